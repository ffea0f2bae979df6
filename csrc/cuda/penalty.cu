// Anchored penalty over a list of tensors on the GPU, value and gradient in one pass.
//
//   value   = scale · Σ_t Σ_k w·φ(θ−a),   φ(d) = d²/2 (quadratic) or |d| (l1)
//   grad_t += scale · w · φ'(θ−a)
//
// Multi-tensor launch: the tensor list travels in the kernel arguments (a TensorTable of
// up to kMaxTensors addresses and sizes plus a block -> (tensor, chunk) map of up to
// kMaxBlocks entries); a list that does not fit is covered by several launches. Each
// block handles one chunk of kChunk elements of one tensor, reads 4 elements per load
// when every pointer allows it, and writes its partial sum to partials[global chunk
// index]. A one-block cleanup kernel adds the partials in a fixed order: the value is
// deterministic, with no floating-point atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace {

constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;
constexpr int kVec = 4;
constexpr int64_t kChunk = fastcl_cuda_penalty_chunk;

enum Kind : int { kQuadratic = 0, kL1 = 1 };

struct TensorTable {
    const void* params[kMaxTensors];
    const void* anchors[kMaxTensors];
    const void* weights[kMaxTensors];
    void* grads[kMaxTensors];
    int64_t sizes[kMaxTensors];
    unsigned char block_tensor[kMaxBlocks];
    int block_chunk[kMaxBlocks];
    int64_t first_partial;  // partials index of this launch's block 0
};
static_assert(sizeof(TensorTable) < 4000, "kernel arguments are limited to 4 KiB");

struct F32 {
    using storage = float;
    __device__ static float load(float x) { return x; }
    __device__ static float store(float x) { return x; }
};
struct BF16 {
    using storage = __nv_bfloat16;
    __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
struct F16 {
    using storage = __half;
    __device__ static float load(__half x) { return __half2float(x); }
    __device__ static __half store(float x) { return __float2half_rn(x); }
};
struct NoW {
    using storage = float;
};

template <class T>
struct alignas(sizeof(typename T::storage) * kVec) Pack {
    typename T::storage v[kVec];
};

template <class W>
__device__ __forceinline__ float weight_at(const typename W::storage* w, int64_t i) {
    if constexpr (std::is_same<W, NoW>::value) return 1.0f;
    else return W::load(w[i]);
}

template <int KIND>
__device__ __forceinline__ float phi(float d) {
    return KIND == kQuadratic ? d * d : fabsf(d);
}

template <int KIND>
__device__ __forceinline__ float dphi(float d) {
    return KIND == kQuadratic ? d : float(d > 0.0f) - float(d < 0.0f);
}

__device__ __forceinline__ bool aligned(const void* p, int bytes) {
    return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

template <class P, class A, class W, int KIND>
__global__ void __launch_bounds__(kThreads) penalty_kernel(TensorTable table, float* __restrict__ partials, float scale, bool with_grad) {
    using PS = typename P::storage;
    using AS = typename A::storage;
    using WS = typename W::storage;
    constexpr bool kHasW = !std::is_same<W, NoW>::value;
    const int t = table.block_tensor[blockIdx.x];
    const int64_t start = int64_t(table.block_chunk[blockIdx.x]) * kChunk;
    const int64_t n = min(kChunk, table.sizes[t] - start);
    const PS* __restrict__ p = static_cast<const PS*>(table.params[t]) + start;
    const AS* __restrict__ a = static_cast<const AS*>(table.anchors[t]) + start;
    const WS* __restrict__ w = kHasW ? static_cast<const WS*>(table.weights[t]) + start : nullptr;
    PS* __restrict__ g = with_grad ? static_cast<PS*>(table.grads[t]) + start : nullptr;

    float acc = 0.0f;
    const bool vec_ok = aligned(p, sizeof(PS) * kVec) && aligned(a, sizeof(AS) * kVec) &&
                        aligned(w, sizeof(WS) * kVec) && aligned(g, sizeof(PS) * kVec);
    const int64_t n_vec = vec_ok ? n / kVec : 0;
    for (int64_t v = threadIdx.x; v < n_vec; v += kThreads) {
        const Pack<P> pv = reinterpret_cast<const Pack<P>*>(p)[v];
        const Pack<A> av = reinterpret_cast<const Pack<A>*>(a)[v];
        Pack<W> wv;
        if constexpr (kHasW) wv = reinterpret_cast<const Pack<W>*>(w)[v];
        float slope[kVec], wf[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            const float d = P::load(pv.v[j]) - A::load(av.v[j]);
            wf[j] = weight_at<W>(wv.v, j);
            acc += wf[j] * phi<KIND>(d);
            slope[j] = dphi<KIND>(d);
        }
        if (with_grad) {
            Pack<P> gv = reinterpret_cast<const Pack<P>*>(g)[v];
#pragma unroll
            for (int j = 0; j < kVec; ++j) gv.v[j] = P::store(P::load(gv.v[j]) + scale * wf[j] * slope[j]);
            reinterpret_cast<Pack<P>*>(g)[v] = gv;
        }
    }
    for (int64_t i = n_vec * kVec + threadIdx.x; i < n; i += kThreads) {
        const float d = P::load(p[i]) - A::load(a[i]);
        const float wf = weight_at<W>(w, i);
        acc += wf * phi<KIND>(d);
        if (with_grad) g[i] = P::store(P::load(g[i]) + scale * wf * dphi<KIND>(d));
    }

    // fixed-shape block reduction: warp shuffles, then the first warp over warp sums
    __shared__ float warp_sums[kThreads / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        float s = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
        if (threadIdx.x == 0) partials[table.first_partial + blockIdx.x] = s;
    }
}

// out[0] = factor · Σ partials, summed in double in an order fixed by n alone.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* __restrict__ partials, int64_t n, double factor, float* __restrict__ out) {
    __shared__ double sums[kThreads];
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) s += partials[i];
    sums[threadIdx.x] = s;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width >>= 1) {
        if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = float(factor * sums[0]);
}

template <class P, class A, class W, int KIND>
cudaError_t launch_list(int64_t num_tensors, const void* const* params, const void* const* anchors,
                        const void* const* weights, void* const* grads, const int64_t* sizes,
                        float scale, float* partials, cudaStream_t stream) {
    TensorTable table{};
    int n_tensors = 0, n_blocks = 0;
    auto launch = [&]() -> cudaError_t {
        if (n_blocks == 0) return cudaSuccess;
        penalty_kernel<P, A, W, KIND><<<n_blocks, kThreads, 0, stream>>>(table, partials, scale, grads != nullptr);
        table.first_partial += n_blocks;
        n_blocks = 0;
        return cudaGetLastError();
    };
    for (int64_t t = 0; t < num_tensors; ++t) {
        if (sizes[t] <= 0) continue;
        if (n_tensors == kMaxTensors) {
            if (cudaError_t e = launch(); e != cudaSuccess) return e;
            n_tensors = 0;
        }
        int slot = n_tensors++;
        table.params[slot] = params[t];
        table.anchors[slot] = anchors[t];
        table.weights[slot] = weights ? weights[t] : nullptr;
        table.grads[slot] = grads ? grads[t] : nullptr;
        table.sizes[slot] = sizes[t];
        const int64_t chunks = (sizes[t] + kChunk - 1) / kChunk;
        for (int64_t c = 0; c < chunks; ++c) {
            table.block_tensor[n_blocks] = static_cast<unsigned char>(slot);
            table.block_chunk[n_blocks] = static_cast<int>(c);
            if (++n_blocks < kMaxBlocks) continue;
            if (cudaError_t e = launch(); e != cudaSuccess) return e;
            n_tensors = 0;
            if (c + 1 < chunks) {  // the rest of this tensor goes on in slot 0 of the next launch
                table.params[0] = table.params[slot];
                table.anchors[0] = table.anchors[slot];
                table.weights[0] = table.weights[slot];
                table.grads[0] = table.grads[slot];
                table.sizes[0] = table.sizes[slot];
                slot = 0;
                n_tensors = 1;
            }
        }
    }
    return launch();
}

using LaunchFn = cudaError_t (*)(int64_t, const void* const*, const void* const*, const void* const*,
                                 void* const*, const int64_t*, float, float*, cudaStream_t);

template <class P, class A, class W>
LaunchFn pick_kind(int kind) {
    return kind == kQuadratic ? launch_list<P, A, W, kQuadratic> : launch_list<P, A, W, kL1>;
}

template <class P, class A>
LaunchFn pick_weight(int weight_dtype, int kind) {
    switch (weight_dtype) {
        case -1: return pick_kind<P, A, NoW>(kind);
        case 0: return pick_kind<P, A, F32>(kind);
        case 1: return pick_kind<P, A, BF16>(kind);
    }
    return nullptr;
}

template <class P>
LaunchFn pick_anchor(int anchor_dtype, int weight_dtype, int kind) {
    switch (anchor_dtype) {
        case 0: return pick_weight<P, F32>(weight_dtype, kind);
        case 1: return pick_weight<P, BF16>(weight_dtype, kind);
    }
    return nullptr;
}

LaunchFn pick(int param_dtype, int anchor_dtype, int weight_dtype, int kind) {
    if (kind != kQuadratic && kind != kL1) return nullptr;
    switch (param_dtype) {
        case 0: return pick_anchor<F32>(anchor_dtype, weight_dtype, kind);
        case 1: return pick_anchor<BF16>(anchor_dtype, weight_dtype, kind);
        case 2: return pick_anchor<F16>(anchor_dtype, weight_dtype, kind);
    }
    return nullptr;
}

}  // namespace

extern "C" int64_t fastcl_cuda_penalty_num_partials(int64_t num_tensors, const int64_t* sizes) {
    int64_t n = 0;
    for (int64_t t = 0; t < num_tensors; ++t) n += sizes[t] > 0 ? (sizes[t] + kChunk - 1) / kChunk : 0;
    return n;
}

extern "C" int fastcl_cuda_penalty(int64_t num_tensors, const void* const* params, const void* const* anchors,
                                   const void* const* weights, void* const* grads, const int64_t* sizes,
                                   int param_dtype, int anchor_dtype, int weight_dtype, int kind, double scale,
                                   float* partials, int64_t num_partials, float* out, int device, void* stream) {
    if (weights == nullptr) weight_dtype = -1;
    if (weight_dtype == -1) weights = nullptr;
    const LaunchFn fn = pick(param_dtype, anchor_dtype, weight_dtype, kind);
    if (fn == nullptr) return int(cudaErrorInvalidValue);
    if (num_partials != fastcl_cuda_penalty_num_partials(num_tensors, sizes)) return int(cudaErrorInvalidValue);
    for (int64_t t = 0; t < num_tensors; ++t)
        if (sizes[t] > int64_t(kChunk) * 0x7FFFFFFF) return int(cudaErrorInvalidValue);
    int previous = -1;
    if (cudaError_t e = cudaGetDevice(&previous); e != cudaSuccess) return int(e);
    if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return int(e);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t e = fn(num_tensors, params, anchors, weights, grads, sizes, float(scale), partials, s);
    if (e == cudaSuccess) {
        const double factor = (kind == kQuadratic ? 0.5 : 1.0) * scale;
        sum_partials_kernel<<<1, kThreads, 0, s>>>(partials, num_partials, factor, out);
        e = cudaGetLastError();
    }
    if (previous != device) cudaSetDevice(previous);
    return int(e);
}

extern "C" int fastcl_cuda_device_count(int* count) {
    *count = 0;
    return int(cudaGetDeviceCount(count));
}

extern "C" const char* fastcl_cuda_error_string(int code) {
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
