// The ISA variants of the distillation kernel (see distill_impl.inc), one per translation unit.
#pragma once

#include <cstdint>

namespace fastcl {
#define FASTCL_DECLARE_DISTILL(NS)                                                                   \
    namespace NS {                                                                                   \
    void distill(const void* student, const void* teacher, const uint8_t* mask, float* row_loss,    \
                 void* grad, int64_t rows, int64_t vocab, int dtype, double temperature,             \
                 double grad_scale, int num_threads);                                                \
    }
FASTCL_DECLARE_DISTILL(isa_baseline)
FASTCL_DECLARE_DISTILL(isa_avx2)
FASTCL_DECLARE_DISTILL(isa_avx512)
#undef FASTCL_DECLARE_DISTILL
}  // namespace fastcl

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTCL_X86_DISPATCH 1
#else
#define FASTCL_X86_DISPATCH 0
#endif
