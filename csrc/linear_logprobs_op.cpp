// The linear_logprobs TORCH_LIBRARY op: log-probs straight from hidden states and an lm_head, with CPU /
// CUDA / Meta kernels and a C++ autograd formula.
//
//   fastrlhf::linear_logprobs(hidden [..., H], weight [V, H], labels [...], bias [V]?, temperature,
//                             ignore_index, return_entropy, chunk_rows, by_columns)
//       -> (logprobs [...], entropy [...] or [0], stats [N, 2])
//   fastrlhf::linear_logprobs_backward(...) -> (d hidden, d weight, d bias), [0] where not asked for
//
// The chunk engine of ops/_linear_chunks.py, for the compiled backends. The forward makes the float32
// logits one block at a time: with `by_columns` on CPU a block of vocabulary columns for all rows, folded
// into each row's running softmax state; otherwise a block of `chunk_rows` rows run through the gather
// kernel (stats keep each row's max and log-sum). The backward recomputes them one block of vocabulary
// columns at a time (the same logits budget), turns each block into d(logits) in place and folds it into
// the gradients. The GEMMs,
// their operands and the block bounds are the Python engine's, so both give the same bits; the Python
// engine stays for the Triton kernels, which Python launches. The chunk size is the caller's
// (`_linear_chunks.default_chunk_rows` is its one rule).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "gather_logprobs_entry.h"
#include "linear_head.h"
#include "op_checks.h"
#include "tensor_views.h"

namespace fastrlhf {
namespace {

using at::Tensor;
using MaybeTensor = std::optional<Tensor>;
using op_checks::NamedTensor;
using op_checks::py_shape;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

// The rows BLOCK_IGNORE / NOT_IN_BLOCK of _linear_chunks.py: inside a column block, rows the caller
// ignores are mapped to -1, and rows whose label lies in another block to -2 (no one-hot term there).
constexpr int64_t kBlockIgnore = -1;
constexpr int64_t kNotInBlock = -2;

using linear_head::Fp32Head;
using linear_head::LinearCall;
using linear_head::prepare;

// Vocabulary columns per block: the forward's chunk_rows x V logits budget, spent on all rows
// (_linear_chunks.column_block_width).
int64_t column_block_width(int64_t rows, int64_t vocab, int64_t chunk_rows) {
  return std::max<int64_t>(1, std::min(vocab, (chunk_rows * vocab) / std::max<int64_t>(rows, 1)));
}

// The labels as the gather kernels see them inside the column block [start, end) of a narrower-than-V
// block: the label's column in it, kBlockIgnore for rows the caller ignores (`ignored`), kNotInBlock
// elsewhere (_linear_chunks.labels_in_block).
Tensor labels_in_block(const Tensor& labels, const Tensor& ignored, int64_t start, int64_t end) {
  const Tensor in_block = labels.ge(start).logical_and(labels.lt(end));
  return at::where(ignored, at::full_like(labels, kBlockIgnore),
                   at::where(in_block, labels - start, at::full_like(labels, kNotInBlock)));
}

// Whether the forward goes by blocks of vocabulary columns (_linear_chunks.forward_by_columns): when the
// caller asks (a backward will follow), on CPU, and the rows take more than one chunk.
bool forward_by_columns(bool by_columns, const Tensor& hidden, int64_t rows, int64_t chunk_rows) {
  return by_columns && hidden.is_cpu() && rows > chunk_rows;
}

std::tuple<Tensor, Tensor, Tensor> linear_logprobs_kernel(const Tensor& hidden, const Tensor& weight,
                                                          const Tensor& labels, const MaybeTensor& bias,
                                                          double temperature, int64_t ignore_index,
                                                          bool return_entropy, int64_t chunk_rows,
                                                          bool by_columns) {
  const LinearCall c = prepare(hidden, weight, labels, bias, temperature, chunk_rows);
  const int64_t rows = c.labels.numel();
  // Before any GEMM: a bad label fails the call whole, whichever chunk holds it.
  check_labels_in_range(c.labels, weight.size(0), ignore_index);
  const Fp32Head head(weight, bias);
  Tensor logprobs, stats, entropy;
  if (forward_by_columns(by_columns, hidden, rows, chunk_rows)) {
    // Every row's softmax state, folded one [N, width] block of logits at a time; the label's raw logit
    // is kept by the block that holds it.
    const int64_t vocab = weight.size(0);
    const int64_t width = column_block_width(rows, vocab, chunk_rows);
    const Tensor ignored = c.labels.eq(ignore_index);
    const Tensor state = empty_softmax_states(rows, hidden.options());
    const Tensor label_logit = at::zeros({rows}, hidden.options().dtype(at::kFloat));
    for (int64_t start = 0; start < vocab; start += width) {
      const int64_t end = std::min(start + width, vocab);
      gather_logprobs_fold(head.logits(c.hidden, start, end), labels_in_block(c.labels, ignored, start, end),
                           c.inv_temperature, kBlockIgnore, return_entropy, state, label_logit);
    }
    std::tie(logprobs, stats, entropy) =
        gather_logprobs_finalize(state, label_logit, c.labels, c.inv_temperature, ignore_index, return_entropy);
  } else if (rows <= chunk_rows) {
    // One chunk: the kernel's outputs are the results (no copies).
    std::tie(logprobs, stats, entropy) = gather_logprobs_forward(
        head.logits(c.hidden, 0, weight.size(0)), c.labels, c.inv_temperature, ignore_index, return_entropy);
  } else {
    const auto f32 = hidden.options().dtype(at::kFloat);
    logprobs = at::empty({rows}, f32);
    stats = at::empty({rows, 2}, f32);
    entropy = at::empty({return_entropy ? rows : 0}, f32);
    for (int64_t start = 0; start < rows; start += chunk_rows) {
      const int64_t end = std::min(start + chunk_rows, rows);
      // The chunk's logits die at the end of this iteration, before the next GEMM allocates its own.
      auto [lp, st, ent] = gather_logprobs_forward(head.logits(c.hidden.slice(0, start, end), 0, weight.size(0)),
                                                   c.labels.slice(0, start, end), c.inv_temperature,
                                                   ignore_index, return_entropy);
      logprobs.slice(0, start, end).copy_(lp);
      stats.slice(0, start, end).copy_(st);
      if (return_entropy) entropy.slice(0, start, end).copy_(ent);
    }
  }
  return {logprobs.view(c.lead), return_entropy ? entropy.view(c.lead) : entropy, stats};
}

std::tuple<Tensor, Tensor, Tensor> linear_logprobs_meta(const Tensor& hidden, const Tensor& weight,
                                                        const Tensor& labels, const MaybeTensor& bias,
                                                        double temperature, int64_t ignore_index,
                                                        bool return_entropy, int64_t chunk_rows,
                                                        bool /*by_columns*/) {
  const LinearCall c = prepare(hidden, weight, labels, bias, temperature, chunk_rows);
  const auto f32 = hidden.options().dtype(at::kFloat);
  return {at::empty(c.lead, f32), return_entropy ? at::empty(c.lead, f32) : at::empty({0}, f32),
          at::empty({c.labels.numel(), 2}, f32)};
}

Grads linear_logprobs_backward_kernel(const Tensor& grad_logprobs, const MaybeTensor& grad_entropy,
                                      const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                                      const MaybeTensor& bias, const Tensor& stats, const Tensor& entropy,
                                      double temperature, int64_t ignore_index, int64_t chunk_rows,
                                      std::array<bool, 3> output_mask) {
  const LinearCall c = prepare(hidden, weight, labels, bias, temperature, chunk_rows);
  const int64_t rows = c.labels.numel();
  const int64_t vocab = weight.size(0);
  const Fp32Head head(weight, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  const auto [need_hidden, need_weight, need_bias_arg] = output_mask;
  const bool need_bias = need_bias_arg && has_bias;
  const Tensor g = flat(contiguous_as(grad_logprobs, at::kFloat));
  const bool has_h = grad_entropy.has_value() && grad_entropy->defined() && grad_entropy->numel() > 0;
  const Tensor h = has_h ? flat(contiguous_as(*grad_entropy, at::kFloat)) : g.new_empty({0});
  const Tensor e = has_h ? flat(entropy.contiguous()) : g.new_empty({0});
  const Tensor stats_c = stats.contiguous();

  const Tensor hidden_gemm = head.cast(c.hidden);
  Tensor d_hidden = need_hidden ? at::zeros(c.hidden.sizes(), hidden.options().dtype(at::kFloat)) : Tensor();
  Tensor d_weight = need_weight ? at::empty(weight.sizes(), weight.options()) : Tensor();
  Tensor d_bias = need_bias ? at::empty({vocab}, bias->options()) : Tensor();
  const int64_t width = column_block_width(rows, vocab, chunk_rows);
  const Tensor ignored = width < vocab ? c.labels.eq(ignore_index) : Tensor();
  for (int64_t start = 0; start < vocab; start += width) {
    const int64_t end = std::min(start + width, vocab);
    // One block of every column needs no relabelling: the labels and ignore_index as given.
    Tensor block_labels = c.labels;
    int64_t block_ignore = ignore_index;
    if (width < vocab) {
      block_labels = labels_in_block(c.labels, ignored, start, end);
      block_ignore = kBlockIgnore;
    }
    Tensor logits = head.logits(c.hidden, start, end);
    gather_logprobs_backward(g, h, logits, block_labels, stats_c, e, c.inv_temperature, block_ignore, logits);
    const Tensor d_low = head.cast(logits);
    if (need_weight) d_weight.slice(0, start, end).copy_(head.mm(d_low.t(), hidden_gemm));
    if (need_hidden) head.addmm_(d_hidden, d_low, head.weight.slice(0, start, end));
    if (need_bias) d_bias.slice(0, start, end).copy_(logits.sum(0));
  }
  // A gradient not asked for comes back as its own empty tensor (op outputs may not alias).
  const auto empty = [&] { return at::empty({0}, hidden.options()); };
  return {need_hidden ? d_hidden.to(hidden.scalar_type()).view(hidden.sizes()) : empty(),
          need_weight ? d_weight : empty(), need_bias ? d_bias : empty()};
}

Grads linear_logprobs_backward_meta(const Tensor& grad_logprobs, const MaybeTensor& grad_entropy,
                                    const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                                    const MaybeTensor& bias, const Tensor& stats, const Tensor& entropy,
                                    double temperature, int64_t ignore_index, int64_t chunk_rows,
                                    std::array<bool, 3> output_mask) {
  prepare(hidden, weight, labels, bias, temperature, chunk_rows);
  const bool has_bias = bias.has_value() && bias->defined();
  const auto empty = [&] { return at::empty({0}, hidden.options()); };
  return {output_mask[0] ? at::empty_like(hidden) : empty(), output_mask[1] ? at::empty_like(weight) : empty(),
          output_mask[2] && has_bias ? at::empty_like(*bias) : empty()};
}

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::linear_logprobs", "")
                             .typed<decltype(linear_logprobs_kernel)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::linear_logprobs_backward", "")
                             .typed<decltype(linear_logprobs_backward_kernel)>();
  return op;
}

class LinearLogprobsFunction : public torch::autograd::Function<LinearLogprobsFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& hidden,
                                                const Tensor& weight, const Tensor& labels, const MaybeTensor& bias,
                                                double temperature, int64_t ignore_index, bool return_entropy,
                                                int64_t chunk_rows, bool by_columns) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [logprobs, entropy, stats] = forward_op().call(hidden, weight, labels, bias, temperature, ignore_index,
                                                        return_entropy, chunk_rows, by_columns);
    ctx->save_for_backward({hidden, weight, labels, bias.value_or(Tensor()), stats, entropy});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["chunk_rows"] = chunk_rows;
    if (return_entropy) {
      ctx->mark_non_differentiable({stats});
    } else {
      ctx->mark_non_differentiable({entropy, stats});
    }
    return {logprobs, entropy, stats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(9);
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = saved[3].defined();
    // needs_input_grad counts the tensor inputs given (labels included; an absent bias has no edge);
    // `out` is indexed by argument.
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(3)};
    if ((!grads[0].defined() && !grads[1].defined()) || !(mask[0] || mask[1] || mask[2])) return out;
    const Tensor grad_logprobs = grads[0].defined() ? grads[0] : at::zeros(saved[2].sizes(), saved[4].options());
    const MaybeTensor grad_entropy =
        grads[1].defined() && grads[1].numel() > 0 ? MaybeTensor(grads[1]) : std::nullopt;
    auto& d = ctx->saved_data;
    auto [d_hidden, d_weight, d_bias] = backward_op().call(
        grad_logprobs, grad_entropy, saved[0], saved[1], saved[2], has_bias ? MaybeTensor(saved[3]) : std::nullopt,
        saved[4], saved[5], d["temperature"].toDouble(), d["ignore_index"].toInt(), d["chunk_rows"].toInt(), mask);
    if (mask[0]) out[0] = d_hidden;
    if (mask[1]) out[1] = d_weight;
    if (mask[2]) out[3] = d_bias;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> linear_logprobs_autograd(const Tensor& hidden, const Tensor& weight,
                                                            const Tensor& labels, const MaybeTensor& bias,
                                                            double temperature, int64_t ignore_index,
                                                            bool return_entropy, int64_t chunk_rows,
                                                            bool by_columns) {
  const bool bias_requires_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  if (!at::GradMode::is_enabled() || !(hidden.requires_grad() || weight.requires_grad() || bias_requires_grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(hidden, weight, labels, bias, temperature, ignore_index, return_entropy, chunk_rows,
                             by_columns);
  }
  auto out = LinearLogprobsFunction::apply(hidden, weight, labels, bias, temperature, ignore_index, return_entropy,
                                           chunk_rows, by_columns);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def(
      "linear_logprobs(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, float temperature, "
      "int ignore_index, bool return_entropy, int chunk_rows, bool by_columns) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor labels, Tensor? bias, Tensor stats, Tensor entropy, float temperature, int ignore_index, "
      "int chunk_rows, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("linear_logprobs", &fastrlhf::linear_logprobs_kernel);
  m.impl("linear_logprobs_backward", &fastrlhf::linear_logprobs_backward_kernel);
}

#ifdef FASTRLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("linear_logprobs", &fastrlhf::linear_logprobs_kernel);
  m.impl("linear_logprobs_backward", &fastrlhf::linear_logprobs_backward_kernel);
}
#endif

TORCH_LIBRARY_IMPL(fastrlhf, Meta, m) {
  m.impl("linear_logprobs", &fastrlhf::linear_logprobs_meta);
  m.impl("linear_logprobs_backward", &fastrlhf::linear_logprobs_backward_meta);
}

TORCH_LIBRARY_IMPL(fastrlhf, Autograd, m) { m.impl("linear_logprobs", &fastrlhf::linear_logprobs_autograd); }
