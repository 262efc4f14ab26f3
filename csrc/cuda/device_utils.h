// Small device helpers of the CUDA kernels: dtype conversion, 16-byte tiles, alignment checks, grid
// sizing. Only for .cu files (device code).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/macros.h"

namespace fastrlhf::cuda::device {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
// Each thread moves 16 bytes per load: the widest single load/store instruction.
constexpr int kVecBytes = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether p is aligned to `bytes` (nullptr counts as aligned: it is never read).
inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks for a grid-stride loop over `work` items of `per_block` each, capped at a few waves.
inline unsigned grid_blocks(int64_t work, int64_t per_block, int sm_count, int blocks_per_sm) {
  const int64_t cap = static_cast<int64_t>(std::max(sm_count, 1)) * blocks_per_sm;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(work, per_block), cap)));
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// fp32 to T, rounded to nearest.
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// kN consecutive elements moved by one aligned load (kN * sizeof(T) <= 16 bytes).
template <class T, int kN>
struct alignas(sizeof(T) * kN) Tile {
  T v[kN];
};

// Loads kN elements starting at p (aligned to kN * sizeof(T)) as floats.
template <class T, int kN>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[kN]) {
  const Tile<T, kN> t = *reinterpret_cast<const Tile<T, kN>*>(p);
  FASTRLHF_UNROLL
  for (int k = 0; k < kN; ++k) out[k] = to_float(t.v[k]);
}

// Stores kN floats as T at p (aligned to kN * sizeof(T)) with one aligned store.
template <class T, int kN>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[kN]) {
  Tile<T, kN> t;
  FASTRLHF_UNROLL
  for (int k = 0; k < kN; ++k) t.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Tile<T, kN>*>(p) = t;
}

// kN fp32 values from / to p (aligned to 16 bytes when kN >= 4), in 16-byte pieces.
template <int kN>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[kN]) {
  constexpr int kPiece = kN < 4 ? kN : 4;
  FASTRLHF_UNROLL
  for (int k = 0; k < kN; k += kPiece) {
    const Tile<float, kPiece> t = *reinterpret_cast<const Tile<float, kPiece>*>(p + k);
    FASTRLHF_UNROLL
    for (int e = 0; e < kPiece; ++e) out[k + e] = t.v[e];
  }
}
template <int kN>
__device__ __forceinline__ void store_f32(float* p, const float (&in)[kN]) {
  constexpr int kPiece = kN < 4 ? kN : 4;
  FASTRLHF_UNROLL
  for (int k = 0; k < kN; k += kPiece) {
    Tile<float, kPiece> t;
    FASTRLHF_UNROLL
    for (int e = 0; e < kPiece; ++e) t.v[e] = in[k + e];
    *reinterpret_cast<Tile<float, kPiece>*>(p + k) = t;
  }
}

}  // namespace fastrlhf::cuda::device
