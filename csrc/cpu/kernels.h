// CPU kernels of fastcl._C. Raw pointers in, no torch dependency; the Python wrappers in
// fastcl/kernels/cpp.py validate the tensors and build the arguments.
#pragma once

#include <cstdint>

namespace fastcl {

// Elements per work item of the penalty. Work items never straddle tensors; their
// partial sums are added in item order, so the value does not depend on the thread count.
constexpr int64_t kPenaltyChunk = 1 << 16;
// Elements per OpenMP thread at least (shorter lists run on fewer threads).
constexpr int64_t kPenaltyGrain = 1 << 17;

// value = scale · Σ_t Σ_k w·φ(θ−a) (φ = d²/2 for kQuadratic, |d| for kL1);
// grad_mode kAccumulate: grads[t] += scale·w·φ'(θ−a); kStore: grads[t] = scale·w·φ'(θ−a)
// (grads not read); kValueOnly: grads unused (may be nullptr). Grads have θ's dtype.
// weights == nullptr or weight_dtype == kNone means w = 1. Codes: csrc/common/codes.h.
double penalty_cpu(int64_t num_tensors, const void* const* params, const void* const* anchors,
                   const void* const* weights, void* const* grads, const int64_t* sizes,
                   int param_dtype, int anchor_dtype, int weight_dtype, int form, int grad_mode,
                   double scale, int num_threads);

// Per row r of [R, V] logits: row_loss[r] = T²·KL(softmax(t/T) ‖ softmax(s/T)),
// grad[r] = grad_scale·T·(softmax(s/T) − softmax(t/T)) in the logits' dtype; rows with
// mask[r] == 0 (mask may be nullptr) get 0. row_loss is float32 and not scaled. NaN, +inf
// and all −inf rows give NaN (contract in fastcl/ops/distill.py).
// Runs ISA variant `isa` (0 baseline, 1 AVX2+FMA, 2 AVX-512), or with isa = -1 the widest
// the CPU supports (see distill_isa()); asking for one the CPU lacks throws.
void distill_cpu(const void* student, const void* teacher, const uint8_t* mask, float* row_loss,
                 void* grad, int64_t rows, int64_t vocab, int dtype, double temperature,
                 double grad_scale, int num_threads, int isa = -1);

// The distillation variant in use: 0 baseline (x86-64-v2 or non-x86), 1 AVX2+FMA, 2 AVX-512.
int distill_isa();

// out[o, i] += Σ_b |Σ_t g[b,t,o]·x[b,t,i]|^power (power 2 or 1), out [O, I] float32 contiguous;
// x [B, T, I] and g [B, T, O] in `dtype` with element strides x_strides/g_strides (3 each).
// Deterministic for any thread count. isa as for distill_cpu (-1: the widest supported).
void sqgrad_cpu(const void* x, const void* g, float* out, int64_t B, int64_t T, int64_t I, int64_t O,
                const int64_t* x_strides, const int64_t* g_strides, int dtype, int power, int num_threads,
                int isa = -1);

}  // namespace fastcl
