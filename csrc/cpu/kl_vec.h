// SIMD helpers of the kl_penalty and advantages CPU kernels: the common/kl.h math on
// at::vec::Vectorized<float>, and one vectorised pass over a contiguous range of tokens.
//
// Included by csrc/cpu/<op>.cpp, which are compiled once per CPU capability (csrc/cpu/arch), so
// everything here lives in fastrlhf::cpu::<CPU_CAPABILITY>::kl_vec: each copy has its own symbols.
#pragma once

#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "common/kl.h"
#include "cpu/vec_io.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {
namespace kl_vec {

using Vec = at::vec::Vectorized<float>;

using vec_io::kStep;

// k3 and expm1 on SIMD vectors for |u| within the exponent range, by one shared range reduction
// u = k·ln2 + r, |r| <= ln2/2, and q = e^r - 1 - r = r^2·(1/2! + r/3! + ... + r^6/8!) (the first
// omitted term is < 4e-9 of q). Then, with s = 2^k,
//     e^u - 1     = s·(r + q) + (s - 1)
//     e^u - 1 - u = s·q + (s - 1)·r + ((s - 1) - k·ln2)
// At k = 0 (|u| < 0.35) both are r + q and q exactly, so small gaps keep full precision with no series
// select; past it the result is >= 0.05 and no term exceeds ~5x of it. One polynomial and no select,
// instead of common/kl.h's series and an exp side by side: on one core of an Intel Xeon, in L1, k3 went
// from 0.77 to 0.47 ns per element with AVX-512 and from 1.19 to 0.71 with AVX2.
namespace reduced_exp {

// Fast-path range: k = round(u / ln2) stays in [-126, 127], so s is a normal float and s·(1 + r + q)
// does not overflow. Lanes outside it (or NaN) send the whole vector to common/kl.h's form.
constexpr float kLow = -87.0f;
constexpr float kHigh = 88.0f;
// ln 2 split so that k·kLn2Hi is exact for |k| < 2^15 (Cody and Waite).
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kLog2e = 1.44269504088896341f;

struct Parts {
  Vec s_minus_1, s, r, q, k;
};

inline bool in_range(const Vec& u) {
#if defined(CPU_CAPABILITY_AVX512)
  // Two chained mask compares: at::vec's comparisons would first widen each mask to a vector.
  const __mmask16 above_low = _mm512_cmp_ps_mask(u, _mm512_set1_ps(kLow), _CMP_GE_OQ);
  return _mm512_mask_cmp_ps_mask(above_low, u, _mm512_set1_ps(kHigh), _CMP_LE_OQ) == 0xFFFF;
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(u, _mm256_set1_ps(kLow), _CMP_GE_OQ),
                                      _mm256_cmp_ps(u, _mm256_set1_ps(kHigh), _CMP_LE_OQ));
  return _mm256_movemask_ps(inside) == 0xFF;
#else
  // zero_mask flags the lanes whose comparison came out false (out of range, or NaN).
  return ((u >= Vec(kLow)) & (u <= Vec(kHigh))).zero_mask() == 0;
#endif
}

inline Parts split(const Vec& u) {
  Parts p;
  p.k = (u * Vec(kLog2e)).round();
  p.r = at::vec::fmadd(p.k, Vec(-kLn2Lo), at::vec::fmadd(p.k, Vec(-kLn2Hi), u));
  Vec poly(1.0f / 40320.0f);
  poly = at::vec::fmadd(poly, p.r, Vec(1.0f / 5040.0f));
  poly = at::vec::fmadd(poly, p.r, Vec(1.0f / 720.0f));
  poly = at::vec::fmadd(poly, p.r, Vec(1.0f / 120.0f));
  poly = at::vec::fmadd(poly, p.r, Vec(1.0f / 24.0f));
  poly = at::vec::fmadd(poly, p.r, Vec(1.0f / 6.0f));
  poly = at::vec::fmadd(poly, p.r, Vec(0.5f));
  p.q = p.r * p.r * poly;
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec biased = at::vec::convert_to_int_of_same_size(p.k) + IVec(127);
  p.s = at::vec::cast<float>(biased << IVec(23));  // 2^k from its exponent bits
  p.s_minus_1 = p.s - Vec(1.0f);                   // exact: s is a power of 2 in [2^-126, 2^127]
  return p;
}

// e^u - 1 - u and e^u - 1 from u's parts (the header's formulas).
inline Vec k3_of(const Parts& p) {
  const Vec head = at::vec::fmadd(p.k, Vec(-kLn2Lo), at::vec::fmadd(p.k, Vec(-kLn2Hi), p.s_minus_1));
  return at::vec::fmadd(p.s, p.q, at::vec::fmadd(p.s_minus_1, p.r, head));
}
inline Vec expm1_of(const Parts& p) { return at::vec::fmadd(p.s, p.r + p.q, p.s_minus_1); }

}  // namespace reduced_exp

// The common/kl.h policy on SIMD vectors. at::vec::maximum / minimum propagate NaN like
// ScalarKLMath. exp is torch's fast exp_u20 (polynomial, ~2 ulp); the baseline copy maps std::exp per lane.
struct VecKLMath {
  // e^u - 1 - u, >= 0 (k3 at u = -d).
  static Vec k3(const Vec& u) {
    if (!reduced_exp::in_range(u)) return k3_by_series<VecKLMath>(u);
    return reduced_exp::k3_of(reduced_exp::split(u));
  }
  // e^u - 1, accurate near 0.
  static Vec expm1(const Vec& u) {
    if (!reduced_exp::in_range(u)) return expm1_by_series<VecKLMath>(u);
    return reduced_exp::expm1_of(reduced_exp::split(u));
  }
  // k3(u) and expm1(u) from one range reduction: the same values as the two calls above.
  static void k3_and_expm1(const Vec& u, Vec& k3_out, Vec& expm1_out) {
    if (!reduced_exp::in_range(u)) {
      k3_out = k3_by_series<VecKLMath>(u);
      expm1_out = expm1_by_series<VecKLMath>(u);
      return;
    }
    const reduced_exp::Parts p = reduced_exp::split(u);
    k3_out = reduced_exp::k3_of(p);
    expm1_out = reduced_exp::expm1_of(p);
  }
  static Vec exp(const Vec& x) { return x.exp_u20(); }
  static Vec abs(const Vec& x) { return x.abs(); }
  static Vec clamp_min0(const Vec& x) { return at::vec::maximum(x, Vec(0.0f)); }
  static Vec clamp(const Vec& x, const Vec& lo, const Vec& hi) {
    return at::vec::minimum(at::vec::maximum(x, lo), hi);
  }
  static Vec floor_at(const Vec& x, const Vec& lo) { return at::vec::maximum(x, lo); }
  static Vec sign(const Vec& x) { return x.gt(Vec(0.0f)) - x.lt(Vec(0.0f)); }
  static Vec select_small(const Vec& x, const Vec& bound, const Vec& a, const Vec& b) {
    return Vec::blendv(b, a, x.abs() < bound);
  }
  static Vec pass_within(const Vec& x, const Vec& lo, const Vec& hi, const Vec& v) {
    return Vec::blendv(Vec(0.0f), v, (x >= lo) & (x <= hi));
  }
};

using vec_io::load2;
using vec_io::store2;

// Tokens per block of a segment sum: 1024 floats (4 KiB) stay in L1 between the kernel and the sum.
constexpr int64_t kBlock = 1024;

// What kl_range writes per token.
enum class KLPass {
  kValue,         // scale * kl(x, y)
  kValueAndGrad,  // scale * kl(x, y), and d kl / d x into out_derivative (saved for the backward)
  kGradPerToken,  // scale * grad[j] * d kl / d x
  kGradUniform,   // scale * d kl / d x: one gradient for every token (a mean's, or an expanded scalar's)
};

// out[j] for j < n as `P` says where mask[j] (mask may be null), 0 elsewhere (NaN computed there
// included). out_neg, when not null, receives -out[j]: d kl / d ref. out_derivative: see kValueAndGrad.
// One pass: the mask and the negation are applied in registers, so each output is stored once and
// nothing is re-read.
template <class T, KLEstimator E, bool kClamp, KLPass P>
void kl_range(const T* x, const T* y, const float* grad, const uint8_t* mask, int64_t n, float clamp,
              float scale, float* out, float* out_neg, float* out_derivative = nullptr) {
  const Vec vclamp(clamp), vscale(scale);
  const int64_t v_end = n / kStep * kStep;
  for (int64_t j = 0; j < v_end; j += kStep) {
    Vec x0, x1, y0, y1;
    load2(x + j, x0, x1);
    load2(y + j, y0, y1);
    if constexpr (P == KLPass::kGradPerToken) {
      Vec g0, g1;
      load2(grad + j, g0, g1);
      x0 = kl_value_grad<VecKLMath, E, kClamp>(vscale * g0, x0, y0, vclamp);
      x1 = kl_value_grad<VecKLMath, E, kClamp>(vscale * g1, x1, y1, vclamp);
    } else if constexpr (P == KLPass::kGradUniform) {
      x0 = kl_value_grad<VecKLMath, E, kClamp>(vscale, x0, y0, vclamp);
      x1 = kl_value_grad<VecKLMath, E, kClamp>(vscale, x1, y1, vclamp);
    } else {
      if constexpr (P == KLPass::kValueAndGrad) {
        Vec v0, v1, d0, d1;
        kl_value_and_grad<VecKLMath, E, kClamp>(x0, y0, vclamp, v0, d0);
        kl_value_and_grad<VecKLMath, E, kClamp>(x1, y1, vclamp, v1, d1);
        if (mask != nullptr) vec_io::zero_where_dropped(mask + j, d0, d1);
        store2(out_derivative + j, d0, d1);
        x0 = vscale * v0;
        x1 = vscale * v1;
      } else {
        x0 = vscale * kl_value<VecKLMath, E, kClamp>(x0, y0, vclamp);
        x1 = vscale * kl_value<VecKLMath, E, kClamp>(x1, y1, vclamp);
      }
    }
    if (mask != nullptr) vec_io::zero_where_dropped(mask + j, x0, x1);
    store2(out + j, x0, x1);
    if (out_neg != nullptr) store2(out_neg + j, x0.neg(), x1.neg());
  }
  for (int64_t j = v_end; j < n; ++j) {
    const float xj = static_cast<float>(x[j]);
    const float yj = static_cast<float>(y[j]);
    float v;
    if constexpr (P == KLPass::kGradPerToken) {
      v = kl_value_grad<ScalarKLMath, E, kClamp>(scale * grad[j], xj, yj, clamp);
    } else if constexpr (P == KLPass::kGradUniform) {
      v = kl_value_grad<ScalarKLMath, E, kClamp>(scale, xj, yj, clamp);
    } else {
      if constexpr (P == KLPass::kValueAndGrad) {
        float value, dj;
        kl_value_and_grad<ScalarKLMath, E, kClamp>(xj, yj, clamp, value, dj);
        out_derivative[j] = mask == nullptr || mask[j] != 0 ? dj : 0.0f;
        v = scale * value;
      } else {
        v = scale * kl_value<ScalarKLMath, E, kClamp>(xj, yj, clamp);
      }
    }
    out[j] = mask == nullptr || mask[j] != 0 ? v : 0.0f;
    if (out_neg != nullptr) out_neg[j] = -out[j];
  }
}

// The backward from a derivative the forward saved (kValueAndGrad): out[j] = (scale * grad[j]) *
// derivative[j] (grad may be null: scale alone), the same product, in the same order, as kl_range's
// gradient passes, so the same values to an ulp (scalar tails may round apart where the compiler
// contracts differently); 0 where mask[j] == 0 (mask may be null); out_neg as in kl_range.
// Reads 4 bytes a token where kl_range reads both inputs, and needs no exp.
inline void scale_derivative(const float* derivative, const float* grad, const uint8_t* mask, int64_t n,
                             float scale, float* out, float* out_neg) {
  const Vec vscale(scale);
  const int64_t v_end = n / kStep * kStep;
  for (int64_t j = 0; j < v_end; j += kStep) {
    Vec d0, d1;
    load2(derivative + j, d0, d1);
    if (grad != nullptr) {
      Vec g0, g1;
      load2(grad + j, g0, g1);
      d0 = (vscale * g0) * d0;
      d1 = (vscale * g1) * d1;
    } else {
      d0 = vscale * d0;
      d1 = vscale * d1;
    }
    if (mask != nullptr) vec_io::zero_where_dropped(mask + j, d0, d1);
    store2(out + j, d0, d1);
    if (out_neg != nullptr) store2(out_neg + j, d0.neg(), d1.neg());
  }
  for (int64_t j = v_end; j < n; ++j) {
    const float v = (grad == nullptr ? scale : scale * grad[j]) * derivative[j];
    out[j] = mask == nullptr || mask[j] != 0 ? v : 0.0f;
    if (out_neg != nullptr) out_neg[j] = -out[j];
  }
}

// Sum of the masked estimates over x[0, n) (in double, from fp32 block sums) and the number of
// positions the mask keeps (n without a mask): one segment of a seq-mean or token-mean.
// out_derivative, when not null, receives d kl / d x per token as kl_range's kValueAndGrad writes it.
template <class T, KLEstimator E, bool kClamp>
void kl_sum(const T* x, const T* y, const uint8_t* mask, int64_t n, float clamp, double& sum, int64_t& count,
            float* out_derivative = nullptr) {
  alignas(64) float block[kBlock];
  sum = 0.0;
  count = mask == nullptr ? n : vec_io::count_kept(mask, n);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const uint8_t* m = mask == nullptr ? nullptr : mask + b;
    if (out_derivative == nullptr) {
      kl_range<T, E, kClamp, KLPass::kValue>(x + b, y + b, nullptr, m, len, clamp, 1.0f, block, nullptr);
    } else {
      kl_range<T, E, kClamp, KLPass::kValueAndGrad>(x + b, y + b, nullptr, m, len, clamp, 1.0f, block, nullptr,
                                                    out_derivative + b);
    }
    sum += static_cast<double>(at::vec::reduce_all<float>([](const Vec& a, const Vec& c) { return a + c; },
                                                          block, len));
  }
}

}  // namespace kl_vec
}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
