// Masked whitening CPU kernel: (x - mean) / sqrt(var + 1e-8) over the positions a mask sets, with the
// unbiased variance, in double (reference.masked_whiten is the spec). The epilogue of the advantage ops:
// it replaces a dozen float64 torch ops and their temporaries with two reads of x, one for the statistics
// and one for the write. The statistics are exact two-pass ones within each block (staged in cache), merged
// in block order by Chan et al.'s update, so the result does not depend on the thread count. Fewer than
// two set positions give a variance of 0 (the caller decides whether that is an error); the centred
// values are then 0 too.
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/masked_whiten_params.h"
#include "cpu/kernels.h"
#include "cpu/vec_io.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace masked_whiten_impl {

using VecD = at::vec::Vectorized<double>;
using VecF = at::vec::Vectorized<float>;

// Positions per partial sum: the unit of the fixed summation order, and of the staging buffers below
// (2 x 32 KiB of doubles: in L1/L2).
constexpr int64_t kWhitenBlock = 4096;
// Blocks per parallel task: below ~32k positions a second thread costs more than it saves.
constexpr int64_t kWhitenGrainBlocks = 8;

// x[0, n) and mask[0, n) as doubles (n <= kWhitenBlock). Plain loops: the compiler vectorises the
// conversions, which a select inside the sum (a branch per position) would not let it do.
inline void stage(const float* x, const uint8_t* mask, int64_t n, double* xs, double* ms) {
  for (int64_t j = 0; j < n; ++j) xs[j] = static_cast<double>(x[j]);
  for (int64_t j = 0; j < n; ++j) ms[j] = static_cast<double>(mask[j]);
}

// Sum over the set positions of staged values of (xs - shift), or of its square. A select, not a product,
// keeps NaN or inf at unset positions out of the sum.
template <bool kSquare>
double masked_sum(const double* xs, const double* ms, int64_t n, double shift) {
  const VecD vshift(shift), zero(0.0);
  VecD acc0(0.0), acc1(0.0);
  constexpr int64_t kStep = 2 * VecD::size();
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    VecD d0 = VecD::loadu(xs + j) - vshift;
    VecD d1 = VecD::loadu(xs + j + VecD::size()) - vshift;
    if constexpr (kSquare) {
      d0 = d0 * d0;
      d1 = d1 * d1;
    }
    acc0 = acc0 + VecD::blendv(zero, d0, VecD::loadu(ms + j) != zero);
    acc1 = acc1 + VecD::blendv(zero, d1, VecD::loadu(ms + j + VecD::size()) != zero);
  }
  alignas(64) double lanes[VecD::size()];
  (acc0 + acc1).store(lanes);
  double total = 0.0;
  for (int64_t lane = 0; lane < VecD::size(); ++lane) total += lanes[lane];
  for (; j < n; ++j) {
    const double d = xs[j] - shift;
    total += ms[j] != 0.0 ? (kSquare ? d * d : d) : 0.0;
  }
  return total;
}

// Count, mean and sum of squared deviations of one block's set positions.
struct BlockStats {
  double count = 0.0, mean = 0.0, m2 = 0.0;
};

// One read of the block from memory: staged as doubles, its mean and then its squared deviations from
// that mean come from cache (the exact two-pass formula, per block).
BlockStats block_stats(const float* x, const uint8_t* mask, int64_t n) {
  alignas(64) double xs[kWhitenBlock];
  alignas(64) double ms[kWhitenBlock];
  stage(x, mask, n, xs, ms);
  const int64_t count = vec_io::count_kept(mask, n);
  BlockStats s;
  s.count = static_cast<double>(count);
  if (count == 0) return s;
  s.mean = masked_sum<false>(xs, ms, n, 0.0) / s.count;
  s.m2 = masked_sum<true>(xs, ms, n, s.mean);
  return s;
}

// Chan et al.'s pairwise update: the statistics of a's and b's positions together.
BlockStats merge(const BlockStats& a, const BlockStats& b) {
  if (b.count == 0.0) return a;
  if (a.count == 0.0) return b;
  BlockStats out;
  out.count = a.count + b.count;
  const double delta = b.mean - a.mean;
  out.mean = a.mean + delta * (b.count / out.count);
  out.m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / out.count);
  return out;
}

// The statistics of every set position: per-block statistics, merged in block order (so the result does
// not depend on how the blocks were shared among threads).
BlockStats masked_stats(const MaskedWhitenParams& p) {
  const int64_t blocks = (p.n + kWhitenBlock - 1) / kWhitenBlock;
  std::vector<BlockStats> partial(blocks);
  at::parallel_for(0, blocks, kWhitenGrainBlocks, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t begin = b * kWhitenBlock;
      partial[b] = block_stats(p.x + begin, p.mask + begin, std::min(kWhitenBlock, p.n - begin));
    }
  });
  BlockStats total;
  for (const BlockStats& s : partial) total = merge(total, s);
  return total;
}

// out[0, n) = (x - mean) * inv_std at set positions, else 0; out may be x.
void write_block(const float* x, const uint8_t* mask, int64_t n, double mean, double inv_std, float* out) {
  alignas(64) double xs[kWhitenBlock];
  alignas(64) float whitened[kWhitenBlock];
  alignas(64) float keep[kWhitenBlock];
  for (int64_t j = 0; j < n; ++j) xs[j] = (static_cast<double>(x[j]) - mean) * inv_std;
  for (int64_t j = 0; j < n; ++j) whitened[j] = static_cast<float>(xs[j]);
  for (int64_t j = 0; j < n; ++j) keep[j] = static_cast<float>(mask[j]);
  const VecF zero(0.0f);
  int64_t j = 0;
  for (; j + VecF::size() <= n; j += VecF::size()) {
    VecF::blendv(zero, VecF::loadu(whitened + j), VecF::loadu(keep + j) != zero).store(out + j);
  }
  for (; j < n; ++j) out[j] = keep[j] != 0.0f ? whitened[j] : 0.0f;
}

}  // namespace masked_whiten_impl

void masked_whiten_kernel(const MaskedWhitenParams& p) {
  using namespace masked_whiten_impl;
  const BlockStats stats = masked_stats(p);
  *p.count = static_cast<int64_t>(stats.count);
  if (p.n == 0) return;
  const double var = stats.m2 / std::max(stats.count - 1.0, 1.0);
  const double inv_std = 1.0 / std::sqrt(var + 1e-8);  // 1e-8: the epsilon TRL, OpenRLHF and veRL use
  const double mean = stats.mean;
  const int64_t blocks = (p.n + kWhitenBlock - 1) / kWhitenBlock;
  at::parallel_for(0, blocks, kWhitenGrainBlocks, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t begin = b * kWhitenBlock;
      write_block(p.x + begin, p.mask + begin, std::min(kWhitenBlock, p.n - begin), mean, inv_std,
                  p.out + begin);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
