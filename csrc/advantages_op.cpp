// The compute_advantages TORCH_LIBRARY op: schema, CPU / CUDA / Meta kernels.
//
//   fastrlhf::compute_advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, gamma,
//                                lam, score_clip?, whiten, kl_clamp?) -> (token_rewards, advantages, returns)
//
// The PPO experience step in one call: checks, the fused pass per row (KL-shaped token rewards, the score
// at the last valid token, the reverse GAE walk) and the masked whitening, all in C++, so a call costs a
// dispatcher round trip instead of ~20 Python-dispatched torch ops. No gradient flows through it: the
// Autograd kernel runs the op below autograd (as the Python path's no_grad). The checks raise the
// ValueErrors fastrlhf/ops/advantages.py raises on its plain-torch path, in the same order.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/dispatch.h"
#include "kl_args.h"
#include "masked_whiten.h"
#include "op_checks.h"
#include "tensor_params.h"
#include "tensor_views.h"
#ifdef FASTRLHF_WITH_CUDA
#include "cuda/bindings.h"
#endif

namespace fastrlhf {
namespace {

using at::Tensor;
using c10::string_view;
using op_checks::NamedTensor;

struct AdvantagesCall {
  Tensor scores;                  // contiguous float32 [B], score_clip applied
  Tensor logprobs, ref_logprobs;  // contiguous, one kernel dtype
  Tensor values;                  // contiguous float32 [B, T]
  Tensor mask;                    // contiguous uint8 [B, T]
  float kl_coef, clamp, gamma, lam;
  int estimator;
};

AdvantagesCall prepare(const Tensor& scores, const Tensor& logprobs, const Tensor& ref_logprobs,
                       const Tensor& values, const Tensor& mask, double kl_coef, string_view estimator,
                       double gamma, double lam, std::optional<double> score_clip, std::optional<double> kl_clamp) {
  op_checks::check_float(scores, "scores");
  op_checks::check_float(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 2, "values must be 2-D [batch, time], got shape ",
                    op_checks::py_shape(values.sizes()));
  op_checks::check_float(logprobs, "logprobs");
  op_checks::check_float(ref_logprobs, "ref_logprobs");
  op_checks::check_same_shape("values", values, "mask", mask);
  op_checks::check_same_shape("values", values, "logprobs", logprobs);
  op_checks::check_same_shape("values", values, "ref_logprobs", ref_logprobs);
  AdvantagesCall call;
  call.mask = op_checks::mask_as_bytes("mask", mask);
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == values.size(0), "scores has shape ",
                    op_checks::py_shape(scores.sizes()), "; expected (", values.size(0), ",), one per row");
  op_checks::check_same_device({NamedTensor{"scores", &scores}, NamedTensor{"logprobs", &logprobs},
                                NamedTensor{"ref_logprobs", &ref_logprobs}, NamedTensor{"values", &values},
                                NamedTensor{"mask", &mask}});
  op_checks::check_finite("kl_coef", kl_coef);
  TORCH_CHECK_VALUE(kl_coef >= 0.0, "kl_coef must be >= 0, got ", op_checks::py_float(kl_coef));
  call.kl_coef = static_cast<float>(kl_coef);
  call.estimator = kl_args::estimator_code(estimator);
  call.clamp = static_cast<float>(kl_args::clamp_value("kl_clamp", kl_clamp));
  call.gamma = static_cast<float>(op_checks::check_discount("gamma", gamma));
  call.lam = static_cast<float>(op_checks::check_discount("lam", lam));
  Tensor clipped = scores;
  if (score_clip.has_value()) {
    const double clip = kl_args::clamp_value("score_clip", score_clip);
    clipped = scores.clamp(-clip, clip);
  }
  call.scores = contiguous_as(clipped, at::kFloat);
  // The kernels read float32 / bfloat16 / float16 log-probs of one dtype; anything else is widened.
  const bool widen = logprobs.scalar_type() != ref_logprobs.scalar_type() || logprobs.scalar_type() == at::kDouble;
  call.logprobs = (widen ? logprobs.to(at::kFloat) : logprobs).contiguous();
  call.ref_logprobs = (widen ? ref_logprobs.to(at::kFloat) : ref_logprobs).contiguous();
  call.values = contiguous_as(values, at::kFloat);
  return call;
}

std::tuple<Tensor, Tensor, Tensor> compute_advantages_kernel(const Tensor& scores, const Tensor& logprobs,
                                                             const Tensor& ref_logprobs, const Tensor& values,
                                                             const Tensor& mask, double kl_coef,
                                                             string_view estimator, double gamma, double lam,
                                                             std::optional<double> score_clip, bool whiten,
                                                             std::optional<double> kl_clamp) {
  const AdvantagesCall c =
      prepare(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, gamma, lam, score_clip, kl_clamp);
  Tensor token_rewards = at::empty_like(c.values);
  Tensor advantages = at::empty_like(c.values);
  Tensor returns = at::empty_like(c.values);
  if (c.values.numel() > 0) {
    if (c.values.is_cpu()) {
      cpu::advantages_forward(make_advantages_params(c.scores, c.logprobs, c.ref_logprobs, c.values, c.mask,
                                                     c.kl_coef, c.estimator, c.clamp, c.gamma, c.lam,
                                                     token_rewards, advantages, returns));
    } else {
#ifdef FASTRLHF_WITH_CUDA
      TORCH_CHECK(c.values.is_cuda(), "fastrlhf: compute_advantages has no kernel for device ", values.device());
      cuda::advantages_forward(c.scores, c.logprobs, c.ref_logprobs, c.values, c.mask, c.kl_coef, c.estimator,
                               c.clamp, c.gamma, c.lam, token_rewards, advantages, returns);
#else
      TORCH_CHECK(false, "fastrlhf: compute_advantages has no kernel for device ", values.device());
#endif
    }
  }
  if (whiten) {
    const int64_t count = masked_whiten_into(advantages, c.mask, advantages);
    TORCH_CHECK_VALUE(count >= 2, "mask must select at least 2 positions to estimate a variance, it selects ",
                      count);
  }
  return {token_rewards, advantages, returns};
}

std::tuple<Tensor, Tensor, Tensor> compute_advantages_meta(const Tensor& scores, const Tensor& logprobs,
                                                           const Tensor& ref_logprobs, const Tensor& values,
                                                           const Tensor& mask, double kl_coef,
                                                           string_view estimator, double gamma, double lam,
                                                           std::optional<double> score_clip, bool whiten,
                                                           std::optional<double> kl_clamp) {
  const auto f32 = values.options().dtype(at::kFloat);
  prepare(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, gamma, lam, score_clip, kl_clamp);
  return {at::empty(values.sizes(), f32), at::empty(values.sizes(), f32), at::empty(values.sizes(), f32)};
}

// No gradient flows through the experience step: dispatch below autograd, so no node is recorded.
std::tuple<Tensor, Tensor, Tensor> compute_advantages_no_grad(const Tensor& scores, const Tensor& logprobs,
                                                              const Tensor& ref_logprobs, const Tensor& values,
                                                              const Tensor& mask, double kl_coef,
                                                              string_view estimator, double gamma, double lam,
                                                              std::optional<double> score_clip, bool whiten,
                                                              std::optional<double> kl_clamp) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::compute_advantages", "")
                             .typed<decltype(compute_advantages_kernel)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, gamma, lam, score_clip, whiten,
                 kl_clamp);
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def(
      "compute_advantages(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor mask, "
      "float kl_coef, str estimator, float gamma, float lam, float? score_clip, bool whiten, float? kl_clamp)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) { m.impl("compute_advantages", &fastrlhf::compute_advantages_kernel); }

#ifdef FASTRLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) { m.impl("compute_advantages", &fastrlhf::compute_advantages_kernel); }
#endif

TORCH_LIBRARY_IMPL(fastrlhf, Meta, m) { m.impl("compute_advantages", &fastrlhf::compute_advantages_meta); }

TORCH_LIBRARY_IMPL(fastrlhf, Autograd, m) {
  m.impl("compute_advantages", &fastrlhf::compute_advantages_no_grad);
}
