// Outcome advantages of critic-free RL (GRPO, RLOO, REINFORCE++), shared by the CPU and CUDA kernels.
//
// One score per response; a group is the k consecutive responses of one prompt. Per group, in double
// (k numbers: the cost is nil, squares of fp32 scores up to 3.4e38 fit, and an all-equal group gives
// exactly 0 below):
//   pivot = s[0];  c_j = s_j - pivot;  mean_c = sum(c_j) / k;  d_j = c_j - mean_c  (= s_j - mean)
//   std = sqrt(sum(d_j^2) / (k - 1))                                  (unbiased, as veRL)
// Shifting by the pivot first keeps an all-equal group's d_j exactly 0 whatever the summation order.
//
// The row value of response i (outcome_row_value):
//   kCenter       d_i                    (GRPO without std scaling, REINFORCE++-baseline)
//   kNormalize    d_i / (std + eps)      (GRPO); 0 when std + eps == 0 (eps = 0, all-equal group)
//   kLeaveOneOut  d_i * k / (k - 1)      (RLOO: s_i minus the mean of the others; k >= 2)
//   kDiscount     s_i                    (REINFORCE++: then discounted along the row)
// A group of one follows veRL: mean 0 and std 1, so kCenter gives s_i and kNormalize s_i / (1 + eps).
//
// kDiscount places the score at the row's last valid token and walks the row right to left: each valid
// token gets score * gamma^(valid tokens after it); masked tokens get 0 and are skipped (the discount
// carries over them, like GAE's mask-carry). Sequential kernels run discount_step from a discount of 1;
// parallel ones start each run of tokens at discount_power(gamma, valid tokens to its right).
// Plain C++17, no torch headers: nvcc compiles it standalone.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace fastrlhf {

// The mode codes of group_advantages_forward.
enum class OutcomeMode : int { kCenter = 0, kNormalize = 1, kLeaveOneOut = 2, kDiscount = 3 };

constexpr bool valid_outcome_mode(int64_t m) { return m >= 0 && m <= 3; }

struct GroupStats {
  double pivot;   // the group's first score
  double mean_c;  // mean of the scores minus the pivot
  double std;     // unbiased standard deviation; 0 for a group of one
};

// Statistics of the k scores of one group, scores[0 .. k-1] (k >= 1).
FASTRLHF_HD GroupStats group_stats(const float* scores, int64_t k) {
  const double pivot = scores[0];
  double sum = 0.0;
  for (int64_t j = 0; j < k; ++j) sum += static_cast<double>(scores[j]) - pivot;
  const double mean_c = sum / static_cast<double>(k);
  double squares = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    const double d = (static_cast<double>(scores[j]) - pivot) - mean_c;
    squares += d * d;
  }
  const double std = k > 1 ? sqrt(squares / static_cast<double>(k - 1)) : 0.0;
  return {pivot, mean_c, std};
}

// The value of one response (see the file comment), rounded to float once at the end.
FASTRLHF_HD float outcome_row_value(OutcomeMode mode, float score, const GroupStats& g, int64_t k, double eps) {
  const double s = score;
  if (mode == OutcomeMode::kDiscount) return score;
  if (k == 1) {
    // veRL's group of one: mean 0, std 1. (RLOO needs k >= 2; the callers check it.)
    return mode == OutcomeMode::kNormalize ? static_cast<float>(s / (1.0 + eps)) : score;
  }
  const double d = (s - g.pivot) - g.mean_c;
  if (mode == OutcomeMode::kNormalize) {
    const double denom = g.std + eps;
    return denom > 0.0 ? static_cast<float>(d / denom) : 0.0f;
  }
  if (mode == OutcomeMode::kLeaveOneOut) {
    return static_cast<float>(d * static_cast<double>(k) / static_cast<double>(k - 1));
  }
  return static_cast<float>(d);
}

// gamma^count: the discount of a valid token with `count` valid tokens after it.
FASTRLHF_HD double discount_power(double gamma, int64_t count) {
  return count == 0 ? 1.0 : pow(gamma, static_cast<double>(count));
}

// One position of the right-to-left walk: score * discount at a valid token (which then moves the
// discount on by gamma), 0 at a masked one. The discount is a double: a float one would drift by an
// ulp a step over thousands of tokens.
FASTRLHF_HD float discount_step(double& discount, float score, bool valid, double gamma) {
  if (!valid) return 0.0f;
  const float out = static_cast<float>(static_cast<double>(score) * discount);
  discount *= gamma;
  return out;
}

}  // namespace fastrlhf
