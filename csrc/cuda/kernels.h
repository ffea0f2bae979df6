// C interface of the CUDA kernels (csrc/cuda/*.cu), so that the pybind11 bindings are
// compiled by the host C++ compiler without CUDA headers. Return values are cudaError_t
// codes (0 = success); fastcl_cuda_error_string names them. Dtype, form and grad-mode
// codes: csrc/common/codes.h.
#pragma once

#include <cstdint>

// Elements per chunk of the penalty: the unit of work a block takes from the list.
constexpr int64_t fastcl_cuda_penalty_chunk = 1 << 15;

extern "C" {

// Length of the partials buffer fastcl_cuda_penalty needs on a device with `num_sms` SMs.
int64_t fastcl_cuda_penalty_max_partials(int num_sms);

// out[0] = scale · Σ w·φ(θ−a) (float32); grad_mode 1: grads += scale·w·φ'(θ−a), 2: grads =
// scale·w·φ'(θ−a) (grads not read), 0: value only. Asynchronous on `stream` of `device`:
// one persistent-grid launch and one reduction launch, whatever the list.
//
// `table`: device int64 array describing the n = num_tensors tensors (all on `device`):
//   [0, n) θ addresses · [n, 2n) anchor addresses · [2n, 3n) weight addresses (unused
//   without weights) · [3n, 4n) grad addresses (unused for value only) · [4n, 5n) element
//   counts · [5n, 6n + 1) first chunk of each tensor, then num_chunks (a prefix sum of
//   ceil(count / fastcl_cuda_penalty_chunk)).
// weight_dtype -1 means w = 1. partials: device float32 scratch of max_partials elements
// (fastcl_cuda_penalty_max_partials of the device's SM count or more).
int fastcl_cuda_penalty(const int64_t* table, int64_t num_tensors, int64_t num_chunks, int param_dtype,
                        int anchor_dtype, int weight_dtype, int form, int grad_mode, double scale,
                        float* partials, int64_t max_partials, float* out, int device, void* stream);

// Number of CUDA devices this extension's (statically linked) runtime sees; an error
// code here (e.g. a driver older than the toolkit) means the kernels cannot run.
int fastcl_cuda_device_count(int* count);

// Streaming multiprocessors of `device`.
int fastcl_cuda_multiprocessor_count(int device, int* count);

const char* fastcl_cuda_error_string(int code);

}
