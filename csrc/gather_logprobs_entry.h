// The compiled gather_logprobs entry points on [N, V] logits: checked, dispatched by device to the CPU
// kernels (csrc/cpu) or the CUDA kernels (csrc/cuda/bindings.cpp). Shared by the pybind module
// (linear_logprobs runs them per chunk of logits) and the TORCH_LIBRARY op (csrc/gather_logprobs_op.cpp).
#pragma once

#include <ATen/core/Tensor.h>

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

// Writes d(loss)/d(logits) into dlogits (which may be logits itself). grad_entropy and entropy are
// undefined or [0]-sized when the entropy has no gradient.
void gather_logprobs_backward(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                              const at::Tensor& entropy, double inv_temperature, int64_t ignore_index,
                              const at::Tensor& dlogits);

}  // namespace fastrlhf
