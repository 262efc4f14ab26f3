// Stable softplus / sigmoid, shared by the CPU and CUDA kernels. Both are finite for any finite x
// (no exp of a positive argument), so reward gaps of 1e4 and beyond are safe.
// Plain C++17, no torch headers: nvcc compiles it standalone.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace fastrlhf {

// log(1 + e^x) = max(x, 0) + log1p(e^-|x|).
FASTRLHF_HD float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

// 1 / (1 + e^-x), from e = e^-|x| in (0, 1]: 1 / (1 + e) for x >= 0, e / (1 + e) otherwise.
FASTRLHF_HD float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

}  // namespace fastrlhf
