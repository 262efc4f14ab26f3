// The compiled gather_logprobs entry points (see gather_logprobs_entry.h).
#include "gather_logprobs_entry.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "cpu/dispatch.h"
#include "tensor_params.h"
#include "tensor_views.h"
#ifdef FASTRLHF_WITH_CUDA
#include "cuda/bindings.h"
#endif

namespace fastrlhf {
namespace {

// [N, V] with unit stride along V (any row stride). The V stride is irrelevant when V <= 1.
void check_logits_like(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "fastrlhf: ", name, " must be 2-D [N, V], got ", t.dim(), "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fastrlhf: ", name, " must have stride 1 along V");
  dtype_of(t);
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype,
                  const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fastrlhf: ", name, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastrlhf: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastrlhf: ", name, " is on ", t.device(), " but logits on ",
              like.device());
}

// The forward's per-row (max, log-sum) pairs: f32 [N, 2].
void check_stats(const at::Tensor& t, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == 2, "fastrlhf: stats must have shape [", n,
              ", 2], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastrlhf: stats must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastrlhf: stats is on ", t.device(), " but logits on ",
              like.device());
}

void check_optional_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& like) {
  if (t.defined() && t.numel() > 0) check_vector(t, name, n, at::kFloat, like);
}

void check_inv_temperature(double inv_temperature) {
  TORCH_CHECK(inv_temperature > 0.0 && std::isfinite(inv_temperature),
              "fastrlhf: inv_temperature must be finite and > 0, got ", inv_temperature);
}

}  // namespace

void check_labels_in_range(const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  if (labels.numel() == 0 || labels.is_meta()) return;
  int64_t count = 0;
  int64_t first = 0;
  if (labels.is_cpu()) {
    // One pass with no torch ops: the CPU forward calls this on every call.
    const at::Tensor flat = contiguous_as(labels, at::kLong);
    const int64_t* label = flat.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < flat.numel(); ++i) {
      if (label[i] != ignore_index && (label[i] < 0 || label[i] >= vocab)) {
        if (count++ == 0) first = label[i];
      }
    }
  } else {
    const at::Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(vocab)));
    count = bad.sum().item<int64_t>();
    if (count > 0) first = labels.masked_select(bad)[0].item<int64_t>();
  }
  TORCH_CHECK_VALUE(count == 0, "labels has ", count, " value(s) outside [0, ", vocab,
                    ") that are not ignore_index=", ignore_index, " (first: ", first, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_forward(const at::Tensor& logits,
                                                                        const at::Tensor& labels,
                                                                        double inv_temperature,
                                                                        int64_t ignore_index,
                                                                        bool with_entropy) {
  check_logits_like(logits, "logits");
  const int64_t n = logits.size(0);
  check_vector(labels, "labels", n, at::kLong, logits);
  TORCH_CHECK(labels.is_contiguous(), "fastrlhf: labels must be contiguous");
  TORCH_CHECK(n == 0 || logits.size(1) > 0, "fastrlhf: logits must have V >= 1");
  check_inv_temperature(inv_temperature);

  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({n}, f32);
  at::Tensor stats = at::empty({n, 2}, f32);
  at::Tensor entropy = at::empty({with_entropy ? n : 0}, f32);
  if (n == 0) return {logprobs, stats, entropy};

  if (logits.is_cpu()) {
    check_labels_in_range(labels, logits.size(1), ignore_index);
    cpu::gather_logprobs_forward(
        make_forward_params(logits, labels, inv_temperature, ignore_index, logprobs, stats, entropy));
  } else if (logits.is_cuda()) {
#ifdef FASTRLHF_WITH_CUDA
    cuda::gather_logprobs_forward(logits, labels, inv_temperature, ignore_index, logprobs, stats, entropy);
#else
    TORCH_CHECK(false, "fastrlhf._C was built without CUDA kernels; rebuild with a CUDA-enabled torch");
#endif
  } else {
    TORCH_CHECK(false, "fastrlhf: gather_logprobs has no kernel for device ", logits.device());
  }
  return {logprobs, stats, entropy};
}

at::Tensor empty_softmax_states(int64_t n, const at::TensorOptions& options) {
  at::Tensor state = at::zeros({n, 3}, options.dtype(at::kFloat));
  state.select(1, 0).fill_(-INFINITY);
  return state;
}

void gather_logprobs_fold(const at::Tensor& logits, const at::Tensor& block_labels, double inv_temperature,
                          int64_t skip_label, bool with_entropy, const at::Tensor& state,
                          const at::Tensor& label_logit) {
  check_logits_like(logits, "logits");
  TORCH_CHECK(logits.is_cpu(), "fastrlhf: gather_logprobs_fold runs on CPU tensors, got ", logits.device());
  const int64_t n = logits.size(0);
  const int64_t width = logits.size(1);
  check_vector(block_labels, "block_labels", n, at::kLong, logits);
  check_vector(label_logit, "label_logit", n, at::kFloat, logits);
  TORCH_CHECK(state.dim() == 2 && state.size(0) == n && state.size(1) == 3 && state.scalar_type() == at::kFloat &&
                  state.is_contiguous() && state.device() == logits.device(),
              "fastrlhf: state must be a contiguous float32 [", n, ", 3] CPU tensor, got ", state.scalar_type(), " ",
              state.sizes());
  TORCH_CHECK(block_labels.is_contiguous() && label_logit.is_contiguous(),
              "fastrlhf: block_labels and label_logit must be contiguous");
  check_inv_temperature(inv_temperature);
  const int64_t* label = block_labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(label[i] < width, "fastrlhf: block_labels[", i, "] = ", label[i], " is past the block's ", width,
                " columns");
  }
  GatherLogprobsFoldParams p{};
  p.logits = logits.const_data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.labels = label;
  p.n_rows = n;
  p.vocab = width;
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.skip_label = skip_label;
  p.dtype = dtype_of(logits);
  p.with_entropy = with_entropy;
  p.state = state.mutable_data_ptr<float>();
  p.label_logit = label_logit.mutable_data_ptr<float>();
  cpu::gather_logprobs_fold(p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_finalize(const at::Tensor& state,
                                                                         const at::Tensor& label_logit,
                                                                         const at::Tensor& labels,
                                                                         double inv_temperature,
                                                                         int64_t ignore_index, bool with_entropy) {
  TORCH_CHECK(state.is_cpu() && state.dim() == 2 && state.size(1) == 3 && state.scalar_type() == at::kFloat &&
                  state.is_contiguous(),
              "fastrlhf: state must be a contiguous float32 [N, 3] CPU tensor, got ", state.scalar_type(), " ",
              state.sizes());
  const int64_t n = state.size(0);
  check_vector(labels, "labels", n, at::kLong, state);
  check_vector(label_logit, "label_logit", n, at::kFloat, state);
  TORCH_CHECK(labels.is_contiguous() && label_logit.is_contiguous(),
              "fastrlhf: labels and label_logit must be contiguous");
  check_inv_temperature(inv_temperature);
  const auto f32 = state.options();
  at::Tensor logprobs = at::empty({n}, f32);
  at::Tensor stats = at::empty({n, 2}, f32);
  at::Tensor entropy = at::empty({with_entropy ? n : 0}, f32);
  GatherLogprobsFinalizeParams p{};
  p.out.labels = labels.const_data_ptr<int64_t>();
  p.out.n_rows = n;
  p.out.inv_temperature = static_cast<float>(inv_temperature);
  p.out.ignore_index = ignore_index;
  p.out.logprobs = logprobs.mutable_data_ptr<float>();
  p.out.stats = stats.mutable_data_ptr<float>();
  p.out.entropy = with_entropy ? entropy.mutable_data_ptr<float>() : nullptr;
  p.state = state.const_data_ptr<float>();
  p.label_logit = label_logit.const_data_ptr<float>();
  if (n > 0) cpu::gather_logprobs_finalize(p);
  return {logprobs, stats, entropy};
}

void gather_logprobs_backward(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                              const at::Tensor& entropy, double inv_temperature, int64_t ignore_index,
                              const at::Tensor& dlogits) {
  check_logits_like(logits, "logits");
  check_logits_like(dlogits, "dlogits");
  TORCH_CHECK(dlogits.sizes() == logits.sizes() && dlogits.scalar_type() == logits.scalar_type() &&
                  dlogits.device() == logits.device(),
              "fastrlhf: dlogits must match logits in shape, dtype and device");
  const int64_t n = logits.size(0);
  check_vector(labels, "labels", n, at::kLong, logits);
  check_vector(grad_logprobs, "grad_logprobs", n, at::kFloat, logits);
  check_stats(stats, n, logits);
  check_optional_vector(grad_entropy, "grad_entropy", n, logits);
  check_optional_vector(entropy, "entropy", n, logits);
  const bool has_grad_entropy = grad_entropy.defined() && grad_entropy.numel() > 0;
  TORCH_CHECK(!has_grad_entropy || entropy.numel() > 0,
              "fastrlhf: grad_entropy needs the entropy saved by the forward");
  TORCH_CHECK(labels.is_contiguous(), "fastrlhf: labels must be contiguous");
  check_inv_temperature(inv_temperature);
  if (n == 0 || logits.size(1) == 0) return;

  // Autograd may hand over expanded (stride-0) gradients; these [N] vectors are cheap to copy.
  const at::Tensor g = grad_logprobs.contiguous();
  const at::Tensor h = has_grad_entropy ? grad_entropy.contiguous() : at::Tensor();
  const at::Tensor stats_c = stats.contiguous();
  const at::Tensor entropy_c = has_grad_entropy ? entropy.contiguous() : at::Tensor();

  if (logits.is_cpu()) {
    cpu::gather_logprobs_backward(make_backward_params(g, h, logits, labels, stats_c, entropy_c,
                                                       inv_temperature, ignore_index, dlogits));
  } else if (logits.is_cuda()) {
#ifdef FASTRLHF_WITH_CUDA
    cuda::gather_logprobs_backward(g, h, logits, labels, stats_c, entropy_c, inv_temperature, ignore_index,
                                   dlogits);
#else
    TORCH_CHECK(false, "fastrlhf._C was built without CUDA kernels; rebuild with a CUDA-enabled torch");
#endif
  } else {
    TORCH_CHECK(false, "fastrlhf: gather_logprobs has no kernel for device ", logits.device());
  }
}

}  // namespace fastrlhf
