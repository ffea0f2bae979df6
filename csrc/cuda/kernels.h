// C interface of the CUDA kernels (csrc/cuda/*.cu), so that the pybind11 bindings are
// compiled by the host C++ compiler without CUDA headers. Return values are cudaError_t
// codes (0 = success); fastcl_cuda_error_string names them.
#pragma once

#include <cstdint>

// Elements per block of the penalty kernel: one partial sum per chunk of each tensor.
constexpr int64_t fastcl_cuda_penalty_chunk = 1 << 15;

extern "C" {

// Σ_t ceil(sizes[t] / chunk): the length of the partials buffer fastcl_cuda_penalty needs.
int64_t fastcl_cuda_penalty_num_partials(int64_t num_tensors, const int64_t* sizes);

// out[0] = scale · Σ w·φ(θ−a) (float32), grads += scale·w·φ'(θ−a) if grads != nullptr,
// all on `stream` of `device`. Dtype codes: 0 float32, 1 bfloat16, 2 float16; weight
// code -1 (or weights == nullptr) means w = 1. kind 0 = quadratic, 1 = l1. partials:
// device float32 buffer of fastcl_cuda_penalty_num_partials(...) elements (scratch).
int fastcl_cuda_penalty(int64_t num_tensors, const void* const* params, const void* const* anchors,
                        const void* const* weights, void* const* grads, const int64_t* sizes,
                        int param_dtype, int anchor_dtype, int weight_dtype, int kind, double scale,
                        float* partials, int64_t num_partials, float* out, int device, void* stream);

// Number of CUDA devices this extension's (statically linked) runtime sees; an error
// code here (e.g. a driver older than the toolkit) means the kernels cannot run.
int fastcl_cuda_device_count(int* count);

const char* fastcl_cuda_error_string(int code);

}
