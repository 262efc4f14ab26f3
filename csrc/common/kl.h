// Per-token KL estimators and their derivatives, shared by the CPU and CUDA kl_penalty /
// advantages kernels.
//
// With d = logp - ref and u = -d:  k1 = d,  k2 = d^2 / 2,  k3 = e^u - 1 - u,  abs = |d|.
// d/d(logp):                      1,       d,            -(e^u - 1),    sign(d).
// For |u| < kK3SeriesBound, e^u - 1 - u comes from its Taylor series (the plain form cancels: at
// |d| = 1e-3 it keeps only ~1e-4 relative precision, and such tiny gaps are common early in PPO), and
// e^u - 1 = u + series for the gradient. Past the bound plain exp is accurate enough and, in SIMD,
// several times cheaper than expm1; a gap of +-50 nats stays finite in fp32 (e^50 ~ 5e21). k3 is
// clamped at 0 because rounding can push it a hair below.
//
// The math is templated on a "Math" policy (ScalarKLMath here; SIMD policies in csrc/cpu) so the CPU
// SIMD loops, CPU scalar tails and CUDA kernels all run this same code. T is float or a SIMD vector.
// The policy supplies k3(u) = e^u - 1 - u and expm1(u): the scalar one by the series-or-exp form below;
// the CPU SIMD one (csrc/cpu/kl_vec.h) by one range-reduced polynomial that needs no select, falling back
// to this form outside the exponent range.
// Plain C++17, no torch headers: nvcc compiles it standalone.
#pragma once

#include <cmath>
#include <type_traits>

#include "common/macros.h"

namespace fastrlhf {

// The estimator codes of kl_penalty_forward / _backward / advantages_forward.
enum class KLEstimator : int { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3 };

constexpr bool valid_kl_estimator(int e) { return e >= 0 && e <= 3; }


// e^u - 1 - u (>= 0) and e^u - 1, each from the series below kK3SeriesBound and from Math::exp past it;
// defined below. The scalar policy's k3 / expm1; the SIMD policy's fallback outside its fast range.
template <class Math, class T>
FASTRLHF_HD T k3_by_series(const T& u);
template <class Math, class T>
FASTRLHF_HD T expm1_by_series(const T& u);

// Scalar policy. Every helper propagates NaN (a NaN gap gives a NaN estimate, as in torch).
struct ScalarKLMath {
  static FASTRLHF_HD float k3(float u) { return k3_by_series<ScalarKLMath>(u); }
  static FASTRLHF_HD float expm1(float u) { return expm1_by_series<ScalarKLMath>(u); }
  // Both of the above at one u (a SIMD policy shares their range reduction).
  static FASTRLHF_HD void k3_and_expm1(float u, float& k3_out, float& expm1_out) {
    k3_out = k3(u);
    expm1_out = expm1(u);
  }
  static FASTRLHF_HD float exp(float x) { return expf(x); }
  static FASTRLHF_HD float abs(float x) { return fabsf(x); }
  static FASTRLHF_HD float clamp_min0(float x) { return x < 0.0f ? 0.0f : x; }
  static FASTRLHF_HD float clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
  // max(x, lo), NaN propagating.
  static FASTRLHF_HD float floor_at(float x, float lo) { return x < lo ? lo : x; }
  static FASTRLHF_HD float sign(float x) {
    return static_cast<float>(x > 0.0f) - static_cast<float>(x < 0.0f);
  }
  // a where |x| < bound, else b.
  static FASTRLHF_HD float select_small(float x, float bound, float a, float b) { return fabsf(x) < bound ? a : b; }
  // v where lo <= x <= hi, else 0 (torch.clamp's gradient mask).
  static FASTRLHF_HD float pass_within(float x, float lo, float hi, float v) {
    return (x >= lo && x <= hi) ? v : 0.0f;
  }
};

// Below this |d|, k3 = e^u - 1 - u (u = -d) comes from its series: the series' first omitted term,
// u^10/10!, is < 3e-9 of the result there, and expm1(u) - u has lost ~2 bits to cancellation at 0.5.
constexpr float kK3SeriesBound = 0.5f;

// e^u - 1 - u = u^2/2! + u^3/3! + ... + u^9/9!, in Horner form.
template <class T>
FASTRLHF_HD T k3_series(const T& u) {
  T p(1.0f / 362880.0f);
  p = T(1.0f / 40320.0f) + u * p;
  p = T(1.0f / 5040.0f) + u * p;
  p = T(1.0f / 720.0f) + u * p;
  p = T(1.0f / 120.0f) + u * p;
  p = T(1.0f / 24.0f) + u * p;
  p = T(1.0f / 6.0f) + u * p;
  p = T(0.5f) + u * p;
  return u * u * p;
}

template <class Math, class T>
FASTRLHF_HD T k3_by_series(const T& u) {
  // Past the series bound plain exp is enough (at |u| = 0.5 the subtraction costs ~2 bits, within
  // the fp32 tolerance), and it is several times cheaper than expm1 in SIMD.
  return Math::clamp_min0(
      Math::select_small(u, T(kK3SeriesBound), k3_series(u), (Math::exp(u) - T(1.0f)) - u));
}

template <class Math, class T>
FASTRLHF_HD T expm1_by_series(const T& u) {
  // Near 0, e^u - 1 = u + k3_series(u) keeps full precision without expm1.
  return Math::select_small(u, T(kK3SeriesBound), u + k3_series(u), Math::exp(u) - T(1.0f));
}

template <class Math, KLEstimator E, class T>
FASTRLHF_HD T kl_estimate(const T& d) {
  if constexpr (E == KLEstimator::kK1) {
    return d;
  } else if constexpr (E == KLEstimator::kK2) {
    return T(0.5f) * d * d;
  } else if constexpr (E == KLEstimator::kK3) {
    return Math::k3(T(0.0f) - d);
  } else {
    return Math::abs(d);
  }
}

// d kl_estimate / d(logp), unclamped.
template <class Math, KLEstimator E, class T>
FASTRLHF_HD T kl_estimate_grad(const T& d) {
  if constexpr (E == KLEstimator::kK1) {
    return T(1.0f);
  } else if constexpr (E == KLEstimator::kK2) {
    return d;
  } else if constexpr (E == KLEstimator::kK3) {
    return T(0.0f) - Math::expm1(T(0.0f) - d);  // -(e^u - 1) with u = -d
  } else {
    return Math::sign(d);
  }
}

// kl penalty of one token: the estimate, bounded to [-clamp, clamp] when kClamp.
// The log-ratio k3 is evaluated at. Under a clamp c, gaps u = -d past c + 1 are capped there: k3 >=
// e^(c+1) - c - 2 > c already (the clamp wins, no value changes), so a -inf log-prob gives the clamp and
// a zero gradient instead of inf - inf = NaN. One NaN-propagating max per element; c + 1 is loop-invariant.
// (If e^(c+1) overflows, k3 is inf and still clamps to c; the gradient selects 0 rather than multiplying,
// so unlike the autograd reference no further cap is needed here.)
template <class Math, KLEstimator E, bool kClamp, class T>
FASTRLHF_HD T kl_gap(const T& logp, const T& ref, const T& clamp) {
  const T d = logp - ref;
  if constexpr (kClamp && E == KLEstimator::kK3) {
    return Math::floor_at(d, T(0.0f) - (clamp + T(1.0f)));
  } else {
    return d;
  }
}

template <class Math, KLEstimator E, bool kClamp, class T>
FASTRLHF_HD T kl_value(const T& logp, const T& ref, const T& clamp) {
  const T kl = kl_estimate<Math, E>(kl_gap<Math, E, kClamp>(logp, ref, clamp));
  if constexpr (kClamp) {
    return Math::clamp(kl, T(0.0f) - clamp, clamp);
  } else {
    return kl;
  }
}

// grad * d kl_value / d(logp): 0 where the clamp is active.
template <class Math, KLEstimator E, bool kClamp, class T>
FASTRLHF_HD T kl_value_grad(const T& grad, const T& logp, const T& ref, const T& clamp) {
  const T d = kl_gap<Math, E, kClamp>(logp, ref, clamp);
  const T g = grad * kl_estimate_grad<Math, E>(d);
  if constexpr (kClamp) {
    return Math::pass_within(kl_estimate<Math, E>(d), T(0.0f) - clamp, clamp, g);
  } else {
    return g;
  }
}

// kl_value and kl_value_grad with grad = 1 (the same values), from one evaluation of the estimate:
// for k3 the policy's k3_and_expm1 computes e^u once for both. The forward that saves the derivative.
template <class Math, KLEstimator E, bool kClamp, class T>
FASTRLHF_HD void kl_value_and_grad(const T& logp, const T& ref, const T& clamp, T& value, T& grad) {
  const T d = kl_gap<Math, E, kClamp>(logp, ref, clamp);
  T estimate, estimate_grad;
  if constexpr (E == KLEstimator::kK3) {
    T expm1_u;
    Math::k3_and_expm1(T(0.0f) - d, estimate, expm1_u);
    estimate_grad = T(0.0f) - expm1_u;
  } else {
    estimate = kl_estimate<Math, E>(d);
    estimate_grad = kl_estimate_grad<Math, E>(d);
  }
  if constexpr (kClamp) {
    value = Math::clamp(estimate, T(0.0f) - clamp, clamp);
    grad = Math::pass_within(estimate, T(0.0f) - clamp, clamp, estimate_grad);
  } else {
    value = estimate;
    grad = estimate_grad;
  }
}

// Calls f(std::integral_constant<KLEstimator, E>{}, std::bool_constant<kClamp>{}) for a run-time
// estimator code and clamp (a non-finite clamp means none). Returns false for an unknown code.
template <class F>
bool dispatch_kl(int estimator, float clamp, F&& f) {
  const bool has_clamp = std::isfinite(clamp);
  auto with_clamp = [&](auto e) {
    if (has_clamp) {
      f(e, std::true_type{});
    } else {
      f(e, std::false_type{});
    }
  };
  switch (static_cast<KLEstimator>(estimator)) {
    case KLEstimator::kK1:
      with_clamp(std::integral_constant<KLEstimator, KLEstimator::kK1>{});
      return true;
    case KLEstimator::kK2:
      with_clamp(std::integral_constant<KLEstimator, KLEstimator::kK2>{});
      return true;
    case KLEstimator::kK3:
      with_clamp(std::integral_constant<KLEstimator, KLEstimator::kK3>{});
      return true;
    case KLEstimator::kAbs:
      with_clamp(std::integral_constant<KLEstimator, KLEstimator::kAbs>{});
      return true;
  }
  return false;
}

}  // namespace fastrlhf
