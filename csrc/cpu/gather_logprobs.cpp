// gather_logprobs CPU kernels: fused log-softmax + gather (+ entropy) and its backward.
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability, with
// CPU_CAPABILITY naming the namespace (and at::vec's) so the copies don't clash.
//
// Forward: one memory pass per row. The row is read in L1-sized blocks; each block gets a max pass
// and then an exp-sum pass that re-reads it from L1, giving the block's SoftmaxState, which is
// merged into the row's (common/online_softmax.h). The exp-sum pass prefetches the next block, so
// memory keeps streaming while it computes. Few long rows are split into V-chunks whose
// states are merged afterwards. Fold / finalize: the same per-row states over one block of columns
// at a time, merged into running states (linear_logprobs' forward by columns). Backward: one
// elementwise pass (common/logprob_grad.h).
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

// GCC 12's AVX512 intrinsic headers raise -W(maybe-)uninitialized false positives (deliberately
// undefined __Y operands) once inlined here; torch builds with -Wno-maybe-uninitialized too.
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
#include <cstring>
#include <memory>

#include "common/gather_logprobs_params.h"
#include "common/gather_logprobs_row.h"
#include "common/logprob_grad.h"
#include "common/online_softmax.h"
#include "cpu/kernels.h"
#include "cpu/vec_exp.h"
#include "cpu/vec_io.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

namespace {

using Vec = at::vec::Vectorized<float>;

// Math policy for the shared element formulas on SIMD vectors. Every exp here is of t <= 0 (a
// logit less its row's max, or a log-probability): cpu/vec_exp.h's, half the work of ATen's exp_u20,
// which kept the forward compute-bound on AVX-512.
struct VecMath {
  static Vec exp(const Vec& x) { return vec_exp::exp_nonpositive(x); }
  // Only ever max(t, floor) with a constant floor (common/): one instruction that keeps a NaN t.
  static Vec max(const Vec& t, const Vec& floor) { return vec_exp::max_with_floor(t, floor); }
  static Vec fms(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmsub(a, b, c); }
};

// Scalar policy for the tails. fms goes through the SIMD fmsub so that an element gets the same t,
// to the bit, in a tail as in the SIMD loop: at::vec::fmsub is fused with AVX2 / AVX512 (and NEON)
// but a * b - c in the baseline x86 copy, which has no FMA instruction. max keeps a NaN t, like
// VecMath's (ScalarMath's fmaxf would turn a NaN logit in a tail into the floor: a silent -inf).
struct TailMath : ScalarMath {
  static float fms(float a, float b, float c) {
    float t;
    at::vec::fmsub(Vec(a), Vec(b), Vec(c)).store(&t, 1);
    return t;
  }
  static float max(float t, float floor) { return t < floor ? floor : t; }
};

using vec_io::kStep;

// Block of a row processed while it sits in L1: 2048 elements is 8 KiB of fp32 (4 KiB of 16-bit),
// so the exp pass re-reads it from cache, not memory. (Zen 4, fp32: 1024 ties, 4096 is 15% slower.)
constexpr int64_t kBlock = 2048;
static_assert(kBlock % kStep == 0, "blocks must hold whole SIMD steps");

// Splitting rows into chunks: a chunk below this many elements costs more in task overhead and
// merging than it gains in balance (8192 fp32 exps take a few microseconds).
constexpr int64_t kMinChunk = 8192;
// Tasks per thread to aim for when rows are few, so uneven tasks still balance.
constexpr int64_t kTasksPerThread = 4;
// Below this many elements in total, threads cost more than they save.
constexpr int64_t kMinParallelElements = 32768;

using vec_io::load2;
using vec_io::reduce_max;
using vec_io::reduce_sum;
using vec_io::store2;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How rows are cut into (row, chunk) tasks.
struct Split {
  int64_t chunks;     // per row
  int64_t chunk_len;  // multiple of kBlock, so only a row's last chunk has a partial SIMD step
  int64_t grain;      // tasks per at::parallel_for grain
};

Split plan_split(int64_t n_rows, int64_t vocab) {
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  const int64_t target_tasks = kTasksPerThread * threads;
  if (n_rows < target_tasks) {
    chunks = std::clamp<int64_t>(ceil_div(target_tasks, n_rows), 1, std::max<int64_t>(1, vocab / kMinChunk));
  }
  const int64_t chunk_len = ceil_div(ceil_div(vocab, chunks), kBlock) * kBlock;
  chunks = ceil_div(vocab, chunk_len);
  const int64_t task_elems = std::min(chunk_len, vocab);
  return {chunks, chunk_len, std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(1, task_elems))};
}

// ---------------------------------------------------------------------------------------------
// Forward

// SoftmaxState of z = x * inv_t over one block of n <= kBlock elements.
template <class T, bool kEntropy>
SoftmaxState block_state(const T* x, int64_t n, float inv_t) {
  const int64_t n_vec = n - n % kStep;

  // Pass 1: max of z, as the max of x scaled (the same value: inv_t > 0 and rounding is monotone).
  // Scaled before the last max reductions, so that m is a max, not a bare product that a compiler
  // could contract into a later subtraction (rescale's): m must be exactly the value the stats save.
  const Vec vinv(inv_t);
  Vec max0(-INFINITY), max1(-INFINITY);
  for (int64_t j = 0; j < n_vec; j += kStep) {
    Vec a, b;
    load2(x + j, a, b);
    max0 = at::vec::maximum(max0, a);
    max1 = at::vec::maximum(max1, b);
  }
  float m = reduce_max(at::vec::maximum(max0, max1) * vinv);
  for (int64_t j = n_vec; j < n; ++j) {  // NaN-propagating, like the SIMD maximum above
    const float z = static_cast<float>(x[j]) * inv_t;
    m = std::isnan(z) || z > m ? z : m;
  }
  if (m == -INFINITY) return empty_state();  // only -inf: adds nothing (and avoids -inf - -inf)

  // Pass 2: exp-sum relative to the block max; the block is in L1 now. It is compute-bound, so it
  // prefetches the next block meanwhile (past the end of a row: the next row's start, usually this
  // thread's next block too). AVX2 Zen 3, N=8192, V=32000, builds side by side: 93-111 -> 56-74 ms, one
  // read of the logits 45-52 ms (docs/benchmarks.md).
  const Vec vm(m);
  Vec sum0(0.0f), sum1(0.0f), ent0(0.0f), ent1(0.0f);
  for (int64_t j = 0; j < n_vec; j += kStep) {
    vec_io::prefetch_step(x + j, kBlock);
    Vec a, b;
    load2(x + j, a, b);
    if constexpr (kEntropy) {
      accumulate<VecMath, kEntropy>(shifted_logit<VecMath>(a, vinv, vm), sum0, ent0);
      accumulate<VecMath, kEntropy>(shifted_logit<VecMath>(b, vinv, vm), sum1, ent1);
    } else {  // the sum alone needs no exact zeros (no e * t): a cheaper exp, 16% less time in cache
      sum0 = sum0 + vec_exp::exp_term_of_sum(shifted_logit<VecMath>(a, vinv, vm));
      sum1 = sum1 + vec_exp::exp_term_of_sum(shifted_logit<VecMath>(b, vinv, vm));
    }
  }
  float sum = reduce_sum(sum0 + sum1);
  float ent = kEntropy ? reduce_sum(ent0 + ent1) : 0.0f;
  for (int64_t j = n_vec; j < n; ++j) {
    accumulate<TailMath, kEntropy>(shifted_logit<TailMath>(static_cast<float>(x[j]), inv_t, m), sum, ent);
  }
  return {m, sum, ent};
}

// SoftmaxState of x[begin, end), block by block.
template <class T, bool kEntropy>
SoftmaxState range_state(const T* x, int64_t begin, int64_t end, float inv_t) {
  SoftmaxState st = empty_state();
  for (int64_t b = begin; b < end; b += kBlock) {
    st = merge(st, block_state<T, kEntropy>(x + b, std::min(kBlock, end - b), inv_t));
  }
  return st;
}

template <class T>
void write_row(const GatherLogprobsForwardParams& p, int64_t row, const SoftmaxState& st) {
  const int64_t label = p.labels[row];
  const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const float label_logit = label == p.ignore_index ? 0.0f : static_cast<float>(x[label]);
  write_row_outputs<TailMath>(p, row, label, label_logit, st);
}

template <class T, bool kEntropy>
void forward_typed(const GatherLogprobsForwardParams& p) {
  const Split split = plan_split(p.n_rows, p.vocab);
  const T* logits = static_cast<const T*>(p.logits);
  auto task_state = [&](int64_t task) {
    const int64_t row = task / split.chunks;
    const int64_t begin = (task % split.chunks) * split.chunk_len;
    if (p.labels[row] == p.ignore_index) return empty_state();  // skipped rows are never read
    return range_state<T, kEntropy>(logits + row * p.logits_row_stride, begin,
                                    std::min(p.vocab, begin + split.chunk_len), p.inv_temperature);
  };

  if (split.chunks == 1) {
    at::parallel_for(0, p.n_rows, split.grain, [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) write_row<T>(p, row, task_state(row));
    });
    return;
  }
  // Few long rows: every (row, chunk) is a task; merge each row's chunk states afterwards.
  const int64_t n_tasks = p.n_rows * split.chunks;
  std::unique_ptr<SoftmaxState[]> partial(new SoftmaxState[n_tasks]);
  at::parallel_for(0, n_tasks, split.grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) partial[task] = task_state(task);
  });
  for (int64_t row = 0; row < p.n_rows; ++row) {  // rows are few here (< kTasksPerThread * threads)
    SoftmaxState st = empty_state();
    for (int64_t c = 0; c < split.chunks; ++c) st = merge(st, partial[row * split.chunks + c]);
    write_row<T>(p, row, st);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward by blocks of columns: fold, then finalize

template <class T, bool kEntropy>
void fold_typed(const GatherLogprobsFoldParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(1, p.vocab));
  at::parallel_for(0, p.n_rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t label = p.labels[row];
      if (label == p.skip_label) continue;  // an ignored row: never read, its state stays empty
      const T* x = logits + row * p.logits_row_stride;
      float* st = p.state + 3 * row;
      const SoftmaxState block = range_state<T, kEntropy>(x, 0, p.vocab, p.inv_temperature);
      const SoftmaxState merged = merge({st[0], st[1], st[2]}, block);
      st[0] = merged.max;
      st[1] = merged.sum;
      st[2] = merged.ent;
      if (label >= 0) p.label_logit[row] = static_cast<float>(x[label]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

// dlogits[row, begin:end). Reads each x before writing the same element, so dlogits may alias
// logits; the label's logit is read up front because the SIMD loop overwrites it.
template <class T>
void backward_range(const GatherLogprobsBackwardParams& p, int64_t row, int64_t begin, int64_t end) {
  T* d = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
  const int64_t label = p.labels[row];
  if (label == p.ignore_index) {
    std::memset(static_cast<void*>(d + begin), 0, (end - begin) * sizeof(T));  // +0 in all dtypes
    return;
  }
  const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const float inv_t = p.inv_temperature;
  const float h = p.grad_entropy != nullptr ? p.grad_entropy[row] : 0.0f;
  const float entropy = p.grad_entropy != nullptr ? p.entropy[row] : 0.0f;
  const GradCoeffs c = grad_coeffs(p.grad_logprobs[row], h, entropy, inv_t);
  const float m = p.stats[2 * row];
  const float log_s = p.stats[2 * row + 1];
  const bool has_label = begin <= label && label < end;
  const float x_label = has_label ? static_cast<float>(x[label]) : 0.0f;

  const int64_t n_vec = (end - begin) - (end - begin) % kStep;
  const Vec vinv(inv_t), vm(m), vlog_s(log_s), vc0(c.c0), vc1(c.c1);
  for (int64_t j = begin; j < begin + n_vec; j += kStep) {
    Vec a, b;
    load2(x + j, a, b);
    a = grad_element<VecMath>(shifted_logit<VecMath>(a, vinv, vm), vlog_s, vc0, vc1);
    b = grad_element<VecMath>(shifted_logit<VecMath>(b, vinv, vm), vlog_s, vc0, vc1);
    store2(d + j, a, b);
  }
  for (int64_t j = begin + n_vec; j < end; ++j) {
    const float t = shifted_logit<TailMath>(static_cast<float>(x[j]), inv_t, m);
    d[j] = static_cast<T>(grad_element<TailMath>(t, log_s, c.c0, c.c1));
  }
  if (has_label) {
    const float t = shifted_logit<TailMath>(x_label, inv_t, m);
    d[label] = static_cast<T>(grad_element<TailMath>(t, log_s, c.c0, c.c1) + c.label_coef);
  }
}

template <class T>
void backward_typed(const GatherLogprobsBackwardParams& p) {
  const Split split = plan_split(p.n_rows, p.vocab);
  at::parallel_for(0, p.n_rows * split.chunks, split.grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t row = task / split.chunks;
      const int64_t begin = (task % split.chunks) * split.chunk_len;
      backward_range<T>(p, row, begin, std::min(p.vocab, begin + split.chunk_len));
    }
  });
}

}  // namespace

void gather_logprobs_forward_kernel(const GatherLogprobsForwardParams& p) {
  if (p.n_rows == 0) return;
  const bool entropy = p.entropy != nullptr;
  switch (p.dtype) {
    case DType::kFloat32:
      return entropy ? forward_typed<float, true>(p) : forward_typed<float, false>(p);
    case DType::kBFloat16:
      return entropy ? forward_typed<c10::BFloat16, true>(p) : forward_typed<c10::BFloat16, false>(p);
    case DType::kFloat16:
      return entropy ? forward_typed<c10::Half, true>(p) : forward_typed<c10::Half, false>(p);
  }
}

void gather_logprobs_fold_kernel(const GatherLogprobsFoldParams& p) {
  if (p.n_rows == 0 || p.vocab == 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      return p.with_entropy ? fold_typed<float, true>(p) : fold_typed<float, false>(p);
    case DType::kBFloat16:
      return p.with_entropy ? fold_typed<c10::BFloat16, true>(p) : fold_typed<c10::BFloat16, false>(p);
    case DType::kFloat16:
      return p.with_entropy ? fold_typed<c10::Half, true>(p) : fold_typed<c10::Half, false>(p);
  }
}

// Scalar and cheap ([N] values), but per capability all the same: the label's logprob takes TailMath's
// fused multiply-subtract, so it gets the t the one-pass forward of this copy would give.
void gather_logprobs_finalize_kernel(const GatherLogprobsFinalizeParams& p) {
  const GatherLogprobsForwardParams& out = p.out;
  for (int64_t row = 0; row < out.n_rows; ++row) {
    const int64_t label = out.labels[row];
    const float* st = p.state + 3 * row;
    const float label_logit = label == out.ignore_index ? 0.0f : p.label_logit[row];
    write_row_outputs<TailMath>(out, row, label, label_logit, {st[0], st[1], st[2]});
  }
}

void gather_logprobs_backward_kernel(const GatherLogprobsBackwardParams& p) {
  if (p.n_rows == 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      return backward_typed<float>(p);
    case DType::kBFloat16:
      return backward_typed<c10::BFloat16>(p);
    case DType::kFloat16:
      return backward_typed<c10::Half>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
