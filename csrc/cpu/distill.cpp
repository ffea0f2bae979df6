// Distillation kernel, baseline ISA, and the run-time choice among the ISA variants.
#include "distill_isa.h"

#include <cstddef>
#include <stdexcept>

#include "pages.h"

#define FASTCL_DISTILL_NS isa_baseline
#include "distill_impl.inc"

namespace fastcl {

namespace {
// 0: baseline, 1: AVX2 + FMA, 2: AVX-512 (F, BW, VL, DQ). Decided once.
int detect_isa() {
#if FASTCL_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

}  // namespace

int distill_isa() {
    static const int isa = detect_isa();
    return isa;
}

void distill_cpu(const void* student, const void* teacher, const uint8_t* mask, float* row_loss,
                 void* grad, int64_t rows, int64_t vocab, int dtype, double temperature,
                 double grad_scale, int num_threads, int isa) {
    if (isa > distill_isa()) throw std::invalid_argument("distill: this CPU does not support the requested ISA variant");
    const size_t element = dtype == kFloat32 ? 4 : (dtype == kBFloat16 || dtype == kFloat16) ? 2 : 0;
    if (rows > 0 && vocab > 0) advise_huge_pages(grad, size_t(rows) * size_t(vocab) * element);
    switch (isa < 0 ? distill_isa() : isa) {
        case 2: return isa_avx512::distill(student, teacher, mask, row_loss, grad, rows, vocab, dtype, temperature, grad_scale, num_threads);
        case 1: return isa_avx2::distill(student, teacher, mask, row_loss, grad, rows, vocab, dtype, temperature, grad_scale, num_threads);
        default: return isa_baseline::distill(student, teacher, mask, row_loss, grad, rows, vocab, dtype, temperature, grad_scale, num_threads);
    }
}

}  // namespace fastcl
