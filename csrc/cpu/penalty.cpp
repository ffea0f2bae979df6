// Anchored penalty over a list of tensors, value and gradient in one memory pass.
//
//   value    = scale · Σ_t Σ_k w·φ(θ−a),   φ(d) = d²/2 (quadratic) or |d| (l1)
//   grad_t  += scale · w · φ'(θ−a)          (kAccumulate)
//   grad_t   = scale · w · φ'(θ−a)          (kStore: the gradient is not read)
//
// Work is cut into items of at most kPenaltyChunk elements of one tensor. OpenMP
// threads take items; each item's partial sum is kept in its own slot and the slots are
// added in item order afterwards, so the value is bitwise the same for any thread count.
// Within an item, kLanes independent float accumulators (a fixed summation order) let
// the compiler vectorise the loop without -ffast-math. The per-element math (φ, φ') is
// csrc/common/penalty_math.h, shared with the CUDA kernel.
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "dtypes.h"
#include "kernels.h"
#include "pages.h"
#include "penalty_dispatch.h"
#include "penalty_math.h"

namespace fastcl {
namespace {

constexpr int kLanes = 16;

struct WorkItem {
    int64_t tensor;
    int64_t offset;
    int64_t length;
};

template <class W>
inline float weight_at(const typename W::storage* __restrict w, int64_t i) {
    if constexpr (std::is_same_v<W, NoW>) return 1.0f;
    else return W::load(w[i]);
}

// One element: adds w·φ(d) to acc and writes the gradient (per MODE).
template <class P, class A, class W, int FORM, int MODE>
inline void penalty_element(const typename P::storage* __restrict p, const typename A::storage* __restrict a,
                            const typename W::storage* __restrict w, typename P::storage* __restrict g,
                            int64_t i, float s, float& acc) {
    const float d = P::load(p[i]) - A::load(a[i]);
    const float wv = weight_at<W>(w, i);
    acc += wv * penalty_phi<FORM>(d);
    if constexpr (MODE != kValueOnly) {
        const float old = MODE == kAccumulate ? P::load(g[i]) : 0.0f;
        g[i] = P::store(penalty_grad<MODE>(old, s * wv * penalty_dphi<FORM>(d)));
    }
}

// Σ w·φ(θ−a) over n elements (φ without the 1/2), and the gradient per MODE.
template <class P, class A, class W, int FORM, int MODE>
double penalty_item(const typename P::storage* __restrict p, const typename A::storage* __restrict a,
                    const typename W::storage* __restrict w, typename P::storage* __restrict g,
                    int64_t n, float s) {
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) penalty_element<P, A, W, FORM, MODE>(p, a, w, g, i + l, s, acc[l]);
    }
    for (int l = 0; i < n; ++i, ++l) penalty_element<P, A, W, FORM, MODE>(p, a, w, g, i, s, acc[l]);
    double total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += acc[l];
    return total;
}

template <class P, class A, class W, int FORM, int MODE>
double penalty_list(const void* const* params, const void* const* anchors, const void* const* weights,
                    void* const* grads, const std::vector<WorkItem>& items, float s, int num_threads) {
    using PS = typename P::storage;
    using AS = typename A::storage;
    using WS = typename W::storage;
    const int64_t n_items = int64_t(items.size());
    std::vector<double> partial(size_t(n_items), 0.0);
    double* out = partial.data();
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && n_items > 1)
    for (int64_t k = 0; k < n_items; ++k) {
        const WorkItem it = items[size_t(k)];
        const PS* p = static_cast<const PS*>(params[it.tensor]) + it.offset;
        const AS* a = static_cast<const AS*>(anchors[it.tensor]) + it.offset;
        const WS* w = weights ? static_cast<const WS*>(weights[it.tensor]) + it.offset : nullptr;
        PS* g = MODE != kValueOnly ? static_cast<PS*>(grads[it.tensor]) + it.offset : nullptr;
        out[k] = penalty_item<P, A, W, FORM, MODE>(p, a, w, g, it.length, s);
    }
    double total = 0.0;
    for (int64_t k = 0; k < n_items; ++k) total += out[k];
    return total;
}

using ListFn = double (*)(const void* const*, const void* const*, const void* const*, void* const*,
                          const std::vector<WorkItem>&, float, int);

struct Pick {
    using Result = ListFn;
    using F32 = fastcl::F32;
    using BF16 = fastcl::BF16;
    using F16 = fastcl::F16;
    using NoW = fastcl::NoW;
    template <class P, class A, class W, int FORM, int MODE>
    static Result get() { return penalty_list<P, A, W, FORM, MODE>; }
};

}  // namespace

double penalty_cpu(int64_t num_tensors, const void* const* params, const void* const* anchors,
                   const void* const* weights, void* const* grads, const int64_t* sizes,
                   int param_dtype, int anchor_dtype, int weight_dtype, int form, int grad_mode,
                   double scale, int num_threads) {
    if (weights == nullptr) weight_dtype = kNone;
    if (weight_dtype == kNone) weights = nullptr;
    if (grad_mode != kValueOnly && grads == nullptr)
        throw std::invalid_argument("penalty: grad mode 1 (accumulate) and 2 (store) need grads");
    const ListFn fn = pick_penalty<Pick>(param_dtype, anchor_dtype, weight_dtype, form, grad_mode);
    if (fn == nullptr)
        throw std::invalid_argument("penalty: codes out of range (param dtype 0..2, anchor dtype 0..1, "
                                    "weight dtype -1..1, form 0..1, grad mode 0..2; see csrc/common/codes.h)");
    std::vector<WorkItem> items;
    for (int64_t t = 0; t < num_tensors; ++t) {
        if (sizes[t] < 0) throw std::invalid_argument("penalty: sizes must be >= 0");
        for (int64_t off = 0; off < sizes[t]; off += kPenaltyChunk)
            items.push_back({t, off, sizes[t] - off < kPenaltyChunk ? sizes[t] - off : kPenaltyChunk});
    }
    if (items.empty()) return 0.0;
    if (grad_mode == kStore) {  // store mode writes fresh buffers: fault them in as huge pages
        const size_t element = param_dtype == kFloat32 ? 4 : 2;
        for (int64_t t = 0; t < num_tensors; ++t) advise_huge_pages(grads[t], size_t(sizes[t]) * element);
    }
    // a thread per kPenaltyGrain elements at most: a short list is not worth an OpenMP fork/join
    // (the value does not depend on the thread count, whatever it is)
    int64_t total = 0;
    for (int64_t t = 0; t < num_tensors; ++t) total += sizes[t];
    const int64_t useful = (total + kPenaltyGrain - 1) / kPenaltyGrain;
    const int threads = int(num_threads < 1 ? 1 : (useful < num_threads ? useful : num_threads));
    const double sum = fn(params, anchors, weights, grads, items, float(scale), threads);
    return penalty_value_factor(form, scale) * sum;
}

}  // namespace fastcl
