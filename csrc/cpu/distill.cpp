// Temperature-T distillation, loss and student gradient per row in one kernel.
//
//   p_t = softmax(t/T),  log p_s = log_softmax(s/T)
//   row_loss = T² · Σ_v p_t,v · (log p_t,v − log p_s,v)     (terms with p_t,v = 0 are 0)
//   grad     = T · (softmax(s/T) − p_t)
//
// Rows are independent: OpenMP splits them statically. Each row takes three passes
// (maxima, partition functions, outputs) over data that stays in cache; the loops use
// kLanes float accumulators and a branch-free exp so that they vectorise.
#include <cmath>
#include <limits>
#include <stdexcept>

#include "dtypes.h"
#include "kernels.h"

namespace fastcl {
namespace {

constexpr int kLanes = 16;

// exp(x) for x <= ~88, branch-free (Cephes-style range reduction and degree-6 polynomial,
// about 1 ulp); x < -87 gives 0, so exp(-inf) = 0; NaN stays NaN.
inline float exp_approx(float x) {
    const float xc = select_float(x < -87.0f, -87.0f, x);
    // round to nearest by adding and removing 1.5·2^23 (vectorises; floorf does not without -fno-trapping-math)
    const float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (xc - fn * 0.693359375f) - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const float two_n = bits_float(uint32_t(int32_t(fn) + 127) << 23);
    return select_float(x < -87.0f, 0.0f, p * two_n);
}

template <class D>
void distill_row(const typename D::storage* __restrict s, const typename D::storage* __restrict t,
                 typename D::storage* __restrict grad, float* row_loss, int64_t V, float T) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    float ms[kLanes], mt[kLanes];
    for (int l = 0; l < kLanes; ++l) ms[l] = mt[l] = kNegInf;
    int64_t i = 0;
    for (; i + kLanes <= V; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
            const float a = D::load(s[i + l]) / T, b = D::load(t[i + l]) / T;
            ms[l] = a > ms[l] ? a : ms[l];
            mt[l] = b > mt[l] ? b : mt[l];
        }
    }
    for (int l = 0; i < V; ++i, ++l) {
        const float a = D::load(s[i]) / T, b = D::load(t[i]) / T;
        ms[l] = a > ms[l] ? a : ms[l];
        mt[l] = b > mt[l] ? b : mt[l];
    }
    float max_s = kNegInf, max_t = kNegInf;
    for (int l = 0; l < kLanes; ++l) {
        max_s = ms[l] > max_s ? ms[l] : max_s;
        max_t = mt[l] > max_t ? mt[l] : max_t;
    }

    float zs[kLanes] = {}, zt[kLanes] = {};
    i = 0;
    for (; i + kLanes <= V; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
            zs[l] += exp_approx(D::load(s[i + l]) / T - max_s);
            zt[l] += exp_approx(D::load(t[i + l]) / T - max_t);
        }
    }
    for (int l = 0; i < V; ++i, ++l) {
        zs[l] += exp_approx(D::load(s[i]) / T - max_s);
        zt[l] += exp_approx(D::load(t[i]) / T - max_t);
    }
    double sum_s = 0.0, sum_t = 0.0;
    for (int l = 0; l < kLanes; ++l) {
        sum_s += zs[l];
        sum_t += zt[l];
    }
    // log-partition functions shifted by the maxima: log p = x/T − shift
    const float shift_s = max_s + float(std::log(sum_s));
    const float shift_t = max_t + float(std::log(sum_t));

    float kl[kLanes] = {};
    i = 0;
    for (; i + kLanes <= V; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
            const float log_ps = D::load(s[i + l]) / T - shift_s;
            const float log_pt = D::load(t[i + l]) / T - shift_t;
            const float pt = exp_approx(log_pt);
            kl[l] += select_float(pt > 0.0f, pt * (log_pt - log_ps), 0.0f);
            grad[i + l] = D::store(T * (exp_approx(log_ps) - pt));
        }
    }
    for (int l = 0; i < V; ++i, ++l) {
        const float log_ps = D::load(s[i]) / T - shift_s;
        const float log_pt = D::load(t[i]) / T - shift_t;
        const float pt = exp_approx(log_pt);
        kl[l] += select_float(pt > 0.0f, pt * (log_pt - log_ps), 0.0f);
        grad[i] = D::store(T * (exp_approx(log_ps) - pt));
    }
    double total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += kl[l];
    *row_loss = float(double(T) * double(T) * total);
}

template <class D>
void distill_rows(const void* student, const void* teacher, const uint8_t* mask, float* row_loss, void* grad,
                  int64_t R, int64_t V, float T, int num_threads) {
    using S = typename D::storage;
    const S* s = static_cast<const S*>(student);
    const S* t = static_cast<const S*>(teacher);
    S* g = static_cast<S*>(grad);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && R > 1)
    for (int64_t r = 0; r < R; ++r) {
        S* g_row = g + r * V;
        if (mask && !mask[r]) {
            row_loss[r] = 0.0f;
            for (int64_t v = 0; v < V; ++v) g_row[v] = D::store(0.0f);
            continue;
        }
        distill_row<D>(s + r * V, t + r * V, g_row, row_loss + r, V, T);
    }
}

}  // namespace

void distill_cpu(const void* student, const void* teacher, const uint8_t* mask, float* row_loss,
                 void* grad, int64_t rows, int64_t vocab, int dtype, double temperature,
                 int num_threads) {
    if (rows < 0 || vocab < 1) throw std::invalid_argument("distill: need rows >= 0 and vocab >= 1");
    if (!(temperature > 0.0)) throw std::invalid_argument("distill: temperature must be > 0");
    const int nt = num_threads < 1 ? 1 : num_threads;
    const float T = float(temperature);
    switch (dtype) {
        case kFloat32: return distill_rows<F32>(student, teacher, mask, row_loss, grad, rows, vocab, T, nt);
        case kBFloat16: return distill_rows<BF16>(student, teacher, mask, row_loss, grad, rows, vocab, T, nt);
        case kFloat16: return distill_rows<F16>(student, teacher, mask, row_loss, grad, rows, vocab, T, nt);
    }
    throw std::invalid_argument("distill: dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)");
}

}  // namespace fastcl
