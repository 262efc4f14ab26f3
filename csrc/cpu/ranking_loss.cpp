// ranking_loss CPU kernels: InstructGPT's K-wise pairwise loss per prompt and its gradient.
// K is small (2..16 typically), so each prompt is an O(K^2) scalar loop (common/ranking.h) and
// prompts run in parallel.
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>

#include <algorithm>

#include "common/ranking.h"
#include "common/ranking_loss_params.h"
#include "cpu/kernels.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace ranking_loss_impl {

// Pair evaluations per parallel task: each costs an exp and a log1p (~20 ns), so 4096 of them
// (~0.1 ms) outweigh a task's overhead.
constexpr int64_t kGrainPairs = 4096;

inline int64_t prompt_grain(int64_t k) { return std::max<int64_t>(1, kGrainPairs / std::max<int64_t>(1, k * k)); }

inline RankingRow row_of(const float* rewards, const int64_t* ranks, const uint8_t* mask, int64_t n, int64_t k,
                         float margin) {
  const int64_t o = n * k;
  return {rewards + o, ranks + o, mask == nullptr ? nullptr : mask + o, k, margin};
}

}  // namespace ranking_loss_impl

void ranking_loss_forward_kernel(const RankingLossForwardParams& p) {
  using namespace ranking_loss_impl;
  at::parallel_for(0, p.n, prompt_grain(p.k), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const RankingRow row = row_of(p.rewards, p.ranks, p.mask, n, p.k, p.margin);
      RankingSums s = ranking_empty_sums();
      for (int64_t w = 0; w < p.k; ++w) ranking_accumulate_winner(row, w, s);
      p.prompt_loss[n] = ranking_mean_loss(s);
      p.prompt_accuracy[n] = ranking_accuracy(s);
      p.num_pairs[n] = static_cast<float>(s.pairs);
    }
  });
}

void ranking_loss_backward_kernel(const RankingLossBackwardParams& p) {
  using namespace ranking_loss_impl;
  at::parallel_for(0, p.n, prompt_grain(p.k), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const RankingRow row = row_of(p.rewards, p.ranks, p.mask, n, p.k, p.margin);
      float* d = p.d_rewards + n * p.k;
      int64_t pairs = 0;
      for (int64_t w = 0; w < p.k; ++w) pairs += ranking_pairs_won(row, w);
      if (pairs == 0) {
        std::fill(d, d + p.k, 0.0f);
        continue;
      }
      const float scale = p.grad_prompt_loss[n] / static_cast<float>(pairs);
      for (int64_t j = 0; j < p.k; ++j) d[j] = scale * ranking_reward_grad(row, j);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
