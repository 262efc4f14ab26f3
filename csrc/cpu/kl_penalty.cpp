// kl_penalty CPU kernels: per-token KL estimate (forward) and its derivative w.r.t. logprobs
// (backward), elementwise over contiguous tokens in parallel chunks (csrc/cpu/kl_vec.h).
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "common/kl.h"
#include "common/kl_penalty_params.h"
#include "cpu/kernels.h"
#include "cpu/kl_vec.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace kl_penalty_impl {

// Tokens per parallel task: below this a thread costs more than it saves (a few microseconds).
constexpr int64_t kGrain = 32768;

template <class T, bool kGrad>
void run(const KLPenaltyParams& p) {
  const T* x = static_cast<const T*>(p.logprobs);
  const T* y = static_cast<const T*>(p.ref_logprobs);
  const bool known = dispatch_kl(p.estimator, p.clamp, [&](auto e, auto clamp_on) {
    at::parallel_for(0, p.n, kGrain, [&](int64_t lo, int64_t hi) {
      kl_vec::kl_range<T, decltype(e)::value, decltype(clamp_on)::value, kGrad>(
          x + lo, y + lo, p.grad == nullptr ? nullptr : p.grad + lo, p.mask == nullptr ? nullptr : p.mask + lo,
          hi - lo, p.clamp, 1.0f, p.out + lo);
    });
  });
  TORCH_CHECK(known, "fastrlhf: unknown KL estimator code ", p.estimator);
}

template <bool kGrad>
void dispatch(const KLPenaltyParams& p) {
  if (p.n == 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      return run<float, kGrad>(p);
    case DType::kBFloat16:
      return run<c10::BFloat16, kGrad>(p);
    case DType::kFloat16:
      return run<c10::Half, kGrad>(p);
  }
}

}  // namespace kl_penalty_impl

void kl_penalty_forward_kernel(const KLPenaltyParams& p) {
  kl_penalty_impl::dispatch<false>(p);
}

void kl_penalty_backward_kernel(const KLPenaltyParams& p) {
  TORCH_CHECK(p.grad != nullptr || p.n == 0, "fastrlhf: kl_penalty backward needs grad");
  kl_penalty_impl::dispatch<true>(p);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
