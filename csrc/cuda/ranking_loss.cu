// ranking_loss CUDA kernels: one warp per prompt. Lanes take responses (as winners in the forward,
// as the differentiated reward in the backward) and loop over the other K (common/ranking.h), so a
// prompt costs O(K^2 / 32) per lane; K is small (2..16 typically), up to a few hundred.
// No torch headers: nvcc compiles this file on its own.
#include "cuda/ranking_loss.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/ranking.h"
#include "cuda/device_utils.h"

namespace fastrlhf::cuda {
namespace {

using namespace device;

// 4 prompts per block: small blocks keep the tail of a small batch from idling a whole SM.
constexpr int kThreads = 128;
constexpr int kPromptsPerBlock = kThreads / kWarpSize;

__device__ __forceinline__ RankingRow row_of(const float* rewards, const int64_t* ranks, const uint8_t* mask,
                                             int64_t n, int64_t k, float margin) {
  const int64_t o = n * k;
  return {rewards + o, ranks + o, mask == nullptr ? nullptr : mask + o, k, margin};
}

__device__ __forceinline__ long long warp_sum(long long v) {
  FASTRLHF_UNROLL
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) v += __shfl_xor_sync(kFullWarp, v, delta);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  FASTRLHF_UNROLL
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) v += __shfl_xor_sync(kFullWarp, v, delta);
  return v;
}

// Grid-stride over prompts, one warp each (the whole warp takes the same trip count).
__global__ void __launch_bounds__(kThreads) forward_kernel(const RankingLossForwardParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kPromptsPerBlock;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kPromptsPerBlock + threadIdx.x / kWarpSize; n < p.n;
       n += warps) {
    const RankingRow row = row_of(p.rewards, p.ranks, p.mask, n, p.k, p.margin);
    RankingSums s = ranking_empty_sums();
    for (int64_t w = lane; w < p.k; w += kWarpSize) ranking_accumulate_winner(row, w, s);
    s.loss = warp_sum(s.loss);
    s.correct = warp_sum(static_cast<long long>(s.correct));
    s.pairs = warp_sum(static_cast<long long>(s.pairs));
    if (lane == 0) {
      p.prompt_loss[n] = ranking_mean_loss(s);
      p.prompt_accuracy[n] = ranking_accuracy(s);
      p.num_pairs[n] = static_cast<float>(s.pairs);
    }
  }
}

__global__ void __launch_bounds__(kThreads) backward_kernel(const RankingLossBackwardParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kPromptsPerBlock;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kPromptsPerBlock + threadIdx.x / kWarpSize; n < p.n;
       n += warps) {
    const RankingRow row = row_of(p.rewards, p.ranks, p.mask, n, p.k, p.margin);
    long long pairs = 0;
    for (int64_t w = lane; w < p.k; w += kWarpSize) pairs += ranking_pairs_won(row, w);
    pairs = warp_sum(pairs);
    float* d = p.d_rewards + n * p.k;
    const float scale = pairs > 0 ? p.grad_prompt_loss[n] / static_cast<float>(pairs) : 0.0f;
    for (int64_t j = lane; j < p.k; j += kWarpSize) d[j] = pairs > 0 ? scale * ranking_reward_grad(row, j) : 0.0f;
  }
}

// Grid cap: 65535 blocks of 4 warps is far more than a GPU holds resident; the grid-stride loop
// takes any further prompts.
constexpr int64_t kMaxBlocks = 65535;

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kPromptsPerBlock), kMaxBlocks));
}

}  // namespace

cudaError_t launch_ranking_loss_forward(const RankingLossForwardParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  forward_kernel<<<blocks_for(p.n), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_ranking_loss_backward(const RankingLossBackwardParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.k == 0) return cudaSuccess;
  backward_kernel<<<blocks_for(p.n), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fastrlhf::cuda
