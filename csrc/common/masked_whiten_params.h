// Raw-pointer arguments of the masked whitening CPU kernel (csrc/cpu/masked_whiten.cpp). Plain C++17.
#pragma once

#include <cstdint>

namespace fastrlhf {

struct MaskedWhitenParams {
  const float* x;        // [n]
  const uint8_t* mask;   // [n], 0 / 1
  int64_t n;
  float* out;            // [n]: (x - mean) / sqrt(var + 1e-8) where mask is set, else 0; may be x itself
  int64_t* count;        // receives the number of set positions
};

}  // namespace fastrlhf
