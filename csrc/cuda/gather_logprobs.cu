// gather_logprobs CUDA kernels: fused log-softmax + gather (+ entropy) and its backward.
//
// Forward: one block per row; each thread folds 16-byte tiles into a SoftmaxState with the shared
// update_block, then warp shuffles and shared memory merge the states (common/online_softmax.h).
// Few long rows: a (row, V-chunk) grid writes partial states that a second kernel merges.
// Backward: a grid over (row, V-chunk) tasks, elementwise (common/logprob_grad.h).
// No torch headers: nvcc compiles this file on its own.
#include "cuda/gather_logprobs.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/gather_logprobs_row.h"
#include "common/logprob_grad.h"
#include "common/online_softmax.h"
#include "cuda/device_utils.h"

namespace fastrlhf::cuda {
namespace {

// 8 warps per block: small enough that several blocks share an SM (keeping many loads in
// flight), large enough that one block streams a 32k-152k row quickly.
using device::ceil_div;
using device::from_float;
using device::kVecBytes;
using device::kWarpSize;
using device::to_float;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
// Chunk boundaries fall on whole tiles of every dtype (16 bytes of a 2-byte type).
constexpr int64_t kChunkAlign = 8;
// A split-forward chunk smaller than this is mostly block-reduction overhead.
constexpr int64_t kMinSplitChunk = 4096;
// gridDim.y / gridDim.x hardware limits.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;
// Backward tiles per thread per task: amortises the per-row coefficient loads over 4 tiles.
constexpr int kBwdTilesPerThread = 4;
// Backward blocks per SM launched (the kernel loops over tasks): a few waves of 8 resident blocks.
constexpr int kBwdBlocksPerSm = 32;
// Threads per block of the split-forward combine kernel (one row per thread).
constexpr int kCombineThreads = 128;

// ---------------------------------------------------------------------------------------------
// Forward

__device__ __forceinline__ SoftmaxState shfl_xor(const SoftmaxState& s, int lane_mask) {
  constexpr unsigned kFullWarp = 0xffffffffu;
  return {__shfl_xor_sync(kFullWarp, s.max, lane_mask), __shfl_xor_sync(kFullWarp, s.sum, lane_mask),
          __shfl_xor_sync(kFullWarp, s.ent, lane_mask)};
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState st) {
  FASTRLHF_UNROLL
  for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) st = merge(st, shfl_xor(st, lane_mask));
  return st;
}

// Merge of every thread's state; the result is valid in thread 0.
__device__ __forceinline__ SoftmaxState block_merge(SoftmaxState st) {
  __shared__ SoftmaxState warp_states[kWarps];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  st = warp_merge(st);
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) st = warp_merge(lane < kWarps ? warp_states[lane] : empty_state());
  return st;
}

template <class T>
__device__ void write_row(const GatherLogprobsForwardParams& p, int64_t row, int64_t label,
                          const SoftmaxState& st) {
  const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const float label_logit = label == p.ignore_index ? 0.0f : to_float(x[label]);
  write_row_outputs<ScalarMath>(p, row, label, label_logit, st);
}

// Grid (row, chunk). With one chunk the block finishes the row; otherwise it writes its chunk's
// state to partials[row * chunks + chunk] for combine_kernel. kVec == 1 serves unaligned rows.
template <class T, int kVec, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const GatherLogprobsForwardParams p, const int64_t chunk_len, SoftmaxState* partials) {
  const int64_t row = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t chunks = gridDim.y;
  const int64_t label = p.labels[row];
  if (label == p.ignore_index) {  // skipped rows are never read
    if (chunks == 1 && threadIdx.x == 0) write_row<T>(p, row, label, empty_state());
    return;  // when split, combine_kernel writes the zeros
  }
  const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = min(p.vocab, begin + chunk_len);
  const int64_t n_tiles = (end - begin) / kVec;
  const float inv_t = p.inv_temperature;

  SoftmaxState st = empty_state();
  for (int64_t k = threadIdx.x; k < n_tiles; k += kThreads) {
    float v[kVec];
    device::load_floats<T, kVec>(x + begin + k * kVec, v);
    update_block<kEntropy>(st, v, inv_t);
  }
  for (int64_t j = begin + n_tiles * kVec + threadIdx.x; j < end; j += kThreads) {  // ragged row end
    const float v[1] = {to_float(x[j])};
    update_block<kEntropy>(st, v, inv_t);
  }

  st = block_merge(st);
  if (threadIdx.x == 0) {
    if (chunks == 1) {
      write_row<T>(p, row, label, st);
    } else {
      partials[row * chunks + chunk] = st;
    }
  }
}

// One thread per row: merges the row's chunk states and writes its outputs.
template <class T>
__global__ void combine_kernel(const GatherLogprobsForwardParams p, const int64_t chunks,
                               const SoftmaxState* partials) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= p.n_rows) return;
  const int64_t label = p.labels[row];
  SoftmaxState st = empty_state();
  if (label != p.ignore_index) {  // ignored rows have no partials
    for (int64_t c = 0; c < chunks; ++c) st = merge(st, partials[row * chunks + c]);
  }
  write_row<T>(p, row, label, st);
}

// ---------------------------------------------------------------------------------------------
// Backward

struct RowGrad {
  float inv_t;
  float m;      // the row's stats, saved by the forward
  float log_s;
  GradCoeffs c;
  int64_t label;
};

__device__ __forceinline__ float grad_at(float x, int64_t j, const RowGrad& r) {
  const float g =
      grad_element<ScalarMath>(shifted_logit<ScalarMath>(x, r.inv_t, r.m), r.log_s, r.c.c0, r.c.c1);
  return j == r.label ? g + r.c.label_coef : g;
}

// Grid-stride loop over (row, chunk) tasks of kThreads * kVec * kBwdTilesPerThread elements. Each
// element is read and written by the same thread, so dlogits may alias logits.
template <class T, int kVec>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const GatherLogprobsBackwardParams p, const int64_t chunks_per_row) {
  constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kVec * kBwdTilesPerThread;
  const int64_t n_tasks = p.n_rows * chunks_per_row;
  for (int64_t task = blockIdx.x; task < n_tasks; task += gridDim.x) {
    const int64_t row = task / chunks_per_row;
    const int64_t begin = (task % chunks_per_row) * kChunk;
    const int64_t end = min(p.vocab, begin + kChunk);
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* d = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;

    RowGrad r{p.inv_temperature, 0.0f, 0.0f, {0.0f, 0.0f, 0.0f}, p.labels[row]};
    const bool ignored = r.label == p.ignore_index;  // ignored rows get zeros, logits unread
    if (!ignored) {
      const bool has_h = p.grad_entropy != nullptr;
      r.c = grad_coeffs(p.grad_logprobs[row], has_h ? p.grad_entropy[row] : 0.0f,
                        has_h ? p.entropy[row] : 0.0f, p.inv_temperature);
      r.m = p.stats[2 * row];
      r.log_s = p.stats[2 * row + 1];
    }

    const int64_t n_tiles = (end - begin) / kVec;
    for (int64_t k = threadIdx.x; k < n_tiles; k += kThreads) {
      const int64_t j0 = begin + k * kVec;
      float v[kVec];
      if (ignored) {
        FASTRLHF_UNROLL
        for (int e = 0; e < kVec; ++e) v[e] = 0.0f;
      } else {
        device::load_floats<T, kVec>(x + j0, v);
        FASTRLHF_UNROLL
        for (int e = 0; e < kVec; ++e) v[e] = grad_at(v[e], j0 + e, r);
      }
      device::store_floats<T, kVec>(d + j0, v);
    }
    for (int64_t j = begin + n_tiles * kVec + threadIdx.x; j < end; j += kThreads) {  // ragged row end
      d[j] = from_float<T>(ignored ? 0.0f : grad_at(to_float(x[j]), j, r));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

// Whether every row start is 16-byte aligned, so rows can move in whole tiles.
bool rows_aligned(const void* base, int64_t row_stride, int64_t n_rows, int vec) {
  return reinterpret_cast<uintptr_t>(base) % kVecBytes == 0 && (n_rows <= 1 || row_stride % vec == 0);
}

template <class T, bool kEntropy>
cudaError_t launch_forward_typed(const GatherLogprobsForwardParams& p, const ForwardPlan& plan,
                                 SoftmaxState* partials, cudaStream_t stream) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const dim3 grid(static_cast<unsigned>(p.n_rows), static_cast<unsigned>(plan.chunks));
  if (rows_aligned(p.logits, p.logits_row_stride, p.n_rows, kVec)) {
    forward_kernel<T, kVec, kEntropy><<<grid, kThreads, 0, stream>>>(p, plan.chunk_len, partials);
  } else {
    forward_kernel<T, 1, kEntropy><<<grid, kThreads, 0, stream>>>(p, plan.chunk_len, partials);
  }
  if (plan.chunks > 1) {
    const unsigned blocks = static_cast<unsigned>(ceil_div(p.n_rows, kCombineThreads));
    combine_kernel<T><<<blocks, kCombineThreads, 0, stream>>>(p, plan.chunks, partials);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_forward_entropy(const GatherLogprobsForwardParams& p, const ForwardPlan& plan,
                                   SoftmaxState* partials, cudaStream_t stream) {
  return p.entropy != nullptr ? launch_forward_typed<T, true>(p, plan, partials, stream)
                              : launch_forward_typed<T, false>(p, plan, partials, stream);
}

template <class T>
cudaError_t launch_backward_typed(const GatherLogprobsBackwardParams& p, int sm_count, cudaStream_t stream) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const bool aligned = rows_aligned(p.logits, p.logits_row_stride, p.n_rows, kVec) &&
                       rows_aligned(p.dlogits, p.dlogits_row_stride, p.n_rows, kVec);
  const int vec = aligned ? kVec : 1;
  const int64_t chunks_per_row = ceil_div(p.vocab, static_cast<int64_t>(kThreads) * vec * kBwdTilesPerThread);
  const int64_t n_tasks = p.n_rows * chunks_per_row;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>(n_tasks, static_cast<int64_t>(sm_count) * kBwdBlocksPerSm));
  if (aligned) {
    backward_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(p, chunks_per_row);
  } else {
    backward_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p, chunks_per_row);
  }
  return cudaGetLastError();
}

}  // namespace

ForwardPlan plan_gather_logprobs_forward(int64_t n_rows, int64_t vocab, int sm_count) {
  // One block per row fills the GPU from about two blocks per SM; with fewer rows, split V.
  const int64_t target_blocks = 2 * static_cast<int64_t>(std::max(sm_count, 1));
  int64_t chunks = 1;
  if (n_rows > 0 && n_rows < target_blocks && vocab >= 2 * kMinSplitChunk) {
    chunks = std::min({ceil_div(target_blocks, n_rows), vocab / kMinSplitChunk, kMaxGridY});
  }
  const int64_t chunk_len = std::max(kChunkAlign, ceil_div(ceil_div(vocab, chunks), kChunkAlign) * kChunkAlign);
  chunks = std::max<int64_t>(1, ceil_div(vocab, chunk_len));
  const size_t workspace = chunks > 1 ? static_cast<size_t>(n_rows * chunks) * sizeof(SoftmaxState) : 0;
  return {chunks, chunk_len, workspace};
}

cudaError_t launch_gather_logprobs_forward(const GatherLogprobsForwardParams& p, const ForwardPlan& plan,
                                           void* workspace, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  if (p.n_rows > kMaxGridX || plan.chunks < 1 || plan.chunks > kMaxGridY ||
      (plan.chunks > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  auto* partials = static_cast<SoftmaxState*>(workspace);
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_forward_entropy<float>(p, plan, partials, stream);
    case DType::kBFloat16:
      return launch_forward_entropy<__nv_bfloat16>(p, plan, partials, stream);
    case DType::kFloat16:
      return launch_forward_entropy<__half>(p, plan, partials, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gather_logprobs_backward(const GatherLogprobsBackwardParams& p, int sm_count,
                                            cudaStream_t stream) {
  if (p.n_rows == 0 || p.vocab == 0) return cudaSuccess;
  if (sm_count < 1) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_backward_typed<float>(p, sm_count, stream);
    case DType::kBFloat16:
      return launch_backward_typed<__nv_bfloat16>(p, sm_count, stream);
    case DType::kFloat16:
      return launch_backward_typed<__half>(p, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastrlhf::cuda
