// Argument checks of the TORCH_LIBRARY ops (csrc/*_op.cpp). Each raises ValueError worded exactly as
// fastrlhf/ops/_validation.py words it for the plain-torch path, naming the argument, so a user sees
// the same message whichever backend runs. Python formatting is mirrored: shapes as tuples, dtypes
// and devices by their Python names.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdlib>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
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

// γ and λ: finite and in [0, 1] (ops/_common.py::check_discount).
inline double check_discount(const char* name, double value) {
  check_finite(name, value);
  TORCH_CHECK_VALUE(value >= 0.0 && value <= 1.0, name, " must be in [0, 1], got ", py_float(value));
  return value;
}

// Raises the "must hold only 0 and 1" error for the mask element `bad` (a one-element tensor).
[[noreturn]] inline void bad_mask_value(const char* name, const at::Tensor& mask, const at::Tensor& bad) {
  std::ostringstream found;
  if (mask.is_floating_point()) {
    found << py_float(bad.item<double>());
  } else {
    found << bad.item<int64_t>();
  }
  TORCH_CHECK_VALUE(false, name, " must hold only 0 and 1 (it is a mask), found ", found.str());
  std::abort();  // not reached: TORCH_CHECK_VALUE(false, ...) throws
}

// One block of a CPU mask: true when every value is 0 or 1, with the values written to `dst` as bytes
// (an integer mask may pass a null `dst`: check only, for a mask already in bytes). Branch-free, so the loop vectorises; local restrict pointers, because a
// uint8_t store may alias anything, and through pointers the compiler cannot prove apart it reloads both
// after every store and the loop stays scalar (on a 2-core Xeon a 64 x 2048 float mask added ~400 us to
// a GAE call that way, ~80 us vectorised).
template <typename scalar_t>
inline bool mask_block_is_binary(const scalar_t* __restrict__ values, uint8_t* __restrict__ dst, int64_t len) {
  if constexpr (std::is_integral_v<scalar_t>) {
    // 0 and 1 are the integers whose unsigned form shifted right by one is 0 (a negative one is huge):
    // an OR of shifts is one vector op per lane on SSE2, where a 64-bit compare is not (int64 masks, as
    // Hugging Face attention masks are, were a scalar loop: 210 us for 131k of them).
    using unsigned_t = std::make_unsigned_t<scalar_t>;
    unsigned_t high_bits = 0;
    if (dst == nullptr) {
      for (int64_t i = 0; i < len; ++i) high_bits |= static_cast<unsigned_t>(values[i]) >> 1;
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const unsigned_t u = static_cast<unsigned_t>(values[i]);
        high_bits |= u >> 1;
        dst[i] = static_cast<uint8_t>(u);
      }
    }
    return high_bits == 0;
  } else {
    static_assert(!std::is_same_v<scalar_t, uint8_t>);  // floats always convert: `dst` is never null here
    int not_binary = 0;  // a count, not a bool: GCC vectorises this form, 4x the && / |= ones
    for (int64_t i = 0; i < len; ++i) {
      const scalar_t v = values[i];
      not_binary += (v != scalar_t(0)) & (v != scalar_t(1));
      dst[i] = v == scalar_t(1);
    }
    return not_binary == 0;
  }
}

// CPU: check and convert in one pass over the mask. The ATen composition below costs five ops and a
// device-to-host read, ~25 us on a 2 x 8 float mask, three times a whole GAE call on a bool mask.
// Blocks are checked branch-free and searched only when one fails; the error names the first bad
// element in row-major order, as the ATen path does. A uint8 mask is only checked, and returned as is.
inline at::Tensor mask_as_bytes_cpu(const char* name, const at::Tensor& mask) {
  constexpr int64_t kBlock = 4096;
  // Blocks per task: one thread up to 32k values, where waking the second costs more than it saves.
  constexpr int64_t kGrainBlocks = 8;
  const at::Tensor src = mask.contiguous();
  const bool bytes_already = src.scalar_type() == at::kByte;
  at::Tensor out = bytes_already ? src : at::empty(src.sizes(), src.options().dtype(at::kByte));
  uint8_t* dst = bytes_already ? nullptr : out.mutable_data_ptr<uint8_t>();
  const int64_t n = src.numel();
  std::atomic<int64_t> first_bad{n};
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mask_as_bytes", [&] {
    const scalar_t* values = src.const_data_ptr<scalar_t>();
    at::parallel_for(0, (n + kBlock - 1) / kBlock, kGrainBlocks, [&](int64_t lo, int64_t hi) {
      for (int64_t block = lo; block < hi; ++block) {
        const int64_t begin = block * kBlock, end = std::min(n, begin + kBlock);
        if (mask_block_is_binary(values + begin, dst == nullptr ? nullptr : dst + begin, end - begin)) continue;
        int64_t i = begin;
        while (values[i] == scalar_t(0) || values[i] == scalar_t(1)) ++i;
        int64_t seen = first_bad.load();
        while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
        }
        return;  // later blocks of this chunk cannot hold an earlier bad element
      }
    });
  });
  if (first_bad.load() < n) bad_mask_value(name, src, src.view(-1)[first_bad.load()]);
  return out;
}

// A 0/1 mask of any real or bool dtype as a contiguous uint8 tensor (a bool mask is reinterpreted and
// a uint8 one checked, neither copied). Values other than 0 and 1 are an error; a meta tensor has no
// values to check.
inline at::Tensor mask_as_bytes(const char* name, const at::Tensor& mask) {
  if (mask.scalar_type() == at::kBool) return mask.contiguous().view(at::kByte);
  TORCH_CHECK_VALUE(!mask.is_complex(), name, " must be bool or a real 0/1 tensor, got ",
                    py_dtype(mask.scalar_type()));
  if (mask.is_cpu() && mask.numel() > 0) return mask_as_bytes_cpu(name, mask);
  if (mask.numel() > 0 && !mask.is_meta()) {
    const at::Tensor bad = mask.ne(0).logical_and(mask.ne(1));
    if (bad.any().item<bool>()) bad_mask_value(name, mask, mask.masked_select(bad).flatten()[0]);
  }
  return mask.scalar_type() == at::kByte ? mask.contiguous() : mask.to(at::kByte).contiguous();
}

}  // namespace fastrlhf::op_checks
