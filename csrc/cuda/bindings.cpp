// Torch glue of the CUDA kernels: device checks, device guard, current stream, workspace from the
// caching allocator, then the raw-pointer launchers of csrc/cuda/*.cu.
#include "cuda/bindings.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/gae.h"
#include "cuda/gather_logprobs.h"
#include "cuda/group_advantages.h"
#include "cuda/kl_penalty.h"
#include "cuda/ppo_loss.h"
#include "cuda/ranking_loss.h"
#include "cuda/sample.h"
#include "tensor_params.h"

namespace fastrlhf::cuda {
namespace {

// csrc/fastrlhf.cpp checked that every tensor is on logits' device; this checks it is a GPU.
void check_cuda(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "fastrlhf: expected CUDA tensors, got ", logits.device());
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace

void gather_logprobs_forward(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                             int64_t ignore_index, const at::Tensor& logprobs, const at::Tensor& stats,
                             const at::Tensor& entropy) {
  check_cuda(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const GatherLogprobsForwardParams p =
      make_forward_params(logits, labels, inv_temperature, ignore_index, logprobs, stats, entropy);
  const ForwardPlan plan = plan_gather_logprobs_forward(p.n_rows, p.vocab, sm_count());
  // Freed on return, but the caching allocator only reuses it for work queued after this launch
  // on the same stream, so the kernels finish with it first.
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, logits.options().dtype(at::kByte));
  }
  C10_CUDA_CHECK(launch_gather_logprobs_forward(p, plan, workspace.defined() ? workspace.data_ptr() : nullptr,
                                                at::cuda::getCurrentCUDAStream()));
}

void gather_logprobs_backward(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                              const at::Tensor& entropy, double inv_temperature, int64_t ignore_index,
                              const at::Tensor& dlogits) {
  check_cuda(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const GatherLogprobsBackwardParams p = make_backward_params(
      grad_logprobs, grad_entropy, logits, labels, stats, entropy, inv_temperature, ignore_index, dlogits);
  C10_CUDA_CHECK(launch_gather_logprobs_backward(p, sm_count(), at::cuda::getCurrentCUDAStream()));
}

void kl_penalty(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask,
                const at::Tensor& grad, int64_t estimator, double clamp, const at::Tensor& out) {
  check_cuda(logprobs);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  C10_CUDA_CHECK(launch_kl_penalty(make_kl_penalty_params(logprobs, ref_logprobs, mask, grad, estimator, clamp, out),
                                   sm_count(), at::cuda::getCurrentCUDAStream()));
}

void gae_forward(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                 double lam, const at::Tensor& advantages, const at::Tensor& returns) {
  check_cuda(values);
  const c10::cuda::CUDAGuard guard(values.device());
  C10_CUDA_CHECK(launch_gae_forward(make_gae_params(rewards, values, mask, gamma, lam, advantages, returns),
                                    at::cuda::getCurrentCUDAStream()));
}

void advantages_forward(const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                        const at::Tensor& values, const at::Tensor& mask, double kl_coef, int64_t estimator,
                        double clamp, double gamma, double lam, const at::Tensor& token_rewards,
                        const at::Tensor& advantages, const at::Tensor& returns) {
  check_cuda(values);
  const c10::cuda::CUDAGuard guard(values.device());
  C10_CUDA_CHECK(launch_advantages_forward(
      make_advantages_params(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, clamp, gamma, lam,
                             token_rewards, advantages, returns),
      at::cuda::getCurrentCUDAStream()));
}

void group_advantages_forward(const at::Tensor& scores, const at::Tensor& mask, int64_t group_size, int64_t mode,
                              double gamma, double eps, const at::Tensor& out) {
  check_cuda(mask);
  const c10::cuda::CUDAGuard guard(mask.device());
  C10_CUDA_CHECK(launch_group_advantages_forward(
      make_group_advantages_params(scores, mask, group_size, mode, gamma, eps, out), at::cuda::getCurrentCUDAStream()));
}

void ranking_loss_forward(const at::Tensor& rewards, const at::Tensor& ranks, const at::Tensor& mask,
                          double margin, const at::Tensor& prompt_loss, const at::Tensor& prompt_accuracy,
                          const at::Tensor& num_pairs) {
  check_cuda(rewards);
  const c10::cuda::CUDAGuard guard(rewards.device());
  C10_CUDA_CHECK(launch_ranking_loss_forward(
      make_ranking_loss_forward_params(rewards, ranks, mask, margin, prompt_loss, prompt_accuracy, num_pairs),
      at::cuda::getCurrentCUDAStream()));
}

void ranking_loss_backward(const at::Tensor& grad_prompt_loss, const at::Tensor& rewards, const at::Tensor& ranks,
                           const at::Tensor& mask, double margin, const at::Tensor& d_rewards) {
  check_cuda(rewards);
  const c10::cuda::CUDAGuard guard(rewards.device());
  C10_CUDA_CHECK(launch_ranking_loss_backward(
      make_ranking_loss_backward_params(grad_prompt_loss, rewards, ranks, mask, margin, d_rewards),
      at::cuda::getCurrentCUDAStream()));
}

void sample_forward(const at::Tensor& logits, const at::Tensor& uniforms, double inv_temperature, int64_t top_k,
                    double top_p, double min_p, const at::Tensor& tokens, const at::Tensor& logprobs,
                    const at::Tensor& entropy) {
  check_cuda(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(launch_sample(
      make_sample_params(logits, uniforms, inv_temperature, top_k, top_p, min_p, tokens, logprobs, entropy),
      at::cuda::getCurrentCUDAStream()));
}

void ppo_loss_forward(const PPOLossForwardParams& p, const at::Tensor& device_of) {
  check_cuda(device_of);
  const c10::cuda::CUDAGuard guard(device_of.device());
  C10_CUDA_CHECK(launch_ppo_loss_forward(p, at::cuda::getCurrentCUDAStream()));
}

void ppo_loss_backward(const PPOLossBackwardParams& p, const at::Tensor& device_of) {
  check_cuda(device_of);
  const c10::cuda::CUDAGuard guard(device_of.device());
  C10_CUDA_CHECK(launch_ppo_loss_backward(p, sm_count(), at::cuda::getCurrentCUDAStream()));
}

}  // namespace fastrlhf::cuda
