// Raw-pointer arguments of the few-row linear kernels: out = hidden @ weight.T for a handful of hidden rows
// against a large weight, as in one decoding step's lm_head. The weight is packed once (for a whole
// decode) into panels of kFewRowPanel output columns, so each step streams it once. Plain C++17.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace fastrlhf {

// Output columns per packed panel: two AVX-512 or four AVX2 fp32 vectors.
constexpr int64_t kFewRowPanel = 32;

struct FewRowPackParams {
  const void* weight;  // [out_features, in_features] of `dtype`, contiguous
  int64_t in_features;
  int64_t out_features;
  DType dtype;
  float* packed;  // [ceil(out_features / kFewRowPanel), in_features, kFewRowPanel]: packed[p][k][c] =
                  // weight[p * kFewRowPanel + c][k] widened to fp32, 0 past out_features
};

struct FewRowLinearParams {
  const float* hidden;  // [n_rows, in_features] fp32, contiguous
  const float* packed;  // as FewRowPackParams::packed
  int64_t n_rows;
  int64_t in_features;
  int64_t out_features;
  float* out;  // [n_rows, out_features] fp32: sum_k hidden[b, k] * weight[v, k], accumulated in fp32
};

}  // namespace fastrlhf
