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

struct PPOTokenStats {
  float loss;
  float clipped;    // 1 where the clipped surrogate is in force
  float approx_kl;  // e^l - 1 - l
  float ref_kl;     // KL(logp, ref); 0 without a reference
};

FASTRLHF_HD float ppo_clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// d max(a, b) / da as torch's autograd takes it: 1 where a > b (or either is NaN), 1/2 at a tie, else 0.
FASTRLHF_HD float max_share(float a, float b) { return a < b ? 0.0f : (a == b ? 0.5f : 1.0f); }

template <KLEstimator E>
FASTRLHF_HD PPOTokenStats ppo_token_forward(float logp, float old, float adv, float ref, float entropy,
                                            const PPOLossOptions& o) {
  const float l = ppo_clamp(logp - old, -kLogRatioCap, kLogRatioCap);
  const float r = expf(l);
  const float unclipped = -adv * r;
  const float clipped = -adv * ppo_clamp(r, o.ratio_low, o.ratio_high);
  // Selects rather than branches: the signs of A and the clip decisions are data, and a mispredicted
  // branch costs more than the arithmetic of both sides.
  float pg = clipped > unclipped ? clipped : unclipped;  // a NaN in unclipped stays
  const float cap = -adv * o.dual_clip;
  const float capped = cap < pg ? cap : pg;
  pg = adv < 0.0f ? capped : pg;  // dual_clip = +inf caps nothing
  PPOTokenStats s;
  s.ref_kl = o.has_ref ? kl_estimate<ScalarKLMath, E>(logp - ref) : 0.0f;
  if (o.has_ref && o.kl_coef != 0.0f) pg += o.kl_coef * s.ref_kl;
  if (o.has_entropy && o.entropy_coef != 0.0f) pg -= o.entropy_coef * entropy;
  s.loss = pg;
  s.clipped = clipped > unclipped ? 1.0f : 0.0f;
  // e^l - 1 - l from r = e^l, or from its series near 0 where the subtraction cancels (common/kl.h):
  // no expm1 call.
  s.approx_kl = fabsf(l) < kK3SeriesBound ? k3_series(l) : (r - 1.0f) - l;
  return s;
}

// d loss / d logp of one valid token (the entropy's derivative is -entropy_coef, a constant).
template <KLEstimator E>
FASTRLHF_HD float ppo_token_grad(float logp, float old, float adv, float ref, const PPOLossOptions& o) {
  const float d = logp - old;
  const float l = ppo_clamp(d, -kLogRatioCap, kLogRatioCap);
  const float r = expf(l);
  const float unclipped = -adv * r;
  const float clipped = -adv * ppo_clamp(r, o.ratio_low, o.ratio_high);
  const float clip_pass = (r >= o.ratio_low && r <= o.ratio_high) ? 1.0f : 0.0f;
  float d_pg = max_share(unclipped, clipped) * -adv + max_share(clipped, unclipped) * -adv * clip_pass;
  // d min(pg, cap) / d pg is d max(cap, pg) / d cap; with dual_clip = +inf the cap never binds.
  const float pg = clipped > unclipped ? clipped : unclipped;
  d_pg *= adv < 0.0f ? max_share(-adv * o.dual_clip, pg) : 1.0f;
  const float ratio_pass = (d >= -kLogRatioCap && d <= kLogRatioCap) ? 1.0f : 0.0f;
  float g = d_pg * r * ratio_pass;
  if (o.has_ref && o.kl_coef != 0.0f) g += o.kl_coef * kl_estimate_grad<ScalarKLMath, E>(logp - ref);
  return g;
}

}  // namespace fastrlhf
