// The compiled gather_logprobs entry points on [N, V] logits: checked, dispatched by device to the CPU
// kernels (csrc/cpu) or the CUDA kernels (csrc/cuda/bindings.cpp). Shared by the pybind module
// (linear_logprobs runs them per chunk of logits) and the TORCH_LIBRARY op (csrc/gather_logprobs_op.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <tuple>

namespace fastrlhf {

// Returns (logprobs f32[N], stats f32[N, 2], entropy f32[N] or f32[0]); ignored rows give 0. stats holds
// each row's (m, log_s) for the backward: m = max_j z_j, log_s = log sum_j e^{z_j - m}, z = logits * inv_t.
// On CPU tensors the labels are range-checked in the kernel's loop (a ValueError).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_forward(const at::Tensor& logits,
                                                                        const at::Tensor& labels,
                                                                        double inv_temperature,
                                                                        int64_t ignore_index,
                                                                        bool with_entropy);

// Every label is ignore_index or in [0, vocab), else a ValueError worded as ops/_validation.py's
// check_labels_in_range. CPU tensors: one loop; other devices: a reduction and a device-to-host read (a
// sync). Meta tensors have no values to check.
void check_labels_in_range(const at::Tensor& labels, int64_t vocab, int64_t ignore_index);

// linear_logprobs' forward by blocks of vocabulary columns, on CPU tensors (csrc/cpu/gather_logprobs.cpp):
// empty_softmax_states(N) gives the running states f32 [N, 3] (max -inf, sum 0, ent 0); each
// gather_logprobs_fold merges one block's logits [N, W] into them, and records the raw logit at
// block_labels[i] (the label's column in the block) into label_logit f32 [N]. A row whose block label is
// skip_label is not read; any other negative block label means the label lies in another block.
// gather_logprobs_finalize then gives gather_logprobs_forward's outputs for the caller's labels.
at::Tensor empty_softmax_states(int64_t n, const at::TensorOptions& options);
void gather_logprobs_fold(const at::Tensor& logits, const at::Tensor& block_labels, double inv_temperature,
                          int64_t skip_label, bool with_entropy, const at::Tensor& state,
                          const at::Tensor& label_logit);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_finalize(const at::Tensor& state,
                                                                         const at::Tensor& label_logit,
                                                                         const at::Tensor& labels,
                                                                         double inv_temperature,
                                                                         int64_t ignore_index, bool with_entropy);

// Writes d(loss)/d(logits) into dlogits (which may be logits itself). grad_entropy and entropy are
// undefined or [0]-sized when the entropy has no gradient.
void gather_logprobs_backward(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                              const at::Tensor& entropy, double inv_temperature, int64_t ignore_index,
                              const at::Tensor& dlogits);

}  // namespace fastrlhf
