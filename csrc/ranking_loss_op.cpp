// The ranking_loss TORCH_LIBRARY op: schema, CPU / CUDA / Meta kernels and a C++ autograd formula.
//
//   fastrlhf::ranking_loss(rewards, ranks, mask?, margin) -> (loss, accuracy, prompts_without_pairs)
//   fastrlhf::ranking_loss_with_grad(rewards, ranks, mask?, margin)
//       -> (loss, accuracy, prompts_without_pairs, d_loss_d_rewards)
//
// loss is the mean over prompts that have a pair of each prompt's mean pair loss, accuracy the same mean
// of the fraction of pairs ordered right, prompts_without_pairs an int64 count (see
// fastrlhf/ops/reference.py::ranking_loss). The kernels compute per-prompt values; the mean over
// prompts is a C++ loop in a fixed order on the CPU and an ATen reduction on CUDA, inside this op.
// The loss is a scalar, so its gradient is d_loss_d_rewards times the incoming gradient: the autograd
// forward asks for it (on the CPU it comes out of the forward's own pass over the pairs, from the same
// exp), and the backward is one multiply. A prompt without pairs gets no gradient.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/dispatch.h"
#include "op_checks.h"
#include "tensor_params.h"
#include "tensor_views.h"
#ifdef FASTRLHF_WITH_CUDA
#include "cuda/bindings.h"
#endif

namespace fastrlhf {
namespace {

using at::Tensor;
using op_checks::NamedTensor;

struct RankingCall {
  Tensor rewards;  // f32 [N, K], contiguous
  Tensor ranks;    // int64 [N, K], contiguous
  Tensor mask;     // uint8 [N, K], contiguous, or undefined for "all valid"
  double margin;
};

// The largest number of valid responses of any prompt (CPU: one pass over the bytes).
int64_t max_valid_per_prompt(const Tensor& mask) {
  if (!mask.is_cpu()) return mask.sum(1).max().item<int64_t>();
  const uint8_t* m = mask.const_data_ptr<uint8_t>();
  const int64_t n = mask.size(0), k = mask.size(1);
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t valid = 0;
    for (int64_t j = 0; j < k; ++j) valid += m[i * k + j] != 0;
    best = std::max(best, valid);
  }
  return best;
}

RankingCall prepare(const Tensor& rewards, const Tensor& ranks, const std::optional<Tensor>& mask, double margin) {
  op_checks::check_float(rewards, "rewards");
  op_checks::check_index(ranks, "ranks");
  TORCH_CHECK_VALUE(rewards.dim() == 2, "rewards must be 2-D [prompts, K], got shape ",
                    op_checks::py_shape(rewards.sizes()));
  op_checks::check_same_shape("rewards", rewards, "ranks", ranks);
  const Tensor* mask_ptr = mask.has_value() && mask->defined() ? &*mask : nullptr;
  if (mask_ptr != nullptr) op_checks::check_same_shape("rewards", rewards, "mask", *mask_ptr);
  op_checks::check_same_device(
      {NamedTensor{"rewards", &rewards}, NamedTensor{"ranks", &ranks}, NamedTensor{"mask", mask_ptr}});
  TORCH_CHECK_VALUE(rewards.size(1) >= 2, "rewards has K=", rewards.size(1),
                    " responses per prompt; a ranking needs K >= 2");
  RankingCall call;
  call.margin = op_checks::check_finite("margin", margin);
  call.rewards = contiguous_as(rewards, at::kFloat);
  call.ranks = contiguous_as(ranks, at::kLong);
  if (mask_ptr != nullptr) {
    call.mask = op_checks::mask_as_bytes("mask", *mask_ptr);
    TORCH_CHECK_VALUE(rewards.size(0) == 0 || call.mask.is_meta() || max_valid_per_prompt(call.mask) >= 2,
                      "mask leaves every prompt with fewer than 2 responses: there is no pair to rank");
  }  // else: undefined, "all valid" (optional_mask gives the kernels nullptr)
  return call;
}

using RankingOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The op's outputs; d_loss_d_rewards (f32 [N, K]) only when with_grad, else undefined.
RankingOutputs ranking_outputs(const Tensor& rewards, const Tensor& ranks, const std::optional<Tensor>& mask,
                               double margin, bool with_grad) {
  const RankingCall c = prepare(rewards, ranks, mask, margin);
  const int64_t n = c.rewards.size(0), k = c.rewards.size(1);
  const auto f32 = c.rewards.options().dtype(at::kFloat);
  Tensor d_rewards = with_grad ? at::empty({n, k}, f32) : Tensor();
  if (c.rewards.is_cpu()) {
    // The per-prompt values live in one host buffer, not three tensors: on a small call the allocations,
    // not the pairs, are the op's cost (its outputs are the three scalars and the gradient).
    std::vector<float> per_prompt(static_cast<size_t>(3 * n));
    if (n > 0) {
      cpu::ranking_loss_forward(make_ranking_loss_forward_params(
          c.rewards, c.ranks, c.mask, c.margin, per_prompt.data(), per_prompt.data() + n, per_prompt.data() + 2 * n,
          with_grad ? d_rewards.mutable_data_ptr<float>() : nullptr));
    }
    // The mean over prompts with pairs, in prompt order (deterministic); no-pair prompts hold 0.
    const float* loss = per_prompt.data();
    const float* accuracy = loss + n;
    const float* pairs = loss + 2 * n;
    double loss_sum = 0.0, accuracy_sum = 0.0;
    int64_t with_pairs = 0;
    for (int64_t i = 0; i < n; ++i) {
      loss_sum += loss[i];
      accuracy_sum += accuracy[i];
      with_pairs += pairs[i] > 0.0f;
    }
    const double denom = static_cast<double>(std::max<int64_t>(with_pairs, 1));
    if (with_grad) {
      // Each prompt's weight in the mean; the kernel already divided by the prompt's own pair count.
      float* d = d_rewards.mutable_data_ptr<float>();
      const float weight = static_cast<float>(1.0 / denom);
      for (int64_t i = 0; i < d_rewards.numel(); ++i) d[i] *= weight;
    }
    return {at::scalar_tensor(loss_sum / denom, f32), at::scalar_tensor(accuracy_sum / denom, f32),
            at::scalar_tensor(n - with_pairs, f32.dtype(at::kLong)), d_rewards};
  }
  Tensor prompt_loss = at::empty({n}, f32), prompt_accuracy = at::empty({n}, f32), num_pairs = at::empty({n}, f32);
#ifdef FASTRLHF_WITH_CUDA
  TORCH_CHECK(c.rewards.is_cuda(), "fastrlhf: ranking_loss has no kernel for device ", rewards.device());
  if (n > 0) cuda::ranking_loss_forward(c.rewards, c.ranks, c.mask, c.margin, prompt_loss, prompt_accuracy, num_pairs);
  const Tensor with_pairs = num_pairs.gt(0).sum();
  const Tensor denom = with_pairs.clamp_min(1).to(at::kFloat);
  if (with_grad && n > 0) {
    // The backward kernel with every prompt weighted 1 / (prompts with pairs): d loss / d rewards.
    const Tensor weight = (1.0f / denom).expand({n}).contiguous();
    cuda::ranking_loss_backward(weight, c.rewards, c.ranks, c.mask, c.margin, d_rewards);
  }
  return {prompt_loss.sum() / denom, prompt_accuracy.sum() / denom, at::rsub(with_pairs, n), d_rewards};
#else
  TORCH_CHECK(false, "fastrlhf: ranking_loss has no kernel for device ", rewards.device());
#endif
}

std::tuple<Tensor, Tensor, Tensor> ranking_loss_kernel(const Tensor& rewards, const Tensor& ranks,
                                                       const std::optional<Tensor>& mask, double margin) {
  auto [loss, accuracy, without, unused] = ranking_outputs(rewards, ranks, mask, margin, false);
  return {loss, accuracy, without};
}

RankingOutputs ranking_loss_with_grad_kernel(const Tensor& rewards, const Tensor& ranks,
                                             const std::optional<Tensor>& mask, double margin) {
  return ranking_outputs(rewards, ranks, mask, margin, true);
}

std::tuple<Tensor, Tensor, Tensor> ranking_loss_meta(const Tensor& rewards, const Tensor& ranks,
                                                     const std::optional<Tensor>& mask, double margin) {
  prepare(rewards, ranks, mask, margin);
  const auto f32 = rewards.options().dtype(at::kFloat);
  return {at::empty({}, f32), at::empty({}, f32), at::empty({}, f32.dtype(at::kLong))};
}

RankingOutputs ranking_loss_with_grad_meta(const Tensor& rewards, const Tensor& ranks,
                                           const std::optional<Tensor>& mask, double margin) {
  auto [loss, accuracy, without] = ranking_loss_meta(rewards, ranks, mask, margin);
  return {loss, accuracy, without, at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat))};
}

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::ranking_loss", "")
                             .typed<decltype(ranking_loss_kernel)>();
  return op;
}

const auto& with_grad_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::ranking_loss_with_grad", "")
                             .typed<decltype(ranking_loss_with_grad_kernel)>();
  return op;
}

class RankingLossFunction : public torch::autograd::Function<RankingLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& rewards,
                                                const Tensor& ranks, const std::optional<Tensor>& mask,
                                                double margin) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, accuracy, without, d_rewards] = with_grad_op().call(rewards, ranks, mask, margin);
    ctx->save_for_backward({d_rewards});
    ctx->saved_data["dtype"] = static_cast<int64_t>(rewards.scalar_type());
    ctx->mark_non_differentiable({accuracy, without});
    return {loss, accuracy, without};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(4);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return out;
    const Tensor d_rewards = ctx->get_saved_variables()[0];
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    out[0] = at::mul(d_rewards, grads[0]).to(dtype);
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> ranking_loss_autograd(const Tensor& rewards, const Tensor& ranks,
                                                         const std::optional<Tensor>& mask, double margin) {
  if (!at::GradMode::is_enabled() || !rewards.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(rewards, ranks, mask, margin);
  }
  auto out = RankingLossFunction::apply(rewards, ranks, mask, margin);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("ranking_loss(Tensor rewards, Tensor ranks, Tensor? mask, float margin) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ranking_loss_with_grad(Tensor rewards, Tensor ranks, Tensor? mask, float margin) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("ranking_loss", &fastrlhf::ranking_loss_kernel);
  m.impl("ranking_loss_with_grad", &fastrlhf::ranking_loss_with_grad_kernel);
}

#ifdef FASTRLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("ranking_loss", &fastrlhf::ranking_loss_kernel);
  m.impl("ranking_loss_with_grad", &fastrlhf::ranking_loss_with_grad_kernel);
}
#endif

TORCH_LIBRARY_IMPL(fastrlhf, Meta, m) {
  m.impl("ranking_loss", &fastrlhf::ranking_loss_meta);
  m.impl("ranking_loss_with_grad", &fastrlhf::ranking_loss_with_grad_meta);
}

TORCH_LIBRARY_IMPL(fastrlhf, Autograd, m) { m.impl("ranking_loss", &fastrlhf::ranking_loss_autograd); }
