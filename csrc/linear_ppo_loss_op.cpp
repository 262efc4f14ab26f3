// The linear_ppo_policy_loss TORCH_LIBRARY op: PPO's clipped policy loss straight from the last hidden
// states and the lm_head, its gradient made in the same chunked pass, with CPU / CUDA / Meta kernels and a
// C++ autograd formula. The compiled backends' form of ops/policy_loss.py::linear_ppo_policy_loss (whose
// Python engine stays for the Triton kernels).
//
//   fastrlhf::linear_ppo_policy_loss(hidden [..., H], weight [V, H], labels [...], bias [V]?,
//       old_logprobs [...]?, advantages [...], mask [...], ref_logprobs [...]?, temperature, ignore_index,
//       clip_eps, clip_eps_high?, dual_clip?, kl_coef, kl_estimator, entropy_coef, compute_entropy, loss_agg,
//       chunk_rows)
//       -> (loss, clip_fraction, approx_kl, entropy_mean or [0], ref_kl or [0], logprobs [...],
//           entropy [...] or [0])
//   fastrlhf::linear_ppo_policy_loss_with_grads(<the same>, bool[3] output_mask)
//       -> (<the same seven>, d hidden, d weight, d bias), [0] where not asked for
//
// Per chunk of rows: one GEMM for the float32 logits, the gather kernel's forward, the per-token derivative
// of the loss (the ppo_policy_loss op's backward, with the aggregation's token weights as its row weights),
// the gather kernel's backward in place, and two GEMMs for d(hidden) and d(weight): three GEMMs in all,
// against four for linear_logprobs followed by ppo_policy_loss. The loss and the stats are one call of the
// ppo_policy_loss op on the finished log-probs. The autograd formula scales the stored gradients by the
// incoming one. `old_logprobs` absent is on-policy: each chunk's own log-probs stand in (ratio exactly 1).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "gather_logprobs_entry.h"
#include "linear_head.h"
#include "op_checks.h"
#include "ppo_loss_options.h"
#include "tensor_params.h"
#include "tensor_views.h"

namespace fastrlhf {
namespace {

using at::Tensor;
using c10::string_view;
using op_checks::NamedTensor;
using MaybeTensor = std::optional<Tensor>;
using MaybeDouble = std::optional<double>;
using LossOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

const Tensor* present(const MaybeTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// Everything about one call after the checks.
struct FusedCall {
  linear_head::LinearCall linear;
  // In the labels' shape [...], contiguous: the loss op takes them so, and the chunks slice flat views.
  Tensor old_logprobs, advantages, ref_logprobs;  // float32; old / ref undefined when absent
  Tensor valid;  // mask and a label that is not ignore_index: uint8 on CPU, bool elsewhere (valid_tokens)
  bool with_entropy;
  bool seq_mean;
};

// 0/1 in mask_bytes' shape: the mask (uint8 or bool, contiguous) set and the label (int64 [N]) not
// ignore_index. On CPU one loop (the two comparisons and the logical and as ATen ops were a third of a
// small call), into uint8, which the loss op takes as its mask without a view. Elsewhere bool: the loss
// op would check a uint8 mask's values on the device and wait for the answer.
Tensor valid_tokens(const Tensor& mask_bytes, const Tensor& labels, int64_t ignore_index) {
  if (!mask_bytes.is_cpu() || !labels.is_cpu()) {
    return mask_bytes.ne(0).logical_and_(labels.view(mask_bytes.sizes()).ne(ignore_index));
  }
  Tensor valid = at::empty(mask_bytes.sizes(), labels.options().dtype(at::kByte));
  const uint8_t* m = mask_ptr(mask_bytes);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  uint8_t* v = valid.mutable_data_ptr<uint8_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) v[i] = (m[i] != 0) & (y[i] != ignore_index);
  return valid;
}

// Worded as ops/policy_loss.py's checks of linear_ppo_policy_loss.
FusedCall prepare(const Tensor& hidden, const Tensor& weight, const Tensor& labels, const MaybeTensor& bias,
                  const MaybeTensor& old_logprobs, const Tensor& advantages, const Tensor& mask,
                  const MaybeTensor& ref_logprobs, double temperature, int64_t ignore_index, double clip_eps,
                  MaybeDouble clip_eps_high, MaybeDouble dual_clip, double kl_coef, string_view kl_estimator,
                  double entropy_coef, bool compute_entropy, string_view loss_agg, int64_t chunk_rows) {
  const PolicyLossSettings settings = check_policy_loss_options(clip_eps, clip_eps_high, dual_clip, kl_coef,
                                                                kl_estimator, entropy_coef, loss_agg);
  FusedCall c;
  c.linear = linear_head::prepare(hidden, weight, labels, bias, temperature, chunk_rows);
  const Tensor* old = present(old_logprobs);
  const Tensor* ref = present(ref_logprobs);
  const std::pair<const char*, const Tensor*> per_token[] = {
      {"old_logprobs", old}, {"advantages", &advantages}, {"ref_logprobs", ref}};
  for (const auto& [name, t] : per_token) {
    if (t != nullptr) op_checks::check_float(*t, name);
  }
  for (const auto& [name, t] : per_token) {
    if (t != nullptr) op_checks::check_same_shape("labels", labels, name, *t);
  }
  TORCH_CHECK_VALUE(!settings.seq_mean || labels.dim() == 2,
                    "loss_agg='seq-mean-token-mean' needs [batch, time] inputs, but labels has shape ",
                    op_checks::py_shape(labels.sizes()));
  op_checks::check_same_shape("labels", labels, "mask", mask);
  op_checks::check_same_device({NamedTensor{"hidden", &hidden}, NamedTensor{"old_logprobs", old},
                                NamedTensor{"advantages", &advantages}, NamedTensor{"mask", &mask},
                                NamedTensor{"ref_logprobs", ref}});
  // A bool mask needs no check of its values, nor a uint8 view.
  const Tensor mask_bytes =
      mask.scalar_type() == at::kBool ? mask.contiguous() : op_checks::mask_as_bytes("mask", mask);
  c.valid = valid_tokens(mask_bytes, c.linear.labels, ignore_index);
  if (old != nullptr) c.old_logprobs = contiguous_as(*old, at::kFloat);
  c.advantages = contiguous_as(advantages, at::kFloat);
  if (ref != nullptr) c.ref_logprobs = contiguous_as(*ref, at::kFloat);
  c.with_entropy = compute_entropy || entropy_coef != 0.0;
  c.seq_mean = settings.seq_mean;
  return c;
}

// loss_token_weights below, in loops over the valid flags, with the reference's float32 arithmetic.
Tensor loss_token_weights_cpu(const FusedCall& c, at::IntArrayRef labels_shape) {
  const uint8_t* v = c.valid.const_data_ptr<uint8_t>();
  const int64_t n = c.valid.numel();
  const auto f32 = c.valid.options().dtype(at::kFloat);
  if (!c.seq_mean) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) count += v[i];
    return at::full({1}, 1.0f / static_cast<float>(std::max<int64_t>(count, 1)), f32);
  }
  const int64_t length = labels_shape[1];
  const int64_t batch = labels_shape[0];
  std::vector<float> per_sequence(batch, 0.0f);
  int64_t sequences = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t count = 0;
    for (int64_t t = 0; t < length; ++t) count += v[b * length + t];
    per_sequence[b] = static_cast<float>(std::max<int64_t>(count, 1));
    sequences += count > 0;
  }
  const float sequences_f = static_cast<float>(std::max<int64_t>(sequences, 1));
  Tensor weights = at::empty({n}, f32);
  float* w = weights.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) w[i] = (static_cast<float>(v[i]) / per_sequence[i / length]) / sequences_f;
  return weights;
}

// The loss's weight of each token, as the per-chunk derivative takes it (reference.loss_token_weights):
// "token-mean" one weight for every token, [1] = 1/(valid tokens); "seq-mean-token-mean" [N], the token's
// 1/(its sequence's valid tokens · sequences with a valid token).
Tensor loss_token_weights(const FusedCall& c, at::IntArrayRef labels_shape) {
  if (c.valid.is_cpu()) return loss_token_weights_cpu(c, labels_shape);
  const Tensor valid = c.valid.to(at::kFloat);
  if (!c.seq_mean) return valid.sum().clamp_min(1).reciprocal().reshape({1});
  const Tensor per_sequence = valid.view(labels_shape).sum(-1, /*keepdim=*/true);
  const Tensor sequences = per_sequence.gt(0).sum().to(at::kFloat).clamp_min(1);
  return (valid.view(labels_shape) / per_sequence.clamp_min(1) / sequences).reshape({-1}).contiguous();
}

const auto& policy_loss_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::ppo_policy_loss", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&, const MaybeTensor&,
                                 const MaybeTensor&, double, MaybeDouble, MaybeDouble, double, string_view, double,
                                 string_view)>();
  return op;
}

const auto& policy_loss_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::ppo_policy_loss_backward", "")
                             .typed<std::tuple<Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const MaybeTensor&, const MaybeTensor&, const Tensor&, double, MaybeDouble,
                                 MaybeDouble, double, string_view, double, string_view)>();
  return op;
}

// Both ops' outputs. `gradient_slots`: the with_grads op's last three outputs, a [0] tensor for a gradient not
// asked for; without it (the forward-only op, which drops them) those are left undefined, unallocated.
Outputs fused_outputs(const Tensor& hidden, const Tensor& weight, const Tensor& labels, const MaybeTensor& bias,
                      const MaybeTensor& old_logprobs, const Tensor& advantages, const Tensor& mask,
                      const MaybeTensor& ref_logprobs, double temperature, int64_t ignore_index, double clip_eps,
                      MaybeDouble clip_eps_high, MaybeDouble dual_clip, double kl_coef, string_view kl_estimator,
                      double entropy_coef, bool compute_entropy, string_view loss_agg, int64_t chunk_rows,
                      std::array<bool, 3> output_mask, bool gradient_slots) {
  const FusedCall c = prepare(hidden, weight, labels, bias, old_logprobs, advantages, mask, ref_logprobs,
                              temperature, ignore_index, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator,
                              entropy_coef, compute_entropy, loss_agg, chunk_rows);
  const Tensor& labels_flat = c.linear.labels;
  const int64_t rows = labels_flat.numel();
  const int64_t vocab = weight.size(0);
  // Before any GEMM: a bad label fails the call whole, whichever chunk holds it.
  check_labels_in_range(labels_flat, vocab, ignore_index);
  const linear_head::Fp32Head head(weight, bias);
  const bool need_hidden = output_mask[0];
  const bool need_weight = output_mask[1];
  const bool need_bias = output_mask[2] && present(bias) != nullptr;
  const bool need_grads = need_hidden || need_weight || need_bias;
  const bool entropy_in_loss = entropy_coef != 0.0;
  const auto f32 = hidden.options().dtype(at::kFloat);
  const Tensor empty = at::empty({0}, f32);

  // One chunk (the common case at small sizes): the gather kernel's outputs are the results, no copies.
  const bool one_chunk = rows <= chunk_rows;
  Tensor logprobs = one_chunk ? Tensor() : at::empty({rows}, f32);
  Tensor entropy = one_chunk || !c.with_entropy ? empty : at::empty({rows}, f32);
  // One chunk takes the whole tensors, not slices of them: each slice is a dispatcher call on a small call's path.
  const auto chunk_of = [&](const Tensor& t, int64_t start, int64_t end) {
    return one_chunk ? t : t.slice(0, start, end);
  };
  Tensor d_hidden = need_hidden && !one_chunk ? at::empty(c.linear.hidden.sizes(), hidden.options()) : Tensor();
  Tensor d_weight, d_bias;  // float32 sums over the chunks, started by the first chunk's product
  const Tensor weights = need_grads ? loss_token_weights(c, labels.sizes()) : Tensor();
  const Tensor one = need_grads ? at::ones({}, f32) : Tensor();
  // "seq-mean-token-mean" hands the backward each token as a row of its own, with its own weight.
  const auto as_rows = [&](const Tensor& t) { return c.seq_mean ? t.view({-1, 1}) : t; };
  const string_view chunk_agg = c.seq_mean ? "seq-mean-token-mean" : "token-mean";
  // The per-token inputs as [N], for the chunks' slices; only the gradient's pass slices them.
  const auto flat_if = [&](const Tensor& t) { return need_grads && t.defined() ? flat(t) : Tensor(); };
  const Tensor old_flat = flat_if(c.old_logprobs), advantages_flat = flat_if(c.advantages);
  const Tensor ref_flat = flat_if(c.ref_logprobs), valid_flat = flat_if(c.valid);

  for (int64_t start = 0; start < rows; start += chunk_rows) {
    const int64_t end = std::min(start + chunk_rows, rows);
    const Tensor hidden_rows = chunk_of(c.linear.hidden, start, end);
    const Tensor chunk_labels = chunk_of(labels_flat, start, end);
    // The chunk's logits die at the end of this iteration, before the next GEMM allocates its own.
    Tensor logits = head.logits(hidden_rows, 0, vocab);
    auto [lp, stats, ent] =
        gather_logprobs_forward(logits, chunk_labels, c.linear.inv_temperature, ignore_index, c.with_entropy);
    if (one_chunk) {
      logprobs = lp;
      if (c.with_entropy) entropy = ent;
    } else {
      logprobs.slice(0, start, end).copy_(lp);
      if (c.with_entropy) entropy.slice(0, start, end).copy_(ent);
    }
    if (!need_grads) continue;
    const Tensor lp_rows = as_rows(lp);
    const auto slice = [&](const Tensor& t) -> MaybeTensor {
      return t.defined() ? MaybeTensor(as_rows(chunk_of(t, start, end))) : std::nullopt;
    };
    auto [grad_lp, grad_ent] = policy_loss_backward_op().call(
        one, lp_rows, old_flat.defined() ? *slice(old_flat) : lp_rows, *slice(advantages_flat), *slice(valid_flat),
        slice(ref_flat), entropy_in_loss ? MaybeTensor(as_rows(ent)) : std::nullopt,
        c.seq_mean ? chunk_of(weights, start, end) : weights, clip_eps, clip_eps_high, dual_clip, kl_coef,
        kl_estimator, entropy_coef, chunk_agg);
    gather_logprobs_backward(grad_lp.view({-1}), entropy_in_loss ? grad_ent.view({-1}) : empty, logits,
                             chunk_labels, stats, entropy_in_loss ? ent : empty, c.linear.inv_temperature,
                             ignore_index, logits);
    const Tensor d_low = head.cast(logits);  // fp32 stays fp32; with a native bf16 GEMM, rounded once
    if (need_hidden) {
      const Tensor d_rows = head.mm(d_low, head.weight);
      if (one_chunk) {
        d_hidden = d_rows.to(hidden.scalar_type());
      } else {
        d_hidden.slice(0, start, end).copy_(d_rows);
      }
    }
    if (need_weight) {
      if (start == 0) {
        d_weight = head.mm(d_low.t(), head.cast(hidden_rows));
      } else {
        head.addmm_(d_weight, d_low.t(), head.cast(hidden_rows));
      }
    }
    if (need_bias) {
      if (start == 0) {
        d_bias = logits.sum(0);
      } else {
        d_bias.add_(logits.sum(0));
      }
    }
  }
  if (rows == 0) {  // no chunk ran: no log-probs, and zero gradients
    logprobs = at::empty({0}, f32);
    if (need_hidden) d_hidden = at::empty(c.linear.hidden.sizes(), hidden.options());
    if (need_weight) d_weight = at::zeros(weight.sizes(), f32);
    if (need_bias) d_bias = at::zeros({vocab}, f32);
  }

  const auto shaped = [&](const Tensor& t) { return t.sizes() == labels.sizes() ? t : t.view(labels.sizes()); };
  const Tensor logprobs_shaped = shaped(logprobs);
  auto [loss, clip_fraction, approx_kl, entropy_mean, ref_kl, row_weight] = policy_loss_op().call(
      logprobs_shaped, c.old_logprobs.defined() ? c.old_logprobs : logprobs_shaped, c.advantages, c.valid,
      c.ref_logprobs.defined() ? MaybeTensor(c.ref_logprobs) : std::nullopt,
      c.with_entropy ? MaybeTensor(shaped(entropy)) : std::nullopt, clip_eps, clip_eps_high, dual_clip, kl_coef,
      kl_estimator, entropy_coef, loss_agg);
  (void)row_weight;
  // A gradient not asked for comes back as its own empty tensor (op outputs may not alias).
  const auto none = [&] { return gradient_slots ? at::empty({0}, hidden.options()) : Tensor(); };
  return {loss,
          clip_fraction,
          approx_kl,
          entropy_mean,
          ref_kl,
          logprobs_shaped,
          c.with_entropy ? shaped(entropy) : entropy,
          need_hidden ? d_hidden.view(hidden.sizes()) : none(),
          need_weight ? d_weight.to(weight.scalar_type()) : none(),
          need_bias ? d_bias.to(bias->scalar_type()) : none()};
}

Outputs fused_kernel(const Tensor& hidden, const Tensor& weight, const Tensor& labels, const MaybeTensor& bias,
                     const MaybeTensor& old_logprobs, const Tensor& advantages, const Tensor& mask,
                     const MaybeTensor& ref_logprobs, double temperature, int64_t ignore_index, double clip_eps,
                     MaybeDouble clip_eps_high, MaybeDouble dual_clip, double kl_coef, string_view kl_estimator,
                     double entropy_coef, bool compute_entropy, string_view loss_agg, int64_t chunk_rows,
                     std::array<bool, 3> output_mask) {
  return fused_outputs(hidden, weight, labels, bias, old_logprobs, advantages, mask, ref_logprobs, temperature,
                       ignore_index, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef,
                       compute_entropy, loss_agg, chunk_rows, output_mask, /*gradient_slots=*/true);
}

Outputs fused_meta(const Tensor& hidden, const Tensor& weight, const Tensor& labels, const MaybeTensor& bias,
                   const MaybeTensor& old_logprobs, const Tensor& advantages, const Tensor& mask,
                   const MaybeTensor& ref_logprobs, double temperature, int64_t ignore_index, double clip_eps,
                   MaybeDouble clip_eps_high, MaybeDouble dual_clip, double kl_coef, string_view kl_estimator,
                   double entropy_coef, bool compute_entropy, string_view loss_agg, int64_t chunk_rows,
                   std::array<bool, 3> output_mask) {
  const FusedCall c = prepare(hidden, weight, labels, bias, old_logprobs, advantages, mask, ref_logprobs,
                              temperature, ignore_index, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator,
                              entropy_coef, compute_entropy, loss_agg, chunk_rows);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const auto stat = [&](bool given) { return given ? at::empty({}, f32) : at::empty({0}, f32); };
  const auto none = [&] { return at::empty({0}, hidden.options()); };
  return {at::empty({}, f32),
          at::empty({}, f32),
          at::empty({}, f32),
          stat(c.with_entropy),
          stat(c.ref_logprobs.defined()),
          at::empty(labels.sizes(), f32),
          c.with_entropy ? at::empty(labels.sizes(), f32) : at::empty({0}, f32),
          output_mask[0] ? at::empty_like(hidden) : none(),
          output_mask[1] ? at::empty_like(weight) : none(),
          output_mask[2] && present(bias) != nullptr ? at::empty_like(*bias) : none()};
}

LossOutputs loss_outputs(Outputs&& out) {
  return {std::move(std::get<0>(out)), std::move(std::get<1>(out)), std::move(std::get<2>(out)),
          std::move(std::get<3>(out)), std::move(std::get<4>(out)), std::move(std::get<5>(out)),
          std::move(std::get<6>(out))};
}

LossOutputs linear_ppo_policy_loss_kernel(const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                                          const MaybeTensor& bias, const MaybeTensor& old_logprobs,
                                          const Tensor& advantages, const Tensor& mask,
                                          const MaybeTensor& ref_logprobs, double temperature, int64_t ignore_index,
                                          double clip_eps, MaybeDouble clip_eps_high, MaybeDouble dual_clip,
                                          double kl_coef, string_view kl_estimator, double entropy_coef,
                                          bool compute_entropy, string_view loss_agg, int64_t chunk_rows) {
  return loss_outputs(fused_outputs(hidden, weight, labels, bias, old_logprobs, advantages, mask, ref_logprobs,
                                    temperature, ignore_index, clip_eps, clip_eps_high, dual_clip, kl_coef,
                                    kl_estimator, entropy_coef, compute_entropy, loss_agg, chunk_rows,
                                    {false, false, false}, /*gradient_slots=*/false));
}

LossOutputs linear_ppo_policy_loss_meta(const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                                        const MaybeTensor& bias, const MaybeTensor& old_logprobs,
                                        const Tensor& advantages, const Tensor& mask, const MaybeTensor& ref_logprobs,
                                        double temperature, int64_t ignore_index, double clip_eps,
                                        MaybeDouble clip_eps_high, MaybeDouble dual_clip, double kl_coef,
                                        string_view kl_estimator, double entropy_coef, bool compute_entropy,
                                        string_view loss_agg, int64_t chunk_rows) {
  return loss_outputs(fused_meta(hidden, weight, labels, bias, old_logprobs, advantages, mask, ref_logprobs,
                                 temperature, ignore_index, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator,
                                 entropy_coef, compute_entropy, loss_agg, chunk_rows, {false, false, false}));
}

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::linear_ppo_policy_loss", "")
                             .typed<decltype(linear_ppo_policy_loss_kernel)>();
  return op;
}

const auto& with_grads_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::linear_ppo_policy_loss_with_grads", "")
                             .typed<decltype(fused_kernel)>();
  return op;
}

class LinearPPOPolicyLossFunction : public torch::autograd::Function<LinearPPOPolicyLossFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& hidden, const Tensor& weight, const Tensor& labels,
      const MaybeTensor& bias, const MaybeTensor& old_logprobs, const Tensor& advantages, const Tensor& mask,
      const MaybeTensor& ref_logprobs, double temperature, int64_t ignore_index, double clip_eps,
      MaybeDouble clip_eps_high, MaybeDouble dual_clip, double kl_coef, string_view kl_estimator,
      double entropy_coef, bool compute_entropy, string_view loss_agg, int64_t chunk_rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool bias_requires_grad = present(bias) != nullptr && bias->requires_grad();
    auto [loss, clip_fraction, approx_kl, entropy_mean, ref_kl, logprobs, entropy, d_hidden, d_weight, d_bias] =
        with_grads_op().call(hidden, weight, labels, bias, old_logprobs, advantages, mask, ref_logprobs, temperature,
                             ignore_index, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef,
                             compute_entropy, loss_agg, chunk_rows,
                             {hidden.requires_grad(), weight.requires_grad(), bias_requires_grad});
    ctx->save_for_backward({d_hidden, d_weight, d_bias});
    ctx->saved_data["has_bias"] = present(bias) != nullptr;
    ctx->mark_non_differentiable({clip_fraction, approx_kl, entropy_mean, ref_kl, logprobs, entropy});
    return {loss, clip_fraction, approx_kl, entropy_mean, ref_kl, logprobs, entropy};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(19);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor scale = grads[0].to(at::kFloat);
    // The gradients were made for an upstream gradient of 1. They are always multiplied, even by 1 (one
    // pass over [V, H], under 1% of the GEMMs' time at V=32000, H=512): handing the saved tensor itself on
    // would let a caller's in-place change of a returned gradient (clipping between two backward passes of
    // a retained graph) break the next pass. A low-precision gradient is scaled in float32.
    const auto scaled = [&](const Tensor& d) -> Tensor {
      return d.scalar_type() == at::kFloat ? d * scale : (d.to(at::kFloat) * scale).to(d.scalar_type());
    };
    // needs_input_grad counts the tensor inputs given (labels included; an absent bias has no edge);
    // `out` is indexed by argument.
    if (ctx->needs_input_grad(0)) out[0] = scaled(saved[0]);
    if (ctx->needs_input_grad(1)) out[1] = scaled(saved[1]);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) out[3] = scaled(saved[2]);
    return out;
  }
};

LossOutputs linear_ppo_policy_loss_autograd(const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                                            const MaybeTensor& bias, const MaybeTensor& old_logprobs,
                                            const Tensor& advantages, const Tensor& mask,
                                            const MaybeTensor& ref_logprobs, double temperature, int64_t ignore_index,
                                            double clip_eps, MaybeDouble clip_eps_high, MaybeDouble dual_clip,
                                            double kl_coef, string_view kl_estimator, double entropy_coef,
                                            bool compute_entropy, string_view loss_agg, int64_t chunk_rows) {
  const bool bias_requires_grad = present(bias) != nullptr && bias->requires_grad();
  // Without a gradient to make, no autograd node and no gradient GEMMs.
  if (!at::GradMode::is_enabled() || !(hidden.requires_grad() || weight.requires_grad() || bias_requires_grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(hidden, weight, labels, bias, old_logprobs, advantages, mask, ref_logprobs, temperature,
                             ignore_index, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef,
                             compute_entropy, loss_agg, chunk_rows);
  }
  auto out = LinearPPOPolicyLossFunction::apply(hidden, weight, labels, bias, old_logprobs, advantages, mask,
                                                ref_logprobs, temperature, ignore_index, clip_eps, clip_eps_high,
                                                dual_clip, kl_coef, kl_estimator, entropy_coef, compute_entropy,
                                                loss_agg, chunk_rows);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def(
      "linear_ppo_policy_loss(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor? old_logprobs, "
      "Tensor advantages, Tensor mask, Tensor? ref_logprobs, float temperature, int ignore_index, float clip_eps, "
      "float? clip_eps_high, float? dual_clip, float kl_coef, str kl_estimator, float entropy_coef, "
      "bool compute_entropy, str loss_agg, int chunk_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "linear_ppo_policy_loss_with_grads(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, "
      "Tensor? old_logprobs, Tensor advantages, Tensor mask, Tensor? ref_logprobs, float temperature, "
      "int ignore_index, float clip_eps, float? clip_eps_high, float? dual_clip, float kl_coef, str kl_estimator, "
      "float entropy_coef, bool compute_entropy, str loss_agg, int chunk_rows, bool[3] output_mask) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("linear_ppo_policy_loss", &fastrlhf::linear_ppo_policy_loss_kernel);
  m.impl("linear_ppo_policy_loss_with_grads", &fastrlhf::fused_kernel);
}

#ifdef FASTRLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("linear_ppo_policy_loss", &fastrlhf::linear_ppo_policy_loss_kernel);
  m.impl("linear_ppo_policy_loss_with_grads", &fastrlhf::fused_kernel);
}
#endif

TORCH_LIBRARY_IMPL(fastrlhf, Meta, m) {
  m.impl("linear_ppo_policy_loss", &fastrlhf::linear_ppo_policy_loss_meta);
  m.impl("linear_ppo_policy_loss_with_grads", &fastrlhf::fused_meta);
}

TORCH_LIBRARY_IMPL(fastrlhf, Autograd, m) {
  m.impl("linear_ppo_policy_loss", &fastrlhf::linear_ppo_policy_loss_autograd);
}
