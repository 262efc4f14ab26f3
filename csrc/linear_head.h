// The hidden × lm_head half of the fused linear ops (linear_logprobs_op.cpp, linear_ppo_loss_op.cpp): the
// argument checks of hidden / weight / labels / bias, and the float32 products of hidden rows with the head.
// The Python engine's twins are ops/linear_logprobs.py::check_linear_inputs and ops/_matmul.py.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <vector>

#include "op_checks.h"
#include "tensor_views.h"

namespace fastrlhf {
namespace linear_head {

// One call's hidden states and labels, flattened to rows.
struct LinearCall {
  at::Tensor hidden;  // [N, H]
  at::Tensor labels;  // int64 [N], contiguous
  std::vector<int64_t> lead;
  double inv_temperature;
};

// Worded as linear_logprobs.py::check_linear_inputs and check_chunk_size, in the same order.
inline LinearCall prepare(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                          const std::optional<at::Tensor>& bias, double temperature, int64_t chunk_rows) {
  using op_checks::NamedTensor;
  using op_checks::py_shape;
  const at::Tensor* bias_ptr = bias.has_value() && bias->defined() ? &*bias : nullptr;
  op_checks::check_float(hidden, "hidden");
  op_checks::check_float(weight, "weight");
  op_checks::check_index(labels, "labels");
  if (bias_ptr != nullptr) op_checks::check_float(*bias_ptr, "bias");
  op_checks::check_same_device({NamedTensor{"hidden", &hidden}, NamedTensor{"weight", &weight},
                                NamedTensor{"labels", &labels}, NamedTensor{"bias", bias_ptr}});
  TORCH_CHECK_VALUE(hidden.dim() >= 1, "hidden must have at least 1 dimension (the hidden size), got a scalar");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [vocab, hidden], got shape ", py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(-1), "weight has shape ", py_shape(weight.sizes()),
                    " but hidden's last dimension is ", hidden.size(-1),
                    ": weight must be [vocab, hidden] (an nn.Linear / lm_head weight)");
  TORCH_CHECK_VALUE(weight.size(0) > 0, "weight has an empty vocabulary dimension (size 0)");
  TORCH_CHECK_VALUE(weight.scalar_type() == hidden.scalar_type(), "hidden is torch.",
                    op_checks::py_dtype(hidden.scalar_type()), " but weight is torch.",
                    op_checks::py_dtype(weight.scalar_type()),
                    "; give both in one dtype (the products accumulate in float32 either way)");
  const auto lead = hidden.sizes().slice(0, hidden.dim() - 1);
  TORCH_CHECK_VALUE(labels.sizes() == lead, "labels has shape ", py_shape(labels.sizes()), ", but hidden ",
                    py_shape(hidden.sizes()), " needs labels of shape ", py_shape(lead));
  if (bias_ptr != nullptr) {
    TORCH_CHECK_VALUE(bias_ptr->dim() == 1 && bias_ptr->size(0) == weight.size(0), "bias must have shape (",
                      weight.size(0), ",) like weight's rows, got ", py_shape(bias_ptr->sizes()));
  }
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "temperature must be finite and > 0, got ",
                    op_checks::py_float(temperature));
  TORCH_CHECK_VALUE(chunk_rows > 0, "chunk_size must be None or a positive int (rows per chunk), got ", chunk_rows);
  op_checks::check_kernel_dtype(hidden, "hidden");
  LinearCall call;
  call.hidden = matrix_of_rows(hidden);
  call.labels = flat(contiguous_as(labels, at::kLong));
  call.lead = lead.vec();
  call.inv_temperature = 1.0 / temperature;
  return call;
}

// Whether at::mm(a, b, out_dtype=float32) runs for `dtype` operands on `device` (ops/_matmul.py's
// has_fp32_out_gemm): asked once per device kind and dtype, by trying it.
inline bool has_fp32_out_gemm(const at::Device& device, at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  static std::array<std::atomic<int>, 4> known{};  // 0 unknown, 1 no, 2 yes; [cuda?][half?]
  std::atomic<int>& slot = known[(device.is_cuda() ? 2 : 0) + (dtype == at::kHalf ? 1 : 0)];
  int state = slot.load(std::memory_order_relaxed);
  if (state == 0) {
    try {
      const at::Tensor a = at::ones({2, 2}, at::TensorOptions().dtype(dtype).device(device));
      state = at::mm(a, a, at::kFloat).scalar_type() == at::kFloat ? 2 : 1;
    } catch (const c10::Error&) {
      state = 1;
    }
    slot.store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

// weight [V, H] and bias [V] ready for float32 products (ops/_matmul.py's Fp32Operand): the weight as
// is when it is float32 or the device has a float32-output GEMM for its dtype, else one float32 copy.
struct Fp32Head {
  at::Tensor weight;
  at::Tensor bias;  // float32 [V], or undefined
  bool native = false;

  Fp32Head(const at::Tensor& w, const std::optional<at::Tensor>& b) {
    const bool low = w.scalar_type() != at::kFloat && w.scalar_type() != at::kDouble;
    native = low && !w.is_meta() && has_fp32_out_gemm(w.device(), w.scalar_type());
    weight = low && !native ? w.to(at::kFloat) : w;
    if (b.has_value() && b->defined()) bias = b->to(at::kFloat);
  }

  // `other` in the dtype the product needs.
  at::Tensor cast(const at::Tensor& other) const {
    return other.scalar_type() == weight.scalar_type() ? other : other.to(weight.scalar_type());
  }

  at::Tensor mm(const at::Tensor& a, const at::Tensor& b) const {
    return native ? at::mm(a, b, at::kFloat) : at::mm(a, b);
  }

  void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    if (native) {
      out.add_(at::mm(a, b, at::kFloat));
    } else {
      out.addmm_(a, b);
    }
  }

  // Float32 logits [C, V] (or the vocabulary columns [start, end)) of hidden rows [C, H]: a fresh buffer.
  at::Tensor logits(const at::Tensor& hidden_rows, int64_t start, int64_t end) const {
    const bool all = start == 0 && end == weight.size(0);
    at::Tensor logits = mm(cast(hidden_rows), (all ? weight : weight.slice(0, start, end)).t());
    if (bias.defined()) logits.add_(all ? bias : bias.slice(0, start, end));
    return logits;
  }
};

}  // namespace linear_head
}  // namespace fastrlhf
