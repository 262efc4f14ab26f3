// kl_penalty CPU kernels: the per-token KL estimate, its masked sums per segment (the mean
// reductions), either of them optionally with d kl / d logprobs saved per token, and the derivative
// w.r.t. logprobs (and ref_logprobs) under a per-token, per-row or uniform gradient, from the inputs or
// from the saved derivative. Elementwise over contiguous tokens in parallel chunks (csrc/cpu/kl_vec.h).
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "common/kl.h"
#include "common/kl_penalty_params.h"
#include "cpu/kernels.h"
#include "cpu/kl_vec.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace kl_penalty_impl {

using kl_vec::KLPass;

// Tokens per parallel task: below this a thread costs more than it saves (a few microseconds).
constexpr int64_t kGrain = 32768;

// Calls f(tag) with tag's type T the element type of `dtype`.
template <class F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(static_cast<const float*>(nullptr));
    case DType::kBFloat16:
      return f(static_cast<const c10::BFloat16*>(nullptr));
    case DType::kFloat16:
      return f(static_cast<const c10::Half*>(nullptr));
  }
}

template <class F>
void with_estimator(int estimator, float clamp, F&& f) {
  const bool known = dispatch_kl(estimator, clamp, f);
  TORCH_CHECK(known, "fastrlhf: unknown KL estimator code ", estimator);
}

}  // namespace kl_penalty_impl

void kl_penalty_forward_kernel(const KLPenaltyParams& p) {
  using namespace kl_penalty_impl;
  if (p.n == 0) return;
  with_dtype(p.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* x = static_cast<const T*>(p.logprobs);
    const T* y = static_cast<const T*>(p.ref_logprobs);
    with_estimator(p.estimator, p.clamp, [&](auto e, auto clamp_on) {
      constexpr KLEstimator E = decltype(e)::value;
      constexpr bool kClamp = decltype(clamp_on)::value;
      at::parallel_for(0, p.n, kGrain, [&](int64_t lo, int64_t hi) {
        const uint8_t* mask = p.mask == nullptr ? nullptr : p.mask + lo;
        if (p.derivative == nullptr) {
          kl_vec::kl_range<T, E, kClamp, KLPass::kValue>(x + lo, y + lo, nullptr, mask, hi - lo, p.clamp, 1.0f,
                                                         p.out + lo, nullptr);
        } else {
          kl_vec::kl_range<T, E, kClamp, KLPass::kValueAndGrad>(x + lo, y + lo, nullptr, mask, hi - lo, p.clamp,
                                                                1.0f, p.out + lo, nullptr, p.derivative + lo);
        }
      });
    });
  });
}

void kl_penalty_sums_kernel(const KLPenaltySumsParams& p) {
  using namespace kl_penalty_impl;
  if (p.n == 0) return;
  const int64_t segments = (p.n + p.segment_len - 1) / p.segment_len;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, p.segment_len));
  with_dtype(p.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* x = static_cast<const T*>(p.logprobs);
    const T* y = static_cast<const T*>(p.ref_logprobs);
    with_estimator(p.estimator, p.clamp, [&](auto e, auto clamp_on) {
      at::parallel_for(0, segments, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t s = lo; s < hi; ++s) {
          const int64_t o = s * p.segment_len;
          kl_vec::kl_sum<T, decltype(e)::value, decltype(clamp_on)::value>(
              x + o, y + o, p.mask == nullptr ? nullptr : p.mask + o, std::min(p.segment_len, p.n - o), p.clamp,
              p.sums[s], p.counts[s], p.derivative == nullptr ? nullptr : p.derivative + o);
        }
      });
    });
  });
}

void kl_penalty_backward_kernel(const KLPenaltyGradParams& p) {
  using namespace kl_penalty_impl;
  if (p.n == 0) return;
  // Runs range(offset, len, scale) over every token in parallel tasks: one per row, each with its row's
  // gradient, under a seq-mean; else chunks of tokens, with the uniform gradient (or 1 with a per-token one).
  const auto for_each_range = [&](auto&& range) {
    if (p.row_scale != nullptr) {
      const int64_t rows = p.n / p.row_len;
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / p.row_len), [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) range(r * p.row_len, p.row_len, p.row_scale[r]);
      });
    } else {
      at::parallel_for(0, p.n, kGrain,
                       [&](int64_t lo, int64_t hi) { range(lo, hi - lo, p.grad != nullptr ? 1.0f : p.scale); });
    }
  };
  const auto grad_at = [&](int64_t o) { return p.grad == nullptr ? nullptr : p.grad + o; };
  const auto mask_at = [&](int64_t o) { return p.mask == nullptr ? nullptr : p.mask + o; };
  const auto d_ref_at = [&](int64_t o) { return p.d_ref_logprobs == nullptr ? nullptr : p.d_ref_logprobs + o; };
  if (p.derivative != nullptr) {  // the forward saved d kl / d logprobs: only scale it
    for_each_range([&](int64_t o, int64_t len, float scale) {
      kl_vec::scale_derivative(p.derivative + o, grad_at(o), mask_at(o), len, scale, p.d_logprobs + o, d_ref_at(o));
    });
    return;
  }
  with_dtype(p.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* x = static_cast<const T*>(p.logprobs);
    const T* y = static_cast<const T*>(p.ref_logprobs);
    with_estimator(p.estimator, p.clamp, [&](auto e, auto clamp_on) {
      constexpr KLEstimator E = decltype(e)::value;
      constexpr bool kClamp = decltype(clamp_on)::value;
      for_each_range([&](int64_t o, int64_t len, float scale) {
        if (p.grad != nullptr) {
          kl_vec::kl_range<T, E, kClamp, KLPass::kGradPerToken>(x + o, y + o, grad_at(o), mask_at(o), len, p.clamp,
                                                                scale, p.d_logprobs + o, d_ref_at(o));
        } else {
          kl_vec::kl_range<T, E, kClamp, KLPass::kGradUniform>(x + o, y + o, nullptr, mask_at(o), len, p.clamp,
                                                               scale, p.d_logprobs + o, d_ref_at(o));
        }
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
