// sample CUDA kernel: one token per row from softmax(logits / T), truncated by top-k / top-p / min-p,
// with its log-prob (and the entropy) under the truncated distribution. Semantics: common/sample_params.h.
//
// One block per row. No [B, V] scratch: every pass recomputes e = exp(t) from the logits (a row stays in
// L1 / L2 between passes).
//   1. max of x, and whether the row holds a NaN;
//   2. only when truncating: the top-k / top-p thresholds by an MSD radix select on the bit patterns of e
//      (non-negative floats order like their bits), 8 bits a pass: a 256-bin shared histogram of the
//      counts (top-k) or masses (top-p) of the candidates that match the bits chosen so far, then one
//      warp picks the bin that holds the threshold. 4 passes per threshold, exact;
//   3. the kept pass: each warp sums the kept masses of its contiguous 1/kWarps of the row (lanes read
//      consecutive elements), plus the entropy's numerator and the last kept index;
//   4. the inverse CDF: the warp sums locate the chunk holding u * S; in that chunk each thread sums a
//      contiguous run, a block scan of the runs locates the thread whose run holds the crossing, and that
//      thread walks its run.
// Masses are fixed point: e * 2^s rounded to a 64-bit integer. Integer sums are exact in any order, so
// the result does not depend on the order of the shared atomics (the kernel is deterministic), the
// top-p comparisons are exact, and the walk of step 4 crosses u * S exactly where the sums of step 3 say.
// With s = 40 the grid is 1e-12 of the max element's e, finer than an fp32 sum of the row resolves.
// No torch headers: nvcc compiles this file on its own.
#include "cuda/sample.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/online_softmax.h"
#include "cuda/device_utils.h"

namespace fastrlhf::cuda {
namespace {

using namespace device;

using Mass = unsigned long long;  // fixed-point e; also the counts of the top-k histogram

// 16 warps per row: the row's passes are the whole cost, and a batch of sampled rows is often smaller
// than the number of SMs, so each row gets a large block.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr unsigned kDigitMask = kBins - 1;
constexpr int kBinsPerLane = kBins / kWarpSize;
static_assert(kBins % kWarpSize == 0, "one warp scans the histogram, the same number of bins per lane");
// Digit of an element that is not a candidate of the current radix pass.
constexpr unsigned kNoBin = kBins;
// gridDim.x hardware limit; more rows are covered by the grid-stride loop.
constexpr int64_t kMaxGridX = 2147483647;
// e is clamped here before it becomes a mass. e <= 1 up to the rounding of m = fl(x_max / T) (e of the
// max element is exp of that rounding error), so only rows with |x / T| above ~2e7 ever reach it.
constexpr float kMassCap = 4.0f;
constexpr int kMassCapLog2 = 2;
// Fixed-point bits of a mass: e = 1 is 2^40. Fewer for rows so long that vocab * kMassCap * 2^s would
// not fit in 63 bits.
constexpr int kMaxMassBits = 40;

struct BinChoice {
  unsigned bin;  // digit of the threshold at this pass
  Mass above;    // count / mass of the candidates in higher bins, and of the higher bins of earlier passes
  Mass need;     // the count / mass that the candidates at or above the threshold must reach
};

// 256 bins of 64-bit sums as two 32-bit words: shared memory has native 32-bit atomic adds, where a
// 64-bit one compiles to a compare-and-swap loop.
struct Histogram {
  unsigned lo[kBins];
  unsigned hi[kBins];

  __device__ __forceinline__ void clear(int bin) {
    lo[bin] = 0;
    hi[bin] = 0;
  }
  // Exact once every add has completed: each add that wraps the low word carries one into the high word.
  __device__ __forceinline__ void add(unsigned bin, Mass v) {
    const auto v_lo = static_cast<unsigned>(v);
    const auto v_hi = static_cast<unsigned>(v >> 32);
    const unsigned old = atomicAdd(&lo[bin], v_lo);
    const unsigned carry = old + v_lo < old ? 1u : 0u;
    if (v_hi + carry != 0) atomicAdd(&hi[bin], v_hi + carry);
  }
  __device__ __forceinline__ Mass get(int bin) const { return static_cast<Mass>(hi[bin]) << 32 | lo[bin]; }
};

struct SampleShared {
  Histogram hist;
  Mass stage[kWarps][kWarpSize];  // one slot per lane: warp_hist_add's group sums
  Mass chunk_mass[kWarps];        // kept mass of each warp's chunk of the row
  BinChoice choice;
  int64_t token;
};

// The row's logits and the shift of step 1: t_j and e_j exactly as the semantics define them, the same
// bits in every pass.
template <class T>
struct RowView {
  const T* x;
  float inv_t;
  float m;
  __device__ __forceinline__ float shifted(int64_t j) const {
    return shifted_logit<ScalarMath>(to_float(x[j]), inv_t, m);
  }
  __device__ __forceinline__ float weight(int64_t j) const { return ScalarMath::exp(shifted(j)); }
};

__device__ __forceinline__ Mass to_mass(float e, float mass_scale) {
  // The scale is a power of two: the product is exact, and only the rounding to an integer is lost.
  return __float2ull_rn(fminf(e, kMassCap) * mass_scale);
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % kWarpSize); }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x / kWarpSize); }

// ---------------------------------------------------------------------------------------------
// Block-wide reductions and scans

template <class V, class Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
  FASTRLHF_UNROLL
  for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
    v = op(v, __shfl_xor_sync(kFullWarp, v, lane_mask));
  }
  return v;
}

// The reduction over the block, returned to every thread (a fixed tree: deterministic). Ends with its
// shared slots free for the next call.
template <class V, class Op>
__device__ __forceinline__ V block_reduce(V v, Op op) {
  __shared__ V slots[kWarps];
  v = warp_reduce(v, op);
  if (lane_id() == 0) slots[warp_id()] = v;
  __syncthreads();
  v = slots[0];
  FASTRLHF_UNROLL
  for (int w = 1; w < kWarps; ++w) v = op(v, slots[w]);
  __syncthreads();
  return v;
}

__device__ __forceinline__ Mass warp_inclusive_sum(Mass v) {
  const int lane = lane_id();
  FASTRLHF_UNROLL
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const Mass below = __shfl_up_sync(kFullWarp, v, delta);
    if (lane >= delta) v += below;
  }
  return v;
}

// Sum of v over the threads before this one. Ends with its shared slots free for the next call.
__device__ __forceinline__ Mass block_exclusive_sum(Mass v) {
  __shared__ Mass warp_totals[kWarps];
  const Mass inclusive = warp_inclusive_sum(v);
  if (lane_id() == kWarpSize - 1) warp_totals[warp_id()] = inclusive;
  __syncthreads();
  Mass before = 0;
  for (int w = 0; w < warp_id(); ++w) before += warp_totals[w];
  __syncthreads();
  return before + inclusive - v;
}

// ---------------------------------------------------------------------------------------------
// Step 1: max

struct RowMax {
  float x_max;  // max of the raw logits (NaNs skipped)
  bool has_nan;
};

template <class T>
__device__ RowMax row_max(const T* x, int64_t vocab) {
  float x_max = -INFINITY;
  bool has_nan = false;
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    const float v = to_float(x[j]);
    x_max = fmaxf(x_max, v);
    has_nan = has_nan || isnan(v);
  }
  x_max = block_reduce(x_max, [](float a, float b) { return fmaxf(a, b); });
  return {x_max, __syncthreads_or(has_nan) != 0};
}

// ---------------------------------------------------------------------------------------------
// Step 2: thresholds

// Candidates of a radix pass: elements whose e has the bits `prefix` under `mask` (the digits chosen by
// the earlier passes) and is at least `floor` (the top-k threshold, for top-p). Binned by the digit at
// `shift`.
struct RadixPass {
  unsigned prefix;
  unsigned mask;
  unsigned floor;
  int shift;
};

// Adds `value` to bin `digit` for every lane whose digit is not kNoBin. The lanes of one digit add once,
// through their lowest lane: e clusters in a few exponent bins, where one atomic per lane would
// serialise. Called by every lane of the warp.
template <bool kMass>
__device__ __forceinline__ void warp_hist_add(unsigned digit, Mass value, Histogram& hist, Mass* stage) {
  const int lane = lane_id();
  const unsigned peers = __match_any_sync(kFullWarp, digit);
  const bool leader = lane == __ffs(static_cast<int>(peers)) - 1;
  if constexpr (kMass) {
    stage[lane] = value;
    __syncwarp();
    if (leader && digit != kNoBin) {
      Mass sum = 0;
      for (unsigned rest = peers; rest != 0; rest &= rest - 1) sum += stage[__ffs(static_cast<int>(rest)) - 1];
      hist.add(digit, sum);
    }
    __syncwarp();  // the next call rewrites stage
  } else {
    if (leader && digit != kNoBin) hist.add(digit, static_cast<Mass>(__popc(peers)));
  }
}

// The histogram of one radix pass into sh.hist (zeroed by the caller): counts, or masses when kMass.
template <class T, bool kMass>
__device__ void histogram_pass(const RowView<T>& r, int64_t vocab, const RadixPass& pass, float mass_scale,
                               SampleShared& sh) {
  const int lane = lane_id();
  Mass* stage = sh.stage[warp_id()];
  // The warp's first element: the trip count is the same for all its lanes, as warp_hist_add needs.
  for (int64_t base = static_cast<int64_t>(threadIdx.x) - lane; base < vocab; base += kThreads) {
    const int64_t j = base + lane;
    unsigned digit = kNoBin;
    Mass value = 0;
    if (j < vocab) {
      const float e = r.weight(j);
      const unsigned bits = __float_as_uint(e);
      if ((bits & pass.mask) == pass.prefix && bits >= pass.floor) {
        digit = (bits >> pass.shift) & kDigitMask;
        value = kMass ? to_mass(e, mass_scale) : 1;
      }
    }
    if (__any_sync(kFullWarp, digit != kNoBin)) warp_hist_add<kMass>(digit, value, sh.hist, stage);
  }
}

// The mass that top-p must keep: ceil(fraction * total), at most total.
__device__ __forceinline__ Mass mass_need(float fraction, Mass total) {
  const Mass need = __double2ull_ru(static_cast<double>(fraction) * static_cast<double>(total));
  return need < total ? need : total;
}

// Run by warp 0 after a histogram pass: the highest bin b with h[b] > 0 and
// above + sum_{b' >= b} h[b'] >= need, the bin of the threshold, into out. fraction > 0 (top-p's
// first pass) first sets need = fraction of the histogram's total, the candidates' mass.
// need <= above + (this histogram's total) holds at every pass after the first (the chosen bin's
// candidates are the next pass's), so a bin is found; when none is (need 0 with no mass, a degenerate
// row) bin 0 keeps every candidate of the range.
__device__ void choose_bin(const Histogram& hist, Mass above, Mass need, float fraction, BinChoice& out) {
  const int lane = lane_id();
  const int top = kBins - 1 - lane * kBinsPerLane;  // lane 0 holds the highest bins
  Mass sum = 0;
  FASTRLHF_UNROLL
  for (int i = 0; i < kBinsPerLane; ++i) sum += hist.get(top - i);
  const Mass inclusive = warp_inclusive_sum(sum);
  if (fraction > 0.0f) need = mass_need(fraction, above + __shfl_sync(kFullWarp, inclusive, kWarpSize - 1));
  Mass before = above + inclusive - sum;  // candidates in the bins above this lane's
  int bin = -1;
  Mass bin_above = 0;
  FASTRLHF_UNROLL
  for (int i = 0; i < kBinsPerLane; ++i) {
    const Mass h = hist.get(top - i);
    if (bin < 0 && h > 0 && before + h >= need) {
      bin = top - i;
      bin_above = before;
    }
    before += h;
  }
  const unsigned found = __ballot_sync(kFullWarp, bin >= 0);
  const int winner = found != 0 ? __ffs(static_cast<int>(found)) - 1 : 0;
  if (lane == winner) {
    out.bin = found != 0 ? static_cast<unsigned>(bin) : 0u;
    out.above = found != 0 ? bin_above : above;
    out.need = need;
  }
}

// The bits of a threshold by MSD radix select over the candidates e >= floor, kRadixBits a pass.
// Counts (top-k, need = k): the k-th largest e. Masses (top-p, need from fraction): the largest e whose
// candidates at or above it hold `fraction` of the candidates' mass. Ties all fall in the last bin.
template <class T, bool kMass>
__device__ unsigned radix_select(const RowView<T>& r, int64_t vocab, unsigned floor, Mass need, float fraction,
                                 float mass_scale, SampleShared& sh) {
  RadixPass pass{0u, 0u, floor, 0};
  Mass above = 0;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = static_cast<int>(threadIdx.x); b < kBins; b += kThreads) sh.hist.clear(b);
    __syncthreads();  // zeroed before any add (choose_bin of the previous pass read it before the last barrier)
    pass.shift = shift;
    histogram_pass<T, kMass>(r, vocab, pass, mass_scale, sh);
    __syncthreads();
    if (threadIdx.x < kWarpSize) {
      choose_bin(sh.hist, above, need, shift == 32 - kRadixBits ? fraction : 0.0f, sh.choice);
    }
    __syncthreads();
    // Read before the next write of sh.choice, which is two barriers away.
    pass.prefix |= sh.choice.bin << shift;
    pass.mask |= kDigitMask << shift;
    above = sh.choice.above;
    need = sh.choice.need;
  }
  return pass.prefix;
}

// tau of the semantics: max of the top-k threshold, the top-p threshold over e >= it, and min_p * e_max.
template <class T>
__device__ float truncation_threshold(const SampleParams& p, const RowView<T>& r, float mass_scale, float e_max,
                                      SampleShared& sh) {
  unsigned bits = 0;  // e >= 0 compares like its bits
  if (p.top_k > 0 && p.top_k < p.vocab) {
    bits = radix_select<T, false>(r, p.vocab, 0u, static_cast<Mass>(p.top_k), 0.0f, mass_scale, sh);
  }
  if (p.top_p < 1.0f) bits = max(bits, radix_select<T, true>(r, p.vocab, bits, 0, p.top_p, mass_scale, sh));
  float tau = __uint_as_float(bits);
  if (p.min_p > 0.0f) tau = fmaxf(tau, p.min_p * e_max);
  return tau;
}

// ---------------------------------------------------------------------------------------------
// Steps 3 and 4: kept pass and inverse CDF

struct KeptTotals {
  Mass mass;     // S in fixed point
  double ent;    // sum_K e_j t_j (0 without entropy)
  int64_t last;  // the last kept index; -1 when nothing is kept
};

// Warp w's contiguous chunk of the row: [begin, end).
struct Chunk {
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ Chunk warp_chunk(int64_t vocab, int w) {
  const int64_t len = (vocab + kWarps - 1) / kWarps;
  const int64_t begin = w * len;
  return {begin, min(vocab, begin + len)};
}

// Kept: e >= keep_from (> 0). Leaves each warp's kept mass in sh.chunk_mass.
template <class T>
__device__ KeptTotals kept_pass(const RowView<T>& r, int64_t vocab, float keep_from, float mass_scale,
                                bool entropy, SampleShared& sh) {
  const int lane = lane_id();
  const Chunk c = warp_chunk(vocab, warp_id());
  Mass mass = 0;
  float ent = 0.0f;
  long long last = -1;
  for (int64_t j = c.begin + lane; j < c.end; j += kWarpSize) {
    const float t = r.shifted(j);
    const float e = ScalarMath::exp(t);
    if (e >= keep_from) {
      mass += to_mass(e, mass_scale);
      ent += e * t;  // t > -104 for every e > 0: finite
      last = j;
    }
  }
  mass = warp_reduce(mass, [](Mass a, Mass b) { return a + b; });
  if (lane == 0) sh.chunk_mass[warp_id()] = mass;
  KeptTotals out{0, 0.0, -1};
  if (entropy) out.ent = block_reduce(static_cast<double>(ent), [](double a, double b) { return a + b; });
  out.last = block_reduce(last, [](long long a, long long b) { return a > b ? a : b; });
  // The barriers of block_reduce have published sh.chunk_mass.
  FASTRLHF_UNROLL
  for (int w = 0; w < kWarps; ++w) out.mass += sh.chunk_mass[w];
  return out;
}

// In the chunk [c.begin, c.end): the first kept j whose kept mass from c.begin through j exceeds rem,
// given that the chunk's kept mass does. Each thread takes a contiguous run of the chunk.
template <class T>
__device__ int64_t walk_chunk(const RowView<T>& r, Chunk c, Mass rem, float keep_from, float mass_scale,
                              SampleShared& sh) {
  const int64_t per_thread = (c.end - c.begin + kThreads - 1) / kThreads;
  const int64_t lo = c.begin + threadIdx.x * per_thread;
  const int64_t hi = min(c.end, lo + per_thread);
  Mass run = 0;
  for (int64_t j = lo; j < hi; ++j) {
    const float e = r.weight(j);
    if (e >= keep_from) run += to_mass(e, mass_scale);
  }
  if (threadIdx.x == 0) sh.token = -1;
  const Mass before = block_exclusive_sum(run);  // its barriers order the -1 before the write below
  // The runs' intervals [before, before + run) tile [0, chunk mass): exactly one holds rem.
  if (before <= rem && rem - before < run) {
    Mass cum = before;
    for (int64_t j = lo; j < hi; ++j) {
      const float e = r.weight(j);
      if (e >= keep_from) {
        cum += to_mass(e, mass_scale);
        if (cum > rem) {
          sh.token = j;
          break;
        }
      }
    }
  }
  __syncthreads();
  return sh.token;
}

// The sampled index: the first kept j whose kept prefix mass exceeds floor(u * S) (exact in fixed
// point), the last kept one when rounding put u * S at S or past it.
template <class T>
__device__ int64_t inverse_cdf(const RowView<T>& r, int64_t vocab, double u, const KeptTotals& kept, float keep_from,
                               float mass_scale, SampleShared& sh) {
  const double target = u * static_cast<double>(kept.mass);
  if (!(target < static_cast<double>(kept.mass))) return kept.last;  // also a NaN u
  Mass rem = __double2ull_rz(fmax(target, 0.0));
  // Every thread finds the same chunk from the same shared sums: the branch below is block-uniform.
  for (int w = 0; w < kWarps; ++w) {
    const Mass chunk_mass = sh.chunk_mass[w];
    if (chunk_mass > rem) {
      const int64_t token = walk_chunk(r, warp_chunk(vocab, w), rem, keep_from, mass_scale, sh);
      return token >= 0 ? token : kept.last;
    }
    rem -= chunk_mass;
  }
  return kept.last;  // the conversion rounded the target up to S
}

// ---------------------------------------------------------------------------------------------
// Kernel

template <class T>
__device__ void sample_row(const SampleParams& p, int64_t row, float mass_scale, SampleShared& sh) {
  const T* x = static_cast<const T*>(p.logits) + row * p.vocab;
  const RowMax rm = row_max(x, p.vocab);
  // fl(max x * inv_t) is max_j fl(x_j * inv_t): inv_t > 0 and rounding is monotone. Not finite for a
  // +inf logit, only -inf logits (or none), or an overflowing x / T.
  const float m = ScalarMath::mul(rm.x_max, p.inv_temperature);
  if (rm.has_nan || !isfinite(m)) {
    if (threadIdx.x == 0) write_invalid_row(p, row);
    return;  // block-uniform
  }
  const RowView<T> r{x, p.inv_temperature, m};
  const bool truncating = (p.top_k > 0 && p.top_k < p.vocab) || p.top_p < 1.0f;
  // The max element's e: the fused t puts it within rounding of 1, above or below. min_p is relative to it
  // (an absolute min_p could exceed it and keep nothing); every other threshold is an e of the row.
  const float e_max = ScalarMath::exp(shifted_logit<ScalarMath>(rm.x_max, p.inv_temperature, m));
  const float tau = truncating ? truncation_threshold(p, r, mass_scale, e_max, sh)
                               : (p.min_p > 0.0f ? p.min_p * e_max : 0.0f);
  // e >= keep_from is the semantics' e >= tau and e > 0.
  const float keep_from = fmaxf(tau, __uint_as_float(1u));
  const KeptTotals kept = kept_pass(r, p.vocab, keep_from, mass_scale, p.entropy != nullptr, sh);
  const int64_t token = inverse_cdf(r, p.vocab, p.uniforms[row], kept, keep_from, mass_scale, sh);
  if (threadIdx.x != 0) return;
  if (token < 0) {  // nothing kept: only when every e underflowed, in a row of |x / T| ~ 1e9
    write_invalid_row(p, row);
    return;
  }
  // S from the fixed-point sum: each kept e is off by at most half a unit (5e-13), where an fp32 sum of
  // the row would be off by ~1e-7 of S.
  const double s = static_cast<double>(kept.mass) / mass_scale;
  const float log_s = logf(static_cast<float>(s));
  p.tokens[row] = token;
  p.logprobs[row] = r.shifted(token) - log_s;
  if (p.entropy != nullptr) p.entropy[row] = log_s - static_cast<float>(kept.ent / s);
}

template <class T>
__global__ void __launch_bounds__(kThreads) sample_kernel(const SampleParams p, const float mass_scale) {
  __shared__ SampleShared sh;
  // Every shared buffer sample_row writes is behind at least one barrier from its last read in the
  // previous row, so the rows need no barrier between them.
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) sample_row<T>(p, row, mass_scale, sh);
}

// 2^s with s = kMaxMassBits, or less so that vocab * kMassCap * 2^s <= 2^63.
float mass_scale_for(int64_t vocab) {
  int log2_vocab = 0;
  while ((int64_t{1} << log2_vocab) < vocab) ++log2_vocab;
  return std::ldexp(1.0f, std::min(kMaxMassBits, 63 - kMassCapLog2 - log2_vocab));
}

template <class T>
cudaError_t launch_typed(const SampleParams& p, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(std::min(p.n_rows, kMaxGridX));
  sample_kernel<T><<<blocks, kThreads, 0, stream>>>(p, mass_scale_for(p.vocab));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sample(const SampleParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  if (p.n_rows < 0 || p.vocab < 0) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_typed<float>(p, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastrlhf::cuda
