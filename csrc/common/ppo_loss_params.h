// Raw-pointer arguments of the ppo_policy_loss kernels, shared by the CPU kernels, the CUDA launchers and
// the torch glue. Plain C++17, no torch headers.
#pragma once

#include <cstdint>

#include "common/kl.h"
#include "common/macros.h"
#include "common/ppo_loss.h"

namespace fastrlhf {

// The tokens, n contiguous fp32 values in rows of row_len (the last may be shorter): a seq-mean's rows are
// its sequences; a token-mean's are fixed-size segments.
struct PPOLossTokens {
  const float* logprobs;      // [n]
  const float* old_logprobs;  // [n]
  const float* advantages;    // [n]
  const uint8_t* mask;        // [n], 0/1
  const float* ref_logprobs;  // [n], or nullptr
  const float* entropy;       // [n], or nullptr
  int64_t n;
  int64_t rows;     // ceil(n / row_len)
  int64_t row_len;  // >= 1
  int kl_estimator;  // KLEstimator (common/kl.h)
  PPOLossOptions options;
};

// Sums over each row's valid tokens; the forward's reduction epilogue reads them.
enum PPOLossSum : int { kLossSum = 0, kClippedSum = 1, kApproxKLSum = 2, kEntropySum = 3, kRefKLSum = 4, kSums = 5 };

// Adds token i of t to its row's sums and valid-token count (the CUDA forward's loop body).
template <KLEstimator E>
FASTRLHF_HD void add_token(const PPOLossTokens& t, int64_t i, double (&sums)[kSums], int64_t& count) {
  // Padding may hold anything, NaN included: its results are computed and then selected away (a select,
  // not a branch, as the mask is data).
  const bool valid = t.mask[i] != 0;
  const float ref = t.ref_logprobs != nullptr ? t.ref_logprobs[i] : 0.0f;
  const float entropy = t.entropy != nullptr ? t.entropy[i] : 0.0f;
  const PPOTokenStats<float> s =
      ppo_token_forward<ScalarPPOMath, E>(t.logprobs[i], t.old_logprobs[i], t.advantages[i], ref, entropy, t.options);
  sums[kLossSum] += valid ? s.loss : 0.0f;
  sums[kClippedSum] += valid ? s.clipped : 0.0f;
  sums[kApproxKLSum] += valid ? s.approx_kl : 0.0f;
  sums[kEntropySum] += valid ? entropy : 0.0f;
  sums[kRefKLSum] += valid ? s.ref_kl : 0.0f;
  count += valid;
}

// scale · d loss / d logp of token i (0 where masked): the CUDA backward's loop body, and the CPU
// backward's scalar tail.
template <KLEstimator E>
FASTRLHF_HD float token_grad(const PPOLossTokens& t, int64_t i, float scale) {
  const float ref = t.ref_logprobs != nullptr ? t.ref_logprobs[i] : 0.0f;
  const float g = scale * ppo_token_grad<ScalarPPOMath, E>(t.logprobs[i], t.old_logprobs[i], t.advantages[i], ref, t.options);
  return t.mask[i] ? g : 0.0f;  // a select: padding's NaN never reaches the output
}

struct PPOLossForwardParams {
  PPOLossTokens tokens;
  double* row_sums;     // [rows, kSums]
  int64_t* row_counts;  // [rows]: valid tokens
};

// d (scale_r · Σ_valid loss) for every token of row r: each row's gradient scale is given.
struct PPOLossBackwardParams {
  PPOLossTokens tokens;
  const float* row_scale;  // [rows]
  float* d_logprobs;       // [n]; 0 where masked
  float* d_entropy;        // [n], or nullptr (no entropy term)
};

}  // namespace fastrlhf
