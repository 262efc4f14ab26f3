// gae and advantages CUDA kernels: a per-row block scan of GAE's reverse recurrence.
//
// Why a block scan: the walk is sequential along T, and rows are often few (a PPO batch of 8-64
// responses) while T reaches 32k. One thread per row would leave the GPU idle and take T dependent
// steps; one warp per row still walks T/32 steps per lane. A block of 256 threads per row walks
// kItems steps per thread per 1024-token chunk, with a scan of 256 summaries in between.
//
// Per chunk, right to left: each thread summarises its kItems tokens as a GaeSegment (common/gae.h:
// a map on the carry), the block scans the summaries (thread 0 holds the rightmost run), each
// thread applies the scanned prefix to the carry entering the chunk, and walks its tokens with
// gae_step, the same step the CPU kernels run. The chunk's total summary moves the carry on.
// No torch headers: nvcc compiles this file on its own.
#include "cuda/gae.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/gae.h"
#include "common/kl.h"
#include "cuda/device_utils.h"

namespace fastrlhf::cuda {
namespace {

using namespace device;

// 8 warps per row: enough lanes to scan a 1024-token chunk in a few steps, few enough that the
// three barriers per chunk stay cheap.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
// Tokens per thread per chunk: each thread's own walk is short, and its loads fill a 16-byte row
// segment.
constexpr int kItems = 4;
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kItems;
// gridDim.x hardware limit.
constexpr int64_t kMaxGridX = 2147483647;

__device__ __forceinline__ GaeSegment shfl_up(const GaeSegment& s, int delta) {
  return {__shfl_up_sync(kFullWarp, s.a, delta), __shfl_up_sync(kFullWarp, s.b, delta),
          __shfl_up_sync(kFullWarp, s.c, delta), __shfl_up_sync(kFullWarp, s.first_value, delta),
          __shfl_up_sync(kFullWarp, s.has_valid, delta)};
}

// Inclusive scan over lanes; lane i's result is lane i's segment composed to the left of lanes
// i-1 ... 0 (lower lanes hold runs further right).
__device__ __forceinline__ GaeSegment warp_inclusive_scan(GaeSegment s, int lane) {
  FASTRLHF_UNROLL
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const GaeSegment right = shfl_up(s, delta);
    if (lane >= delta) s = gae_compose(s, right);
  }
  return s;
}

// Exclusive block scan: the composition of the runs of threads 0 .. tid-1 (all to the right of
// this thread's run). total gets the whole chunk's composition. Ends with the shared slots free.
__device__ __forceinline__ GaeSegment block_exclusive_scan(const GaeSegment& s, GaeSegment& total) {
  __shared__ GaeSegment warp_totals[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const GaeSegment inclusive = warp_inclusive_scan(s, lane);
  GaeSegment exclusive = shfl_up(inclusive, 1);
  if (lane == 0) exclusive = gae_identity_segment();
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const GaeSegment t = warp_inclusive_scan(lane < kWarps ? warp_totals[lane] : gae_identity_segment(), lane);
    __syncwarp();
    if (lane < kWarps) warp_totals[lane] = t;  // now: warps 0 .. lane composed
  }
  __syncthreads();
  if (warp > 0) exclusive = gae_compose(exclusive, warp_totals[warp - 1]);
  total = warp_totals[kWarps - 1];
  __syncthreads();  // the next chunk rewrites warp_totals
  return exclusive;
}

// Token source of plain GAE: rewards as given.
struct GaeTokens {
  const float* rewards;
  __device__ __forceinline__ float reward(int64_t, int64_t at, bool) const { return rewards[at]; }
};

// Token source of the fused experience step: -kl_coef * kl, plus the score at the row's last valid
// position; writes token_rewards as it goes.
template <class T, KLEstimator E, bool kClamp>
struct AdvantageTokens {
  const T* logprobs;
  const T* ref_logprobs;
  float* token_rewards;
  float neg_kl_coef;
  float clamp;
  int64_t last_valid;  // in the row, -1 when the row has none
  float score;
  __device__ __forceinline__ float reward(int64_t t, int64_t at, bool valid) const {
    float r = 0.0f;
    if (valid) {
      r = neg_kl_coef * kl_value<ScalarKLMath, E, kClamp>(to_float(logprobs[at]), to_float(ref_logprobs[at]), clamp);
      if (t == last_valid) r += score;
    }
    token_rewards[at] = r;
    return r;
  }
};

// The block's scan of one row. Positions past the row end are invalid (identity) tokens.
template <class Tokens>
__device__ void scan_row(const Tokens& tokens, const float* values, const uint8_t* mask, float* advantages,
                         float* returns, int64_t row, int64_t length, float gamma, float gamma_lam) {
  // Thread 0 takes the rightmost kItems tokens of a chunk, so thread order is walk order.
  const int64_t item0 = static_cast<int64_t>(kThreads - 1 - threadIdx.x) * kItems;
  const int64_t row_start = row * length;
  GaeCarry carry = gae_initial_carry();  // entering the current chunk; identical in every thread
  for (int64_t base = (length - 1) / kChunk * kChunk; base >= 0; base -= kChunk) {
    float r[kItems], v[kItems];
    bool valid[kItems];
    GaeSegment seg = gae_identity_segment();
    for (int i = kItems - 1; i >= 0; --i) {
      const int64_t t = base + item0 + i;
      const int64_t at = row_start + t;
      valid[i] = t < length && mask[at] != 0;
      v[i] = t < length ? values[at] : 0.0f;
      r[i] = t < length ? tokens.reward(t, at, valid[i]) : 0.0f;
      seg = gae_compose(gae_segment(r[i], v[i], valid[i], gamma, gamma_lam), seg);
    }
    GaeSegment total;
    const GaeSegment right = block_exclusive_scan(seg, total);
    GaeCarry mine = gae_apply(right, carry);
    for (int i = kItems - 1; i >= 0; --i) {
      const int64_t t = base + item0 + i;
      if (t >= length) continue;
      const float adv = gae_step(mine, r[i], v[i], valid[i], gamma, gamma_lam);
      advantages[row_start + t] = adv;
      returns[row_start + t] = gae_return(adv, v[i], valid[i]);
    }
    carry = gae_apply(total, carry);
  }
}

__global__ void __launch_bounds__(kThreads) gae_kernel(const GaeParams p) {
  scan_row(GaeTokens{p.rewards}, p.values, p.mask, p.advantages, p.returns, blockIdx.x, p.length, p.gamma,
           p.gamma * p.lam);
}

// Last valid position of the row, or -1: a block max-reduction over its mask.
__device__ int64_t last_valid_position(const uint8_t* mask_row, int64_t length) {
  __shared__ long long warp_max[kWarps];
  long long best = -1;
  for (int64_t t = threadIdx.x; t < length; t += kThreads) {
    if (mask_row[t] != 0) best = t;  // t grows per thread, so the latest hit is its max
  }
  FASTRLHF_UNROLL
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) best = max(best, __shfl_xor_sync(kFullWarp, best, delta));
  if (threadIdx.x % kWarpSize == 0) warp_max[threadIdx.x / kWarpSize] = best;
  __syncthreads();
  best = -1;
  FASTRLHF_UNROLL
  for (int w = 0; w < kWarps; ++w) best = max(best, warp_max[w]);
  __syncthreads();  // warp_max is free again
  return best;
}

template <class T, KLEstimator E, bool kClamp>
__global__ void __launch_bounds__(kThreads) advantages_kernel(const AdvantagesParams p) {
  const int64_t row = blockIdx.x;
  const AdvantageTokens<T, E, kClamp> tokens{static_cast<const T*>(p.logprobs),
                                             static_cast<const T*>(p.ref_logprobs),
                                             p.token_rewards,
                                             -p.kl_coef,
                                             p.clamp,
                                             last_valid_position(p.mask + row * p.length, p.length),
                                             p.scores[row]};
  scan_row(tokens, p.values, p.mask, p.advantages, p.returns, row, p.length, p.gamma, p.gamma * p.lam);
}

template <class T>
cudaError_t launch_advantages_typed(const AdvantagesParams& p, cudaStream_t stream) {
  const bool known = dispatch_kl(p.estimator, p.clamp, [&](auto e, auto clamp_on) {
    advantages_kernel<T, decltype(e)::value, decltype(clamp_on)::value>
        <<<static_cast<unsigned>(p.n_rows), kThreads, 0, stream>>>(p);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_gae_forward(const GaeParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.length == 0) return cudaSuccess;
  if (p.n_rows > kMaxGridX) return cudaErrorInvalidValue;
  gae_kernel<<<static_cast<unsigned>(p.n_rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_advantages_forward(const AdvantagesParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.length == 0) return cudaSuccess;
  if (p.n_rows > kMaxGridX) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_advantages_typed<float>(p, stream);
    case DType::kBFloat16:
      return launch_advantages_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_advantages_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastrlhf::cuda
