// Argument checks of the TORCH_LIBRARY ops (csrc/*_op.cpp). Each raises ValueError worded exactly as
// fastrlhf/ops/_validation.py words it for the plain-torch path, naming the argument, so a user sees
// the same message whichever backend runs. Python formatting is mirrored: shapes as tuples, dtypes
// and devices by their Python names.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

namespace fastrlhf::op_checks {

// (2, 3), (3,), () as Python prints a shape tuple.
inline std::string py_shape(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// A float as Python's repr prints it: the shortest round-trip digits, "0.0" not "0", "inf", "nan".
inline std::string py_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  std::string text(buffer, result.ptr);
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

// float32, int64, ... as torch prints a dtype without its "torch." prefix.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

// The dtypes ops/_validation.py calls FLOAT_DTYPES and INDEX_DTYPES.
inline void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble, name,
                    " has dtype ", py_dtype(s), "; expected one of float32, bfloat16, float16, float64");
}

inline void check_index(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kLong || s == at::kInt || s == at::kShort || s == at::kChar || s == at::kByte, name,
                    " has dtype ", py_dtype(s), "; expected one of int64, int32, int16, int8, uint8");
}

// float32 / bfloat16 / float16: what the kernels read natively (float64 runs on the torch reference).
inline void check_kernel_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, name, " dtype torch.",
                    py_dtype(s), " is not supported by backend='", t.is_cuda() ? "cuda" : "cpp",
                    "'; use float32, bfloat16 or float16");
}

inline void check_same_shape(const char* reference_name, const at::Tensor& reference, const char* name,
                             const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.sizes() == reference.sizes(), name, " has shape ", py_shape(t.sizes()), " but ",
                    reference_name, " has ", py_shape(reference.sizes()), "; they must match");
}

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Every present tensor on one device.
inline void check_same_device(std::initializer_list<NamedTensor> tensors) {
  const at::Tensor* first = nullptr;
  bool same = true;
  for (const auto& [name, t] : tensors) {
    if (t == nullptr || !t->defined()) continue;
    if (first == nullptr) first = t;
    same = same && t->device() == first->device();
  }
  if (same) return;
  std::ostringstream where;
  bool comma = false;
  for (const auto& [name, t] : tensors) {
    if (t == nullptr || !t->defined()) continue;
    where << (comma ? ", " : "") << name << " on " << t->device();
    comma = true;
  }
  TORCH_CHECK_VALUE(false, "all tensors must be on one device, got ", where.str());
}

inline double check_finite(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be finite, got ", py_float(value));
  return value;
}

// A 0/1 mask of any real or bool dtype as a contiguous uint8 tensor (a bool mask is reinterpreted,
// not copied). Values other than 0 and 1 are an error; a meta tensor has no values to check.
inline at::Tensor mask_as_bytes(const char* name, const at::Tensor& mask) {
  if (mask.scalar_type() == at::kBool) return mask.contiguous().view(at::kByte);
  TORCH_CHECK_VALUE(!mask.is_complex(), name, " must be bool or a real 0/1 tensor, got ",
                    py_dtype(mask.scalar_type()));
  if (mask.numel() > 0 && !mask.is_meta()) {
    const at::Tensor bad = mask.ne(0).logical_and(mask.ne(1));
    if (bad.any().item<bool>()) {
      const at::Tensor first = mask.masked_select(bad).flatten()[0];
      std::ostringstream found;
      if (mask.is_floating_point()) {
        found << py_float(first.item<double>());
      } else {
        found << first.item<int64_t>();
      }
      TORCH_CHECK_VALUE(false, name, " must hold only 0 and 1 (it is a mask), found ", found.str());
    }
  }
  return mask.to(at::kByte).contiguous();
}

}  // namespace fastrlhf::op_checks
