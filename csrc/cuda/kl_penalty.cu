// kl_penalty CUDA kernels: elementwise, grid-stride over 16-byte tiles of the inputs
// (common/kl.h holds the math). No torch headers: nvcc compiles this file on its own.
#include "cuda/kl_penalty.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kl.h"
#include "cuda/device_utils.h"

namespace fastrlhf::cuda {
namespace {

using namespace device;

constexpr int kThreads = 256;
// Resident blocks per SM to aim for; the grid-stride loop covers the rest of the tokens.
constexpr int kBlocksPerSm = 8;

template <KLEstimator E, bool kClamp, bool kGrad>
__device__ __forceinline__ float token_value(float x, float y, float g, bool valid, float clamp) {
  if (!valid) return 0.0f;
  if constexpr (kGrad) {
    return kl_value_grad<ScalarKLMath, E, kClamp>(g, x, y, clamp);
  } else {
    return kl_value<ScalarKLMath, E, kClamp>(x, y, clamp);
  }
}

// Tiles of kVec tokens (16 bytes of T; kVec == 1 serves unaligned pointers), then a ragged tail.
template <class T, int kVec, KLEstimator E, bool kClamp, bool kGrad>
__global__ void __launch_bounds__(kThreads) kl_kernel(const KLPenaltyParams p) {
  const T* x = static_cast<const T*>(p.logprobs);
  const T* y = static_cast<const T*>(p.ref_logprobs);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t n_tiles = p.n / kVec;
  for (int64_t tile = first; tile < n_tiles; tile += stride) {
    const int64_t j0 = tile * kVec;
    float xv[kVec], yv[kVec], g[kVec] = {}, out[kVec];
    load_floats<T, kVec>(x + j0, xv);
    load_floats<T, kVec>(y + j0, yv);
    if constexpr (kGrad) load_f32<kVec>(p.grad + j0, g);
    uint8_t m[kVec];
    if (p.mask != nullptr) {
      const Tile<uint8_t, kVec> mt = *reinterpret_cast<const Tile<uint8_t, kVec>*>(p.mask + j0);
      FASTRLHF_UNROLL
      for (int k = 0; k < kVec; ++k) m[k] = mt.v[k];
    } else {
      FASTRLHF_UNROLL
      for (int k = 0; k < kVec; ++k) m[k] = 1;
    }
    FASTRLHF_UNROLL
    for (int k = 0; k < kVec; ++k) out[k] = token_value<E, kClamp, kGrad>(xv[k], yv[k], g[k], m[k] != 0, p.clamp);
    store_f32<kVec>(p.out + j0, out);
  }
  for (int64_t j = n_tiles * kVec + first; j < p.n; j += stride) {
    const bool valid = p.mask == nullptr || p.mask[j] != 0;
    const float g = kGrad ? p.grad[j] : 0.0f;
    p.out[j] = token_value<E, kClamp, kGrad>(to_float(x[j]), to_float(y[j]), g, valid, p.clamp);
  }
}

template <class T, bool kGrad>
cudaError_t launch_typed(const KLPenaltyParams& p, int sm_count, cudaStream_t stream) {
  constexpr int kVec = kVecBytes / sizeof(T);
  // Tiles need every pointer aligned to its tile size (the mask's tile is kVec bytes).
  const bool vec_ok = aligned(p.logprobs, kVecBytes) && aligned(p.ref_logprobs, kVecBytes) &&
                      aligned(p.out, kVecBytes) && aligned(p.grad, kVecBytes) && aligned(p.mask, kVec);
  const int vec = vec_ok ? kVec : 1;
  const unsigned blocks = grid_blocks(ceil_div(p.n, vec), kThreads, sm_count, kBlocksPerSm);
  const bool known = dispatch_kl(p.estimator, p.clamp, [&](auto e, auto clamp_on) {
    constexpr KLEstimator E = decltype(e)::value;
    constexpr bool kClamp = decltype(clamp_on)::value;
    if (vec_ok) {
      kl_kernel<T, kVec, E, kClamp, kGrad><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      kl_kernel<T, 1, E, kClamp, kGrad><<<blocks, kThreads, 0, stream>>>(p);
    }
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

template <bool kGrad>
cudaError_t launch_grad(const KLPenaltyParams& p, int sm_count, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_typed<float, kGrad>(p, sm_count, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16, kGrad>(p, sm_count, stream);
    case DType::kFloat16:
      return launch_typed<__half, kGrad>(p, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_kl_penalty(const KLPenaltyParams& p, int sm_count, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return p.grad != nullptr ? launch_grad<true>(p, sm_count, stream) : launch_grad<false>(p, sm_count, stream);
}

}  // namespace fastrlhf::cuda
