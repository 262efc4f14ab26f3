// Raw-pointer arguments of the kl_penalty kernels, shared by the CPU kernels, the CUDA launchers
// and the torch glue. Plain C++17, no torch headers.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace fastrlhf {

// One struct for both directions: the forward leaves grad null and writes kl into out; the
// backward reads grad and writes d kl / d logprobs into out (the caller negates it for ref).
struct KLPenaltyParams {
  const void* logprobs;      // [n], dtype
  const void* ref_logprobs;  // [n], dtype
  const uint8_t* mask;       // [n], or nullptr for "every position counts"
  const float* grad;         // [n] backward only; nullptr in the forward
  int64_t n;
  DType dtype;
  int estimator;  // KLEstimator (common/kl.h)
  float clamp;    // +inf: no clamp
  float* out;     // [n]
};

}  // namespace fastrlhf
