// Per-prompt arithmetic of the K-wise pairwise ranking loss, shared by the CPU and CUDA kernels.
//
// A pair (w, l) counts when both responses are valid and rank[w] < rank[l] (rank 1 is best; equal
// ranks are no pair). With x = r_w - r_l - margin it adds softplus(-x) = -log sigmoid(x) to the
// loss, and counts as correct when r_w > r_l. d softplus(-x) / d r_w = -sigmoid(-x) = -d / d r_l.
// The helpers work on one prompt's row, over one winner or one response at a time, so a kernel can
// hand responses to SIMD lanes / warp lanes or loop over them. Plain C++17, no torch headers.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/softplus.h"

namespace fastrlhf {

// One prompt's row: rewards [k], ranks [k], mask [k] or nullptr (all valid).
struct RankingRow {
  const float* rewards;
  const int64_t* ranks;
  const uint8_t* mask;
  int64_t k;
  float margin;

  FASTRLHF_HD bool valid(int64_t j) const { return mask == nullptr || mask[j] != 0; }
};

struct RankingSums {
  float loss;       // sum of softplus(-x) over pairs
  int64_t correct;  // pairs with r_w > r_l
  int64_t pairs;
};

FASTRLHF_HD RankingSums ranking_empty_sums() { return {0.0f, 0, 0}; }

// Adds every pair won by response w.
FASTRLHF_HD void ranking_accumulate_winner(const RankingRow& row, int64_t w, RankingSums& s) {
  if (!row.valid(w)) return;
  const float rw = row.rewards[w];
  const int64_t kw = row.ranks[w];
  float loss = 0.0f;  // summed per winner first: two short sums round far less than one long one
  for (int64_t l = 0; l < row.k; ++l) {
    if (!row.valid(l) || !(kw < row.ranks[l])) continue;
    const float rl = row.rewards[l];
    loss += softplus(-(rw - rl - row.margin));
    s.correct += rw > rl ? 1 : 0;
    s.pairs += 1;
  }
  s.loss += loss;
}

// Number of pairs won by response w.
FASTRLHF_HD int64_t ranking_pairs_won(const RankingRow& row, int64_t w) {
  if (!row.valid(w)) return 0;
  int64_t pairs = 0;
  const int64_t kw = row.ranks[w];
  for (int64_t l = 0; l < row.k; ++l) pairs += (row.valid(l) && kw < row.ranks[l]) ? 1 : 0;
  return pairs;
}

// d (sum of the prompt's pair losses) / d rewards[j].
FASTRLHF_HD float ranking_reward_grad(const RankingRow& row, int64_t j) {
  if (!row.valid(j)) return 0.0f;
  const float rj = row.rewards[j];
  const int64_t kj = row.ranks[j];
  float g = 0.0f;
  for (int64_t i = 0; i < row.k; ++i) {
    if (!row.valid(i)) continue;
    const int64_t ki = row.ranks[i];
    if (kj < ki) {
      g -= sigmoid(-(rj - row.rewards[i] - row.margin));  // j wins
    } else if (ki < kj) {
      g += sigmoid(-(row.rewards[i] - rj - row.margin));  // j loses
    }
  }
  return g;
}

// Mean of the pair losses and the fraction of correct pairs; both 0 for a prompt with no pair.
FASTRLHF_HD float ranking_mean_loss(const RankingSums& s) {
  return s.pairs > 0 ? s.loss / static_cast<float>(s.pairs) : 0.0f;
}
FASTRLHF_HD float ranking_accuracy(const RankingSums& s) {
  return s.pairs > 0 ? static_cast<float>(s.correct) / static_cast<float>(s.pairs) : 0.0f;
}

}  // namespace fastrlhf
