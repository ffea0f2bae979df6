// The per-element math of the anchored penalty, one definition for the CPU and CUDA kernels.
//
//   value   = scale · Σ w·φ(θ−a),    φ(d) = d²/2 (kQuadratic) or |d| (kL1)
//   grad    = scale · w · φ'(θ−a),   φ'(d) = d or sign(d) (0 at d = 0)
//
// penalty_phi leaves out the 1/2 of d²/2: kernels apply penalty_value_factor() once to the
// final sum instead of once per element.
#pragma once

#include <math.h>

#include "codes.h"

#if defined(__CUDACC__)
#define FASTCL_HD __host__ __device__ __forceinline__
#else
#define FASTCL_HD inline
#endif

namespace fastcl {

template <int FORM>
FASTCL_HD float penalty_phi(float d) {
    return FORM == kQuadratic ? d * d : fabsf(d);
}

template <int FORM>
FASTCL_HD float penalty_dphi(float d) {
    return FORM == kQuadratic ? d : float(d > 0.0f) - float(d < 0.0f);
}

// The factor that turns Σ w·penalty_phi into the value: scale/2 (quadratic) or scale (l1).
FASTCL_HD double penalty_value_factor(int form, double scale) {
    return (form == kQuadratic ? 0.5 : 1.0) * scale;
}

// New gradient element from the old one (ignored unless MODE is kAccumulate) and the step.
template <int MODE>
FASTCL_HD float penalty_grad(float old, float step) {
    return MODE == kAccumulate ? old + step : step;
}

}  // namespace fastcl
