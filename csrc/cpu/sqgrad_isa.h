// The ISA variants of the sqgrad kernel (see sqgrad_impl.inc), one per translation unit.
#pragma once

#include <cstdint>

#include "distill_isa.h"  // FASTCL_X86_DISPATCH

namespace fastcl {
#define FASTCL_DECLARE_SQGRAD(NS)                                                                          \
    namespace NS {                                                                                         \
    void sqgrad(const void* x, const void* g, float* out, int64_t B, int64_t T, int64_t I, int64_t O,      \
                const int64_t* x_strides, const int64_t* g_strides, int dtype, int power, int num_threads); \
    }
FASTCL_DECLARE_SQGRAD(sqgrad_baseline)
FASTCL_DECLARE_SQGRAD(sqgrad_avx2)
FASTCL_DECLARE_SQGRAD(sqgrad_avx512)
#undef FASTCL_DECLARE_SQGRAD
}  // namespace fastcl
