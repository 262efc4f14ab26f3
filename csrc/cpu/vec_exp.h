// exp of non-positive fp32 vectors, the softmax-shaped exp of the CPU kernels (e^{z - max}, e^{log p},
// e^{-|gap|}): about half the instructions of ATen's exp_u20 and ~10x its accuracy. Also the
// one-instruction floor that clamps their arguments (max_with_floor).
//
// e^x = 2^u with u = x log2(e), split as 2^n 2^f, n = round(u), f = u - n in [-1/2, 1/2]. 2^f is a
// degree-5 polynomial (near-minimax for relative error; 2.3e-7 max in fp32 Horner, against exp_u20's
// 20 ulp) and 2^n goes into the exponent field (AVX512: scalef; AVX2: an integer add). Below
// u = -126 the result is 0, as in exp_u20 (e^-87.3 is the smallest normal float), so no denormal is
// ever produced (they are slow on some cores). NaN stays NaN; -inf gives 0. Inputs must be <= 0:
// a positive x is not range-checked (x > 88 would overflow the exponent field).
//
// Compiled once per CPU capability, like the kernel files that include it. The DEFAULT copy (no
// SIMD ISA) keeps exp_u20.
#pragma once

#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {
namespace vec_exp {

using Vec = at::vec::Vectorized<float>;

// 2^f on [-1/2, 1/2], lowest degree first: a relative least-max-error fit (Lawson's algorithm on 4001
// Chebyshev points), rounded to fp32.
constexpr float kC0 = 1.0000001f;
constexpr float kC1 = 0.69314694f;
constexpr float kC2 = 0.2402212f;
constexpr float kC3 = 0.05550713f;
constexpr float kC4 = 0.00967554f;
constexpr float kC5 = 0.00132765f;
constexpr float kLog2e = 1.44269504088896341f;
// Smallest u whose 2^u the polynomial and exponent add keep normal: 2^n 2^f >= 2^-126 for u >= -126.
constexpr float kMinExponent = -126.0f;

// 2^f for f in [-1/2, 1/2]: the polynomial above in Horner form (at::vec::fmadd is one FMA instruction
// with AVX2 and AVX-512; the default copy does not call it).
inline Vec pow2_fraction(const Vec& f) {
  Vec p = at::vec::fmadd(f, Vec(kC5), Vec(kC4));
  p = at::vec::fmadd(f, p, Vec(kC3));
  p = at::vec::fmadd(f, p, Vec(kC2));
  p = at::vec::fmadd(f, p, Vec(kC1));
  return at::vec::fmadd(f, p, Vec(kC0));
}

inline Vec exp_nonpositive(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 lowest = _mm512_set1_ps(kMinExponent);
  __m512 u = _mm512_mul_ps(x, _mm512_set1_ps(kLog2e));
  const __mmask16 keep = _mm512_cmp_ps_mask(u, lowest, _CMP_GE_OQ) | _mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q);
  u = _mm512_max_ps(lowest, u);  // max returns its second operand when one is NaN: NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(u, n);
  const __m512 p = pow2_fraction(Vec(f));
  return _mm512_maskz_scalef_ps(keep, p, n);  // p 2^n where kept, 0 below 2^-126
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 lowest = _mm256_set1_ps(kMinExponent);
  __m256 u = _mm256_mul_ps(x, _mm256_set1_ps(kLog2e));
  const __m256 tiny = _mm256_cmp_ps(u, lowest, _CMP_LT_OQ);  // false for NaN
  u = _mm256_max_ps(lowest, u);                             // NaN stays NaN (second operand)
  const __m256 n = _mm256_round_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(u, n);
  const __m256 p = pow2_fraction(Vec(f));
  // p in [0.707, 1.415], and n >= -126 with f >= 0 at n = -126: adding n to p's exponent field keeps it
  // >= 1 (normal). For NaN, cvtps gives INT_MIN, which shifts to 0: p (NaN) passes unchanged.
  const __m256i scaled = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  return _mm256_andnot_ps(tiny, _mm256_castsi256_ps(scaled));
#else
  return x.exp_u20();
#endif
}

// max(x, floor) for a floor that is never NaN, NaN in x staying NaN: one instruction. (at::vec::maximum
// takes three, to propagate a NaN in either operand; MAXPS returns its second operand when one is NaN.)
inline Vec max_with_floor(const Vec& x, const Vec& floor) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(floor, x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(floor, x);
#else
  return at::vec::maximum(x, floor);
#endif
}

// e^t (t <= 0, or NaN) as a term of a softmax sum, whose largest term is e^0 = 1: like
// exp_nonpositive, except that where e^t < 2^-126 it returns 2^-126 (times 1 + 1e-7) instead of 0.
// No term is ever denormal, and V such terms add at most V 2^-126 to a sum >= 1, far below its half
// ulp (2^-24) for any V < 2^100. What it saves: the caller's clamp of t to kLogFloor and the underflow
// mask (two compares and a mask or), 4 of the 16 instructions per vector of the gather forward's
// exp-sum loop, its hottest. -inf gives 2^-126 (t must not be multiplied by the result: use
// exp_nonpositive where a term's e * t matters); NaN stays NaN.
inline Vec exp_term_of_sum(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 u = _mm512_max_ps(_mm512_set1_ps(kMinExponent), _mm512_mul_ps(t, _mm512_set1_ps(kLog2e)));
  const __m512 n = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(u, n);
  const __m512 p = pow2_fraction(Vec(f));
  return _mm512_scalef_ps(p, n);  // n >= -126, p >= 2^-1/2 with f >= 0 at n = -126: normal
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 u = _mm256_max_ps(_mm256_set1_ps(kMinExponent), _mm256_mul_ps(t, _mm256_set1_ps(kLog2e)));
  const __m256 n = _mm256_round_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(u, n);
  const __m256 p = pow2_fraction(Vec(f));
  // As in exp_nonpositive: NaN's INT_MIN shifts to 0 and leaves p (NaN) as it is.
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
#else
  return exp_nonpositive(t);  // exp_u20: 0 below e^-103, -inf included
#endif
}

}  // namespace vec_exp
}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
