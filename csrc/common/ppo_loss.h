// PPO's clipped policy loss per token, and its derivative, shared by the CPU and CUDA ppo_policy_loss
// kernels. The definition is fastrlhf/ops/reference.py (ppo_token_losses); this restates it in fp32.
//
// With d = logp - old, l = clamp(d, -20, 20), r = e^l, u = -A·r, c = -A·clamp(r, 1 - eps_low, 1 + eps_high):
//   pg = max(u, c)                       (dual clip, A < 0: min(pg, -A·dual))
//   loss = pg + kl_coef·KL(logp, ref) - entropy_coef·H
// and the stats of a valid token: clipped = c > u, approx_kl = e^l - 1 - l, ref_kl = KL(logp, ref).
//
// The derivative follows torch's autograd of the reference exactly, ties included: max / min send half
// the gradient to each side where both are equal (inside the clip range u == c, so both halves add up to
// the unclipped one), and a clamp passes the gradient on its closed range only.
// Plain C++17, no torch headers: nvcc compiles it standalone.
#pragma once

#include <cmath>

#include "common/kl.h"
#include "common/macros.h"

namespace fastrlhf {

// |log ratio| is capped here before exp (reference.LOG_RATIO_CAP).
constexpr float kLogRatioCap = 20.0f;

// The scalar settings of one call, after the checks.
struct PPOLossOptions {
  float ratio_low;     // 1 - clip_eps_low
  float ratio_high;    // 1 + clip_eps_high
  float dual_clip;     // +inf: no dual clip
  float kl_coef;       // 0 (or no reference): no KL term
  float entropy_coef;  // 0 (or no entropy): no entropy term
  bool has_ref;
  bool has_entropy;
};

template <class T>
struct PPOTokenStats {
  T loss;
  T clipped;    // 1 where the clipped surrogate is in force
  T approx_kl;  // e^l - 1 - l
  T ref_kl;     // KL(logp, ref); 0 without a reference
};

// The selects the loss needs, on top of common/kl.h's policy (ScalarPPOMath here; the SIMD one in
// csrc/cpu/ppo_loss.cpp). Selects rather than branches: the signs of A and the clip decisions are data,
// and a mispredicted branch costs more than the arithmetic of both sides.
struct ScalarPPOMath : ScalarKLMath {
  // x where a > b, else y (a NaN compares false).
  static FASTRLHF_HD float where_gt(float a, float b, float x, float y) { return a > b ? x : y; }
  static FASTRLHF_HD float where_lt(float a, float b, float x, float y) { return a < b ? x : y; }
  // d max(a, b) / da as torch's autograd takes it: 1 where a > b (or either is NaN), 1/2 at a tie, else 0.
  static FASTRLHF_HD float max_share(float a, float b) { return a < b ? 0.0f : (a == b ? 0.5f : 1.0f); }
};

template <class Math, KLEstimator E, class T>
FASTRLHF_HD PPOTokenStats<T> ppo_token_forward(const T& logp, const T& old, const T& adv, const T& ref,
                                               const T& entropy, const PPOLossOptions& o) {
  const T l = Math::clamp(logp - old, T(-kLogRatioCap), T(kLogRatioCap));
  const T r = Math::exp(l);
  const T unclipped = T(0.0f) - adv * r;
  const T clipped = T(0.0f) - adv * Math::clamp(r, T(o.ratio_low), T(o.ratio_high));
  T pg = Math::where_gt(clipped, unclipped, clipped, unclipped);  // a NaN in unclipped stays
  const T cap = T(0.0f) - adv * T(o.dual_clip);
  pg = Math::where_lt(adv, T(0.0f), Math::where_lt(cap, pg, cap, pg), pg);  // dual_clip = +inf caps nothing
  PPOTokenStats<T> s;
  s.ref_kl = o.has_ref ? kl_estimate<Math, E>(logp - ref) : T(0.0f);
  if (o.has_ref && o.kl_coef != 0.0f) pg = pg + T(o.kl_coef) * s.ref_kl;
  if (o.has_entropy && o.entropy_coef != 0.0f) pg = pg - T(o.entropy_coef) * entropy;
  s.loss = pg;
  s.clipped = Math::where_gt(clipped, unclipped, T(1.0f), T(0.0f));
  // e^l - 1 - l from r = e^l, or from its series near 0 where the subtraction cancels (common/kl.h):
  // no expm1.
  s.approx_kl = Math::select_small(l, T(kK3SeriesBound), k3_series(l), (r - T(1.0f)) - l);
  return s;
}

// d loss / d logp of one valid token (the entropy's derivative is -entropy_coef, a constant).
template <class Math, KLEstimator E, class T>
FASTRLHF_HD T ppo_token_grad(const T& logp, const T& old, const T& adv, const T& ref, const PPOLossOptions& o) {
  const T d = logp - old;
  const T l = Math::clamp(d, T(-kLogRatioCap), T(kLogRatioCap));
  const T r = Math::exp(l);
  const T neg_adv = T(0.0f) - adv;
  const T unclipped = neg_adv * r;
  const T clipped = neg_adv * Math::clamp(r, T(o.ratio_low), T(o.ratio_high));
  // A clamp passes the gradient on its closed range and gives exactly 0 outside it (not 0 times an inf).
  T d_pg = Math::max_share(unclipped, clipped) * neg_adv +
           Math::pass_within(r, T(o.ratio_low), T(o.ratio_high), Math::max_share(clipped, unclipped) * neg_adv);
  // d min(pg, cap) / d pg is d max(cap, pg) / d cap; with dual_clip = +inf the cap never binds.
  const T pg = Math::where_gt(clipped, unclipped, clipped, unclipped);
  d_pg = d_pg * Math::where_lt(adv, T(0.0f), Math::max_share(neg_adv * T(o.dual_clip), pg), T(1.0f));
  T g = Math::pass_within(d, T(-kLogRatioCap), T(kLogRatioCap), d_pg * r);
  if (o.has_ref && o.kl_coef != 0.0f) g = g + T(o.kl_coef) * kl_estimate_grad<Math, E>(logp - ref);
  return g;
}

}  // namespace fastrlhf
