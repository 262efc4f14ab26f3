// The KL arguments of the TORCH_LIBRARY ops that take them (kl_penalty, compute_advantages), parsed with
// the ValueErrors fastrlhf/ops/kl_penalty.py raises on the plain-torch path.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "common/kl.h"
#include "op_checks.h"

namespace fastrlhf::kl_args {

inline int estimator_code(c10::string_view estimator) {
  if (estimator == "k1") return static_cast<int>(KLEstimator::kK1);
  if (estimator == "k2") return static_cast<int>(KLEstimator::kK2);
  if (estimator == "k3") return static_cast<int>(KLEstimator::kK3);
  if (estimator == "abs") return static_cast<int>(KLEstimator::kAbs);
  TORCH_CHECK_VALUE(false, "estimator='", std::string(estimator), "' is not one of ('k1', 'k2', 'k3', 'abs')");
}

// None -> +inf (no bound); otherwise a positive bound. `name` is the argument's name.
inline double clamp_value(const char* name, std::optional<double> clamp) {
  if (!clamp.has_value()) return std::numeric_limits<double>::infinity();
  TORCH_CHECK_VALUE(!std::isnan(*clamp) && *clamp > 0.0, name, " must be None or a positive number, got ",
                    op_checks::py_float(*clamp));
  return *clamp;
}

}  // namespace fastrlhf::kl_args
