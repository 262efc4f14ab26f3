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
  // CPU forward only: when not null, also d kl / d logprobs per token ([n], 0 where masked), which a
  // backward then scales instead of recomputing it from both inputs.
  float* derivative;
};

}  // namespace fastrlhf

namespace fastrlhf {

// The CPU forward of a mean reduction: the masked sum and kept-token count of each segment of
// `segment_len` consecutive tokens (the last may be shorter). A seq-mean's segments are its rows; a
// token-mean's are fixed-size chunks, so the result does not depend on the thread count.
struct KLPenaltySumsParams {
  const void* logprobs;      // [n], dtype
  const void* ref_logprobs;  // [n], dtype
  const uint8_t* mask;       // [n], or nullptr
  int64_t n;
  int64_t segment_len;
  DType dtype;
  int estimator;
  float clamp;
  double* sums;       // [ceil(n / segment_len)]
  int64_t* counts;    // [ceil(n / segment_len)]
  float* derivative;  // [n] or nullptr: as KLPenaltyParams::derivative
};

// The CPU backward: d loss / d logprobs for one of three gradient shapes, and optionally its negation
// (d loss / d ref_logprobs) from the same pass.
struct KLPenaltyGradParams {
  const void* logprobs;      // [n], dtype
  const void* ref_logprobs;  // [n], dtype
  const uint8_t* mask;       // [n], or nullptr
  const float* grad;         // [n]: a per-token gradient (reduction "none"), or nullptr
  const float* row_scale;    // [n / row_len]: each row's gradient (seq-mean: grad / count), or nullptr
  float scale;               // every token's gradient when grad and row_scale are both nullptr
  int64_t n;
  int64_t row_len;
  DType dtype;
  int estimator;
  float clamp;
  float* d_logprobs;      // [n]
  float* d_ref_logprobs;  // [n], or nullptr
  // [n] or nullptr: d kl / d logprobs saved by the forward (KLPenaltyParams::derivative). When set, the
  // backward scales it and reads neither logprobs nor ref_logprobs (the mask it still applies).
  const float* derivative;
};

}  // namespace fastrlhf
