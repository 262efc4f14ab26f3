// The ppo_policy_loss TORCH_LIBRARY op: schema, CPU / CUDA / Meta kernels and a C++ autograd formula.
//
//   fastrlhf::ppo_policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs?, entropy?, clip_eps,
//       clip_eps_high?, dual_clip?, kl_coef, kl_estimator, entropy_coef, loss_agg)
//       -> (loss, clip_fraction, approx_kl, entropy_mean, ref_kl, row_weight)
//   fastrlhf::ppo_policy_loss_backward(grad, <the same inputs>, row_weight, <the same options>)
//       -> (d_logprobs, d_entropy)
//
// The kernels sum each row's per-token loss and stats (common/ppo_loss.h); the aggregation is the
// epilogue here: loss = Σ_rows row_weight · row loss sum, with row_weight 1/(valid tokens) for
// "token-mean" (rows are fixed segments) and 1/(row's valid tokens · non-empty rows) for
// "seq-mean-token-mean" (rows are the sequences). The stats are means over every valid token. The
// backward reads row_weight instead of recounting. entropy_mean / ref_kl are [0] without entropy /
// reference. The definition is fastrlhf/ops/reference.py (ppo_policy_loss).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/ppo_loss.h"
#include "common/ppo_loss_params.h"
#include "cpu/dispatch.h"
#include "op_checks.h"
#include "ppo_loss_options.h"
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
using MaybeTensor = std::optional<Tensor>;

// Tokens per token-mean row: fixed, so the summation order is too.
constexpr int64_t kTokenMeanSegment = 16384;

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

const Tensor* present(const MaybeTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// Everything about one call that the kernels need, after the checks.
struct PPOLossCall {
  Tensor logprobs, old_logprobs, advantages, ref_logprobs, entropy;  // contiguous fp32 (ref, entropy: or undefined)
  Tensor mask;                                                        // contiguous uint8
  bool seq_mean;
  int64_t rows_out;  // row_weight's length: the sequences (seq-mean) or 1
  PPOLossTokens tokens;
};

Tensor as_f32(const Tensor& t) { return contiguous_as(t, at::kFloat); }

PPOLossCall prepare(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages, const Tensor& mask,
                    const MaybeTensor& ref_logprobs, const MaybeTensor& entropy, double clip_eps,
                    std::optional<double> clip_eps_high, std::optional<double> dual_clip, double kl_coef,
                    string_view kl_estimator, double entropy_coef, string_view loss_agg) {
  const PolicyLossSettings settings = check_policy_loss_options(clip_eps, clip_eps_high, dual_clip, kl_coef,
                                                                kl_estimator, entropy_coef, loss_agg);
  const bool seq_mean = settings.seq_mean;

  const Tensor* ref = present(ref_logprobs);
  const Tensor* ent = present(entropy);
  const std::pair<const char*, const Tensor*> inputs[] = {
      {"logprobs", &logprobs}, {"old_logprobs", &old_logprobs}, {"advantages", &advantages},
      {"ref_logprobs", ref},   {"entropy", ent}};
  for (const auto& [name, t] : inputs) {
    if (t == nullptr) continue;
    op_checks::check_float(*t, name);
    op_checks::check_same_shape("logprobs", logprobs, name, *t);
  }
  op_checks::check_same_shape("logprobs", logprobs, "mask", mask);
  TORCH_CHECK_VALUE(!seq_mean || logprobs.dim() == 2,
                    "loss_agg='seq-mean-token-mean' needs [batch, time] inputs, but logprobs has shape ",
                    op_checks::py_shape(logprobs.sizes()));
  op_checks::check_same_device({NamedTensor{"logprobs", &logprobs}, NamedTensor{"old_logprobs", &old_logprobs},
                                NamedTensor{"advantages", &advantages}, NamedTensor{"mask", &mask},
                                NamedTensor{"ref_logprobs", ref}, NamedTensor{"entropy", ent}});
  for (const auto& [name, t] : inputs) {
    if (t != nullptr) op_checks::check_kernel_dtype(*t, name);
  }

  PPOLossCall c;
  c.logprobs = as_f32(logprobs);
  c.old_logprobs = as_f32(old_logprobs);
  c.advantages = as_f32(advantages);
  if (ref != nullptr) c.ref_logprobs = as_f32(*ref);
  if (ent != nullptr) c.entropy = as_f32(*ent);
  c.mask = op_checks::mask_as_bytes("mask", mask);
  c.seq_mean = seq_mean;
  const int64_t n = logprobs.numel();
  const int64_t row_len = seq_mean ? std::max<int64_t>(logprobs.size(1), 1) : kTokenMeanSegment;
  c.rows_out = seq_mean ? logprobs.size(0) : 1;

  PPOLossTokens& t = c.tokens;
  t = PPOLossTokens{};
  t.n = n;
  t.row_len = row_len;
  t.rows = (n + row_len - 1) / row_len;
  t.kl_estimator = settings.kl_estimator;
  PPOLossOptions& o = t.options;
  o = settings.options;
  o.has_ref = ref != nullptr;
  o.has_entropy = ent != nullptr;
  return c;
}

// Raw pointers, once the call's tensors are on a device with data (not Meta).
void bind_pointers(const PPOLossCall& c, PPOLossTokens& t) {
  t.logprobs = c.logprobs.const_data_ptr<float>();
  t.old_logprobs = c.old_logprobs.const_data_ptr<float>();
  t.advantages = c.advantages.const_data_ptr<float>();
  t.mask = mask_ptr(c.mask);
  t.ref_logprobs = c.ref_logprobs.defined() ? c.ref_logprobs.const_data_ptr<float>() : nullptr;
  t.entropy = c.entropy.defined() ? c.entropy.const_data_ptr<float>() : nullptr;
}

Outputs empty_outputs(const PPOLossCall& c, const at::TensorOptions& f32) {
  auto stat = [&](bool present) { return present ? at::empty({}, f32) : at::empty({0}, f32); };
  return {at::empty({}, f32),
          at::empty({}, f32),
          at::empty({}, f32),
          stat(c.tokens.options.has_entropy),
          stat(c.tokens.options.has_ref),
          at::empty({c.rows_out}, f32)};
}

// The reduction epilogue on the host: the rows' sums and counts to the loss, the stats and row_weight.
Outputs forward_cpu(const PPOLossCall& c) {
  const PPOLossTokens& t = c.tokens;
  std::vector<double> sums(static_cast<size_t>(t.rows) * kSums, 0.0);
  std::vector<int64_t> counts(t.rows, 0);
  if (t.n > 0) {
    PPOLossForwardParams p{};
    p.tokens = t;
    bind_pointers(c, p.tokens);
    p.row_sums = sums.data();
    p.row_counts = counts.data();
    cpu::ppo_loss_forward(p);
  }
  Outputs out = empty_outputs(c, c.logprobs.options());
  double totals[kSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t total_count = 0, nonempty = 0;
  for (int64_t r = 0; r < t.rows; ++r) {
    for (int k = 0; k < kSums; ++k) totals[k] += sums[r * kSums + k];
    total_count += counts[r];
    nonempty += counts[r] > 0;
  }
  float* row_weight = std::get<5>(out).mutable_data_ptr<float>();
  double loss = 0.0;
  if (c.seq_mean) {
    const double sequences = static_cast<double>(std::max<int64_t>(nonempty, 1));
    for (int64_t r = 0; r < c.rows_out; ++r) {
      // rows_out equals t.rows unless there are no tokens at all (then every count is 0).
      const int64_t count = r < t.rows ? counts[r] : 0;
      const double weight = 1.0 / (static_cast<double>(std::max<int64_t>(count, 1)) * sequences);
      row_weight[r] = static_cast<float>(weight);
      if (r < t.rows) loss += weight * sums[r * kSums + kLossSum];
    }
  } else {
    const double weight = 1.0 / static_cast<double>(std::max<int64_t>(total_count, 1));
    row_weight[0] = static_cast<float>(weight);
    loss = weight * totals[kLossSum];
  }
  const double per_token = 1.0 / static_cast<double>(std::max<int64_t>(total_count, 1));
  *std::get<0>(out).mutable_data_ptr<float>() = static_cast<float>(loss);
  *std::get<1>(out).mutable_data_ptr<float>() = static_cast<float>(totals[kClippedSum] * per_token);
  *std::get<2>(out).mutable_data_ptr<float>() = static_cast<float>(totals[kApproxKLSum] * per_token);
  if (t.options.has_entropy) *std::get<3>(out).mutable_data_ptr<float>() = static_cast<float>(totals[kEntropySum] * per_token);
  if (t.options.has_ref) *std::get<4>(out).mutable_data_ptr<float>() = static_cast<float>(totals[kRefKLSum] * per_token);
  return out;
}

#ifdef FASTRLHF_WITH_CUDA
// The same epilogue in ATen on the device (no host round trip).
Outputs forward_cuda(const PPOLossCall& c) {
  const PPOLossTokens& t = c.tokens;
  const auto f64 = c.logprobs.options().dtype(at::kDouble);
  Tensor sums = at::zeros({t.rows, kSums}, f64);
  Tensor counts = at::zeros({t.rows}, c.logprobs.options().dtype(at::kLong));
  if (t.n > 0) {
    PPOLossForwardParams p{};
    p.tokens = t;
    bind_pointers(c, p.tokens);
    p.row_sums = sums.mutable_data_ptr<double>();
    p.row_counts = counts.mutable_data_ptr<int64_t>();
    cuda::ppo_loss_forward(p, c.logprobs);
  }
  const Tensor counts_f = counts.to(at::kDouble);
  const Tensor per_token = 1.0 / counts_f.sum().clamp_min(1);
  Tensor row_weight, loss;
  if (c.seq_mean) {
    const Tensor row_counts = t.rows == c.rows_out ? counts_f : at::zeros({c.rows_out}, f64);
    const Tensor sequences = row_counts.gt(0).sum().to(at::kDouble).clamp_min(1);
    row_weight = 1.0 / (row_counts.clamp_min(1) * sequences);
    loss = t.rows == c.rows_out ? (row_weight * sums.select(1, kLossSum)).sum() : at::zeros({}, f64);
  } else {
    row_weight = per_token.reshape({1});
    loss = sums.select(1, kLossSum).sum() * per_token;
  }
  const Tensor stats = sums.sum(0) * per_token;
  const auto f32 = [](const Tensor& x) { return x.to(at::kFloat); };
  const auto stat = [&](bool present, int k) {
    return present ? f32(stats.select(0, k)) : at::empty({0}, c.logprobs.options());
  };
  return {f32(loss),
          f32(stats.select(0, kClippedSum)),
          f32(stats.select(0, kApproxKLSum)),
          stat(t.options.has_entropy, kEntropySum),
          stat(t.options.has_ref, kRefKLSum),
          f32(row_weight)};
}
#endif

Outputs ppo_policy_loss_kernel(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                               const Tensor& mask, const MaybeTensor& ref_logprobs, const MaybeTensor& entropy,
                               double clip_eps, std::optional<double> clip_eps_high, std::optional<double> dual_clip,
                               double kl_coef, string_view kl_estimator, double entropy_coef, string_view loss_agg) {
  const PPOLossCall c = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_eps,
                                clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg);
  if (c.logprobs.is_cpu()) return forward_cpu(c);
#ifdef FASTRLHF_WITH_CUDA
  if (c.logprobs.is_cuda()) return forward_cuda(c);
#endif
  TORCH_CHECK(false, "fastrlhf: ppo_policy_loss has no kernel for device ", logprobs.device());
}

Outputs ppo_policy_loss_meta(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                             const Tensor& mask, const MaybeTensor& ref_logprobs, const MaybeTensor& entropy,
                             double clip_eps, std::optional<double> clip_eps_high, std::optional<double> dual_clip,
                             double kl_coef, string_view kl_estimator, double entropy_coef, string_view loss_agg) {
  const PPOLossCall c = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_eps,
                                clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg);
  return empty_outputs(c, logprobs.options().dtype(at::kFloat));
}

using Grads = std::tuple<Tensor, Tensor>;

Grads ppo_policy_loss_backward_kernel(const Tensor& grad, const Tensor& logprobs, const Tensor& old_logprobs,
                                      const Tensor& advantages, const Tensor& mask, const MaybeTensor& ref_logprobs,
                                      const MaybeTensor& entropy, const Tensor& row_weight, double clip_eps,
                                      std::optional<double> clip_eps_high, std::optional<double> dual_clip,
                                      double kl_coef, string_view kl_estimator, double entropy_coef,
                                      string_view loss_agg) {
  const PPOLossCall c = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_eps,
                                clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg);
  TORCH_CHECK_VALUE(row_weight.numel() == c.rows_out, "row_weight has ", row_weight.numel(),
                    " elements; the forward gives ", c.rows_out);
  const auto f32 = c.logprobs.options();
  const bool entropy_grad = c.tokens.options.has_entropy && c.tokens.options.entropy_coef != 0.0f;
  Tensor d_logprobs = at::empty(logprobs.sizes(), f32);
  Tensor d_entropy = entropy_grad ? at::empty(logprobs.sizes(), f32) : at::empty({0}, f32);
  if (c.tokens.n > 0) {
    PPOLossBackwardParams p{};
    p.tokens = c.tokens;
    bind_pointers(c, p.tokens);
    p.d_logprobs = d_logprobs.mutable_data_ptr<float>();
    p.d_entropy = entropy_grad ? d_entropy.mutable_data_ptr<float>() : nullptr;
    // Each kernel row's gradient scale: the incoming gradient times its row's weight (token-mean: one
    // weight for every segment).
    const Tensor scale = (row_weight.to(at::kFloat) * grad.to(at::kFloat)).contiguous();
    if (c.logprobs.is_cpu()) {
      std::vector<float> per_row(c.tokens.rows, scale.const_data_ptr<float>()[0]);
      if (c.seq_mean) std::copy_n(scale.const_data_ptr<float>(), c.tokens.rows, per_row.begin());
      p.row_scale = per_row.data();
      cpu::ppo_loss_backward(p);
    } else {
#ifdef FASTRLHF_WITH_CUDA
      TORCH_CHECK(c.logprobs.is_cuda(), "fastrlhf: ppo_policy_loss has no kernel for device ", logprobs.device());
      const Tensor per_row = c.seq_mean ? scale : scale.expand({c.tokens.rows}).contiguous();
      p.row_scale = per_row.const_data_ptr<float>();
      cuda::ppo_loss_backward(p, c.logprobs);
#else
      TORCH_CHECK(false, "fastrlhf: ppo_policy_loss has no kernel for device ", logprobs.device());
#endif
    }
  }
  // The gradients take their inputs' dtypes (the kernels write fp32).
  return {d_logprobs.to(logprobs.scalar_type()), entropy_grad ? d_entropy.to(entropy->scalar_type()) : d_entropy};
}

Grads ppo_policy_loss_backward_meta(const Tensor& grad, const Tensor& logprobs, const Tensor& old_logprobs,
                                    const Tensor& advantages, const Tensor& mask, const MaybeTensor& ref_logprobs,
                                    const MaybeTensor& entropy, const Tensor& row_weight, double clip_eps,
                                    std::optional<double> clip_eps_high, std::optional<double> dual_clip,
                                    double kl_coef, string_view kl_estimator, double entropy_coef,
                                    string_view loss_agg) {
  const PPOLossCall c = prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_eps,
                                clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg);
  const bool entropy_grad = c.tokens.options.has_entropy && c.tokens.options.entropy_coef != 0.0f;
  return {at::empty_like(logprobs),
          entropy_grad ? at::empty_like(*entropy) : at::empty({0}, logprobs.options().dtype(at::kFloat))};
}

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::ppo_policy_loss", "")
                             .typed<decltype(ppo_policy_loss_kernel)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::ppo_policy_loss_backward", "")
                             .typed<decltype(ppo_policy_loss_backward_kernel)>();
  return op;
}

class PPOPolicyLossFunction : public torch::autograd::Function<PPOPolicyLossFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& logprobs, const Tensor& old_logprobs,
      const Tensor& advantages, const Tensor& mask, const MaybeTensor& ref_logprobs, const MaybeTensor& entropy,
      double clip_eps, std::optional<double> clip_eps_high, std::optional<double> dual_clip, double kl_coef,
      string_view kl_estimator, double entropy_coef, string_view loss_agg) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, clip_fraction, approx_kl, entropy_mean, ref_kl, row_weight] =
        forward_op().call(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_eps, clip_eps_high,
                          dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg);
    ctx->save_for_backward({logprobs, old_logprobs, advantages, mask, ref_logprobs.value_or(Tensor()),
                            entropy.value_or(Tensor()), row_weight});
    ctx->saved_data["clip_eps"] = clip_eps;
    ctx->saved_data["clip_eps_high"] = clip_eps_high;
    ctx->saved_data["dual_clip"] = dual_clip;
    ctx->saved_data["kl_coef"] = kl_coef;
    ctx->saved_data["kl_estimator"] = std::string(kl_estimator);
    ctx->saved_data["entropy_coef"] = entropy_coef;
    ctx->saved_data["loss_agg"] = std::string(loss_agg);
    ctx->mark_non_differentiable({clip_fraction, approx_kl, entropy_mean, ref_kl, row_weight});
    return {loss, clip_fraction, approx_kl, entropy_mean, ref_kl, row_weight};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::autograd::variable_list out(13);
    if (!grads[0].defined()) return out;
    const auto optional = [](const Tensor& t) { return t.defined() ? MaybeTensor(t) : std::nullopt; };
    auto& d = ctx->saved_data;
    auto [d_logprobs, d_entropy] = backward_op().call(
        grads[0], saved[0], saved[1], saved[2], saved[3], optional(saved[4]), optional(saved[5]), saved[6],
        d["clip_eps"].toDouble(), d["clip_eps_high"].toOptional<double>(), d["dual_clip"].toOptional<double>(),
        d["kl_coef"].toDouble(), d["kl_estimator"].toStringRef(), d["entropy_coef"].toDouble(),
        d["loss_agg"].toStringRef());
    if (ctx->needs_input_grad(0)) out[0] = d_logprobs;
    // needs_input_grad counts the tensor inputs that were given (an absent optional has no edge); `out` is
    // indexed by argument. No entropy term: the loss does not depend on the entropy (an undefined
    // gradient, as autograd gives).
    if (saved[5].defined() && d_entropy.numel() > 0 && ctx->needs_input_grad(saved[4].defined() ? 5 : 4)) {
      out[5] = d_entropy;
    }
    return out;
  }
};

Outputs ppo_policy_loss_autograd(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                                 const Tensor& mask, const MaybeTensor& ref_logprobs, const MaybeTensor& entropy,
                                 double clip_eps, std::optional<double> clip_eps_high, std::optional<double> dual_clip,
                                 double kl_coef, string_view kl_estimator, double entropy_coef,
                                 string_view loss_agg) {
  const bool entropy_requires_grad = entropy.has_value() && entropy->defined() && entropy->requires_grad();
  // Without a gradient to track, skip the autograd node entirely.
  if (!at::GradMode::is_enabled() || !(logprobs.requires_grad() || entropy_requires_grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_eps,
                             clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg);
  }
  auto out = PPOPolicyLossFunction::apply(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_eps,
                                          clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def(
      "ppo_policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor? ref_logprobs, "
      "Tensor? entropy, float clip_eps, float? clip_eps_high, float? dual_clip, float kl_coef, str kl_estimator, "
      "float entropy_coef, str loss_agg) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ppo_policy_loss_backward(Tensor grad, Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
      "Tensor? ref_logprobs, Tensor? entropy, Tensor row_weight, float clip_eps, float? clip_eps_high, "
      "float? dual_clip, float kl_coef, str kl_estimator, float entropy_coef, str loss_agg) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("ppo_policy_loss", &fastrlhf::ppo_policy_loss_kernel);
  m.impl("ppo_policy_loss_backward", &fastrlhf::ppo_policy_loss_backward_kernel);
}

#ifdef FASTRLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("ppo_policy_loss", &fastrlhf::ppo_policy_loss_kernel);
  m.impl("ppo_policy_loss_backward", &fastrlhf::ppo_policy_loss_backward_kernel);
}
#endif

TORCH_LIBRARY_IMPL(fastrlhf, Meta, m) {
  m.impl("ppo_policy_loss", &fastrlhf::ppo_policy_loss_meta);
  m.impl("ppo_policy_loss_backward", &fastrlhf::ppo_policy_loss_backward_meta);
}

TORCH_LIBRARY_IMPL(fastrlhf, Autograd, m) { m.impl("ppo_policy_loss", &fastrlhf::ppo_policy_loss_autograd); }
