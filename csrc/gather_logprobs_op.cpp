// The gather_logprobs TORCH_LIBRARY op: schema, CPU / CUDA / Meta kernels and a C++ autograd formula.
//
//   fastrlhf::gather_logprobs(logits [..., V], labels [...], temperature, ignore_index, return_entropy,
//                             inplace_backward) -> (logprobs [...], entropy [...] or [0], stats [N, 2])
//   fastrlhf::gather_logprobs_backward(...)  -> d logits [..., V]
//   fastrlhf::gather_logprobs_backward_(...) -> (), writing d logits into the logits buffer
//
// Checks, flattening to [N, V], the backend and the autograd formula are C++, so an eager call costs a
// dispatcher round trip. stats (each row's max and log-sum, f32 [N, 2]) is what the backward needs; it
// is an output, not differentiable. The kernels are the entry points of gather_logprobs_entry.h.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "gather_logprobs_entry.h"
#include "op_checks.h"
#include "output_alloc.h"
#include "tensor_views.h"

namespace fastrlhf {
namespace {

using at::Tensor;
using op_checks::NamedTensor;

struct GatherCall {
  Tensor logits;  // [N, V], stride 1 along V
  Tensor labels;  // int64 [N], contiguous
  std::vector<int64_t> lead;
  double inv_temperature;
};

GatherCall prepare(const Tensor& logits, const Tensor& labels, double temperature, int64_t ignore_index,
                   bool check_labels) {
  op_checks::check_float(logits, "logits");
  op_checks::check_index(labels, "labels");
  op_checks::check_same_device({NamedTensor{"logits", &logits}, NamedTensor{"labels", &labels}});
  TORCH_CHECK_VALUE(logits.dim() > 0, "logits must have at least 1 dimension (the vocabulary), got a scalar");
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK_VALUE(labels.sizes() == lead, "labels has shape ", op_checks::py_shape(labels.sizes()), ", but logits ",
                    op_checks::py_shape(logits.sizes()), " needs labels of shape ", op_checks::py_shape(lead));
  const int64_t vocab = logits.size(-1);
  TORCH_CHECK_VALUE(vocab > 0, "logits has an empty vocabulary dimension (size 0)");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "temperature must be finite and > 0, got ",
                    op_checks::py_float(temperature));
  op_checks::check_kernel_dtype(logits, "logits");
  GatherCall call;
  call.logits = matrix_of_rows(logits);
  if (call.logits.stride(1) != 1) call.logits = call.logits.contiguous();
  call.labels = flat(contiguous_as(labels, at::kLong));
  call.lead = lead.vec();
  call.inv_temperature = 1.0 / temperature;
  // The CPU kernel checks the labels in its own loop; a CUDA tensor needs the reduction (and a sync).
  if (check_labels && !call.labels.is_cpu()) check_labels_in_range(call.labels, vocab, ignore_index);
  return call;
}

std::tuple<Tensor, Tensor, Tensor> gather_logprobs_kernel(const Tensor& logits, const Tensor& labels,
                                                          double temperature, int64_t ignore_index,
                                                          bool return_entropy, bool inplace_backward) {
  const GatherCall c = prepare(logits, labels, temperature, ignore_index, /*check_labels=*/true);
  auto [logprobs, stats, entropy] =
      gather_logprobs_forward(c.logits, c.labels, c.inv_temperature, ignore_index, return_entropy);
  return {logprobs.view(c.lead), return_entropy ? entropy.view(c.lead) : entropy, stats};
}

std::tuple<Tensor, Tensor, Tensor> gather_logprobs_meta(const Tensor& logits, const Tensor& labels,
                                                        double temperature, int64_t ignore_index,
                                                        bool return_entropy, bool inplace_backward) {
  const GatherCall c = prepare(logits, labels, temperature, ignore_index, /*check_labels=*/false);
  const auto f32 = logits.options().dtype(at::kFloat);
  return {at::empty(c.lead, f32), return_entropy ? at::empty(c.lead, f32) : at::empty({0}, f32),
          at::empty({c.logits.size(0), 2}, f32)};
}

// The [N] float32 gradient vectors the kernel reads; an absent entropy gradient is [0].
std::tuple<Tensor, Tensor, Tensor> flat_grads(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                                              const Tensor& entropy) {
  const Tensor g = flat(contiguous_as(grad_logprobs, at::kFloat));
  const bool has_h = grad_entropy.has_value() && grad_entropy->defined() && grad_entropy->numel() > 0;
  const Tensor h = has_h ? flat(contiguous_as(*grad_entropy, at::kFloat)) : g.new_empty({0});
  const Tensor e = has_h ? flat(entropy.contiguous()) : g.new_empty({0});
  return {g, h, e};
}

Tensor gather_logprobs_backward_kernel(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                                       const Tensor& logits, const Tensor& labels, const Tensor& stats,
                                       const Tensor& entropy, double temperature, int64_t ignore_index) {
  const GatherCall c = prepare(logits, labels, temperature, ignore_index, /*check_labels=*/false);
  auto [g, h, e] = flat_grads(grad_logprobs, grad_entropy, entropy);
  Tensor dlogits = empty_output(c.logits.sizes(), c.logits.options());
  gather_logprobs_backward(g, h, c.logits, c.labels, stats.contiguous(), e, c.inv_temperature, ignore_index, dlogits);
  return dlogits.view(logits.sizes());
}

void gather_logprobs_backward_inplace_kernel(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                                             const Tensor& logits, const Tensor& labels, const Tensor& stats,
                                             const Tensor& entropy, double temperature, int64_t ignore_index) {
  const GatherCall c = prepare(logits, labels, temperature, ignore_index, /*check_labels=*/false);
  auto [g, h, e] = flat_grads(grad_logprobs, grad_entropy, entropy);
  gather_logprobs_backward(g, h, c.logits, c.labels, stats.contiguous(), e, c.inv_temperature, ignore_index,
                           c.logits);
  // A [..., V] logits that could not be viewed as [N, V] (a reshape copy): write the result back.
  if (c.logits.data_ptr() != logits.data_ptr()) logits.copy_(c.logits.view(logits.sizes()));
}

Tensor gather_logprobs_backward_meta(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                                     const Tensor& logits, const Tensor& labels, const Tensor& stats,
                                     const Tensor& entropy, double temperature, int64_t ignore_index) {
  prepare(logits, labels, temperature, ignore_index, /*check_labels=*/false);
  return at::empty_like(logits);
}

void gather_logprobs_backward_inplace_meta(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                                           const Tensor& logits, const Tensor& labels, const Tensor& stats,
                                           const Tensor& entropy, double temperature, int64_t ignore_index) {
  prepare(logits, labels, temperature, ignore_index, /*check_labels=*/false);
}

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::gather_logprobs", "")
                             .typed<decltype(gather_logprobs_kernel)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::gather_logprobs_backward", "")
                             .typed<decltype(gather_logprobs_backward_kernel)>();
  return op;
}

const auto& backward_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::gather_logprobs_backward_", "")
                             .typed<decltype(gather_logprobs_backward_inplace_kernel)>();
  return op;
}

class GatherLogprobsFunction : public torch::autograd::Function<GatherLogprobsFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& logits,
                                                const Tensor& labels, double temperature, int64_t ignore_index,
                                                bool return_entropy, bool inplace_backward) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [logprobs, entropy, stats] =
        forward_op().call(logits, labels, temperature, ignore_index, return_entropy, inplace_backward);
    ctx->save_for_backward({logits, labels, stats, entropy});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["inplace_backward"] = inplace_backward;
    if (return_entropy) {
      ctx->mark_non_differentiable({stats});
    } else {
      ctx->mark_non_differentiable({entropy, stats});
    }
    return {logprobs, entropy, stats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(6);
    if (!ctx->needs_input_grad(0) || (!grads[0].defined() && !grads[1].defined())) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor& logits = saved[0];
    const Tensor grad_logprobs = grads[0].defined() ? grads[0] : at::zeros(saved[1].sizes(), saved[2].options());
    const std::optional<Tensor> grad_entropy =
        grads[1].defined() && grads[1].numel() > 0 ? std::optional<Tensor>(grads[1]) : std::nullopt;
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    if (ctx->saved_data["inplace_backward"].toBool()) {
      backward_inplace_op().call(grad_logprobs, grad_entropy, logits, saved[1], saved[2], saved[3], temperature,
                                 ignore_index);
      out[0] = logits;
    } else {
      out[0] = backward_op().call(grad_logprobs, grad_entropy, logits, saved[1], saved[2], saved[3], temperature,
                                  ignore_index);
    }
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> gather_logprobs_autograd(const Tensor& logits, const Tensor& labels,
                                                            double temperature, int64_t ignore_index,
                                                            bool return_entropy, bool inplace_backward) {
  if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(logits, labels, temperature, ignore_index, return_entropy, inplace_backward);
  }
  auto out = GatherLogprobsFunction::apply(logits, labels, temperature, ignore_index, return_entropy,
                                           inplace_backward);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def(
      "gather_logprobs(Tensor logits, Tensor labels, float temperature, int ignore_index, bool return_entropy, "
      "bool inplace_backward) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gather_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
      "Tensor stats, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "gather_logprobs_backward_(Tensor grad_logprobs, Tensor? grad_entropy, Tensor(a!) logits, Tensor labels, "
      "Tensor stats, Tensor entropy, float temperature, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("gather_logprobs", &fastrlhf::gather_logprobs_kernel);
  m.impl("gather_logprobs_backward", &fastrlhf::gather_logprobs_backward_kernel);
  m.impl("gather_logprobs_backward_", &fastrlhf::gather_logprobs_backward_inplace_kernel);
}

#ifdef FASTRLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("gather_logprobs", &fastrlhf::gather_logprobs_kernel);
  m.impl("gather_logprobs_backward", &fastrlhf::gather_logprobs_backward_kernel);
  m.impl("gather_logprobs_backward_", &fastrlhf::gather_logprobs_backward_inplace_kernel);
}
#endif

TORCH_LIBRARY_IMPL(fastrlhf, Meta, m) {
  m.impl("gather_logprobs", &fastrlhf::gather_logprobs_meta);
  m.impl("gather_logprobs_backward", &fastrlhf::gather_logprobs_backward_meta);
  m.impl("gather_logprobs_backward_", &fastrlhf::gather_logprobs_backward_inplace_meta);
}

TORCH_LIBRARY_IMPL(fastrlhf, Autograd, m) { m.impl("gather_logprobs", &fastrlhf::gather_logprobs_autograd); }
