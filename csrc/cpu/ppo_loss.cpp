// ppo_policy_loss CPU kernels: per-row sums of the per-token loss and its stats (the forward), and the
// per-token derivative under a per-row gradient scale (the backward). Rows run in parallel; each row's
// sums are in double and a row's tokens are summed in order, so the result does not depend on the
// thread count. The per-token math is common/ppo_loss.h.
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "common/kl.h"
#include "common/ppo_loss.h"
#include "common/ppo_loss_params.h"
#include "cpu/kernels.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace ppo_loss_impl {

// Tokens per parallel task: below this a thread costs more than it saves.
constexpr int64_t kGrain = 16384;

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

}  // namespace ppo_loss_impl

void ppo_loss_forward_kernel(const PPOLossForwardParams& p) {
  using namespace ppo_loss_impl;
  const PPOLossTokens& t = p.tokens;
  with_estimator(t.kl_estimator, [&](auto e) {
    constexpr KLEstimator E = decltype(e)::value;
    for_rows(t, [&](int64_t r, int64_t o, int64_t end) {
      double sums[kSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
      int64_t count = 0;
      for (int64_t i = o; i < end; ++i) add_token<E>(t, i, sums, count);
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
      for (int64_t i = o; i < end; ++i) {
        p.d_logprobs[i] = token_grad<E>(t, i, scale);
        if (p.d_entropy != nullptr) p.d_entropy[i] = t.mask[i] ? scale * d_entropy_per_unit : 0.0f;
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
