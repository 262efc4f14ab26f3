// Raw-pointer arguments of the sample kernels, shared by the CPU kernels, the CUDA launcher and the
// torch glue. Arrays are contiguous. Plain C++17, no torch headers.
//
// What every backend computes, per row b (fastrlhf/ops/sample.py documents it for users; the float64
// torch reference is fastrlhf.ops.reference.sample):
//   m    = max_j fl32(x_j * inv_temperature);  t_j = fma(x_j, inv_temperature, -m);  e_j = exp(t_j)  (fp32)
//   tau  = 0; top_k in (0, vocab): tau = k-th largest e_j (ties counted);
//          top_p < 1: tau = max(tau, largest e value v with  sum_{e_j >= max(v, tau_k)} e_j >= top_p * S_k),
//                     S_k = sum_{e_j >= tau_k} e_j;
//          min_p > 0: tau = max(tau, min_p * e_max), e_max = e of the largest logit (within rounding of 1:
//                     relative to it, the max is always kept)
//   K    = { j : e_j >= tau and e_j > 0 };  S = sum_K e_j
//   tok  = the smallest j in K with sum_{i in K, i <= j} e_i > uniforms[b] * S (the last j in K if rounding
//          leaves none);  logprob = t_tok - log S;  entropy = log S - sum_K e_j t_j / S.
// A row with a NaN or +inf logit, or only -inf logits, gets token -1 and logprob NaN: the caller reports it.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

namespace fastrlhf {

struct SampleParams {
  const void* logits;      // [n_rows, vocab] of `dtype`
  const double* uniforms;  // [n_rows], each in [0, 1)
  int64_t n_rows;
  int64_t vocab;
  DType dtype;
  float inv_temperature;  // > 0
  int64_t top_k;          // 0 (or >= vocab): no top-k
  float top_p;            // in (0, 1]; 1: no top-p
  float min_p;            // in [0, 1); 0: no min-p (relative to the max's e)
  int64_t* tokens;        // [n_rows]: the sampled index, -1 for a row with no valid distribution
  float* logprobs;        // [n_rows]: log-prob of the token under the truncated distribution
  float* entropy;         // [n_rows] or nullptr: entropy of the truncated distribution
};

// The outputs of a row with no valid distribution: token -1, log-prob and entropy NaN.
FASTRLHF_HD void write_invalid_row(const SampleParams& p, int64_t row) {
  p.tokens[row] = -1;
  p.logprobs[row] = NAN;
  if (p.entropy != nullptr) p.entropy[row] = NAN;
}

}  // namespace fastrlhf
