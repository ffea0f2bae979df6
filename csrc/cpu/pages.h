// Memory-page helpers of the CPU kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastcl {

// A fresh output buffer (torch.empty of a large tensor) is a fresh mapping whose every
// 4 KiB page faults on first write, which costs about as much as a memory-bound kernel
// writing it. Transparent huge pages (where the kernel offers them on request) cut the
// faults 512-fold, as NumPy does for its large arrays. Only the 2 MiB-aligned interior is
// advised; pages already in use are unaffected, and a refusal changes nothing.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)data;
    (void)bytes;
#endif
}

}  // namespace fastcl
