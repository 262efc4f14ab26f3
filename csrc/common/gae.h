// Generalised advantage estimation with mask-carry semantics, shared by the CPU and CUDA kernels.
//
// Walk t from T-1 down to 0 with next_value = 0, last = 0. Where mask[t]:
//   delta = r[t] + gamma * next_value - v[t];  last = delta + gamma*lam * last;  adv[t] = last;
//   next_value = v[t].
// Elsewhere next_value and last carry over and adv[t] = 0.
//
// Sequential kernels (the CPU, one row per thread) run gae_step. The CUDA kernel scans instead:
// a run of positions acts on the carry entering at its right end as
//   last_out       = a * last_in + c * next_value_in + b
//   next_value_out = has_valid ? first_value : next_value_in
// (first_value: the value at the run's leftmost valid position). Such maps compose associatively
// (compose), so a block can summarise its runs in parallel, scan the summaries, and then let each
// thread walk its own run with gae_step from the exact carry entering it.
// Plain C++17, no torch headers: nvcc compiles it standalone.
#pragma once

#include "common/macros.h"

namespace fastrlhf {

struct GaeCarry {
  float next_value;
  float last;
};

FASTRLHF_HD GaeCarry gae_initial_carry() { return {0.0f, 0.0f}; }

// One position of the reverse walk; returns adv[t]. gamma_lam = gamma * lam.
FASTRLHF_HD float gae_step(GaeCarry& carry, float reward, float value, bool valid, float gamma,
                           float gamma_lam) {
  if (!valid) return 0.0f;
  const float delta = reward + gamma * carry.next_value - value;
  carry.last = delta + gamma_lam * carry.last;
  carry.next_value = value;
  return carry.last;
}

// returns[t] from adv[t]: adv + v where valid, else 0.
FASTRLHF_HD float gae_return(float advantage, float value, bool valid) { return valid ? advantage + value : 0.0f; }

// A run of positions as a map on the carry (see the file comment). has_valid is a float (0 or 1)
// so the CUDA scan can shuffle it like the other fields.
struct GaeSegment {
  float a;
  float b;
  float c;
  float first_value;
  float has_valid;
};

// The empty run: leaves the carry unchanged.
FASTRLHF_HD GaeSegment gae_identity_segment() { return {1.0f, 0.0f, 0.0f, 0.0f, 0.0f}; }

// One position as a run: a valid one is exactly gae_step's update.
FASTRLHF_HD GaeSegment gae_segment(float reward, float value, bool valid, float gamma, float gamma_lam) {
  if (!valid) return gae_identity_segment();
  return {gamma_lam, reward - value, gamma, value, 1.0f};
}

// The run `left` directly to the left of the run `right`: right acts first (the walk goes leftward).
// If right has a valid position, left's next_value_in is right's first_value (a constant, into b);
// otherwise it is the carry's next_value_in (into c).
FASTRLHF_HD GaeSegment gae_compose(const GaeSegment& left, const GaeSegment& right) {
  const bool right_valid = right.has_valid != 0.0f;
  GaeSegment s;
  s.a = left.a * right.a;
  s.c = left.a * right.c + (right_valid ? 0.0f : left.c);
  s.b = left.a * right.b + left.b + (right_valid ? left.c * right.first_value : 0.0f);
  s.first_value = left.has_valid != 0.0f ? left.first_value : right.first_value;
  s.has_valid = (left.has_valid != 0.0f || right_valid) ? 1.0f : 0.0f;
  return s;
}

// The carry leaving a run at its left end, given the carry entering at its right end.
FASTRLHF_HD GaeCarry gae_apply(const GaeSegment& s, const GaeCarry& in) {
  return {s.has_valid != 0.0f ? s.first_value : in.next_value, s.a * in.last + s.c * in.next_value + s.b};
}

}  // namespace fastrlhf
