// From the runtime codes of codes.h to one instantiation of a penalty kernel template: the
// one ladder for the CPU and CUDA kernels. Each backend brings its element types (host
// conversions in csrc/cpu/dtypes.h, device intrinsics in csrc/cuda/penalty.cu) and says
// how to instantiate its kernel:
//
//   struct Pick {
//       using Result = <a function pointer type>;
//       using F32 = ...; using BF16 = ...; using F16 = ...; using NoW = ...;   // NoW: no weights
//       template <class P, class A, class W, int FORM, int MODE> static Result get();
//   };
//   Pick::Result fn = pick_penalty<Pick>(param_dtype, anchor_dtype, weight_dtype, form, grad_mode);
//
// θ/grads take F32, BF16 or F16; anchors F32 or BF16; weights NoW (kNone), F32 or BF16.
// Any other code gives nullptr.
#pragma once

#include "codes.h"

namespace fastcl {
namespace penalty_dispatch {

template <class Pick, class P, class A, class W, int FORM>
typename Pick::Result with_mode(int mode) {
    switch (mode) {
        case kValueOnly: return Pick::template get<P, A, W, FORM, kValueOnly>();
        case kAccumulate: return Pick::template get<P, A, W, FORM, kAccumulate>();
        case kStore: return Pick::template get<P, A, W, FORM, kStore>();
    }
    return nullptr;
}

template <class Pick, class P, class A, class W>
typename Pick::Result with_form(int form, int mode) {
    switch (form) {
        case kQuadratic: return with_mode<Pick, P, A, W, kQuadratic>(mode);
        case kL1: return with_mode<Pick, P, A, W, kL1>(mode);
    }
    return nullptr;
}

template <class Pick, class P, class A>
typename Pick::Result with_weight(int weight_dtype, int form, int mode) {
    switch (weight_dtype) {
        case kNone: return with_form<Pick, P, A, typename Pick::NoW>(form, mode);
        case kFloat32: return with_form<Pick, P, A, typename Pick::F32>(form, mode);
        case kBFloat16: return with_form<Pick, P, A, typename Pick::BF16>(form, mode);
    }
    return nullptr;
}

template <class Pick, class P>
typename Pick::Result with_anchor(int anchor_dtype, int weight_dtype, int form, int mode) {
    switch (anchor_dtype) {
        case kFloat32: return with_weight<Pick, P, typename Pick::F32>(weight_dtype, form, mode);
        case kBFloat16: return with_weight<Pick, P, typename Pick::BF16>(weight_dtype, form, mode);
    }
    return nullptr;
}

}  // namespace penalty_dispatch

template <class Pick>
typename Pick::Result pick_penalty(int param_dtype, int anchor_dtype, int weight_dtype, int form, int mode) {
    using namespace penalty_dispatch;
    switch (param_dtype) {
        case kFloat32: return with_anchor<Pick, typename Pick::F32>(anchor_dtype, weight_dtype, form, mode);
        case kBFloat16: return with_anchor<Pick, typename Pick::BF16>(anchor_dtype, weight_dtype, form, mode);
        case kFloat16: return with_anchor<Pick, typename Pick::F16>(anchor_dtype, weight_dtype, form, mode);
    }
    return nullptr;
}

}  // namespace fastcl
