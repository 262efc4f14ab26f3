// Raw-pointer arguments of the gather_logprobs kernels, shared by the CPU kernels, the CUDA
// launchers and the torch glue. Plain C++17, no torch headers.
#pragma once

#include <cstdint>

#include "common/dtype.h"  // DType: the logits / dlogits element type; everything else is fp32 or int64

namespace fastrlhf {

struct GatherLogprobsForwardParams {
  const void* logits;        // [n_rows, vocab], element stride 1 along vocab
  int64_t logits_row_stride;  // in elements
  const int64_t* labels;     // [n_rows], each ignore_index or in [0, vocab)
  int64_t n_rows;
  int64_t vocab;
  float inv_temperature;
  int64_t ignore_index;
  DType dtype;
  float* logprobs;  // [n_rows]
  float* stats;     // [n_rows, 2] contiguous: (m, log_s) per row (common/online_softmax.h), 0 if ignored
  float* entropy;   // [n_rows], or nullptr when entropy isn't requested
};

// One block of vocabulary columns folded into each row's running softmax state (CPU only): the forward
// of linear_logprobs by columns, where no row's logits exist whole. After the last block, the finalize
// kernel turns the states into the outputs of GatherLogprobsForwardParams, as one pass would have.
struct GatherLogprobsFoldParams {
  const void* logits;         // [n_rows, vocab]: the block's columns, element stride 1
  int64_t logits_row_stride;  // in elements
  const int64_t* labels;      // [n_rows]: the label's column in this block, skip_label (row not read),
                              // or any other negative (the label lies in another block)
  int64_t n_rows;
  int64_t vocab;  // columns in this block
  float inv_temperature;
  int64_t skip_label;
  DType dtype;
  bool with_entropy;
  float* state;        // [n_rows, 3] contiguous (max, sum, ent) of SoftmaxState, updated in place
  float* label_logit;  // [n_rows]: the raw logit at the label, written by the block that holds it
};

// The outputs from the folded states: `out` as for one pass (its logits pointer unused), labels the
// caller's, each row's label logit from `label_logit`.
struct GatherLogprobsFinalizeParams {
  GatherLogprobsForwardParams out;
  const float* state;        // [n_rows, 3]
  const float* label_logit;  // [n_rows]
};

struct GatherLogprobsBackwardParams {
  const float* grad_logprobs;  // [n_rows]
  const float* grad_entropy;   // [n_rows], or nullptr (treated as zeros)
  const void* logits;          // [n_rows, vocab]
  int64_t logits_row_stride;
  const int64_t* labels;
  const float* stats;    // [n_rows, 2] contiguous, saved by the forward
  const float* entropy;  // [n_rows], saved by the forward; required iff grad_entropy is set
  int64_t n_rows;
  int64_t vocab;
  float inv_temperature;
  int64_t ignore_index;
  DType dtype;
  void* dlogits;  // [n_rows, vocab], same dtype as logits; may alias logits
  int64_t dlogits_row_stride;
};

}  // namespace fastrlhf
