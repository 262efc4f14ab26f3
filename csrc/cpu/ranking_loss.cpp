// ranking_loss CPU kernel: InstructGPT's K-wise pairwise loss per prompt and, when asked, its gradient in
// the same pass (the pair's sigmoid comes from the softplus's own exp, so a backward is one multiply).
//
// A scalar loop spends ~40 ns per pair on exp and log1p. Here each task first lists its prompts'
// valid pairs (reward gap, winner, loser) in a flat table, then runs softplus / sigmoid over the table
// in SIMD, then folds the results back per prompt: the transcendental work runs at vector speed and the
// O(K^2) pair search is plain compares. The per-prompt arithmetic matches common/ranking.h (CUDA).
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "common/ranking.h"
#include "common/ranking_loss_params.h"
#include "cpu/kernels.h"
#include "cpu/vec_exp.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace ranking_loss_impl {

using Vec = at::vec::Vectorized<float>;

// Pairs per parallel task: a vectorised pair costs ~2 ns, so 16k of them (~30 us) outweigh a task's
// start-up on another thread.
constexpr int64_t kGrainPairs = 16384;
// Pairs listed at a time: the table (gap, loss, slope, winner, loser: 20 bytes a pair) stays in L1/L2.
constexpr int64_t kTablePairs = 2048;

inline int64_t pairs_per_prompt(int64_t k) { return k * (k - 1) / 2; }

inline int64_t prompt_grain(int64_t k) { return std::max<int64_t>(1, kGrainPairs / std::max<int64_t>(1, pairs_per_prompt(k))); }

// The valid pairs of prompt n, appended at `at`: gap r_w - r_l - margin, winner and loser columns.
// Returns how many; adds the pairs ordered right (r_w > r_l) to `correct`.
struct PairTable {
  std::vector<float> gap, result, slope;
  std::vector<int32_t> winner, loser;

  // Room for `prompts` prompts of k responses, at most kTablePairs pairs (one prompt's pairs at least): a
  // small call's table is small, not 2048 zero-filled entries of each column.
  PairTable(int64_t k, int64_t prompts) {
    const int64_t per_prompt = std::max<int64_t>(1, pairs_per_prompt(k));
    const int64_t pairs = std::max(per_prompt, std::min(kTablePairs, per_prompt * std::max<int64_t>(prompts, 1)));
    // + k: collect() writes candidates one slot past its last pair.
    const size_t size = static_cast<size_t>(pairs + k);
    gap.resize(size), result.resize(size), slope.resize(size), winner.resize(size), loser.resize(size);
  }

  // Pairs this table holds at a time (its size less the slack collect() needs).
  int64_t capacity(int64_t k) const { return static_cast<int64_t>(gap.size()) - k; }

  // Each unordered pair {i, j} once, branch-free: every candidate is written and the cursor advances
  // only for a real pair (both valid, ranks differ); the better-ranked response is the winner. Random
  // ranks make "who wins" a coin flip, and a mispredicted branch per candidate cost more than all of
  // the vectorised math.
  int64_t collect(const RankingRow& row, int64_t at, int64_t& correct) {
    // Raw pointers in locals: through the vectors' members the compiler reloaded (and spilled) them on
    // every candidate, and a stalled store-to-load forward made the loop ~10x slower.
    float* __restrict gaps = gap.data();
    int32_t* __restrict winners = winner.data();
    int32_t* __restrict losers = loser.data();
    const float* rewards = row.rewards;
    const int64_t* ranks = row.ranks;
    const float margin = row.margin;
    int64_t m = at;
    int64_t right = 0;
    for (int64_t i = 0; i + 1 < row.k; ++i) {
      if (!row.valid(i)) continue;
      const float ri = rewards[i];
      const int64_t ki = ranks[i];
      for (int64_t j = i + 1; j < row.k; ++j) {
        const float rj = rewards[j];
        const int64_t kj = ranks[j];
        // Arithmetic, not ?: -- the compiler turned the selects into a branch on who wins.
        const int64_t i_wins = static_cast<int64_t>(ki < kj);
        const float diff = static_cast<float>(2 * i_wins - 1) * (ri - rj);  // r_w - r_l
        const int64_t keep = static_cast<int64_t>(row.valid(j)) & static_cast<int64_t>(ki != kj);
        gaps[m] = diff - margin;
        winners[m] = static_cast<int32_t>(j + (i - j) * i_wins);
        losers[m] = static_cast<int32_t>(i + (j - i) * i_wins);
        right += keep & static_cast<int64_t>(diff > 0.0f);
        m += keep;
      }
    }
    correct += right;
    return m - at;
  }
};

// result[i] = softplus(-gap[i]) = max(-gap, 0) + log1p(e^-|gap|), i < m.
// The exp is of -|gap| <= 0: cpu/vec_exp.h's (a polynomial, 2.3e-7 relative), not Sleef's out-of-line
// 1-ULP exp, which was the larger share of the ~8 ns per pair.
inline void softplus_of_negated(const float* gap, float* result, int64_t m) {
  int64_t i = 0;
  for (; i + Vec::size() <= m; i += Vec::size()) {
    const Vec x = Vec(0.0f) - Vec::loadu(gap + i);
    (at::vec::maximum(x, Vec(0.0f)) + vec_exp::exp_nonpositive(Vec(0.0f) - x.abs()).log1p()).store(result + i);
  }
  for (; i < m; ++i) result[i] = softplus(-gap[i]);
}

// loss[i] = softplus(-gap[i]) and slope[i] = sigmoid(-gap[i]) = -d loss[i] / d gap[i], i < m, from one
// e = e^-|gap|: the sigmoid is e / (1 + e) for gap >= 0 and 1 / (1 + e) otherwise. Sharing the exp is
// what makes the gradient nearly free next to the loss.
inline void softplus_and_sigmoid_of_negated(const float* gap, float* loss, float* slope, int64_t m) {
  int64_t i = 0;
  for (; i + Vec::size() <= m; i += Vec::size()) {
    const Vec g = Vec::loadu(gap + i);
    const Vec e = vec_exp::exp_nonpositive(Vec(0.0f) - g.abs());
    (at::vec::maximum(Vec(0.0f) - g, Vec(0.0f)) + e.log1p()).store(loss + i);
    const Vec r = Vec(1.0f) / (Vec(1.0f) + e);
    Vec::blendv(r, e * r, g >= Vec(0.0f)).store(slope + i);
  }
  for (; i < m; ++i) {
    loss[i] = softplus(-gap[i]);
    slope[i] = sigmoid(-gap[i]);
  }
}

inline RankingRow row_of(const float* rewards, const int64_t* ranks, const uint8_t* mask, int64_t n, int64_t k,
                         float margin) {
  const int64_t o = n * k;
  return {rewards + o, ranks + o, mask == nullptr ? nullptr : mask + o, k, margin};
}

// Runs visit(first, last, table, pair_count_per_prompt) over [lo, hi) in batches whose pairs fit the table,
// after listing the batch's pairs (and counting correct ones into correct[n - first]).
template <class Visit>
void for_each_batch(int64_t lo, int64_t hi, const float* rewards, const int64_t* ranks, const uint8_t* mask,
                    int64_t k, float margin, PairTable& table, std::vector<int64_t>& pairs,
                    std::vector<int64_t>& correct, Visit&& visit) {
  const int64_t per_prompt = std::max<int64_t>(1, pairs_per_prompt(k));
  const int64_t batch = std::max<int64_t>(1, table.capacity(k) / per_prompt);
  for (int64_t first = lo; first < hi; first += batch) {
    const int64_t last = std::min(hi, first + batch);
    int64_t m = 0;
    for (int64_t n = first; n < last; ++n) {
      correct[n - first] = 0;
      pairs[n - first] = table.collect(row_of(rewards, ranks, mask, n, k, margin), m, correct[n - first]);
      m += pairs[n - first];
    }
    visit(first, last, m);
  }
}

}  // namespace ranking_loss_impl

void ranking_loss_forward_kernel(const RankingLossForwardParams& p) {
  using namespace ranking_loss_impl;
  const bool with_grad = p.d_rewards != nullptr;
  at::parallel_for(0, p.n, prompt_grain(p.k), [&](int64_t lo, int64_t hi) {
    PairTable table(p.k, hi - lo);
    // One entry per prompt of a batch (for_each_batch's batch: the table's capacity in whole prompts).
    const size_t batch = static_cast<size_t>(
        std::max<int64_t>(1, table.capacity(p.k) / std::max<int64_t>(1, pairs_per_prompt(p.k))));
    std::vector<int64_t> pairs(batch), correct(batch);
    for_each_batch(lo, hi, p.rewards, p.ranks, p.mask, p.k, p.margin, table, pairs, correct,
                   [&](int64_t first, int64_t last, int64_t m) {
                     if (with_grad) {
                       softplus_and_sigmoid_of_negated(table.gap.data(), table.result.data(), table.slope.data(), m);
                     } else {
                       softplus_of_negated(table.gap.data(), table.result.data(), m);
                     }
                     int64_t i = 0;  // the prompt's first pair in the table
                     for (int64_t n = first; n < last; ++n) {
                       const int64_t count = pairs[n - first];
                       const float sum = count > 0 ? at::vec::reduce_all<float>(
                                                         [](const Vec& a, const Vec& b) { return a + b; },
                                                         table.result.data() + i, count)
                                                   : 0.0f;
                       const float denom = static_cast<float>(std::max<int64_t>(count, 1));
                       p.prompt_loss[n] = count > 0 ? sum / denom : 0.0f;
                       p.prompt_accuracy[n] = count > 0 ? static_cast<float>(correct[n - first]) / denom : 0.0f;
                       p.num_pairs[n] = static_cast<float>(count);
                       if (with_grad) {
                         // d (mean pair loss) / d r_w = -sigmoid(-x) / count = -d / d r_l, x = r_w - r_l - margin.
                         float* d = p.d_rewards + n * p.k;
                         std::fill(d, d + p.k, 0.0f);
                         const float scale = 1.0f / denom;
                         for (int64_t j = i; j < i + count; ++j) {
                           const float g = scale * table.slope[j];
                           d[table.winner[j]] -= g;
                           d[table.loser[j]] += g;
                         }
                       }
                       i += count;
                     }
                   });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
