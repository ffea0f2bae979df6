// Anchored penalty over a list of tensors, value and gradient in one memory pass.
//
//   value   = scale · Σ_t Σ_k w·φ(θ−a),   φ(d) = d²/2 (quadratic) or |d| (l1)
//   grad_t += scale · w · φ'(θ−a)
//
// Work is cut into items of at most kPenaltyChunk elements of one tensor. OpenMP
// threads take items; each item's partial sum is kept in its own slot and the slots are
// added in item order afterwards, so the value is bitwise the same for any thread count.
// Within an item, kLanes independent float accumulators (a fixed summation order) let
// the compiler vectorise the loop without -ffast-math.
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "dtypes.h"
#include "kernels.h"

namespace fastcl {
namespace {

constexpr int kLanes = 16;
enum Kind : int { kQuadratic = 0, kL1 = 1 };

struct WorkItem {
    int64_t tensor;
    int64_t offset;
    int64_t length;
};

template <int KIND>
inline float phi(float d) {
    return KIND == kQuadratic ? d * d : std::fabs(d);  // the 1/2 of d²/2 is applied once at the end
}

template <int KIND>
inline float dphi(float d) {
    return KIND == kQuadratic ? d : float(d > 0.0f) - float(d < 0.0f);
}

template <class W>
inline float weight_at(const typename W::storage* __restrict w, int64_t i) {
    if constexpr (std::is_same_v<W, NoW>) return 1.0f;
    else return W::load(w[i]);
}

// Σ w·φ(θ−a) over n elements, and g += s·w·φ'(θ−a) when GRAD.
template <class P, class A, class W, int KIND, bool GRAD>
double penalty_item(const typename P::storage* __restrict p, const typename A::storage* __restrict a,
                    const typename W::storage* __restrict w, typename P::storage* __restrict g,
                    int64_t n, float s) {
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
            const float d = P::load(p[i + l]) - A::load(a[i + l]);
            const float wv = weight_at<W>(w, i + l);
            acc[l] += wv * phi<KIND>(d);
            if (GRAD) g[i + l] = P::store(P::load(g[i + l]) + s * wv * dphi<KIND>(d));
        }
    }
    for (int l = 0; i < n; ++i, ++l) {
        const float d = P::load(p[i]) - A::load(a[i]);
        const float wv = weight_at<W>(w, i);
        acc[l] += wv * phi<KIND>(d);
        if (GRAD) g[i] = P::store(P::load(g[i]) + s * wv * dphi<KIND>(d));
    }
    double total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += acc[l];
    return total;
}

template <class P, class A, class W, int KIND, bool GRAD>
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
        PS* g = GRAD ? static_cast<PS*>(grads[it.tensor]) + it.offset : nullptr;
        out[k] = penalty_item<P, A, W, KIND, GRAD>(p, a, w, g, it.length, s);
    }
    double total = 0.0;
    for (int64_t k = 0; k < n_items; ++k) total += out[k];
    return total;
}

using ListFn = double (*)(const void* const*, const void* const*, const void* const*, void* const*,
                          const std::vector<WorkItem>&, float, int);

template <class P, class A, class W>
ListFn pick_kind(int kind, bool grad) {
    if (kind == kQuadratic) return grad ? penalty_list<P, A, W, kQuadratic, true> : penalty_list<P, A, W, kQuadratic, false>;
    return grad ? penalty_list<P, A, W, kL1, true> : penalty_list<P, A, W, kL1, false>;
}

template <class P, class A>
ListFn pick_weight(int weight_dtype, int kind, bool grad) {
    switch (weight_dtype) {
        case kNone: return pick_kind<P, A, NoW>(kind, grad);
        case kFloat32: return pick_kind<P, A, F32>(kind, grad);
        case kBFloat16: return pick_kind<P, A, BF16>(kind, grad);
    }
    throw std::invalid_argument("penalty: weight dtype code must be -1 (none), 0 (float32) or 1 (bfloat16)");
}

template <class P>
ListFn pick_anchor(int anchor_dtype, int weight_dtype, int kind, bool grad) {
    switch (anchor_dtype) {
        case kFloat32: return pick_weight<P, F32>(weight_dtype, kind, grad);
        case kBFloat16: return pick_weight<P, BF16>(weight_dtype, kind, grad);
    }
    throw std::invalid_argument("penalty: anchor dtype code must be 0 (float32) or 1 (bfloat16)");
}

ListFn pick(int param_dtype, int anchor_dtype, int weight_dtype, int kind, bool grad) {
    if (kind != kQuadratic && kind != kL1) throw std::invalid_argument("penalty: kind code must be 0 (quadratic) or 1 (l1)");
    switch (param_dtype) {
        case kFloat32: return pick_anchor<F32>(anchor_dtype, weight_dtype, kind, grad);
        case kBFloat16: return pick_anchor<BF16>(anchor_dtype, weight_dtype, kind, grad);
        case kFloat16: return pick_anchor<F16>(anchor_dtype, weight_dtype, kind, grad);
    }
    throw std::invalid_argument("penalty: param dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)");
}

}  // namespace

double penalty_cpu(int64_t num_tensors, const void* const* params, const void* const* anchors,
                   const void* const* weights, void* const* grads, const int64_t* sizes,
                   int param_dtype, int anchor_dtype, int weight_dtype, int kind, double scale,
                   int num_threads) {
    if (weights == nullptr) weight_dtype = kNone;
    if (weight_dtype == kNone) weights = nullptr;
    const ListFn fn = pick(param_dtype, anchor_dtype, weight_dtype, kind, grads != nullptr);
    std::vector<WorkItem> items;
    for (int64_t t = 0; t < num_tensors; ++t) {
        if (sizes[t] < 0) throw std::invalid_argument("penalty: sizes must be >= 0");
        for (int64_t off = 0; off < sizes[t]; off += kPenaltyChunk)
            items.push_back({t, off, sizes[t] - off < kPenaltyChunk ? sizes[t] - off : kPenaltyChunk});
    }
    if (items.empty()) return 0.0;
    const double sum = fn(params, anchors, weights, grads, items, float(scale), num_threads < 1 ? 1 : num_threads);
    return (kind == kQuadratic ? 0.5 : 1.0) * scale * sum;
}

}  // namespace fastcl
