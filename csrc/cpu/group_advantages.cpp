// group_advantages CPU kernel: outcome advantages of critic-free RL (common/group_advantages.h).
//
// Group modes: groups run in parallel; each computes its statistics once (k scores, in double), then
// broadcasts each response's value over its row with a branch-free select that the compiler vectorises.
// kDiscount (REINFORCE++): rows run in parallel, each one right-to-left walk of discount_step.
// The batch whitening of the REINFORCE++ variants is not here: the Python op applies
// reference.masked_whiten to this kernel's output, the one home of that rule.
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>

#include <algorithm>

#include "common/group_advantages.h"
#include "common/group_advantages_params.h"
#include "cpu/kernels.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace group_advantages_impl {

// Tokens per parallel task: below this a thread costs more than it saves (as in gae.cpp).
constexpr int64_t kGrainTokens = 32768;

inline int64_t grain(int64_t tokens_per_item) {
  return std::max<int64_t>(1, kGrainTokens / std::max<int64_t>(1, tokens_per_item));
}

// value at the row's valid tokens, 0 elsewhere. A select, not value * mask: value may be inf (a score
// gap past the fp32 range), and inf * 0 is NaN.
inline void fill_row(float value, const uint8_t* mask, float* out, int64_t length) {
  for (int64_t t = 0; t < length; ++t) out[t] = mask[t] != 0 ? value : 0.0f;  // branch-free: vectorises
}

inline void discount_row(float score, const uint8_t* mask, float* out, int64_t length, double gamma) {
  // gamma = 1 (veRL's default) leaves every discount at 1: the walk is the vectorised broadcast.
  if (gamma == 1.0) return fill_row(score, mask, out, length);
  double discount = 1.0;
  for (int64_t t = length - 1; t >= 0; --t) out[t] = discount_step(discount, score, mask[t] != 0, gamma);
}

}  // namespace group_advantages_impl

void group_advantages_forward_kernel(const GroupAdvantagesParams& p) {
  using namespace group_advantages_impl;
  if (p.n_rows == 0 || p.length == 0) return;
  const auto mode = static_cast<OutcomeMode>(p.mode);
  if (mode == OutcomeMode::kDiscount) {
    at::parallel_for(0, p.n_rows, grain(p.length), [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t o = row * p.length;
        discount_row(p.scores[row], p.mask + o, p.out + o, p.length, p.gamma);
      }
    });
    return;
  }
  const int64_t k = p.group_size;
  at::parallel_for(0, p.n_rows / k, grain(k * p.length), [&](int64_t lo, int64_t hi) {
    for (int64_t group = lo; group < hi; ++group) {
      const float* scores = p.scores + group * k;
      const GroupStats stats = group_stats(scores, k);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t o = (group * k + j) * p.length;
        fill_row(outcome_row_value(mode, scores[j], stats, k, p.eps), p.mask + o, p.out + o, p.length);
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
