// Python module fastrlhf._C: validates tensors, allocates outputs, and dispatches each op by
// device to the CPU kernels (csrc/cpu) or, when built with CUDA, to csrc/cuda/bindings.cpp.
// User-facing argument checks of these entry points live in Python; the TORCH_CHECKs here guard
// internal preconditions. gather_logprobs, kl_penalty, ranking_loss, gae, compute_advantages and
// group_advantages are TORCH_LIBRARY ops instead (csrc/*_op.cpp), which check their own arguments:
// loading this module registers them as torch.ops.fastrlhf.*. The gather_logprobs entries stay here too, for linear_logprobs' chunks.
#include <torch/extension.h>

#include <cmath>
#include <tuple>

#include "direct_calls.h"
#include "gather_logprobs_entry.h"
#include "cpu/dispatch.h"
#include "tensor_params.h"
#ifdef FASTRLHF_WITH_CUDA
#include "cuda/bindings.h"
#endif

namespace fastrlhf {
namespace {

bool compiled_with_cuda() {
#ifdef FASTRLHF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

[[noreturn]] void fail_no_cuda() {
  TORCH_CHECK(false, "fastrlhf._C was built without CUDA kernels; rebuild with a CUDA-enabled torch");
}

// ---------------------------------------------------------------------------------------------
// sample, few_row_linear. Python passes contiguous tensors on one device.

#ifdef FASTRLHF_WITH_CUDA
#define FASTRLHF_ON_CUDA(call) call
#else
#define FASTRLHF_ON_CUDA(call) fail_no_cuda()
#endif

[[noreturn]] void fail_device(const char* op, const at::Tensor& like) {
  TORCH_CHECK(false, "fastrlhf: ", op, " has no kernel for device ", like.device());
}

// A contiguous tensor of exactly `sizes` and `dtype` on like's device.
void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType dtype,
                  const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == sizes, "fastrlhf: ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastrlhf: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastrlhf: ", name, " is on ", t.device(), " but expected ",
              like.device());
  TORCH_CHECK(t.is_contiguous(), "fastrlhf: ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_forward(const at::Tensor& logits, const at::Tensor& uniforms,
                                                              double inv_temperature, int64_t top_k, double top_p,
                                                              double min_p, bool with_entropy) {
  TORCH_CHECK(logits.dim() == 2, "fastrlhf: logits must be 2-D [B, V], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "fastrlhf: logits must be contiguous");
  dtype_of(logits);
  TORCH_CHECK(logits.size(1) >= 1, "fastrlhf: logits must have a vocabulary of at least 1");
  check_tensor(uniforms, "uniforms", {logits.size(0)}, at::kDouble, logits);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0.0,
              "fastrlhf: inv_temperature must be finite and > 0, got ", inv_temperature);
  TORCH_CHECK(top_k >= 0, "fastrlhf: top_k must be >= 0 (0: none), got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "fastrlhf: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK(min_p >= 0.0 && min_p < 1.0, "fastrlhf: min_p must be in [0, 1), got ", min_p);
  const at::TensorOptions f32 = logits.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({logits.size(0)}, f32);
  at::Tensor entropy = at::empty({with_entropy ? logits.size(0) : 0}, f32);
  if (logits.size(0) == 0) return {tokens, logprobs, entropy};
  if (logits.is_cpu()) {
    cpu::sample_forward(
        make_sample_params(logits, uniforms, inv_temperature, top_k, top_p, min_p, tokens, logprobs, entropy));
  } else if (logits.is_cuda()) {
    FASTRLHF_ON_CUDA(
        cuda::sample_forward(logits, uniforms, inv_temperature, top_k, top_p, min_p, tokens, logprobs, entropy));
  } else {
    fail_device("sample", logits);
  }
  return {tokens, logprobs, entropy};
}

// CPU only: on a GPU, cuBLAS serves few rows well.
at::Tensor few_row_linear_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "fastrlhf: weight must be 2-D [V, H], got ", weight.sizes());
  TORCH_CHECK(weight.is_cpu() && weight.is_contiguous(), "fastrlhf: weight must be a contiguous CPU tensor");
  const int64_t panels = (weight.size(0) + kFewRowPanel - 1) / kFewRowPanel;
  at::Tensor packed = at::empty({panels, weight.size(1), kFewRowPanel}, weight.options().dtype(at::kFloat));
  if (packed.numel() == 0) return packed;
  FewRowPackParams p{};
  p.weight = weight.const_data_ptr();
  p.in_features = weight.size(1);
  p.out_features = weight.size(0);
  p.dtype = dtype_of(weight);
  p.packed = packed.mutable_data_ptr<float>();
  cpu::few_row_linear_pack(p);
  return packed;
}

at::Tensor few_row_linear_forward(const at::Tensor& hidden, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(hidden.dim() == 2, "fastrlhf: hidden must be 2-D [B, H], got ", hidden.sizes());
  TORCH_CHECK(hidden.is_cpu() && hidden.is_contiguous() && hidden.scalar_type() == at::kFloat,
              "fastrlhf: hidden must be a contiguous float32 CPU tensor");
  TORCH_CHECK(out_features >= 0, "fastrlhf: out_features must be >= 0, got ", out_features);
  const int64_t panels = (out_features + kFewRowPanel - 1) / kFewRowPanel;
  TORCH_CHECK(packed.is_cpu() && packed.is_contiguous() && packed.scalar_type() == at::kFloat &&
                  packed.sizes() == at::IntArrayRef({panels, hidden.size(1), kFewRowPanel}),
              "fastrlhf: packed must be few_row_linear_pack's [", panels, ", ", hidden.size(1), ", ", kFewRowPanel,
              "] float32 for ", out_features, " outputs of ", hidden.size(1), " features, got ", packed.sizes(),
              " ", packed.scalar_type());
  at::Tensor out = at::empty({hidden.size(0), out_features}, hidden.options());
  if (out.numel() == 0) return out;
  FewRowLinearParams p{};
  p.hidden = hidden.const_data_ptr<float>();
  p.packed = packed.const_data_ptr<float>();
  p.n_rows = hidden.size(0);
  p.in_features = hidden.size(1);
  p.out_features = out_features;
  p.out = out.mutable_data_ptr<float>();
  cpu::few_row_linear_forward(p);
  return out;
}

}  // namespace
}  // namespace fastrlhf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fastrlhf compiled kernels (C++ CPU kernels, CUDA kernels when built with CUDA)";

  m.def("gather_logprobs_forward", &fastrlhf::gather_logprobs_forward, py::arg("logits"), py::arg("labels"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("with_entropy"),
        py::call_guard<py::gil_scoped_release>(),
        "Fused log_softmax(logits * inv_temperature) + gather(labels), optionally with entropy.\n"
        "Returns (logprobs f32[N], stats f32[N, 2], entropy f32[N] or f32[0]); ignored rows give 0.\n"
        "stats holds each row's (m, log_s) for the backward: m = max_j z_j and\n"
        "log_s = log sum_j e^{z_j - m}, with z = logits * inv_temperature.");
  m.def("gather_logprobs_backward", &fastrlhf::gather_logprobs_backward, py::arg("grad_logprobs"),
        py::arg("grad_entropy"), py::arg("logits"), py::arg("labels"), py::arg("stats"), py::arg("entropy"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("dlogits"),
        py::call_guard<py::gil_scoped_release>(),
        "Writes d(loss)/d(logits) into dlogits (which may be logits itself). grad_entropy and entropy\n"
        "are [0]-sized when the entropy has no gradient.");
  m.def(
      "empty_softmax_states",
      [](int64_t n) { return fastrlhf::empty_softmax_states(n, at::TensorOptions()); }, py::arg("n"),
      "Running softmax states f32[n, 3] of empty rows (max -inf, sum 0, ent 0), for gather_logprobs_fold.");
  m.def("gather_logprobs_fold", &fastrlhf::gather_logprobs_fold, py::arg("logits"), py::arg("block_labels"),
        py::arg("inv_temperature"), py::arg("skip_label"), py::arg("with_entropy"), py::arg("state"),
        py::arg("label_logit"), py::call_guard<py::gil_scoped_release>(),
        "CPU: merges one block of vocabulary columns, logits [N, W], into each row's softmax state f32[N, 3]\n"
        "and writes the raw logit at block_labels[i] (the label's column in the block) into label_logit\n"
        "f32[N]. Rows whose block label is skip_label are not read; other negative labels lie elsewhere.");
  m.def("gather_logprobs_finalize", &fastrlhf::gather_logprobs_finalize, py::arg("state"), py::arg("label_logit"),
        py::arg("labels"), py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("with_entropy"),
        py::call_guard<py::gil_scoped_release>(),
        "CPU: gather_logprobs_forward's (logprobs, stats, entropy) from states folded over every block.");
  m.def("check_labels_in_range", &fastrlhf::check_labels_in_range, py::arg("labels"), py::arg("vocab"),
        py::arg("ignore_index"),
        "ValueError unless every label is ignore_index or in [0, vocab): one loop on a CPU tensor (no torch\n"
        "ops), a reduction and a sync elsewhere. Worded as ops/_validation.py::check_labels_in_range.");
  m.def("sample_forward", &fastrlhf::sample_forward, py::arg("logits"), py::arg("uniforms"),
        py::arg("inv_temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("with_entropy"),
        py::call_guard<py::gil_scoped_release>(),
        "One token per row of logits [B, V] from softmax(logits * inv_temperature) truncated by top_k (0: none),\n"
        "top_p (1: none) and min_p (0: none), by the inverse CDF at uniforms f64[B] (common/sample_params.h).\n"
        "Returns (tokens i64[B], logprobs f32[B], entropy f32[B] or f32[0]); a row with a NaN or +inf logit,\n"
        "or only -inf ones, gets token -1.");
  m.def("few_row_linear_pack", &fastrlhf::few_row_linear_pack, py::arg("weight"),
        py::call_guard<py::gil_scoped_release>(),
        "weight[V, H] (f32, bf16 or f16) packed as f32[ceil(V / 32), H, 32] for few_row_linear_forward.");
  m.def("few_row_linear_forward", &fastrlhf::few_row_linear_forward, py::arg("hidden"), py::arg("packed"),
        py::arg("out_features"), py::call_guard<py::gil_scoped_release>(),
        "hidden f32[B, H] @ weight.T as f32[B, V], weight given packed: the lm_head of a decoding step on\n"
        "CPU, where a few rows against a large weight starve BLAS (it repacks the weight every call).");
  m.def("cpu_capability", &fastrlhf::cpu::capability_name,
        "CPU kernel set used at run time: 'avx512', 'avx2' or 'default' (follows ATEN_CPU_CAPABILITY).");
  fastrlhf::define_direct_calls(m);
  m.def("with_cuda", &fastrlhf::compiled_with_cuda, "Whether the CUDA kernels were compiled in.");
}
