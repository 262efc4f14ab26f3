// The kl_penalty TORCH_LIBRARY op: schema, CPU / CUDA / Meta kernels and a C++ autograd formula.
//
//   fastrlhf::kl_penalty(logprobs, ref_logprobs, mask?, estimator, clamp?, reduction)
//       -> (kl, normalizer)
//   fastrlhf::kl_penalty_with_derivative(<kl_penalty's arguments>) -> (kl, normalizer, derivative)
//   fastrlhf::kl_penalty_backward(grad, logprobs, ref_logprobs, mask?, normalizer, estimator, clamp?,
//                                 reduction, ref_grad, derivative?) -> (d_logprobs, d_ref_logprobs)
//
// The whole call (checks, backend, reduction, autograd) stays in C++, so an eager call costs a
// dispatcher round trip instead of Python glue, and torch.compile / opcheck see an ordinary op.
// `normalizer` is what the mean divided by (each row's kept-token count for "seq-mean", the total for
// "token-mean", both at least 1; [0] for "none"); the backward reads it instead of recounting.
// On the CPU, a forward whose backward will run (the autograd node's) is kl_penalty_with_derivative: the
// same pass also writes `derivative`, d kl / d logprobs per token (fp32, the inputs' shape, 0 where
// masked), and the backward scales that instead of reading both inputs and recomputing the exp: it
// reads 5 bytes a token (derivative and mask) in place of 9, and computes no exp. CUDA recomputes.
// On the CPU the reductions run inside the kernel (csrc/cpu/kl_penalty.cpp: per-segment sums, summed in
// a fixed order, so the result does not depend on the thread count). On CUDA the per-token kernel runs
// and ATen reduces its output.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/kl.h"
#include "cpu/dispatch.h"
#include "kl_args.h"
#include "op_checks.h"
#include "output_alloc.h"
#include "tensor_params.h"
#ifdef FASTRLHF_WITH_CUDA
#include "cuda/bindings.h"
#endif

namespace fastrlhf {
namespace {

using at::Tensor;
using c10::string_view;
using op_checks::NamedTensor;

enum class Reduction { kNone, kSeqMean, kTokenMean };

// Tokens per token-mean segment on the CPU: fixed, so the summation order is too.
constexpr int64_t kTokenMeanSegment = 16384;

Reduction reduction_code(string_view reduction) {
  if (reduction == "none") return Reduction::kNone;
  if (reduction == "seq-mean") return Reduction::kSeqMean;
  if (reduction == "token-mean") return Reduction::kTokenMean;
  TORCH_CHECK_VALUE(false, "reduction='", std::string(reduction),
                    "' is not one of ('none', 'seq-mean', 'token-mean')");
}

// Everything about one call that the kernels need, after the checks.
struct KLCall {
  Tensor logprobs, ref_logprobs;  // contiguous, one kernel dtype
  Tensor mask;                    // contiguous uint8, or undefined
  int estimator;
  float clamp;
  Reduction reduction;
  std::vector<int64_t> out_sizes;  // the reduction's output shape
  int64_t row_len;                 // seq-mean: tokens per row
};

KLCall prepare(const Tensor& logprobs, const Tensor& ref_logprobs, const std::optional<Tensor>& mask,
               string_view estimator, std::optional<double> clamp, string_view reduction) {
  op_checks::check_float(logprobs, "logprobs");
  op_checks::check_float(ref_logprobs, "ref_logprobs");
  op_checks::check_same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs);
  const Tensor* mask_ptr = mask.has_value() && mask->defined() ? &*mask : nullptr;
  if (mask_ptr != nullptr) op_checks::check_same_shape("logprobs", logprobs, "mask", *mask_ptr);
  op_checks::check_same_device({NamedTensor{"logprobs", &logprobs}, NamedTensor{"ref_logprobs", &ref_logprobs},
                                NamedTensor{"mask", mask_ptr}});
  KLCall call;
  call.estimator = kl_args::estimator_code(estimator);
  call.clamp = static_cast<float>(kl_args::clamp_value("clamp", clamp));
  call.reduction = reduction_code(reduction);
  TORCH_CHECK_VALUE(call.reduction != Reduction::kSeqMean || logprobs.dim() > 0,
                    "reduction='seq-mean' needs logprobs with a sequence dimension, got a scalar");
  op_checks::check_kernel_dtype(logprobs, "logprobs");
  op_checks::check_kernel_dtype(ref_logprobs, "ref_logprobs");
  const bool widen = logprobs.scalar_type() != ref_logprobs.scalar_type();  // one kernel dtype: widen both
  call.logprobs = (widen ? logprobs.to(at::kFloat) : logprobs).contiguous();
  call.ref_logprobs = (widen ? ref_logprobs.to(at::kFloat) : ref_logprobs).contiguous();
  if (mask_ptr != nullptr) call.mask = op_checks::mask_as_bytes("mask", *mask_ptr);
  const auto sizes = logprobs.sizes();
  switch (call.reduction) {
    case Reduction::kNone:
      call.out_sizes = sizes.vec();
      break;
    case Reduction::kSeqMean:
      call.out_sizes = sizes.slice(0, sizes.size() - 1).vec();
      break;
    case Reduction::kTokenMean:
      break;
  }
  call.row_len = logprobs.dim() > 0 ? sizes.back() : 1;
  return call;
}

const uint8_t* mask_data(const KLCall& c) { return c.mask.defined() ? mask_ptr(c.mask) : nullptr; }

// derivative: undefined, or a float32 tensor of the inputs' numel that receives d kl / d logprobs.
std::tuple<Tensor, Tensor> forward_cpu(const KLCall& c, const Tensor& derivative) {
  const auto f32 = c.logprobs.options().dtype(at::kFloat);
  const int64_t n = c.logprobs.numel();
  float* derivative_data = derivative.defined() ? derivative.mutable_data_ptr<float>() : nullptr;
  if (c.reduction == Reduction::kNone) {
    Tensor kl = empty_output(c.out_sizes, f32);
    KLPenaltyParams p{};
    p.logprobs = c.logprobs.const_data_ptr();
    p.ref_logprobs = c.ref_logprobs.const_data_ptr();
    p.mask = mask_data(c);
    p.n = n;
    p.dtype = dtype_of(c.logprobs);
    p.estimator = c.estimator;
    p.clamp = c.clamp;
    p.out = kl.mutable_data_ptr<float>();
    p.derivative = derivative_data;
    cpu::kl_penalty_forward(p);
    return {kl, at::empty({0}, f32)};
  }
  const bool per_row = c.reduction == Reduction::kSeqMean;
  const int64_t segment = per_row ? c.row_len : kTokenMeanSegment;
  const int64_t segments = per_row ? c10::multiply_integers(c.out_sizes) : (n + segment - 1) / segment;
  std::vector<double> sums(segments, 0.0);
  std::vector<int64_t> counts(segments, 0);
  if (n > 0 && segment > 0) {
    KLPenaltySumsParams p{};
    p.logprobs = c.logprobs.const_data_ptr();
    p.ref_logprobs = c.ref_logprobs.const_data_ptr();
    p.mask = mask_data(c);
    p.n = n;
    p.segment_len = segment;
    p.dtype = dtype_of(c.logprobs);
    p.estimator = c.estimator;
    p.clamp = c.clamp;
    p.sums = sums.data();
    p.counts = counts.data();
    p.derivative = derivative_data;
    cpu::kl_penalty_sums(p);
  }
  Tensor kl = at::empty(c.out_sizes, f32);
  Tensor normalizer = at::empty(c.out_sizes, f32);
  float* out = kl.mutable_data_ptr<float>();
  float* norm = normalizer.mutable_data_ptr<float>();
  if (per_row) {
    for (int64_t r = 0; r < segments; ++r) {
      const double count = static_cast<double>(std::max<int64_t>(counts[r], 1));
      out[r] = static_cast<float>(sums[r] / count);
      norm[r] = static_cast<float>(count);
    }
  } else {
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t s = 0; s < segments; ++s) sum += sums[s], count += counts[s];
    norm[0] = static_cast<float>(std::max<int64_t>(count, 1));
    out[0] = static_cast<float>(sum / std::max<int64_t>(count, 1));
  }
  return {kl, normalizer};
}

#ifdef FASTRLHF_WITH_CUDA
std::tuple<Tensor, Tensor> forward_cuda(const KLCall& c) {
  Tensor kl = at::empty(c.logprobs.sizes(), c.logprobs.options().dtype(at::kFloat));
  const Tensor flat_mask = c.mask.defined() ? c.mask.reshape(-1) : at::empty({0}, c.logprobs.options().dtype(at::kByte));
  if (kl.numel() > 0) {
    Tensor flat = kl.view(-1);
    cuda::kl_penalty(c.logprobs.view(-1), c.ref_logprobs.view(-1), flat_mask, Tensor(), c.estimator, c.clamp, flat);
  }
  if (c.reduction == Reduction::kNone) return {kl, at::empty({0}, kl.options())};
  // The kernel wrote 0 where masked, so the sum over kept tokens is the plain sum.
  const Tensor kept = c.mask.defined() ? c.mask.to(at::kFloat) : at::ones_like(kl);
  if (c.reduction == Reduction::kSeqMean) {
    const Tensor normalizer = kept.sum(-1).clamp_min(1);
    return {kl.sum(-1) / normalizer, normalizer};
  }
  const Tensor normalizer = kept.sum().clamp_min(1);
  return {kl.sum() / normalizer, normalizer};
}
#endif

std::tuple<Tensor, Tensor> kl_penalty_kernel(const Tensor& logprobs, const Tensor& ref_logprobs,
                                             const std::optional<Tensor>& mask, string_view estimator,
                                             std::optional<double> clamp, string_view reduction) {
  const KLCall c = prepare(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
  if (c.logprobs.is_cpu()) return forward_cpu(c, Tensor());
#ifdef FASTRLHF_WITH_CUDA
  if (c.logprobs.is_cuda()) return forward_cuda(c);
#endif
  TORCH_CHECK(false, "fastrlhf: kl_penalty has no kernel for device ", logprobs.device());
}

std::tuple<Tensor, Tensor, Tensor> kl_penalty_with_derivative_kernel(const Tensor& logprobs,
                                                                     const Tensor& ref_logprobs,
                                                                     const std::optional<Tensor>& mask,
                                                                     string_view estimator,
                                                                     std::optional<double> clamp,
                                                                     string_view reduction) {
  const KLCall c = prepare(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
  // at::empty, not empty_output's huge pages: the buffer lives from this forward to its backward, and
  // glibc serves it from the memory the last step's freed (Xeon, 2M tokens, the forward alone: 0.77 ms
  // this way, 1.46 ms from fresh huge pages).
  Tensor derivative = at::empty(logprobs.sizes(), c.logprobs.options().dtype(at::kFloat));
  auto [kl, normalizer] = forward_cpu(c, derivative);
  return {kl, normalizer, derivative};
}

std::tuple<Tensor, Tensor> kl_penalty_meta(const Tensor& logprobs, const Tensor& ref_logprobs,
                                           const std::optional<Tensor>& mask, string_view estimator,
                                           std::optional<double> clamp, string_view reduction) {
  const KLCall c = prepare(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
  const auto f32 = logprobs.options().dtype(at::kFloat);
  const bool none = c.reduction == Reduction::kNone;
  return {at::empty(c.out_sizes, f32), none ? at::empty({0}, f32) : at::empty(c.out_sizes, f32)};
}

std::tuple<Tensor, Tensor, Tensor> kl_penalty_with_derivative_meta(const Tensor& logprobs,
                                                                   const Tensor& ref_logprobs,
                                                                   const std::optional<Tensor>& mask,
                                                                   string_view estimator,
                                                                   std::optional<double> clamp,
                                                                   string_view reduction) {
  auto [kl, normalizer] = kl_penalty_meta(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
  return {kl, normalizer, at::empty(logprobs.sizes(), logprobs.options().dtype(at::kFloat))};
}

// Every element of t is one value (a scalar, or a scalar expanded by autograd's sum backward).
bool is_uniform(const Tensor& t) {
  if (t.numel() <= 1) return true;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) != 0) return false;
  }
  return true;
}

// The backward's saved derivative, when given: float32, contiguous, one value per token, beside logprobs.
// Returns a pointer to it, or nullptr when absent.
const Tensor* check_derivative(const std::optional<Tensor>& derivative, const Tensor& logprobs) {
  if (!derivative.has_value() || !derivative->defined()) return nullptr;
  const Tensor& d = *derivative;
  TORCH_CHECK_VALUE(d.scalar_type() == at::kFloat && d.is_contiguous() && d.numel() == logprobs.numel() &&
                        d.device() == logprobs.device(),
                    "kl_penalty_backward: derivative must be a contiguous float32 tensor of logprobs' ", logprobs.numel(),
                    " elements on ", logprobs.device(), ", got ", d.scalar_type(), " of ", d.numel(), " elements on ",
                    d.device());
  return &d;
}

std::tuple<Tensor, Tensor> backward_cpu(const KLCall& c, const Tensor& grad_in, const Tensor& normalizer,
                                        bool ref_grad, const Tensor* derivative) {
  const auto f32 = c.logprobs.options().dtype(at::kFloat);
  Tensor d_logprobs = empty_output(c.logprobs.sizes(), f32);
  Tensor d_ref = ref_grad ? empty_output(c.logprobs.sizes(), f32) : at::empty({0}, f32);
  const int64_t n = c.logprobs.numel();
  if (n == 0) return {d_logprobs, d_ref};
  const Tensor grad = grad_in.to(at::kFloat);
  KLPenaltyGradParams p{};
  p.logprobs = c.logprobs.const_data_ptr();
  p.ref_logprobs = c.ref_logprobs.const_data_ptr();
  p.mask = mask_data(c);
  p.n = n;
  p.row_len = std::max<int64_t>(c.row_len, 1);
  p.dtype = dtype_of(c.logprobs);
  p.estimator = c.estimator;
  p.clamp = c.clamp;
  p.d_logprobs = d_logprobs.mutable_data_ptr<float>();
  p.d_ref_logprobs = ref_grad ? d_ref.mutable_data_ptr<float>() : nullptr;
  p.derivative = derivative == nullptr ? nullptr : derivative->const_data_ptr<float>();
  Tensor grad_c;  // keeps a contiguous copy alive through the kernel
  std::vector<float> row_scale;
  switch (c.reduction) {
    case Reduction::kNone:
      if (is_uniform(grad)) {
        p.scale = *grad.const_data_ptr<float>();
      } else {
        grad_c = grad.contiguous();
        p.grad = grad_c.const_data_ptr<float>();
      }
      break;
    case Reduction::kSeqMean: {
      grad_c = grad.contiguous();
      const float* g = grad_c.const_data_ptr<float>();
      const Tensor norm_c = normalizer.contiguous();
      const float* norm = norm_c.const_data_ptr<float>();
      row_scale.resize(grad_c.numel());
      for (size_t r = 0; r < row_scale.size(); ++r) row_scale[r] = g[r] / norm[r];
      p.row_scale = row_scale.data();
      break;
    }
    case Reduction::kTokenMean:
      p.scale = *grad.const_data_ptr<float>() / *normalizer.const_data_ptr<float>();
      break;
  }
  cpu::kl_penalty_backward(p);
  return {d_logprobs, d_ref};
}

#ifdef FASTRLHF_WITH_CUDA
std::tuple<Tensor, Tensor> backward_cuda(const KLCall& c, const Tensor& grad_in, const Tensor& normalizer,
                                         bool ref_grad) {
  const auto sizes = c.logprobs.sizes();
  Tensor grad = grad_in.to(at::kFloat);
  if (c.reduction == Reduction::kSeqMean) grad = (grad / normalizer).unsqueeze(-1);
  if (c.reduction == Reduction::kTokenMean) grad = grad / normalizer;
  const Tensor per_token = grad.expand(sizes).contiguous().view(-1);
  Tensor d_logprobs = at::empty(sizes, c.logprobs.options().dtype(at::kFloat));
  const Tensor flat_mask = c.mask.defined() ? c.mask.reshape(-1) : at::empty({0}, c.logprobs.options().dtype(at::kByte));
  if (d_logprobs.numel() > 0) {
    Tensor flat = d_logprobs.view(-1);
    cuda::kl_penalty(c.logprobs.view(-1), c.ref_logprobs.view(-1), flat_mask, per_token, c.estimator, c.clamp, flat);
  }
  return {d_logprobs, ref_grad ? d_logprobs.neg() : at::empty({0}, d_logprobs.options())};
}
#endif

std::tuple<Tensor, Tensor> kl_penalty_backward_kernel(const Tensor& grad, const Tensor& logprobs,
                                                      const Tensor& ref_logprobs, const std::optional<Tensor>& mask,
                                                      const Tensor& normalizer, string_view estimator,
                                                      std::optional<double> clamp, string_view reduction,
                                                      bool ref_grad, const std::optional<Tensor>& derivative) {
  const KLCall c = prepare(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
  const Tensor* saved = check_derivative(derivative, logprobs);
  Tensor d_logprobs, d_ref;
  if (c.logprobs.is_cpu()) {
    std::tie(d_logprobs, d_ref) = backward_cpu(c, grad, normalizer, ref_grad, saved);
  } else {
    TORCH_CHECK_VALUE(saved == nullptr, "kl_penalty_backward: derivative is a CPU-only input, got one on ",
                      logprobs.device());
#ifdef FASTRLHF_WITH_CUDA
    TORCH_CHECK(c.logprobs.is_cuda(), "fastrlhf: kl_penalty has no kernel for device ", logprobs.device());
    std::tie(d_logprobs, d_ref) = backward_cuda(c, grad, normalizer, ref_grad);
#else
    TORCH_CHECK(false, "fastrlhf: kl_penalty has no kernel for device ", logprobs.device());
#endif
  }
  // The gradients take their inputs' dtypes (the kernels write fp32).
  return {d_logprobs.to(logprobs.scalar_type()), ref_grad ? d_ref.to(ref_logprobs.scalar_type()) : d_ref};
}

std::tuple<Tensor, Tensor> kl_penalty_backward_meta(const Tensor& grad, const Tensor& logprobs,
                                                    const Tensor& ref_logprobs, const std::optional<Tensor>& mask,
                                                    const Tensor& normalizer, string_view estimator,
                                                    std::optional<double> clamp, string_view reduction,
                                                    bool ref_grad, const std::optional<Tensor>& derivative) {
  prepare(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
  check_derivative(derivative, logprobs);
  return {at::empty_like(logprobs), ref_grad ? at::empty_like(ref_logprobs) : at::empty({0}, grad.options())};
}

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::kl_penalty", "")
                             .typed<decltype(kl_penalty_kernel)>();
  return op;
}

const auto& forward_with_derivative_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::kl_penalty_with_derivative", "")
                             .typed<decltype(kl_penalty_with_derivative_kernel)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::kl_penalty_backward", "")
                             .typed<decltype(kl_penalty_backward_kernel)>();
  return op;
}

class KLPenaltyFunction : public torch::autograd::Function<KLPenaltyFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& logprobs,
                                                const Tensor& ref_logprobs, const std::optional<Tensor>& mask,
                                                string_view estimator, std::optional<double> clamp,
                                                string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor kl, normalizer, derivative;
    if (logprobs.is_cpu()) {
      std::tie(kl, normalizer, derivative) =
          forward_with_derivative_op().call(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
    } else {
      std::tie(kl, normalizer) = forward_op().call(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
    }
    ctx->save_for_backward({logprobs, ref_logprobs, mask.value_or(Tensor()), normalizer, derivative});
    ctx->saved_data["estimator"] = std::string(estimator);
    ctx->saved_data["clamp"] = clamp;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->mark_non_differentiable({normalizer});
    return {kl, normalizer};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::autograd::variable_list out(6);
    if (!grads[0].defined()) return out;
    const bool ref_grad = ctx->needs_input_grad(1);
    const std::optional<Tensor> mask = saved[2].defined() ? std::optional<Tensor>(saved[2]) : std::nullopt;
    const std::optional<Tensor> derivative = saved[4].defined() ? std::optional<Tensor>(saved[4]) : std::nullopt;
    auto [d_logprobs, d_ref] = backward_op().call(
        grads[0], saved[0], saved[1], mask, saved[3], ctx->saved_data["estimator"].toStringRef(),
        ctx->saved_data["clamp"].toOptional<double>(), ctx->saved_data["reduction"].toStringRef(), ref_grad,
        derivative);
    if (ctx->needs_input_grad(0)) out[0] = d_logprobs;
    if (ref_grad) out[1] = d_ref;
    return out;
  }
};

std::tuple<Tensor, Tensor> kl_penalty_autograd(const Tensor& logprobs, const Tensor& ref_logprobs,
                                               const std::optional<Tensor>& mask, string_view estimator,
                                               std::optional<double> clamp, string_view reduction) {
  // Without a gradient to track, skip the autograd node entirely (the common no_grad rollout call).
  if (!at::GradMode::is_enabled() || !(logprobs.requires_grad() || ref_logprobs.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
  }
  auto out = KLPenaltyFunction::apply(logprobs, ref_logprobs, mask, estimator, clamp, reduction);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def(
      "kl_penalty(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, str estimator, float? clamp, str reduction)"
      " -> (Tensor, Tensor)");
  m.def(
      "kl_penalty_with_derivative(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, str estimator, float? clamp, "
      "str reduction) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kl_penalty_backward(Tensor grad, Tensor logprobs, Tensor ref_logprobs, Tensor? mask, Tensor normalizer, "
      "str estimator, float? clamp, str reduction, bool ref_grad, Tensor? derivative=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("kl_penalty", &fastrlhf::kl_penalty_kernel);
  m.impl("kl_penalty_with_derivative", &fastrlhf::kl_penalty_with_derivative_kernel);
  m.impl("kl_penalty_backward", &fastrlhf::kl_penalty_backward_kernel);
}

#ifdef FASTRLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("kl_penalty", &fastrlhf::kl_penalty_kernel);
  m.impl("kl_penalty_backward", &fastrlhf::kl_penalty_backward_kernel);
}
#endif

TORCH_LIBRARY_IMPL(fastrlhf, Meta, m) {
  m.impl("kl_penalty", &fastrlhf::kl_penalty_meta);
  m.impl("kl_penalty_with_derivative", &fastrlhf::kl_penalty_with_derivative_meta);
  m.impl("kl_penalty_backward", &fastrlhf::kl_penalty_backward_meta);
}

TORCH_LIBRARY_IMPL(fastrlhf, Autograd, m) { m.impl("kl_penalty", &fastrlhf::kl_penalty_autograd); }
