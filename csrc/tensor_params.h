// Torch side of the ops: builds the raw-pointer kernel params from tensors that
// csrc/fastrlhf.cpp has already validated. Shared by the CPU path and csrc/cuda/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/gae_params.h"
#include "common/gather_logprobs_params.h"
#include "common/group_advantages_params.h"
#include "common/kl_penalty_params.h"
#include "common/ranking_loss_params.h"
#include "common/sample_params.h"

namespace fastrlhf {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "fastrlhf: logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// A [0]-sized tensor stands for "absent".
inline const float* optional_f32(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<float>() : nullptr;
}

inline GatherLogprobsForwardParams make_forward_params(const at::Tensor& logits, const at::Tensor& labels,
                                                       double inv_temperature, int64_t ignore_index,
                                                       const at::Tensor& logprobs, const at::Tensor& stats,
                                                       const at::Tensor& entropy) {
  GatherLogprobsForwardParams p{};
  p.logits = logits.const_data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.labels = labels.const_data_ptr<int64_t>();
  p.n_rows = logits.size(0);
  p.vocab = logits.size(1);
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.ignore_index = ignore_index;
  p.dtype = dtype_of(logits);
  p.logprobs = logprobs.mutable_data_ptr<float>();
  p.stats = stats.mutable_data_ptr<float>();
  p.entropy = entropy.numel() > 0 ? entropy.mutable_data_ptr<float>() : nullptr;
  return p;
}

inline GatherLogprobsBackwardParams make_backward_params(
    const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& logits,
    const at::Tensor& labels, const at::Tensor& stats, const at::Tensor& entropy, double inv_temperature,
    int64_t ignore_index, const at::Tensor& dlogits) {
  GatherLogprobsBackwardParams p{};
  p.grad_logprobs = grad_logprobs.const_data_ptr<float>();
  p.grad_entropy = optional_f32(grad_entropy);
  p.logits = logits.const_data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.labels = labels.const_data_ptr<int64_t>();
  p.stats = stats.const_data_ptr<float>();
  p.entropy = optional_f32(entropy);
  p.n_rows = logits.size(0);
  p.vocab = logits.size(1);
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.ignore_index = ignore_index;
  p.dtype = dtype_of(logits);
  p.dlogits = dlogits.mutable_data_ptr();
  p.dlogits_row_stride = dlogits.stride(0);
  return p;
}

// ---------------------------------------------------------------------------------------------
// kl_penalty, gae, advantages, ranking_loss: every tensor is contiguous (checked by csrc/fastrlhf.cpp).

// uint8 or bool (both one byte of 0 / 1).
inline const uint8_t* mask_ptr(const at::Tensor& t) { return static_cast<const uint8_t*>(t.const_data_ptr()); }

// A [0]-sized mask stands for "no mask".
inline const uint8_t* optional_mask(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? mask_ptr(t) : nullptr;
}

// grad: an f32 tensor for the backward, or an undefined tensor for the forward.
inline KLPenaltyParams make_kl_penalty_params(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                              const at::Tensor& mask, const at::Tensor& grad, int64_t estimator,
                                              double clamp, const at::Tensor& out) {
  KLPenaltyParams p{};
  p.logprobs = logprobs.const_data_ptr();
  p.ref_logprobs = ref_logprobs.const_data_ptr();
  p.mask = optional_mask(mask);
  p.grad = grad.defined() ? grad.const_data_ptr<float>() : nullptr;
  p.n = logprobs.numel();
  p.dtype = dtype_of(logprobs);
  p.estimator = static_cast<int>(estimator);
  p.clamp = static_cast<float>(clamp);
  p.out = out.mutable_data_ptr<float>();
  return p;
}

inline GaeParams make_gae_params(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                 double gamma, double lam, const at::Tensor& advantages,
                                 const at::Tensor& returns) {
  GaeParams p{};
  p.rewards = rewards.const_data_ptr<float>();
  p.values = values.const_data_ptr<float>();
  p.mask = mask_ptr(mask);
  p.n_rows = values.size(0);
  p.length = values.size(1);
  p.gamma = static_cast<float>(gamma);
  p.lam = static_cast<float>(lam);
  p.advantages = advantages.mutable_data_ptr<float>();
  p.returns = returns.mutable_data_ptr<float>();
  return p;
}

inline AdvantagesParams make_advantages_params(const at::Tensor& scores, const at::Tensor& logprobs,
                                               const at::Tensor& ref_logprobs, const at::Tensor& values,
                                               const at::Tensor& mask, double kl_coef, int64_t estimator,
                                               double clamp, double gamma, double lam,
                                               const at::Tensor& token_rewards, const at::Tensor& advantages,
                                               const at::Tensor& returns) {
  AdvantagesParams p{};
  p.scores = scores.const_data_ptr<float>();
  p.logprobs = logprobs.const_data_ptr();
  p.ref_logprobs = ref_logprobs.const_data_ptr();
  p.values = values.const_data_ptr<float>();
  p.mask = mask_ptr(mask);
  p.n_rows = values.size(0);
  p.length = values.size(1);
  p.dtype = dtype_of(logprobs);
  p.kl_coef = static_cast<float>(kl_coef);
  p.estimator = static_cast<int>(estimator);
  p.clamp = static_cast<float>(clamp);
  p.gamma = static_cast<float>(gamma);
  p.lam = static_cast<float>(lam);
  p.token_rewards = token_rewards.mutable_data_ptr<float>();
  p.advantages = advantages.mutable_data_ptr<float>();
  p.returns = returns.mutable_data_ptr<float>();
  return p;
}

inline GroupAdvantagesParams make_group_advantages_params(const at::Tensor& scores, const at::Tensor& mask,
                                                          int64_t group_size, int64_t mode, double gamma,
                                                          double eps, const at::Tensor& out) {
  GroupAdvantagesParams p{};
  p.scores = scores.const_data_ptr<float>();
  p.mask = mask_ptr(mask);
  p.n_rows = mask.size(0);
  p.length = mask.size(1);
  p.group_size = group_size;
  p.mode = static_cast<int>(mode);
  p.gamma = gamma;
  p.eps = eps;
  p.out = out.mutable_data_ptr<float>();
  return p;
}

// The per-prompt outputs as raw float arrays of n values each (the CPU op keeps them in one host buffer);
// d_rewards may be null (no gradient wanted).
inline RankingLossForwardParams make_ranking_loss_forward_params(const at::Tensor& rewards, const at::Tensor& ranks,
                                                                 const at::Tensor& mask, double margin,
                                                                 float* prompt_loss, float* prompt_accuracy,
                                                                 float* num_pairs, float* d_rewards) {
  RankingLossForwardParams p{};
  p.rewards = rewards.const_data_ptr<float>();
  p.ranks = ranks.const_data_ptr<int64_t>();
  p.mask = optional_mask(mask);
  p.n = rewards.size(0);
  p.k = rewards.size(1);
  p.margin = static_cast<float>(margin);
  p.prompt_loss = prompt_loss;
  p.prompt_accuracy = prompt_accuracy;
  p.num_pairs = num_pairs;
  p.d_rewards = d_rewards;
  return p;
}

inline RankingLossForwardParams make_ranking_loss_forward_params(const at::Tensor& rewards,
                                                                 const at::Tensor& ranks, const at::Tensor& mask,
                                                                 double margin, const at::Tensor& prompt_loss,
                                                                 const at::Tensor& prompt_accuracy,
                                                                 const at::Tensor& num_pairs,
                                                                 const at::Tensor& d_rewards = at::Tensor()) {
  return make_ranking_loss_forward_params(rewards, ranks, mask, margin, prompt_loss.mutable_data_ptr<float>(),
                                          prompt_accuracy.mutable_data_ptr<float>(),
                                          num_pairs.mutable_data_ptr<float>(),
                                          d_rewards.defined() ? d_rewards.mutable_data_ptr<float>() : nullptr);
}

inline RankingLossBackwardParams make_ranking_loss_backward_params(const at::Tensor& grad_prompt_loss,
                                                                   const at::Tensor& rewards,
                                                                   const at::Tensor& ranks, const at::Tensor& mask,
                                                                   double margin, const at::Tensor& d_rewards) {
  RankingLossBackwardParams p{};
  p.grad_prompt_loss = grad_prompt_loss.const_data_ptr<float>();
  p.rewards = rewards.const_data_ptr<float>();
  p.ranks = ranks.const_data_ptr<int64_t>();
  p.mask = optional_mask(mask);
  p.n = rewards.size(0);
  p.k = rewards.size(1);
  p.margin = static_cast<float>(margin);
  p.d_rewards = d_rewards.mutable_data_ptr<float>();
  return p;
}

// entropy: [0]-sized when not requested.
inline SampleParams make_sample_params(const at::Tensor& logits, const at::Tensor& uniforms, double inv_temperature,
                                       int64_t top_k, double top_p, double min_p, const at::Tensor& tokens,
                                       const at::Tensor& logprobs, const at::Tensor& entropy) {
  SampleParams p{};
  p.logits = logits.const_data_ptr();
  p.uniforms = uniforms.const_data_ptr<double>();
  p.n_rows = logits.size(0);
  p.vocab = logits.size(1);
  p.dtype = dtype_of(logits);
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.top_k = top_k;
  p.top_p = static_cast<float>(top_p);
  p.min_p = static_cast<float>(min_p);
  p.tokens = tokens.mutable_data_ptr<int64_t>();
  p.logprobs = logprobs.mutable_data_ptr<float>();
  p.entropy = entropy.numel() > 0 ? entropy.mutable_data_ptr<float>() : nullptr;
  return p;
}

}  // namespace fastrlhf
