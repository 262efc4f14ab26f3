// Raw-pointer arguments of the gae and advantages kernels, shared by the CPU kernels, the CUDA
// launchers and the torch glue. All [n_rows, length] arrays are contiguous. Plain C++17.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace fastrlhf {

struct GaeParams {
  const float* rewards;
  const float* values;
  const uint8_t* mask;
  int64_t n_rows;
  int64_t length;
  float gamma;
  float lam;
  float* advantages;
  float* returns;
};

// The fused experience step: per-token KL rewards, the sequence score at each row's last valid
// position, then GAE on those rewards.
struct AdvantagesParams {
  const float* scores;       // [n_rows]
  const void* logprobs;      // dtype
  const void* ref_logprobs;  // dtype
  const float* values;
  const uint8_t* mask;
  int64_t n_rows;
  int64_t length;
  DType dtype;
  float kl_coef;
  int estimator;  // KLEstimator (common/kl.h)
  float clamp;    // +inf: no clamp
  float gamma;
  float lam;
  float* token_rewards;
  float* advantages;
  float* returns;
};

}  // namespace fastrlhf
