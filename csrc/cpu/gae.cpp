// gae and advantages (fused experience step) CPU kernels.
//
// Each row is one sequential reverse walk (common/gae.h); rows run in parallel. Walking several rows in
// lockstep, to overlap their dependency chains, does not pay. Done naively it is 5x slower (AVX2, 64 x
// 2048): the rows lie a multiple of 4 KiB apart, so each store of one row's output falsely aliases the
// next row's load at the same t (4K aliasing). With the outputs staged in a stack buffer and copied out
// per 64-token chunk, it matches one row at a time (0.20 vs 0.22 ms on one thread, bitwise the same).
// The walk is bound by memory, not by its chain: one row at a time on one thread moves ~11 GB/s, two
// threads ~14 GB/s against a measured copy bandwidth of 17.7 GB/s.
// advantages: a vectorised KL pass writes the row's token rewards (csrc/cpu/kl_vec.h), then the
// walk adds the row's score at the first valid position it meets, which is the row's last one.
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

#include "common/gae.h"
#include "common/gae_params.h"
#include "common/kl.h"
#include "cpu/kernels.h"
#include "cpu/kl_vec.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace gae_impl {

// Tokens per parallel task: below this a thread costs more than it saves.
constexpr int64_t kGrainTokens = 32768;

inline int64_t row_grain(int64_t length) { return std::max<int64_t>(1, kGrainTokens / std::max<int64_t>(1, length)); }

// One row's walk, pointers at the row start. kScore: rewards are read-write token rewards that get
// `score` added at the row's last valid position.
template <bool kScore>
void walk_row(const float* rewards, const float* values, const uint8_t* mask, float score, float* rewards_out,
              float* advantages, float* returns, int64_t length, float gamma, float gamma_lam) {
  GaeCarry carry = gae_initial_carry();
  bool seen_valid = false;
  for (int64_t t = length - 1; t >= 0; --t) {
    const bool valid = mask[t] != 0;
    const float v = values[t];
    float r = rewards[t];
    if constexpr (kScore) {
      if (valid && !seen_valid) {
        r += score;
        rewards_out[t] = r;
        seen_valid = true;
      }
    }
    const float adv = gae_step(carry, r, v, valid, gamma, gamma_lam);
    advantages[t] = adv;
    returns[t] = gae_return(adv, v, valid);
  }
}

template <class T>
void advantages_typed(const AdvantagesParams& p) {
  const T* x = static_cast<const T*>(p.logprobs);
  const T* y = static_cast<const T*>(p.ref_logprobs);
  const float gamma_lam = p.gamma * p.lam;
  const bool known = dispatch_kl(p.estimator, p.clamp, [&](auto e, auto clamp_on) {
    at::parallel_for(0, p.n_rows, row_grain(p.length), [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t o = row * p.length;
        // The row's rewards stay in cache for the walk that follows.
        kl_vec::kl_range<T, decltype(e)::value, decltype(clamp_on)::value, kl_vec::KLPass::kValue>(
            x + o, y + o, nullptr, p.mask + o, p.length, p.clamp, -p.kl_coef, p.token_rewards + o, nullptr);
        walk_row<true>(p.token_rewards + o, p.values + o, p.mask + o, p.scores[row], p.token_rewards + o,
                       p.advantages + o, p.returns + o, p.length, p.gamma, gamma_lam);
      }
    });
  });
  TORCH_CHECK(known, "fastrlhf: unknown KL estimator code ", p.estimator);
}

}  // namespace gae_impl

void gae_forward_kernel(const GaeParams& p) {
  using namespace gae_impl;
  if (p.n_rows == 0 || p.length == 0) return;
  const float gamma_lam = p.gamma * p.lam;
  at::parallel_for(0, p.n_rows, row_grain(p.length), [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t o = row * p.length;
      walk_row<false>(p.rewards + o, p.values + o, p.mask + o, 0.0f, nullptr, p.advantages + o, p.returns + o,
                      p.length, p.gamma, gamma_lam);
    }
  });
}

void advantages_forward_kernel(const AdvantagesParams& p) {
  if (p.n_rows == 0 || p.length == 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      return gae_impl::advantages_typed<float>(p);
    case DType::kBFloat16:
      return gae_impl::advantages_typed<c10::BFloat16>(p);
    case DType::kFloat16:
      return gae_impl::advantages_typed<c10::Half>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
