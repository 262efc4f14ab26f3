// Raw-pointer arguments of the ranking_loss kernels, shared by the CPU kernels, the CUDA launchers
// and the torch glue. All [n, k] arrays are contiguous. Plain C++17, no torch headers.
#pragma once

#include <cstdint>

namespace fastrlhf {

struct RankingLossForwardParams {
  const float* rewards;  // [n, k]
  const int64_t* ranks;  // [n, k], 1 is best
  const uint8_t* mask;   // [n, k], or nullptr for "all valid"
  int64_t n;
  int64_t k;
  float margin;
  float* prompt_loss;      // [n]
  float* prompt_accuracy;  // [n]
  float* num_pairs;        // [n]
  // [n, k] d prompt_loss[n] / d rewards[n, :], written in the same pass; nullptr: not asked for. The CPU
  // kernel fills it; the CUDA forward kernel does not (its op runs the backward kernel for it).
  float* d_rewards;
};

// The CUDA backward kernel's arguments (the CPU forward writes the gradient itself, see d_rewards).
struct RankingLossBackwardParams {
  const float* grad_prompt_loss;  // [n]
  const float* rewards;
  const int64_t* ranks;
  const uint8_t* mask;  // or nullptr
  int64_t n;
  int64_t k;
  float margin;
  float* d_rewards;  // [n, k]
};

}  // namespace fastrlhf
