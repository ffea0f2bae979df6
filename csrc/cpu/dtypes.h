// Storage types of the CPU kernels and their conversions to and from float.
//
// bfloat16 and float16 are converted with integer bit manipulation only, written
// branch-free so that gcc/clang auto-vectorise the loops that use them (no F16C or
// AVX-512 BF16 needed; the wheel targets baseline x86-64-v2 and other architectures).
// Rounding is round-to-nearest-even, NaN stays NaN, overflow goes to infinity: the
// same results as torch's .to(torch.bfloat16) / .to(torch.float16).
#pragma once

#include <cstdint>
#include <cstring>

#include "codes.h"  // csrc/common: DtypeCode (kFloat32, kBFloat16, kFloat16, kNone)

namespace fastcl {

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// cond ? a : b, written with masks so that vectorisers see no control flow.
inline uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
    const uint32_t m = 0u - uint32_t(cond);
    return (a & m) | (b & ~m);
}

inline float select_float(bool cond, float a, float b) {
    return bits_float(select_bits(cond, float_bits(a), float_bits(b)));
}

struct F32 {
    using storage = float;
    static inline float load(float x) { return x; }
    static inline float store(float x) { return x; }
};

struct BF16 {
    using storage = uint16_t;
    static inline float load(uint16_t x) { return bits_float(uint32_t(x) << 16); }
    static inline uint16_t store(float f) {
        const uint32_t u = float_bits(f);
        const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
        return uint16_t(select_bits(is_nan, 0x7FC0u, rounded));
    }
};

struct F16 {
    using storage = uint16_t;
    static inline float load(uint16_t h) {
        const uint32_t sign = uint32_t(h & 0x8000u) << 16;
        const uint32_t em = h & 0x7FFFu;                        // exponent and mantissa
        const uint32_t normal = (em << 13) + (112u << 23);       // re-bias 15 -> 127
        const uint32_t inf_nan = (em << 13) | 0x7F800000u;
        const uint32_t subnormal = float_bits(float(int32_t(em)) * 5.9604644775390625e-8f);  // m * 2^-24
        const uint32_t r = select_bits(em >= 0x7C00u, inf_nan, select_bits(em < 0x0400u, subnormal, normal));
        return bits_float(r | sign);
    }
    static inline uint16_t store(float f) {
        uint32_t u = float_bits(f);
        const uint32_t sign = u & 0x80000000u;
        u ^= sign;
        // |f| >= 65520 (rounds to inf) or inf/nan
        const uint32_t big = select_bits(u > 0x7F800000u, 0x7E00u, 0x7C00u);
        // |f| < 2^-14: let the FPU round into the subnormal range by adding 0.5
        const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
        const uint32_t small = float_bits(bits_float(u) + bits_float(denorm_magic)) - denorm_magic;
        // normal range: re-bias and round the mantissa to nearest even
        const uint32_t mant_odd = (u >> 13) & 1u;
        const uint32_t normal = (u + (uint32_t(15 - 127) << 23) + 0xFFFu + mant_odd) >> 13;
        const uint32_t o = select_bits(u >= (143u << 23), big, select_bits(u < (113u << 23), small, normal));
        return uint16_t(o | (sign >> 16));
    }
};

// "No weights": w = 1.
struct NoW {
    using storage = float;
    static inline float load(float) { return 1.0f; }
};

}  // namespace fastcl
