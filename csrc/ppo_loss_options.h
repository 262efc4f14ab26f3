// The scalar settings of PPO's clipped policy loss, checked with the ValueErrors ops/policy_loss.py's
// check_loss_options raises on the plain-torch path. Shared by the ppo_policy_loss op and the fused
// linear_ppo_policy_loss op.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "common/ppo_loss.h"
#include "kl_args.h"
#include "op_checks.h"

namespace fastrlhf {

struct PolicyLossSettings {
  PPOLossOptions options;  // has_ref / has_entropy are the caller's to set
  int kl_estimator;        // KLEstimator (common/kl.h)
  bool seq_mean;           // loss_agg == "seq-mean-token-mean"
};

inline PolicyLossSettings check_policy_loss_options(double clip_eps, std::optional<double> clip_eps_high,
                                                    std::optional<double> dual_clip, double kl_coef,
                                                    c10::string_view kl_estimator, double entropy_coef,
                                                    c10::string_view loss_agg) {
  TORCH_CHECK_VALUE(std::isfinite(clip_eps) && clip_eps > 0.0, "clip_eps must be finite and > 0, got ",
                    op_checks::py_float(clip_eps));
  TORCH_CHECK_VALUE(clip_eps < 1.0, "clip_eps must be in (0, 1) (the ratio is clipped to [1 - clip_eps, ...]), got ",
                    op_checks::py_float(clip_eps));
  const double eps_high = clip_eps_high.value_or(clip_eps);
  TORCH_CHECK_VALUE(std::isfinite(eps_high) && eps_high > 0.0, "clip_eps_high must be finite and > 0, got ",
                    op_checks::py_float(eps_high));
  if (dual_clip.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*dual_clip) && *dual_clip > 0.0, "dual_clip must be finite and > 0, got ",
                      op_checks::py_float(*dual_clip));
    TORCH_CHECK_VALUE(*dual_clip > 1.0, "dual_clip must be > 1 (it caps -A·ratio for A < 0), got ",
                      op_checks::py_float(*dual_clip));
  }
  PolicyLossSettings s{};
  s.kl_estimator = kl_args::estimator_code(kl_estimator);
  s.seq_mean = loss_agg == "seq-mean-token-mean";
  TORCH_CHECK_VALUE(s.seq_mean || loss_agg == "token-mean", "loss_agg='", std::string(loss_agg),
                    "' is not one of ('token-mean', 'seq-mean-token-mean')");
  op_checks::check_finite("kl_coef", kl_coef);
  op_checks::check_finite("entropy_coef", entropy_coef);
  PPOLossOptions& o = s.options;
  o.ratio_low = static_cast<float>(1.0 - clip_eps);
  o.ratio_high = static_cast<float>(1.0 + eps_high);
  o.dual_clip = dual_clip.has_value() ? static_cast<float>(*dual_clip) : std::numeric_limits<float>::infinity();
  o.kl_coef = static_cast<float>(kl_coef);
  o.entropy_coef = static_cast<float>(entropy_coef);
  return s;
}

}  // namespace fastrlhf
