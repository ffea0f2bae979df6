// Integer codes shared by the compiled kernels (csrc/cpu, csrc/cuda) and their Python
// wrappers (fastcl/kernels/_checks.py, which a test compares against this file).
// Plain C++: no CUDA or torch headers, so both host compilers and nvcc include it.
#pragma once

namespace fastcl {

// Element types of θ, grads, logits (kFloat32..kFloat16) and of anchors/weights
// (kFloat32, kBFloat16); kNone = "no tensor" (weights absent: w = 1).
enum DtypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kNone = -1 };

// φ of the anchored penalty: d²/2 or |d|.
enum PenaltyForm : int { kQuadratic = 0, kL1 = 1 };

// What the penalty kernels do with the gradient list.
//   kValueOnly:  grads absent, only the value is computed
//   kAccumulate: grads[t] += s·w·φ'(θ−a)
//   kStore:      grads[t]  = s·w·φ'(θ−a)   (grads not read: may be uninitialised memory)
enum GradMode : int { kValueOnly = 0, kAccumulate = 1, kStore = 2 };

}  // namespace fastcl
