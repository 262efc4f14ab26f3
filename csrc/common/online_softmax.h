// Online (streaming) log-softmax state shared by the CPU and CUDA gather_logprobs kernels.
//
// A state summarises a set of scaled logits z (z = x * inv_temperature) relative to their max m:
//     max = m,   sum = sum_j e^{z_j - m},   ent = sum_j e^{z_j - m} (z_j - m)
// States of disjoint parts of a row merge exactly (after rescaling both to the larger max), so a
// row can be split over SIMD lanes, blocks, threads, warps or V-chunks in any order.
//
// The forward saves each row's stats (m, log_s = log(sum)) for the backward, and both passes work
// with shifted logits t = z - m only: log p_j = t_j - log_s, H = log_s - ent / sum. Not with
// lse = m + log_s: at |z| ~ 1e4 an fp32 lse carries ~1e-3 of rounding, which z_j - lse would pass
// to every log p, while t and log_s stay small and carry only their own, relative, rounding.
//
// The element math is templated on a "Math" policy (exp / max on scalars or on SIMD vectors) so
// that the CPU SIMD loops, the CPU scalar tails and the CUDA kernels all run this same code.
// Plain C++17, no torch headers: nvcc compiles it standalone.
#pragma once

#include <cfloat>
#include <cmath>

#include "common/macros.h"

namespace fastrlhf {

// Any log-probability below this gives exp() == 0 in fp32 (e^-104 already underflows), so clamping
// to it changes no value, but keeps e * t finite: 0 * -inf would be NaN, 0 * kLogFloor is 0.
// With ScalarMath it also maps the NaN of (-inf) - (-inf) to the floor (fmaxf ignores a NaN
// operand); the CPU SIMD forward never forms that NaN: it skips blocks whose max is -inf.
constexpr float kLogFloor = -200.0f;

// Scalar math for CUDA (and the CPU tails, which swap in their own fms: see csrc/cpu). fmaxf
// returns the non-NaN operand on both.
struct ScalarMath {
  static FASTRLHF_HD float exp(float x) {
    // The accurate expf on the device too, not the __expf intrinsic: __expf's error grows with |x|
    // (2 + 1.17|x| ulp), and on an H200 the CUDA entropy it gave was off enough that gradients at
    // 4096 x 32000 missed the float64 reference by 3.9e-6 where Triton's and torch's were within
    // 1e-7 + 1e-4 relative. The few extra instructions hide under the memory traffic.
    return expf(x);
  }
  static FASTRLHF_HD float max(float a, float b) { return fmaxf(a, b); }
  // a * b rounded to fp32. On the device __fmul_rn, which nvcc never contracts into an FMA.
  static FASTRLHF_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
  // a * b - c, fused (rounded once).
  static FASTRLHF_HD float fms(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, -c);
#else
    return std::fma(a, b, -c);
#endif
  }
};

struct SoftmaxState {
  float max;  // running max of z; -inf while empty
  float sum;  // sum of e^{z - max}
  float ent;  // sum of e^{z - max} (z - max); stays 0 when entropy isn't requested
};

FASTRLHF_HD SoftmaxState empty_state() { return {-INFINITY, 0.0f, 0.0f}; }

// t = z - m from a raw logit x, z = x * inv_temperature, and m a max of the rounded z (the saved
// stat; the kernels take it as a max of rounded products, which no compiler contracts). Every
// kernel computes t through this, as one explicit fused multiply-subtract:
//  - the forward's sums, the label's logprob and the backward's log p = t - log_s must agree on t
//    to the bit, or a dominant logit gets a p off by the difference, relative: at |z| = 1e4 and
//    T != 1 a fused t in one pass against a rounded-product t in the other (0 vs the product's
//    rounding error) gave gradient errors of 1.5e-3 where torch has 1e-7. Written out, t can't
//    depend on whether a compiler contracts x * inv_t - m, as GCC (C++, target with FMA) and nvcc
//    do by default.
//  - fused, the product is exact, so t carries no rounding of the |z|-sized z: at T != 1 and
//    |z| ~ 1e4 results are ~1e-6 from float64, where torch's fp32 (rounding x / T) is ~4e-4 off.
// Math::fms is fused on CUDA and the AVX2 / AVX512 CPU copies; the baseline x86 copy has no FMA
// and rounds the product first, in every pass alike. -inf logits give t = -inf (NaN only when m is
// -inf too, which the callers handle). T is float or a SIMD vector of floats.
template <class Math, class T>
FASTRLHF_HD T shifted_logit(const T& x, const T& inv_temperature, const T& m) {
  return Math::fms(x, inv_temperature, m);
}

// logprob of the label from its raw logit and the row's stats: exactly -inf when the logit is -inf
// (also in a row of only -inf logits, where shifted_logit gives NaN).
template <class Math>
FASTRLHF_HD float label_logprob(float x, float inv_temperature, float m, float log_s) {
  return x == -INFINITY ? -INFINITY : shifted_logit<Math>(x, inv_temperature, m) - log_s;
}

// Adds one term with t = z - max (<= 0) to (sum, ent). T is float or a SIMD vector of floats.
template <class Math, bool kEntropy, class T>
FASTRLHF_HD void accumulate(const T& t, T& sum, T& ent) {
  const T tc = Math::max(t, T(kLogFloor));
  const T e = Math::exp(tc);
  sum = sum + e;
  if constexpr (kEntropy) {
    ent = ent + e * tc;
  }
}

// Re-expresses a state relative to a max new_max >= st.max: each e^{z-m} gains a factor
// f = e^{m-m'} and each (z-m) gains (m-m'), so sum' = f sum and ent' = f (ent + (m-m') sum).
// An empty state (max = -inf) stays empty: d is clamped, f == 0 and the finite d keeps 0 * d == 0.
FASTRLHF_HD SoftmaxState rescale(SoftmaxState st, float new_max) {
  const float d = ScalarMath::max(st.max - new_max, kLogFloor);
  const float f = ScalarMath::exp(d);
  return {new_max, st.sum * f, f * (st.ent + d * st.sum)};
}

// Combine step: the state of the union of two disjoint sets of logits.
FASTRLHF_HD SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
  const float m = ScalarMath::max(a.max, b.max);
  const SoftmaxState ra = rescale(a, m);
  const SoftmaxState rb = rescale(b, m);
  return {m, ra.sum + rb.sum, ra.ent + rb.ent};
}

// Update by block: folds a small block of raw logits x into st. One rescale per block (only when
// the block raises the max), then one exp per element.
template <bool kEntropy, int kN>
FASTRLHF_HD void update_block(SoftmaxState& st, const float (&x)[kN], float inv_temperature) {
  // From rounded products (ScalarMath::mul): st.max is the saved m, and rescale's st.max - block_max
  // must not become an FMA with an unrounded one.
  float block_max = ScalarMath::mul(x[0], inv_temperature);
  FASTRLHF_UNROLL
  for (int k = 1; k < kN; ++k) block_max = ScalarMath::max(block_max, ScalarMath::mul(x[k], inv_temperature));
  if (block_max > st.max) st = rescale(st, block_max);
  bool has_nan = false;
  FASTRLHF_UNROLL
  for (int k = 0; k < kN; ++k) {
    const float t = shifted_logit<ScalarMath>(x[k], inv_temperature, st.max);
    accumulate<ScalarMath, kEntropy>(t, st.sum, st.ent);
    has_nan |= x[k] != x[k];
  }
  // fmaxf skipped a NaN logit in the max and the clamp (which must map the NaN of -inf - -inf to the
  // floor), so it added 0: poison the sum instead. A NaN sum survives every rescale and merge, and
  // makes the row's log-probs, entropy and gradient NaN, as torch's are.
  if (has_nan) st.sum = NAN;
}

// log(sum) of a row's state: with its max, the stats the forward saves. A row of only -inf logits
// is degenerate (torch gives NaN): here m, log_s and logprob are -inf, entropy is 0, and its
// gradient is not finite.
FASTRLHF_HD float state_log_sum(SoftmaxState st) { return logf(st.sum); }

// Entropy of softmax(z). Clamped at 0: rounding can push a near-one-hot row a hair below. A NaN
// state (a NaN logit) gives NaN, as torch does; only a row of only -inf logits gives 0 (see above).
FASTRLHF_HD float state_entropy(SoftmaxState st) {
  if (st.sum == 0.0f) return 0.0f;  // empty: only -inf logits (any finite logit adds e^0 = 1)
  const float entropy = logf(st.sum) - st.ent / st.sum;
  return entropy < 0.0f ? 0.0f : entropy;
}

}  // namespace fastrlhf
