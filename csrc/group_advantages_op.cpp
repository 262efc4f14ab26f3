// The group_advantages TORCH_LIBRARY op: schema, CPU / CUDA / Meta kernels.
//
//   fastrlhf::group_advantages(scores, response_mask, estimator, gamma, eps, norm_by_std)
//       -> (advantages, returns)
//
// Critic-free outcome advantages in one call: checks, one pass per row (group statistics, the RLOO
// factor, REINFORCE++'s discount walk) and, for the REINFORCE++ variants, the masked whitening over the
// batch (csrc/masked_whiten.h), all in C++. `returns` is a separate tensor only for "reinforce++" (the
// unwhitened discounted scores); for the other estimators it is [0] and fastrlhf/ops/group_advantages.py
// returns the advantages in its place (an op's outputs may not alias each other). No gradient flows
// through it: the Autograd kernel runs the op below autograd. The checks raise the ValueErrors
// fastrlhf/ops/group_advantages.py raises on its plain-torch path, in the same order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>
#include <tuple>

#include "common/group_advantages.h"
#include "cpu/dispatch.h"
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
using op_checks::py_shape;

enum class Estimator { kGrpo, kRloo, kReinforcePP, kReinforcePPBaseline };

Estimator estimator_code(string_view estimator) {
  if (estimator == "grpo") return Estimator::kGrpo;
  if (estimator == "rloo") return Estimator::kRloo;
  if (estimator == "reinforce++") return Estimator::kReinforcePP;
  if (estimator == "reinforce++-baseline") return Estimator::kReinforcePPBaseline;
  TORCH_CHECK_VALUE(false, "estimator='", std::string(estimator),
                    "' is not one of ('grpo', 'rloo', 'reinforce++', 'reinforce++-baseline')");
}

// The kernels' mode (common/group_advantages.h); grpo's depends on norm_by_std.
OutcomeMode outcome_mode(Estimator e, bool norm_by_std) {
  switch (e) {
    case Estimator::kGrpo:
      return norm_by_std ? OutcomeMode::kNormalize : OutcomeMode::kCenter;
    case Estimator::kRloo:
      return OutcomeMode::kLeaveOneOut;
    case Estimator::kReinforcePP:
      return OutcomeMode::kDiscount;
    case Estimator::kReinforcePPBaseline:
      return OutcomeMode::kCenter;  // r - group mean, whitened afterwards
  }
  return OutcomeMode::kCenter;
}

// NaN or inf scores would spread through a whole group (or, whitened, the batch).
void check_finite_scores(const Tensor& scores) {
  if (scores.numel() == 0) return;
  int64_t bad = 0;
  double first = 0.0;
  if (scores.is_cpu()) {
    const Tensor s = scores.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "check_finite_scores", [&] {
      const scalar_t* v = s.const_data_ptr<scalar_t>();
      for (int64_t i = s.numel() - 1; i >= 0; --i) {  // backwards, so `first` ends at the first one
        const double x = static_cast<double>(v[i]);
        if (!std::isfinite(x)) ++bad, first = x;
      }
    });
  } else {
    const Tensor not_finite = scores.isfinite().logical_not();
    if (!not_finite.any().item<bool>()) return;
    const Tensor values = scores.masked_select(not_finite);
    bad = values.numel();
    first = values[0].item<double>();
  }
  TORCH_CHECK_VALUE(bad == 0, "scores must be finite; ", bad, " value(s) are not (first: ",
                    op_checks::py_float(first), ")");
}

struct GroupCall {
  Tensor scores;  // contiguous float32 [B * k]
  Tensor mask;    // contiguous uint8 [B * k, T]
  int64_t k;
  Estimator estimator;
  OutcomeMode mode;
  double gamma, eps;
};

GroupCall prepare(const Tensor& scores, const Tensor& response_mask, string_view estimator, double gamma,
                  double eps, bool norm_by_std) {
  op_checks::check_float(scores, "scores");
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be 2-D [B, k] (k responses per prompt), got shape ",
                    py_shape(scores.sizes()));
  const int64_t batch = scores.size(0), k = scores.size(1);
  TORCH_CHECK_VALUE(k >= 1, "scores has shape ", py_shape(scores.sizes()),
                    ": k (responses per prompt) must be >= 1");
  const auto shape = response_mask.sizes();
  if (response_mask.dim() == 3) {
    TORCH_CHECK_VALUE(shape[0] == batch && shape[1] == k, "response_mask has shape ", py_shape(shape),
                      "; expected (", batch, ", ", k, ", T) to match scores");
  } else if (response_mask.dim() == 2) {
    TORCH_CHECK_VALUE(shape[0] == batch * k, "response_mask has shape ", py_shape(shape), "; expected (",
                      batch * k, ", T): B*k rows for scores ", py_shape(scores.sizes()));
  } else {
    TORCH_CHECK_VALUE(false, "response_mask must be [B, k, T] or [B*k, T], got shape ", py_shape(shape));
  }
  GroupCall call;
  call.estimator = estimator_code(estimator);
  TORCH_CHECK_VALUE(call.estimator != Estimator::kRloo || k >= 2,
                    "estimator='rloo' needs k >= 2 responses per prompt (a leave-one-out baseline), but scores "
                    "has shape ",
                    py_shape(scores.sizes()), " (k=", k, ")");
  op_checks::check_same_device({NamedTensor{"scores", &scores}, NamedTensor{"response_mask", &response_mask}});
  call.mask = op_checks::mask_as_bytes("response_mask", response_mask).view({batch * k, shape.back()});
  call.gamma = op_checks::check_discount("gamma", gamma);
  op_checks::check_finite("eps", eps);
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", op_checks::py_float(eps));
  call.eps = eps;
  if (!scores.is_meta()) check_finite_scores(scores);
  call.k = k;
  call.mode = outcome_mode(call.estimator, norm_by_std);
  call.scores = flat(contiguous_as(scores, at::kFloat));
  return call;
}

bool whitened(Estimator e) { return e == Estimator::kReinforcePP || e == Estimator::kReinforcePPBaseline; }

std::tuple<Tensor, Tensor> group_advantages_kernel(const Tensor& scores, const Tensor& response_mask,
                                                   string_view estimator, double gamma, double eps,
                                                   bool norm_by_std) {
  const GroupCall c = prepare(scores, response_mask, estimator, gamma, eps, norm_by_std);
  const auto f32 = scores.options().dtype(at::kFloat);
  Tensor values = at::empty(response_mask.sizes(), f32);
  if (values.numel() > 0) {
    const Tensor flat = values.view(c.mask.sizes());
    const int64_t mode = static_cast<int64_t>(c.mode);
    if (values.is_cpu()) {
      cpu::group_advantages_forward(make_group_advantages_params(c.scores, c.mask, c.k, mode, c.gamma, c.eps, flat));
    } else {
#ifdef FASTRLHF_WITH_CUDA
      TORCH_CHECK(values.is_cuda(), "fastrlhf: group_advantages has no kernel for device ", values.device());
      cuda::group_advantages_forward(c.scores, c.mask, c.k, mode, c.gamma, c.eps, flat);
#else
      TORCH_CHECK(false, "fastrlhf: group_advantages has no kernel for device ", values.device());
#endif
    }
  }
  if (!whitened(c.estimator)) return {values, at::empty({0}, f32)};
  // Fewer than two valid tokens whiten to 0 (reference.masked_whiten's rule): no check of the count.
  if (c.estimator == Estimator::kReinforcePPBaseline) {
    masked_whiten_into(values, c.mask, values);
    return {values, at::empty({0}, f32)};
  }
  Tensor advantages = at::empty_like(values);
  masked_whiten_into(values, c.mask, advantages);
  return {advantages, values};
}

std::tuple<Tensor, Tensor> group_advantages_meta(const Tensor& scores, const Tensor& response_mask,
                                                 string_view estimator, double gamma, double eps,
                                                 bool norm_by_std) {
  const GroupCall c = prepare(scores, response_mask, estimator, gamma, eps, norm_by_std);
  const auto f32 = scores.options().dtype(at::kFloat);
  const bool separate_returns = c.estimator == Estimator::kReinforcePP;
  return {at::empty(response_mask.sizes(), f32),
          separate_returns ? at::empty(response_mask.sizes(), f32) : at::empty({0}, f32)};
}

// No gradient flows through outcome advantages: dispatch below autograd, so no node is recorded.
std::tuple<Tensor, Tensor> group_advantages_no_grad(const Tensor& scores, const Tensor& response_mask,
                                                    string_view estimator, double gamma, double eps,
                                                    bool norm_by_std) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrlhf::group_advantages", "")
                             .typed<decltype(group_advantages_kernel)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(scores, response_mask, estimator, gamma, eps, norm_by_std);
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def(
      "group_advantages(Tensor scores, Tensor response_mask, str estimator, float gamma, float eps, "
      "bool norm_by_std) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) { m.impl("group_advantages", &fastrlhf::group_advantages_kernel); }

#ifdef FASTRLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) { m.impl("group_advantages", &fastrlhf::group_advantages_kernel); }
#endif

TORCH_LIBRARY_IMPL(fastrlhf, Meta, m) { m.impl("group_advantages", &fastrlhf::group_advantages_meta); }

TORCH_LIBRARY_IMPL(fastrlhf, Autograd, m) { m.impl("group_advantages", &fastrlhf::group_advantages_no_grad); }
