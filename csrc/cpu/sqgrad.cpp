// sqgrad kernel, baseline ISA, and the run-time choice among the ISA variants.
#include "sqgrad_isa.h"

#include <stdexcept>

#include "kernels.h"

#define FASTCL_SQGRAD_NS sqgrad_baseline
#define FASTCL_SQGRAD_WIDTH 4
#define FASTCL_SQGRAD_ROWS 6
#define FASTCL_SQGRAD_SUMS_IN_REGISTERS false
#include "sqgrad_impl.inc"

namespace fastcl {

void sqgrad_cpu(const void* x, const void* g, float* out, int64_t B, int64_t T, int64_t I, int64_t O,
                const int64_t* x_strides, const int64_t* g_strides, int dtype, int power, int num_threads, int isa) {
    if (isa > distill_isa()) throw std::invalid_argument("sqgrad: this CPU does not support the requested ISA variant");
    switch (isa < 0 ? distill_isa() : isa) {
        case 2: return sqgrad_avx512::sqgrad(x, g, out, B, T, I, O, x_strides, g_strides, dtype, power, num_threads);
        case 1: return sqgrad_avx2::sqgrad(x, g, out, B, T, I, O, x_strides, g_strides, dtype, power, num_threads);
        default: return sqgrad_baseline::sqgrad(x, g, out, B, T, I, O, x_strides, g_strides, dtype, power, num_threads);
    }
}

}  // namespace fastcl
