// Anchored penalty over a list of tensors on the GPU, value and gradient in one pass.
//
//   value    = scale · Σ_t Σ_k w·φ(θ−a),   φ(d) = d²/2 (quadratic) or |d| (l1)
//   grad_t  += scale · w · φ'(θ−a)          (kAccumulate)
//   grad_t   = scale · w · φ'(θ−a)          (kStore: the gradient is not read)
//
// Two launches for any list: a persistent grid of at most (SMs × resident blocks per SM)
// blocks, then a one-block reduction. The list lives in a device table (built and cached
// by fastcl/kernels/cuda.py, see kernels.h). The tensors are cut into chunks of kChunk
// elements; block b takes chunks b, b + G, b + 2G, … and finds each chunk's tensor by a
// binary search over the table's first-chunk column. A chunk whose four addresses allow
// it is read with 16-byte loads (4 float32 or 8 bfloat16/float16 θ per thread and
// step); an unaligned tensor (a view at an odd offset) takes the scalar loop, alone.
// A thread sums in float within a chunk and in double across chunks; each block writes
// one partial sum; the reduction adds them in double in a fixed order, so the value is
// deterministic for a given device and list (no floating-point atomics).
// The per-element math is csrc/common/penalty_math.h, shared with the CPU kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <type_traits>

#include "codes.h"
#include "kernels.h"
#include "penalty_dispatch.h"
#include "penalty_math.h"

using namespace fastcl;

namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerSM = 2048 / kThreads;  // bound for the partials buffer
constexpr int64_t kChunk = fastcl_cuda_penalty_chunk;
constexpr int kMaxDevices = 64;

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

// N elements of T moved with 16-byte (or, below 16 bytes, one 8/4-byte) memory operations.
template <class T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Vec {
    T v[N];
};

template <class T, int N>
constexpr int kVecAlign = sizeof(T) * N >= 16 ? 16 : int(sizeof(T) * N);

// The raw word type of a memory operation of B bytes.
template <int B>
struct Word;
template <>
struct Word<16> { using type = uint4; };
template <>
struct Word<8> { using type = uint2; };
template <>
struct Word<4> { using type = unsigned; };

// Every access is streaming (each element is read and written once: evict first) and
// explicitly global, so the compiler emits ld/st.global.cs, never generic accesses.
template <class T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
    constexpr int bytes = int(sizeof(T)) * N;
    constexpr int word = bytes >= 16 ? 16 : bytes;
    using W = typename Word<word>::type;
    union {
        W w[bytes / word];
        Vec<T, N> v;
    } u;
#pragma unroll
    for (int k = 0; k < bytes / word; ++k) u.w[k] = __ldcs(reinterpret_cast<const W*>(p) + k);
    return u.v;
}

template <class T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
    static_assert(sizeof(T) * N == 16, "gradients move 16 bytes per step");
    union {
        uint4 w;
        Vec<T, N> v;
    } u;
    u.v = v;
    __stcs(reinterpret_cast<uint4*>(p), u.w);
}

template <class T>
__device__ __forceinline__ T load_one(const T* p) { return __ldcs(p); }

template <class T>
__device__ __forceinline__ void store_one(T* p, T v) { __stcs(p, v); }

__device__ __forceinline__ bool aligned(const void* p, int bytes) {
    return (reinterpret_cast<uintptr_t>(p) % unsigned(bytes)) == 0;
}

// The tensor holding global chunk c: the last t with first[t] <= c (empty tensors own no chunk).
__device__ __forceinline__ int chunk_tensor(const int64_t* __restrict__ first, int n_tensors, int64_t c) {
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (__ldg(first + mid) <= c) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

template <class P, class A, class W, int FORM, int MODE>
__global__ void __launch_bounds__(kThreads) penalty_kernel(const int64_t* __restrict__ table, int n_tensors,
                                                           int64_t n_chunks, float scale, float* __restrict__ partials) {
    using PS = typename P::storage;
    using AS = typename A::storage;
    using WS = typename W::storage;
    constexpr bool kHasW = !std::is_same<W, NoW>::value;
    constexpr int kVec = 16 / int(sizeof(PS));  // θ and grad move 16 bytes per step
    const int64_t* __restrict__ first = table + 5 * int64_t(n_tensors);

    double total = 0.0;  // a thread's sum over its chunks (a float within each chunk)
    for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        float acc = 0.0f;
        const int t = chunk_tensor(first, n_tensors, c);
        const int64_t start = (c - __ldg(first + t)) * kChunk;
        const int64_t size = __ldg(table + 4 * int64_t(n_tensors) + t);
        const int64_t n = min(kChunk, size - start);
        const PS* __restrict__ p = reinterpret_cast<const PS*>(__ldg(table + t)) + start;
        const AS* __restrict__ a = reinterpret_cast<const AS*>(__ldg(table + n_tensors + t)) + start;
        const WS* __restrict__ w = kHasW ? reinterpret_cast<const WS*>(__ldg(table + 2 * int64_t(n_tensors) + t)) + start : nullptr;
        PS* __restrict__ g = MODE != kValueOnly ? reinterpret_cast<PS*>(__ldg(table + 3 * int64_t(n_tensors) + t)) + start : nullptr;

        const bool vec_ok = aligned(p, 16) && aligned(a, kVecAlign<AS, kVec>) &&
                            (!kHasW || aligned(w, kVecAlign<WS, kVec>)) && (MODE == kValueOnly || aligned(g, 16));
        const int64_t n_vec = vec_ok ? n / kVec : 0;
        for (int64_t v = threadIdx.x; v < n_vec; v += kThreads) {
            const Vec<PS, kVec> pv = load_vec<PS, kVec>(p + v * kVec);
            const Vec<AS, kVec> av = load_vec<AS, kVec>(a + v * kVec);
            Vec<WS, kVec> wv;
            if constexpr (kHasW) wv = load_vec<WS, kVec>(w + v * kVec);
            Vec<PS, kVec> gv;
            if constexpr (MODE == kAccumulate) gv = load_vec<PS, kVec>(g + v * kVec);
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                const float d = P::load(pv.v[j]) - A::load(av.v[j]);
                float wf = 1.0f;
                if constexpr (kHasW) wf = W::load(wv.v[j]);
                acc += wf * penalty_phi<FORM>(d);
                if constexpr (MODE != kValueOnly) {
                    const float old = MODE == kAccumulate ? P::load(gv.v[j]) : 0.0f;
                    gv.v[j] = P::store(penalty_grad<MODE>(old, scale * wf * penalty_dphi<FORM>(d)));
                }
            }
            if constexpr (MODE != kValueOnly) store_vec<PS, kVec>(g + v * kVec, gv);
        }
#pragma unroll 1
        for (int64_t i = n_vec * kVec + threadIdx.x; i < n; i += kThreads) {
            const float d = P::load(load_one(p + i)) - A::load(load_one(a + i));
            float wf = 1.0f;
            if constexpr (kHasW) wf = W::load(load_one(w + i));
            acc += wf * penalty_phi<FORM>(d);
            if constexpr (MODE != kValueOnly) {
                const float old = MODE == kAccumulate ? P::load(load_one(g + i)) : 0.0f;
                store_one(g + i, P::store(penalty_grad<MODE>(old, scale * wf * penalty_dphi<FORM>(d))));
            }
        }
        total += acc;
    }

    // fixed-shape block reduction in double: warp shuffles, then the first warp over the warp sums
    __shared__ double warp_sums[kThreads / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) total += __shfl_down_sync(0xffffffffu, total, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = total;
    __syncthreads();
    if (threadIdx.x < 32) {
        double s = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
        if (threadIdx.x == 0) partials[blockIdx.x] = float(s);
    }
}

// out[0] = factor · Σ partials, summed in double in an order fixed by n alone.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* __restrict__ partials, int n, double factor,
                                                                float* __restrict__ out) {
    __shared__ double sums[kThreads];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += kThreads) s += partials[i];
    sums[threadIdx.x] = s;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width >>= 1) {
        if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = float(factor * sums[0]);
}

using Kernel = void (*)(const int64_t*, int, int64_t, float, float*);

// Resident blocks of `kernel` on `device` (SMs × blocks per SM), computed once per pair.
cudaError_t resident_blocks(Kernel kernel, int device, int* out) {
    struct Entry {
        Kernel kernel;
        int blocks;
    };
    static std::mutex mutex;
    static Entry cache[kMaxDevices][128];
    static int used[kMaxDevices];
    if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
    std::lock_guard<std::mutex> lock(mutex);
    for (int i = 0; i < used[device]; ++i)
        if (cache[device][i].kernel == kernel) return (*out = cache[device][i].blocks), cudaSuccess;
    int sms = 0, per_sm = 0;
    if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess) return e;
    if (cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0); e != cudaSuccess) return e;
    per_sm = per_sm < 1 ? 1 : (per_sm > kMaxBlocksPerSM ? kMaxBlocksPerSM : per_sm);
    *out = sms * per_sm;
    if (used[device] < 128) cache[device][used[device]++] = {kernel, *out};
    return cudaSuccess;
}

struct Pick {
    using Result = Kernel;
    using F32 = ::F32;
    using BF16 = ::BF16;
    using F16 = ::F16;
    using NoW = ::NoW;
    template <class P, class A, class W, int FORM, int MODE>
    static Result get() { return penalty_kernel<P, A, W, FORM, MODE>; }
};

}  // namespace

extern "C" int64_t fastcl_cuda_penalty_max_partials(int num_sms) { return int64_t(num_sms) * kMaxBlocksPerSM; }

extern "C" int fastcl_cuda_penalty(const int64_t* table, int64_t num_tensors, int64_t num_chunks, int param_dtype,
                                   int anchor_dtype, int weight_dtype, int form, int grad_mode, double scale,
                                   float* partials, int64_t max_partials, float* out, int device, void* stream) {
    const Kernel kernel = pick_penalty<Pick>(param_dtype, anchor_dtype, weight_dtype, form, grad_mode);
    if (kernel == nullptr || num_tensors < 1 || num_tensors > 0x7FFFFFFF || num_chunks < 0) return int(cudaErrorInvalidValue);
    int previous = -1;
    if (cudaError_t e = cudaGetDevice(&previous); e != cudaSuccess) return int(e);
    if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return int(e);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    int resident = 0;
    cudaError_t e = resident_blocks(kernel, device, &resident);
    if (e == cudaSuccess && resident > max_partials) e = cudaErrorInvalidValue;  // partials buffer too small
    if (e == cudaSuccess) {
        const int grid = int(num_chunks < resident ? num_chunks : resident);
        if (grid > 0) {
            kernel<<<grid, kThreads, 0, s>>>(table, int(num_tensors), num_chunks, float(scale), partials);
            e = cudaGetLastError();
        }
        if (e == cudaSuccess) {
            sum_partials_kernel<<<1, kThreads, 0, s>>>(partials, grid, penalty_value_factor(form, scale), out);
            e = cudaGetLastError();
        }
    }
    if (previous != device) cudaSetDevice(previous);
    return int(e);
}

extern "C" int fastcl_cuda_device_count(int* count) {
    *count = 0;
    return int(cudaGetDeviceCount(count));
}

extern "C" int fastcl_cuda_multiprocessor_count(int device, int* count) {
    *count = 0;
    return int(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device));
}

extern "C" const char* fastcl_cuda_error_string(int code) {
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
