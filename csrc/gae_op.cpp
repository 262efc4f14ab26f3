// The gae TORCH_LIBRARY op: schema, CPU / CUDA / Meta kernels.
//
//   fastrlhf::gae(rewards, values, mask, gamma, lam) -> (advantages, returns)
//
// The whole call (checks, fp32 copies, the walk) stays in C++, so an eager call costs a dispatcher round
// trip instead of Python glue (about 50 us of it at B=64, T=2048, a quarter of the call). GAE carries no
// gradient: the Autograd kernel runs the op below autograd, so its outputs never require grad, whatever
// the inputs do (as the Python path's detach()). The checks raise the ValueErrors fastrlhf/ops/gae.py
// raises on its plain-torch path, in the same order.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

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

struct GaeCall {
  Tensor rewards, values;  // contiguous float32 copies (or the inputs themselves when already so)
  Tensor mask;             // contiguous uint8
  float gamma, lam;
};

GaeCall prepare(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma, double lam) {
  op_checks::check_float(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 2, "values must be 2-D [batch, time], got shape ",
                    op_checks::py_shape(values.sizes()));
  op_checks::check_float(rewards, "rewards");
  op_checks::check_same_shape("values", values, "mask", mask);
  op_checks::check_same_shape("values", values, "rewards", rewards);
  GaeCall call;
  call.mask = op_checks::mask_as_bytes("mask", mask);
  op_checks::check_same_device(
      {NamedTensor{"rewards", &rewards}, NamedTensor{"values", &values}, NamedTensor{"mask", &mask}});
  call.gamma = static_cast<float>(op_checks::check_discount("gamma", gamma));
  call.lam = static_cast<float>(op_checks::check_discount("lam", lam));
  // The kernels read float32; other float dtypes are small [B, T] tensors, copied once.
  call.rewards = contiguous_as(rewards, at::kFloat);
  call.values = contiguous_as(values, at::kFloat);
  return call;
}

std::tuple<Tensor, Tensor> gae_kernel(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma,
                                      double lam) {
  const GaeCall c = prepare(rewards, values, mask, gamma, lam);
  Tensor advantages = at::empty_like(c.values);
  Tensor returns = at::empty_like(c.values);
  if (c.values.numel() == 0) return {advantages, returns};
  if (c.values.is_cpu()) {
    cpu::gae_forward(make_gae_params(c.rewards, c.values, c.mask, c.gamma, c.lam, advantages, returns));
    return {advantages, returns};
  }
#ifdef FASTRLHF_WITH_CUDA
  if (c.values.is_cuda()) {
    cuda::gae_forward(c.rewards, c.values, c.mask, c.gamma, c.lam, advantages, returns);
    return {advantages, returns};
  }
#endif
  TORCH_CHECK(false, "fastrlhf: gae has no kernel for device ", values.device());
}

std::tuple<Tensor, Tensor> gae_meta(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma,
                                    double lam) {
  const GaeCall c = prepare(rewards, values, mask, gamma, lam);
  return {at::empty_like(c.values), at::empty_like(c.values)};
}

// No gradient flows through GAE: dispatch below autograd, so no node is recorded.
std::tuple<Tensor, Tensor> gae_no_grad(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma,
                                       double lam) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastrlhf::gae", "").typed<decltype(gae_kernel)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(rewards, values, mask, gamma, lam);
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) { m.impl("gae", &fastrlhf::gae_kernel); }

#ifdef FASTRLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) { m.impl("gae", &fastrlhf::gae_kernel); }
#endif

TORCH_LIBRARY_IMPL(fastrlhf, Meta, m) { m.impl("gae", &fastrlhf::gae_meta); }

TORCH_LIBRARY_IMPL(fastrlhf, Autograd, m) { m.impl("gae", &fastrlhf::gae_no_grad); }
