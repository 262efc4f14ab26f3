// Torch side of the CUDA kernels: called by csrc/fastrlhf.cpp (only when built with
// FASTRLHF_WITH_CUDA) with tensors it has validated and outputs it has allocated.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/ppo_loss_params.h"

namespace fastrlhf::cuda {

void gather_logprobs_forward(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                             int64_t ignore_index, const at::Tensor& logprobs, const at::Tensor& stats,
                             const at::Tensor& entropy);

// grad_entropy / entropy: undefined or [0]-sized when the entropy has no gradient.
void gather_logprobs_backward(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                              const at::Tensor& entropy, double inv_temperature, int64_t ignore_index,
                              const at::Tensor& dlogits);

// grad: undefined for the forward (out = kl), f32 [M] for the backward. mask may be [0] (none).
void kl_penalty(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask,
                const at::Tensor& grad, int64_t estimator, double clamp, const at::Tensor& out);

void gae_forward(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                 double lam, const at::Tensor& advantages, const at::Tensor& returns);

void advantages_forward(const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                        const at::Tensor& values, const at::Tensor& mask, double kl_coef, int64_t estimator,
                        double clamp, double gamma, double lam, const at::Tensor& token_rewards,
                        const at::Tensor& advantages, const at::Tensor& returns);

void group_advantages_forward(const at::Tensor& scores, const at::Tensor& mask, int64_t group_size, int64_t mode,
                              double gamma, double eps, const at::Tensor& out);

// mask may be [0] (all valid).
void ranking_loss_forward(const at::Tensor& rewards, const at::Tensor& ranks, const at::Tensor& mask,
                          double margin, const at::Tensor& prompt_loss, const at::Tensor& prompt_accuracy,
                          const at::Tensor& num_pairs);

void ranking_loss_backward(const at::Tensor& grad_prompt_loss, const at::Tensor& rewards, const at::Tensor& ranks,
                           const at::Tensor& mask, double margin, const at::Tensor& d_rewards);

// One token per row (common/sample_params.h); entropy: [0]-sized when not requested.
void sample_forward(const at::Tensor& logits, const at::Tensor& uniforms, double inv_temperature, int64_t top_k,
                    double top_p, double min_p, const at::Tensor& tokens, const at::Tensor& logprobs,
                    const at::Tensor& entropy);

// Pointers already bound to CUDA tensors on `device_of`'s device (csrc/ppo_loss_op.cpp).
void ppo_loss_forward(const PPOLossForwardParams& p, const at::Tensor& device_of);
void ppo_loss_backward(const PPOLossBackwardParams& p, const at::Tensor& device_of);

}  // namespace fastrlhf::cuda
