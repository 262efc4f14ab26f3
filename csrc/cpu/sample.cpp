// sample CPU kernel: one token per row from softmax(logits / T), truncated by top-k / top-p / min-p,
// with its log-prob (and the entropy) under the truncated distribution. Semantics: common/sample_params.h.
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
//
// Per row, with a row-sized fp32 scratch that stays in L2 (no [B, V] probability tensor):
//   1. max of x (NaN and +inf propagate through at::vec::maximum, so one test flags a bad row);
//   2. e = exp(t) into the scratch, summed per block of kScanBlock;
//   3. only when truncating: the top-k threshold by nth_element, the top-p threshold by a mass-weighted
//      quickselect (expected linear), both over the candidates above a power-of-4 floor under the
//      threshold, then masked block sums;
//   4. the inverse CDF: the block sums locate the block holding u * S, a scalar walk the token.
// One uniform per row instead of a Gumbel draw per element: the row costs one exp per element, no logs.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "common/online_softmax.h"
#include "common/sample_params.h"
#include "cpu/kernels.h"
#include "cpu/vec_exp.h"
#include "cpu/vec_io.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

// Named, not anonymous: every kernel file lands in one translation unit per capability.
namespace sample_impl {

using Vec = at::vec::Vectorized<float>;
using vec_io::kStep;
using vec_io::load2;
using vec_io::reduce_max;
using vec_io::reduce_sum;

// Elements per block sum of the inverse-CDF scan: the walk inside one block is scalar, so a block
// should be short; 256 makes the block-sum array of a 32k vocabulary 125 doubles.
constexpr int64_t kScanBlock = 256;
static_assert(kScanBlock % kStep == 0, "scan blocks must hold whole SIMD steps");
// Below this many candidates the top-p search sorts them instead of partitioning again.
constexpr int64_t kSortBelow = 64;

// t = x * inv_t - m rounded once, on SIMD vectors and on scalars alike (at::vec::fmsub is fused on
// AVX2 / AVX512; the baseline copy rounds the product first, everywhere).
inline Vec shifted(const Vec& x, const Vec& inv_t, const Vec& m) { return at::vec::fmsub(x, inv_t, m); }
inline float shifted(float x, float inv_t, float m) {
  float t;
  at::vec::fmsub(Vec(x), Vec(inv_t), Vec(m)).store(&t, 1);
  return t;
}
// e = exp(t); t below kLogFloor (and -inf) gives exactly 0.
inline Vec exp_shifted(const Vec& t) { return vec_exp::exp_nonpositive(vec_exp::max_with_floor(t, Vec(kLogFloor))); }
inline float exp_shifted(float t) {
  float e;
  exp_shifted(Vec(t)).store(&e, 1);
  return e;
}

// Max of the raw row. Scaled, m = fl(max(x) * inv_t) is the max of the scaled elements (inv_t > 0 and
// rounding is monotone). NaN or +inf anywhere, or only -inf, gives a non-finite m.
template <class T>
float row_max(const T* x, int64_t vocab) {
  const int64_t n_vec = vocab - vocab % kStep;
  Vec max0(-INFINITY), max1(-INFINITY);
  for (int64_t j = 0; j < n_vec; j += kStep) {
    Vec a, b;
    load2(x + j, a, b);
    max0 = at::vec::maximum(max0, a);
    max1 = at::vec::maximum(max1, b);
  }
  float m = reduce_max(at::vec::maximum(max0, max1));
  for (int64_t j = n_vec; j < vocab; ++j) {
    const float v = static_cast<float>(x[j]);
    m = std::isnan(v) || std::isnan(m) ? NAN : std::fmax(m, v);
  }
  return m;
}

// e[j] = exp(t_j) for the whole row; block_sums[b] = the sum of block b's e (in float, then widened).
template <class T>
void exp_pass(const T* x, int64_t vocab, float inv_t, float m, float* e, double* block_sums) {
  const Vec vinv(inv_t), vm(m);
  for (int64_t begin = 0, b = 0; begin < vocab; begin += kScanBlock, ++b) {
    const int64_t end = std::min(vocab, begin + kScanBlock);
    const int64_t n_vec = begin + (end - begin) / kStep * kStep;
    Vec s0(0.0f), s1(0.0f);
    for (int64_t j = begin; j < n_vec; j += kStep) {
      Vec a, c;
      load2(x + j, a, c);
      const Vec ea = exp_shifted(shifted(a, vinv, vm)), ec = exp_shifted(shifted(c, vinv, vm));
      ea.store(e + j);
      ec.store(e + j + Vec::size());
      s0 = s0 + ea;
      s1 = s1 + ec;
    }
    float s = reduce_sum(s0 + s1);
    for (int64_t j = n_vec; j < end; ++j) {
      e[j] = exp_shifted(shifted(static_cast<float>(x[j]), inv_t, m));
      s += e[j];
    }
    block_sums[b] = s;
  }
}

// Block sums of the kept elements, e >= tau (tau > 0, so e = 0 is never kept).
void kept_block_sums(const float* e, int64_t vocab, float tau, double* block_sums) {
  const Vec vtau(tau), zero(0.0f);
  for (int64_t begin = 0, b = 0; begin < vocab; begin += kScanBlock, ++b) {
    const int64_t end = std::min(vocab, begin + kScanBlock);
    const int64_t n_vec = begin + (end - begin) / Vec::size() * Vec::size();
    Vec s(0.0f);
    for (int64_t j = begin; j < n_vec; j += Vec::size()) {
      const Vec v = Vec::loadu(e + j);
      s = s + Vec::blendv(zero, v, v >= vtau);
    }
    float total = reduce_sum(s);
    for (int64_t j = n_vec; j < end; ++j) total += e[j] >= tau ? e[j] : 0.0f;
    block_sums[b] = total;
  }
}

// The largest value v among c[0, n) with sum_{c_i >= v} c_i >= need: a quickselect that keeps the mass
// of everything above the current range instead of a count. Reorders c. n >= 1.
float mass_threshold(float* c, int64_t n, double need) {
  int64_t lo = 0, hi = n;
  double above = 0.0;  // mass of the elements greater than every element of c[lo, hi)
  float smallest_seen = c[0];
  while (hi - lo > kSortBelow) {
    // Median of three: a sorted or constant row does not degrade to quadratic time.
    float a = c[lo], b = c[lo + (hi - lo) / 2], d = c[hi - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), d));
    // Three-way partition into [> pivot][== pivot][< pivot].
    float* gt_end = std::partition(c + lo, c + hi, [pivot](float v) { return v > pivot; });
    float* eq_end = std::partition(gt_end, c + hi, [pivot](float v) { return v == pivot; });
    double gt_mass = 0.0;
    for (float* p = c + lo; p < gt_end; ++p) gt_mass += *p;
    const double eq_mass = static_cast<double>(pivot) * static_cast<double>(eq_end - gt_end);
    if (above + gt_mass >= need) {
      hi = gt_end - c;
    } else if (above + gt_mass + eq_mass >= need || eq_end == c + hi) {
      return pivot;  // the pivot itself; or nothing below it (need was rounded above the total)
    } else {
      above += gt_mass + eq_mass;
      smallest_seen = pivot;
      lo = eq_end - c;
    }
  }
  std::sort(c + lo, c + hi, std::greater<float>());
  for (int64_t i = lo; i < hi; ++i) {
    above += c[i];
    if (above >= need) return c[i];
  }
  return hi > lo ? c[hi - 1] : smallest_seen;
}

// Count and mass of the elements e >= floor (vectorized).
struct Tail {
  int64_t count;
  double mass;
};
Tail tail_above(const float* e, int64_t vocab, float floor) {
  const Vec vfloor(floor), zero(0.0f), one(1.0f);
  const int64_t n_vec = vocab - vocab % Vec::size();
  Vec count(0.0f), mass(0.0f);
  for (int64_t j = 0; j < n_vec; j += Vec::size()) {
    const Vec v = Vec::loadu(e + j);
    const Vec above = v >= vfloor;
    count = count + Vec::blendv(zero, one, above);
    mass = mass + Vec::blendv(zero, v, above);
  }
  Tail t{static_cast<int64_t>(reduce_sum(count)), reduce_sum(mass)};
  for (int64_t j = n_vec; j < vocab; ++j) {
    if (e[j] >= floor) {
      ++t.count;
      t.mass += e[j];
    }
  }
  return t;
}

// The largest of 2^-2, 2^-4, ..., 2^-120 (else 0) with at least `count` elements and `mass` above it: a
// floor under the threshold, so the selections below run over the elements above it, not the vocabulary.
// A language model's row has few tokens within a few nats of its most likely one; each probe is one
// vectorized pass over e, a small fraction of the exp pass's cost.
float candidate_floor(const float* e, int64_t vocab, int64_t count, double mass) {
  for (float floor = 0x1p-2f; floor >= 0x1p-120f; floor *= 0x1p-2f) {
    const Tail t = tail_above(e, vocab, floor);
    if (t.count >= count && t.mass >= mass) return floor;
  }
  return 0.0f;
}

// Copies the elements e >= floor to out; returns how many. Chunks whose max is below the floor (most of
// them) are skipped after one vectorized max.
int64_t copy_above(const float* e, int64_t vocab, float floor, float* out) {
  constexpr int64_t kChunk = 4 * Vec::size();
  int64_t n = 0, j = 0;
  for (; j + kChunk <= vocab; j += kChunk) {
    Vec top = Vec::loadu(e + j);
    for (int64_t i = Vec::size(); i < kChunk; i += Vec::size()) top = at::vec::maximum(top, Vec::loadu(e + j + i));
    if (reduce_max(top) < floor) continue;
    for (int64_t i = j; i < j + kChunk; ++i) {
      if (e[i] >= floor) out[n++] = e[i];
    }
  }
  for (; j < vocab; ++j) {
    if (e[j] >= floor) out[n++] = e[j];
  }
  return n;
}

// The truncation threshold tau on e (common/sample_params.h); 0 when nothing is truncated. `total` is
// the row's sum of e.
float truncation_threshold(const SampleParams& p, const float* e, double total, float e_max, float* scratch) {
  const int64_t vocab = p.vocab;
  float tau = 0.0f;
  int64_t n = 0;  // with top-k: the top-k set (ties included) in scratch[0, n)
  const bool top_k = p.top_k > 0 && p.top_k < vocab;
  if (top_k) {
    const int64_t found = copy_above(e, vocab, candidate_floor(e, vocab, p.top_k, 0.0), scratch);
    std::nth_element(scratch, scratch + (p.top_k - 1), scratch + found, std::greater<float>());
    tau = scratch[p.top_k - 1];
    // Elements after position k - 1 are <= tau; those equal to it are kept too (ties count).
    n = p.top_k;
    for (int64_t j = p.top_k; j < found; ++j) {
      if (scratch[j] == tau) scratch[n++] = tau;
    }
  }
  if (p.top_p < 1.0f) {
    double kept_mass = total;
    if (top_k) {
      kept_mass = 0.0;
      for (int64_t j = 0; j < n; ++j) kept_mass += scratch[j];
    }
    const double need = static_cast<double>(p.top_p) * kept_mass;
    if (!top_k) n = copy_above(e, vocab, candidate_floor(e, vocab, 1, need), scratch);
    tau = std::max(tau, mass_threshold(scratch, n, need));
  }
  // Relative to the max's own e, which the fused t puts within rounding of 1 (above or below): an absolute
  // min_p could exceed it and keep nothing.
  if (p.min_p > 0.0f) tau = std::max(tau, p.min_p * e_max);
  return tau;
}

// The kept element whose inclusive prefix sum first exceeds target; the last kept one if none does.
int64_t inverse_cdf(const float* e, int64_t vocab, float tau, const double* block_sums, double target) {
  const int64_t n_blocks = (vocab + kScanBlock - 1) / kScanBlock;
  double cum = 0.0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (cum + block_sums[b] > target) {
      const int64_t begin = b * kScanBlock, end = std::min(vocab, begin + kScanBlock);
      int64_t last = -1;
      for (int64_t j = begin; j < end; ++j) {
        if (e[j] > 0.0f && e[j] >= tau) {
          cum += e[j];
          last = j;
          if (cum > target) return j;
        }
      }
      if (last >= 0) return last;  // the block sum rounded above the walk's sum: its last kept element
    } else {
      cum += block_sums[b];
    }
  }
  for (int64_t j = vocab - 1; j >= 0; --j) {
    if (e[j] > 0.0f && e[j] >= tau) return j;
  }
  return -1;  // nothing kept
}

// sum over the kept elements of e * t (the entropy's numerator); t from x, like the exp pass.
template <class T>
double kept_entropy_sum(const T* x, const float* e, int64_t vocab, float inv_t, float m, float tau) {
  const Vec vinv(inv_t), vm(m), vtau(tau), floor(kLogFloor), zero(0.0f);
  const int64_t n_vec = vocab - vocab % kStep;
  Vec s0(0.0f), s1(0.0f);
  for (int64_t j = 0; j < n_vec; j += kStep) {
    Vec a, b;
    load2(x + j, a, b);
    const Vec ea = Vec::loadu(e + j), eb = Vec::loadu(e + j + Vec::size());
    const Vec ta = vec_exp::max_with_floor(shifted(a, vinv, vm), floor);
    const Vec tb = vec_exp::max_with_floor(shifted(b, vinv, vm), floor);
    s0 = s0 + Vec::blendv(zero, ea * ta, ea >= vtau);
    s1 = s1 + Vec::blendv(zero, eb * tb, eb >= vtau);
  }
  double s = reduce_sum(s0 + s1);
  for (int64_t j = n_vec; j < vocab; ++j) {
    if (e[j] >= tau) s += e[j] * std::max(shifted(static_cast<float>(x[j]), inv_t, m), kLogFloor);
  }
  return s;
}

template <class T>
void sample_row(const SampleParams& p, int64_t row, float* e, float* scratch, double* block_sums) {
  const T* x = static_cast<const T*>(p.logits) + row * p.vocab;
  const float inv_t = p.inv_temperature;
  const float x_max = row_max(x, p.vocab);
  const float m = x_max * inv_t;
  if (!std::isfinite(m)) {
    write_invalid_row(p, row);
    return;
  }
  exp_pass(x, p.vocab, inv_t, m, e, block_sums);
  const int64_t n_blocks = (p.vocab + kScanBlock - 1) / kScanBlock;
  double total = 0.0;
  for (int64_t b = 0; b < n_blocks; ++b) total += block_sums[b];
  float tau = truncation_threshold(p, e, total, exp_shifted(shifted(x_max, inv_t, m)), scratch);
  // tau = 0 keeps every element with e > 0; the smallest positive float does the same in the masks.
  if (tau > 0.0f) {
    kept_block_sums(e, p.vocab, tau, block_sums);
    total = 0.0;
    for (int64_t b = 0; b < n_blocks; ++b) total += block_sums[b];
  } else {
    tau = std::numeric_limits<float>::denorm_min();
  }
  const int64_t token = inverse_cdf(e, p.vocab, tau, block_sums, p.uniforms[row] * total);
  if (token < 0) {  // nothing kept: cannot happen (the max's e is kept by every threshold), but never x[-1]
    write_invalid_row(p, row);
    return;
  }
  const float log_s = std::log(static_cast<float>(total));
  p.tokens[row] = token;
  p.logprobs[row] = shifted(static_cast<float>(x[token]), inv_t, m) - log_s;
  if (p.entropy != nullptr) {
    const double ent = kept_entropy_sum(x, e, p.vocab, inv_t, m, tau);
    p.entropy[row] = log_s - static_cast<float>(ent / total);
  }
}

template <class T>
void sample_typed(const SampleParams& p) {
  const int64_t n_blocks = (p.vocab + kScanBlock - 1) / kScanBlock;
  const bool truncating = (p.top_k > 0 && p.top_k < p.vocab) || p.top_p < 1.0f;
  // A row of 32k exps is tens of microseconds: one row per task balances well there. Short rows are
  // grouped so that a task holds at least kMinTaskLogits of them: a decode step on a small vocabulary
  // (2 x 16 logits) otherwise paid a thread fork and join, ~10 us, for under a microsecond of work.
  constexpr int64_t kMinTaskLogits = 16384;
  const int64_t grain = std::max<int64_t>(1, kMinTaskLogits / std::max<int64_t>(1, p.vocab));
  at::parallel_for(0, p.n_rows, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> e(p.vocab), scratch(truncating ? p.vocab : 0);
    std::vector<double> block_sums(n_blocks);
    for (int64_t row = lo; row < hi; ++row) sample_row<T>(p, row, e.data(), scratch.data(), block_sums.data());
  });
}

}  // namespace sample_impl

void sample_forward_kernel(const SampleParams& p) {
  using namespace sample_impl;
  switch (p.dtype) {
    case DType::kFloat32:
      return sample_typed<float>(p);
    case DType::kBFloat16:
      return sample_typed<c10::BFloat16>(p);
    case DType::kFloat16:
      return sample_typed<c10::Half>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
