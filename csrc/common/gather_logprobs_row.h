// One gather_logprobs row's outputs from its softmax state, shared by the CPU and CUDA forwards.
// Plain C++17, no torch headers: nvcc compiles it standalone.
#pragma once

#include <cstdint>

#include "common/gather_logprobs_params.h"
#include "common/macros.h"
#include "common/online_softmax.h"

namespace fastrlhf {

// Writes the row's logprob, its saved stats (m, log_s) and its entropy (when asked for). An ignored
// row (label == ignore_index) gets zeros. label_logit is the raw logit at the label (unread when the
// row is ignored: the caller must not index with ignore_index). Math supplies the fused
// multiply-subtract of shifted_logit, the same one the row's sums used.
template <class Math>
FASTRLHF_HD void write_row_outputs(const GatherLogprobsForwardParams& p, int64_t row, int64_t label,
                                   float label_logit, const SoftmaxState& st) {
  float* stats = p.stats + 2 * row;
  if (label == p.ignore_index) {
    p.logprobs[row] = 0.0f;
    stats[0] = stats[1] = 0.0f;
    if (p.entropy != nullptr) p.entropy[row] = 0.0f;
    return;
  }
  const float log_s = state_log_sum(st);
  stats[0] = st.max;
  stats[1] = log_s;
  p.logprobs[row] = label_logprob<Math>(label_logit, p.inv_temperature, st.max, log_s);
  if (p.entropy != nullptr) p.entropy[row] = state_entropy(st);
}

}  // namespace fastrlhf
