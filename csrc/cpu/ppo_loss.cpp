// ppo_policy_loss CPU kernels: per-row sums of the per-token loss and its stats (the forward), and the
// per-token derivative under a per-row gradient scale (the backward). The per-token math is
// common/ppo_loss.h, run here on SIMD vectors (VecPPOMath) with a scalar tail. Rows run in parallel; a
// row's tokens are summed in blocks in a fixed order, so the result does not depend on the thread count.
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "common/kl.h"
#include "common/ppo_loss.h"
#include "common/ppo_loss_params.h"
#include "cpu/kernels.h"
#include "cpu/kl_vec.h"
#include "cpu/vec_io.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace ppo_loss_impl {

using kl_vec::Vec;
using vec_io::kStep;

// common/ppo_loss.h's selects on SIMD vectors (a comparison with NaN is false, as in ScalarPPOMath).
struct VecPPOMath : kl_vec::VecKLMath {
  // exp_u20 maps NaN to a number; a NaN log-ratio must stay NaN (a NaN on a valid token is not hidden).
  static Vec exp(const Vec& x) { return Vec::blendv(x.exp_u20(), x, x.isnan()); }
  static Vec where_gt(const Vec& a, const Vec& b, const Vec& x, const Vec& y) { return Vec::blendv(y, x, a > b); }
  static Vec where_lt(const Vec& a, const Vec& b, const Vec& x, const Vec& y) { return Vec::blendv(y, x, a < b); }
  static Vec max_share(const Vec& a, const Vec& b) {
    return Vec::blendv(Vec::blendv(Vec(1.0f), Vec(0.5f), a == b), Vec(0.0f), a < b);
  }
};

// Tokens per parallel task: below this a thread costs more than it saves.
constexpr int64_t kGrain = 16384;
// Tokens whose per-token results sit in L1 between the math and the masked sums: 5 x 4 KiB.
constexpr int64_t kSumBlock = 1024;

// Calls f(std::integral_constant<KLEstimator, E>{}) for the run-time estimator code.
template <class F>
void with_estimator(int estimator, F&& f) {
  const bool known = dispatch_kl(estimator, INFINITY, [&](auto e, auto) { f(e); });
  TORCH_CHECK(known, "fastrlhf: unknown KL estimator code ", estimator);
}

template <class F>
void for_rows(const PPOLossTokens& t, F&& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, t.row_len));
  at::parallel_for(0, t.rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) f(r, r * t.row_len, std::min(t.n, (r + 1) * t.row_len));
  });
}

Vec load_or_zero(const float* p, int64_t i) { return p != nullptr ? Vec::loadu(p + i) : Vec(0.0f); }

// Sum of x[0, len) over the kept positions (mask[j] != 0), NaN computed elsewhere included.
double masked_sum(const float* x, const uint8_t* mask, int64_t len) {
  alignas(64) float kept[kSumBlock];
  for (int64_t j = 0; j < len; ++j) kept[j] = mask[j] != 0 ? x[j] : 0.0f;  // branch-free: vectorises
  return static_cast<double>(
      at::vec::reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, kept, len));
}

// The sums of tokens [b, b + len), len <= kSumBlock, added to sums / count.
template <KLEstimator E>
void add_block(const PPOLossTokens& t, int64_t b, int64_t len, double (&sums)[kSums], int64_t& count) {
  alignas(64) float out[kSums][kSumBlock];
  const int64_t v_end = len / Vec::size() * Vec::size();
  for (int64_t j = 0; j < v_end; j += Vec::size()) {
    const int64_t i = b + j;
    const Vec entropy = load_or_zero(t.entropy, i);
    const PPOTokenStats<Vec> s = ppo_token_forward<VecPPOMath, E>(
        Vec::loadu(t.logprobs + i), Vec::loadu(t.old_logprobs + i), Vec::loadu(t.advantages + i),
        load_or_zero(t.ref_logprobs, i), entropy, t.options);
    s.loss.store(out[kLossSum] + j);
    s.clipped.store(out[kClippedSum] + j);
    s.approx_kl.store(out[kApproxKLSum] + j);
    entropy.store(out[kEntropySum] + j);
    s.ref_kl.store(out[kRefKLSum] + j);
  }
  for (int64_t j = v_end; j < len; ++j) {
    const int64_t i = b + j;
    const float entropy = t.entropy != nullptr ? t.entropy[i] : 0.0f;
    const PPOTokenStats<float> s = ppo_token_forward<ScalarPPOMath, E>(
        t.logprobs[i], t.old_logprobs[i], t.advantages[i], t.ref_logprobs != nullptr ? t.ref_logprobs[i] : 0.0f,
        entropy, t.options);
    out[kLossSum][j] = s.loss;
    out[kClippedSum][j] = s.clipped;
    out[kApproxKLSum][j] = s.approx_kl;
    out[kEntropySum][j] = entropy;
    out[kRefKLSum][j] = s.ref_kl;
  }
  const uint8_t* mask = t.mask + b;
  for (int k = 0; k < kSums; ++k) {
    const bool present = (k != kEntropySum || t.entropy != nullptr) && (k != kRefKLSum || t.ref_logprobs != nullptr);
    if (present) sums[k] += masked_sum(out[k], mask, len);
  }
  count += vec_io::count_kept(mask, len);
}

}  // namespace ppo_loss_impl

void ppo_loss_forward_kernel(const PPOLossForwardParams& p) {
  using namespace ppo_loss_impl;
  const PPOLossTokens& t = p.tokens;
  with_estimator(t.kl_estimator, [&](auto e) {
    for_rows(t, [&](int64_t r, int64_t o, int64_t end) {
      double sums[kSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
      int64_t count = 0;
      for (int64_t b = o; b < end; b += kSumBlock) {
        add_block<decltype(e)::value>(t, b, std::min(kSumBlock, end - b), sums, count);
      }
      std::copy(sums, sums + kSums, p.row_sums + r * kSums);
      p.row_counts[r] = count;
    });
  });
}

void ppo_loss_backward_kernel(const PPOLossBackwardParams& p) {
  using namespace ppo_loss_impl;
  const PPOLossTokens& t = p.tokens;
  const float d_entropy_per_unit = -t.options.entropy_coef;
  with_estimator(t.kl_estimator, [&](auto e) {
    constexpr KLEstimator E = decltype(e)::value;
    for_rows(t, [&](int64_t r, int64_t o, int64_t end) {
      const float scale = p.row_scale[r];
      const Vec vscale(scale);
      // Two vectors a step: their exp chains overlap. Masked positions get exactly 0, whatever was
      // computed there (NaN padding included), in registers, so each gradient is stored once.
      const int64_t v_end = o + (end - o) / kStep * kStep;
      for (int64_t i = o; i < v_end; i += kStep) {
        const int64_t i1 = i + Vec::size();
        Vec g0 = ppo_token_grad<VecPPOMath, E>(Vec::loadu(t.logprobs + i), Vec::loadu(t.old_logprobs + i),
                                              Vec::loadu(t.advantages + i), load_or_zero(t.ref_logprobs, i),
                                              t.options);
        Vec g1 = ppo_token_grad<VecPPOMath, E>(Vec::loadu(t.logprobs + i1), Vec::loadu(t.old_logprobs + i1),
                                              Vec::loadu(t.advantages + i1), load_or_zero(t.ref_logprobs, i1),
                                              t.options);
        g0 = vscale * g0;
        g1 = vscale * g1;
        vec_io::zero_where_dropped(t.mask + i, g0, g1);
        vec_io::store2(p.d_logprobs + i, g0, g1);
      }
      for (int64_t i = v_end; i < end; ++i) p.d_logprobs[i] = t.mask[i] != 0 ? token_grad<E>(t, i, scale) : 0.0f;
      if (p.d_entropy != nullptr) {
        const float per_token = scale * d_entropy_per_unit;
        for (int64_t i = o; i < end; ++i) p.d_entropy[i] = t.mask[i] != 0 ? per_token : 0.0f;  // vectorises
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
