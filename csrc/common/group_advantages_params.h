// Raw-pointer arguments of the group_advantages kernels, shared by the CPU kernels, the CUDA launcher
// and the torch glue. Arrays are contiguous. Plain C++17.
#pragma once

#include <cstdint>

namespace fastrlhf {

struct GroupAdvantagesParams {
  const float* scores;  // [n_rows]: row g * group_size + j is response j of prompt g
  const uint8_t* mask;  // [n_rows, length], 0 / 1
  int64_t n_rows;
  int64_t length;
  int64_t group_size;  // divides n_rows; >= 2 for kLeaveOneOut
  int mode;            // OutcomeMode (common/group_advantages.h)
  double gamma;        // kDiscount only, in [0, 1]
  double eps;          // kNormalize only, >= 0
  float* out;          // [n_rows, length]: the row value (or discounted score) at valid tokens, else 0
};

}  // namespace fastrlhf
