// Typed dispatcher entries of the TORCH_LIBRARY ops, for the Python wrappers' eager calls.
//
// `torch.ops.fastrlhf.<op>(...)` parses its Python arguments against the schema at every call (each
// argument boxed into an IValue, then unboxed again for the kernel): ~1 µs per argument here, 4-5 µs of a
// 12-argument op whose C++ work takes ~2 µs. These entries take the arguments through pybind11's typed
// casters and call the same operator handle unboxed. Everything below the Python boundary is unchanged:
// the call enters the dispatcher at the top, so autograd, inference mode, Meta/fake tensors, Python
// dispatch modes and profiling see the same op as through torch.ops. torch.compile cannot trace a
// pybind11 function, so the wrappers call torch.ops while compiling (fastrlhf/ops/_compiled.py).
#include "direct_calls.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastrlhf {
namespace {

namespace py = pybind11;
using at::Tensor;
using c10::string_view;
using MaybeTensor = std::optional<Tensor>;
using MaybeDouble = std::optional<double>;

template <typename Signature>
struct DirectCall;

// Binds `fastrlhf::<name>` with the C++ signature Ret(Args...); the handle is looked up once, at import
// (the ops register themselves in this library's static initialisers, which run first), and the
// signature is checked against the registered kernels then.
template <typename Ret, typename... Args>
struct DirectCall<Ret(Args...)> {
  template <typename... PyArgs>
  static void define(py::module_& m, const char* name, const char* doc, PyArgs... py_args) {
    const auto handle = c10::Dispatcher::singleton()
                            .findSchemaOrThrow((std::string("fastrlhf::") + name).c_str(), "")
                            .template typed<Ret(Args...)>();
    // The GIL is released as torch.ops releases it: a large input's kernel should not stall other threads.
    m.def(name, [handle](Args... args) -> Ret { return handle.call(std::forward<Args>(args)...); }, py_args...,
          py::call_guard<py::gil_scoped_release>(), doc);
  }
};

}  // namespace

void define_direct_calls(py::module_& m) {
  using py::arg;
  DirectCall<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double, double)>::define(
      m, "gae", "torch.ops.fastrlhf.gae without the Python argument parsing.", arg("rewards"), arg("values"),
      arg("mask"), arg("gamma"), arg("lam"));
  DirectCall<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, double, string_view, double, double, MaybeDouble,
                                                bool, MaybeDouble)>::
      define(m, "compute_advantages", "torch.ops.fastrlhf.compute_advantages without the Python argument parsing.",
             arg("scores"), arg("logprobs"), arg("ref_logprobs"), arg("values"), arg("mask"), arg("kl_coef"),
             arg("estimator"), arg("gamma"), arg("lam"), arg("score_clip").none(true), arg("whiten"),
             arg("kl_clamp").none(true));
  DirectCall<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, string_view, double, double, bool)>::define(
      m, "group_advantages", "torch.ops.fastrlhf.group_advantages without the Python argument parsing.",
      arg("scores"), arg("response_mask"), arg("estimator"), arg("gamma"), arg("eps"), arg("norm_by_std"));
  DirectCall<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const MaybeTensor&, string_view, MaybeDouble,
                                        string_view)>::
      define(m, "kl_penalty", "torch.ops.fastrlhf.kl_penalty without the Python argument parsing.", arg("logprobs"),
             arg("ref_logprobs"), arg("mask").none(true), arg("estimator"), arg("clamp").none(true),
             arg("reduction"));
  DirectCall<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const MaybeTensor&, double)>::define(
      m, "ranking_loss", "torch.ops.fastrlhf.ranking_loss without the Python argument parsing.", arg("rewards"),
      arg("ranks"), arg("mask").none(true), arg("margin"));
  DirectCall<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double, int64_t, bool, bool)>::define(
      m, "gather_logprobs", "torch.ops.fastrlhf.gather_logprobs without the Python argument parsing.",
      arg("logits"), arg("labels"), arg("temperature"), arg("ignore_index"), arg("return_entropy"),
      arg("inplace_backward"));
  DirectCall<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const MaybeTensor&,
                                                double, int64_t, bool, int64_t, bool)>::
      define(m, "linear_logprobs", "torch.ops.fastrlhf.linear_logprobs without the Python argument parsing.",
             arg("hidden"), arg("weight"), arg("labels"), arg("bias").none(true), arg("temperature"),
             arg("ignore_index"), arg("return_entropy"), arg("chunk_rows"), arg("by_columns"));
  DirectCall<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const MaybeTensor&, const MaybeTensor&, double,
      MaybeDouble, MaybeDouble, double, string_view, double, string_view)>::
      define(m, "ppo_policy_loss", "torch.ops.fastrlhf.ppo_policy_loss without the Python argument parsing.",
             arg("logprobs"), arg("old_logprobs"), arg("advantages"), arg("mask"), arg("ref_logprobs").none(true),
             arg("entropy").none(true), arg("clip_eps"), arg("clip_eps_high").none(true),
             arg("dual_clip").none(true), arg("kl_coef"), arg("kl_estimator"), arg("entropy_coef"),
             arg("loss_agg"));
  DirectCall<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const MaybeTensor&, const MaybeTensor&, const Tensor&,
      const Tensor&, const MaybeTensor&, double, int64_t, double, MaybeDouble, MaybeDouble, double, string_view,
      double, bool, string_view, int64_t)>::
      define(m, "linear_ppo_policy_loss",
             "torch.ops.fastrlhf.linear_ppo_policy_loss without the Python argument parsing.", arg("hidden"),
             arg("weight"), arg("labels"), arg("bias").none(true), arg("old_logprobs").none(true),
             arg("advantages"), arg("mask"), arg("ref_logprobs").none(true), arg("temperature"),
             arg("ignore_index"), arg("clip_eps"), arg("clip_eps_high").none(true), arg("dual_clip").none(true),
             arg("kl_coef"), arg("kl_estimator"), arg("entropy_coef"), arg("compute_entropy"), arg("loss_agg"),
             arg("chunk_rows"));
}

}  // namespace fastrlhf
