// group_advantages CUDA kernels: outcome advantages of critic-free RL (common/group_advantages.h holds
// the math, the same functions the CPU kernel runs).
//
// One block per row.
// Group modes: thread 0 computes the group's statistics (k scores, in double) and the row's value into
// shared memory, then the block writes the row, 4 tokens a thread per step when the row allows 4-byte
// mask and 16-byte output tiles. Each of a group's k rows recomputes the statistics: O(k) per row,
// nothing next to the row's T tokens, and no second kernel or workspace.
// kDiscount: the walk is sequential along T. Each chunk of kThreads * kItems tokens is split into runs
// of kItems per thread; a block scan of the runs' valid counts tells each run how many valid tokens
// lie to its right, discount_power starts the run there, and discount_step walks it.
// The batch whitening of the REINFORCE++ variants is not here: the Python op whitens this output.
// No torch headers: nvcc compiles this file on its own.
#include "cuda/group_advantages.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "common/group_advantages.h"
#include "cuda/device_utils.h"

namespace fastrlhf::cuda {
namespace {

using namespace device;

// 8 warps per row: a 1024-token response is one step of 4-token tiles.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
// Tokens per thread per chunk of the discount walk: each thread's own walk is short, and its mask
// bytes are one 4-byte word.
constexpr int kItems = 4;
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kItems;
// gridDim.x hardware limit.
constexpr int64_t kMaxGridX = 2147483647;
// Tokens per thread per step of the vectorised broadcast: one 16-byte store of floats.
constexpr int kTile = 4;

template <bool kVec>
__global__ void __launch_bounds__(kThreads) group_kernel(const GroupAdvantagesParams p) {
  __shared__ float row_value;
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) {
    const int64_t k = p.group_size;
    const GroupStats stats = group_stats(p.scores + row / k * k, k);
    row_value = outcome_row_value(static_cast<OutcomeMode>(p.mode), p.scores[row], stats, k, p.eps);
  }
  __syncthreads();
  const float value = row_value;
  const uint8_t* mask = p.mask + row * p.length;
  float* out = p.out + row * p.length;
  if constexpr (kVec) {
    // length % kTile == 0 here, so every row starts 4-byte aligned in the mask and 16-byte in out.
    for (int64_t t = static_cast<int64_t>(threadIdx.x) * kTile; t < p.length; t += kThreads * kTile) {
      const Tile<uint8_t, kTile> m = *reinterpret_cast<const Tile<uint8_t, kTile>*>(mask + t);
      float v[kTile];
      FASTRLHF_UNROLL
      for (int i = 0; i < kTile; ++i) v[i] = m.v[i] != 0 ? value : 0.0f;
      store_f32<kTile>(out + t, v);
    }
  } else {
    for (int64_t t = threadIdx.x; t < p.length; t += kThreads) out[t] = mask[t] != 0 ? value : 0.0f;
  }
}

// Sum of `count` over threads 0 .. tid-1 (the runs to this thread's right); total gets the whole
// block's sum. Ends with the shared slots free.
__device__ __forceinline__ int block_exclusive_sum(int count, int& total) {
  __shared__ int warp_totals[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  int inclusive = count;
  FASTRLHF_UNROLL
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const int below = __shfl_up_sync(kFullWarp, inclusive, delta);
    if (lane >= delta) inclusive += below;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  int before = 0;
  total = 0;
  FASTRLHF_UNROLL
  for (int w = 0; w < kWarps; ++w) {
    const int sum = warp_totals[w];
    before += w < warp ? sum : 0;
    total += sum;
  }
  __syncthreads();  // the next chunk rewrites warp_totals
  return before + inclusive - count;
}

__global__ void __launch_bounds__(kThreads) discount_kernel(const GroupAdvantagesParams p) {
  const int64_t row = blockIdx.x;
  const uint8_t* mask = p.mask + row * p.length;
  float* out = p.out + row * p.length;
  const float score = p.scores[row];
  // Thread 0 takes the rightmost kItems tokens of a chunk, so thread order is walk order.
  const int64_t item0 = static_cast<int64_t>(kThreads - 1 - threadIdx.x) * kItems;
  int64_t right_of_chunk = 0;  // valid tokens right of the current chunk; identical in every thread
  for (int64_t base = (p.length - 1) / kChunk * kChunk; base >= 0; base -= kChunk) {
    bool valid[kItems];
    int count = 0;
    FASTRLHF_UNROLL
    for (int i = 0; i < kItems; ++i) {
      const int64_t t = base + item0 + i;
      valid[i] = t < p.length && mask[t] != 0;
      count += valid[i] ? 1 : 0;
    }
    int total = 0;
    const int right_in_chunk = block_exclusive_sum(count, total);
    double discount = discount_power(p.gamma, right_of_chunk + right_in_chunk);
    FASTRLHF_UNROLL
    for (int i = kItems - 1; i >= 0; --i) {
      const int64_t t = base + item0 + i;
      if (t < p.length) out[t] = discount_step(discount, score, valid[i], p.gamma);
    }
    right_of_chunk += total;
  }
}

}  // namespace

cudaError_t launch_group_advantages_forward(const GroupAdvantagesParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.length == 0) return cudaSuccess;
  if (p.n_rows > kMaxGridX || p.group_size < 1 || p.n_rows % p.group_size != 0 || !valid_outcome_mode(p.mode)) {
    return cudaErrorInvalidValue;
  }
  const auto blocks = static_cast<unsigned>(p.n_rows);
  if (static_cast<OutcomeMode>(p.mode) == OutcomeMode::kDiscount) {
    discount_kernel<<<blocks, kThreads, 0, stream>>>(p);
  } else if (p.length % kTile == 0 && aligned(p.mask, kTile) && aligned(p.out, kVecBytes)) {
    group_kernel<true><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    group_kernel<false><<<blocks, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace fastrlhf::cuda
