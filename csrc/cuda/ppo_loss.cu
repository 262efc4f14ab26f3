// ppo_policy_loss CUDA kernels: per-row sums of the per-token loss and its stats (one block per row,
// a fixed reduction order), and the per-token derivative under a per-row gradient scale (common/ppo_loss.h
// holds the math). No torch headers: nvcc compiles this file on its own.
#include "cuda/ppo_loss.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "common/kl.h"
#include "common/ppo_loss.h"
#include "cuda/device_utils.h"

namespace fastrlhf::cuda {
namespace {

using namespace device;

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

template <KLEstimator E>
__global__ void __launch_bounds__(kThreads) ppo_loss_forward_kernel(const PPOLossForwardParams p) {
  const PPOLossTokens& t = p.tokens;
  const int64_t row = blockIdx.x;
  const int64_t begin = row * t.row_len;
  const int64_t end = begin + t.row_len < t.n ? begin + t.row_len : t.n;
  double sums[kSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t count = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) add_token<E>(t, i, sums, count);
  // Warp sums, then the warps' sums in shared memory, added by thread 0 in a fixed order.
  FASTRLHF_UNROLL
  for (int k = 0; k < kSums; ++k) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sums[k] += __shfl_down_sync(kFullWarp, sums[k], offset);
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) count += __shfl_down_sync(kFullWarp, count, offset);
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ double warp_sums[kWarps][kSums];
  __shared__ int64_t warp_counts[kWarps];
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    FASTRLHF_UNROLL
    for (int k = 0; k < kSums; ++k) warp_sums[warp][k] = sums[k];
    warp_counts[warp] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 0; k < kSums; ++k) {
      double total = 0.0;
      for (int w = 0; w < kWarps; ++w) total += warp_sums[w][k];
      p.row_sums[row * kSums + k] = total;
    }
    int64_t total_count = 0;
    for (int w = 0; w < kWarps; ++w) total_count += warp_counts[w];
    p.row_counts[row] = total_count;
  }
}

template <KLEstimator E>
__global__ void __launch_bounds__(kThreads) ppo_loss_backward_kernel(const PPOLossBackwardParams p) {
  const PPOLossTokens& t = p.tokens;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < t.n; i += stride) {
    const float scale = p.row_scale[i / t.row_len];
    p.d_logprobs[i] = token_grad<E>(t, i, scale);
    if (p.d_entropy != nullptr) p.d_entropy[i] = t.mask[i] ? -scale * t.options.entropy_coef : 0.0f;
  }
}

}  // namespace

cudaError_t launch_ppo_loss_forward(const PPOLossForwardParams& p, cudaStream_t stream) {
  if (p.tokens.rows == 0) return cudaSuccess;
  const bool known = dispatch_kl(p.tokens.kl_estimator, INFINITY, [&](auto e, auto) {
    ppo_loss_forward_kernel<decltype(e)::value><<<static_cast<unsigned>(p.tokens.rows), kThreads, 0, stream>>>(p);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_ppo_loss_backward(const PPOLossBackwardParams& p, int sm_count, cudaStream_t stream) {
  if (p.tokens.n == 0) return cudaSuccess;
  const unsigned blocks = grid_blocks(p.tokens.n, kThreads, sm_count, kBlocksPerSm);
  const bool known = dispatch_kl(p.tokens.kl_estimator, INFINITY, [&](auto e, auto) {
    ppo_loss_backward_kernel<decltype(e)::value><<<blocks, kThreads, 0, stream>>>(p);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace fastrlhf::cuda
