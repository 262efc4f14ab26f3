// few_row_linear CPU kernels: out[b, v] = sum_k hidden[b, k] * weight[v, k] for a few hidden rows (a
// decoding step's batch) against a large weight (the lm_head), in fp32; and the packing of that weight.
//
// Not compiled on its own: csrc/cpu/arch/<cap>.cpp includes it once per CPU capability.
//
// Why not torch.mm: with 1-32 rows against a [32000, 256] fp32 weight, MKL's sgemm took 4.5-8 ms on a
// 2-core AMD EPYC (it repacks the whole weight on every call), where the weight streams from memory at
// ~50 GB/s and the FMAs need ~1.5 ms. Here the weight is packed once per decode into panels of
// kFewRowPanel output columns ([panel][k][column], contiguous), and each step walks every panel once:
// for a tile of kTileRows hidden rows, kTileRows x kVecs accumulators stay in registers over k, each
// panel load feeds kTileRows FMAs, and the vector lanes run along the outputs, so nothing is reduced
// across lanes. A panel is in_features x 128 bytes (32 KiB at 256): the row tiles after the first
// re-read it from cache.
#ifndef CPU_CAPABILITY
#error "compile through csrc/cpu/arch/<capability>.cpp, which defines CPU_CAPABILITY"
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "common/few_row_linear_params.h"
#include "cpu/kernels.h"

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {

FASTRLHF_CPU_KERNEL_DECLARATIONS

// Named, not anonymous: every kernel file lands in one translation unit per capability.
namespace few_row_linear_impl {

using Vec = at::vec::Vectorized<float>;

constexpr int kVecs = static_cast<int>(kFewRowPanel / Vec::size());
static_assert(kFewRowPanel % Vec::size() == 0, "a panel holds whole vectors");
// Accumulators kTileRows x kVecs: 8 x 2 of AVX-512's 32 registers, 2 x 4 of AVX2's 16, with the panel's
// kVecs loads and a broadcast beside them.
constexpr int kTileRows = Vec::size() >= 16 ? 8 : 2;

int64_t panels(int64_t out_features) { return (out_features + kFewRowPanel - 1) / kFewRowPanel; }

template <class T>
void pack_typed(const FewRowPackParams& p) {
  const T* weight = static_cast<const T*>(p.weight);
  const int64_t in = p.in_features;
  at::parallel_for(0, panels(p.out_features), 16, [&](int64_t lo, int64_t hi) {
    for (int64_t panel = lo; panel < hi; ++panel) {
      float* dst = p.packed + panel * in * kFewRowPanel;
      const int64_t first = panel * kFewRowPanel;
      const int64_t columns = std::min(kFewRowPanel, p.out_features - first);
      for (int64_t c = 0; c < kFewRowPanel; ++c) {
        const T* src = weight + (first + c) * in;
        for (int64_t k = 0; k < in; ++k) dst[k * kFewRowPanel + c] = c < columns ? static_cast<float>(src[k]) : 0.0f;
      }
    }
  });
}

// out[b + j, first .. first + columns) for j < TB, from one panel.
template <int TB>
void panel_tile(const FewRowLinearParams& p, const float* panel, int64_t first, int64_t columns, int64_t b) {
  const int64_t in = p.in_features;
  Vec acc[TB][kVecs];
  for (int j = 0; j < TB; ++j) {
    for (int i = 0; i < kVecs; ++i) acc[j][i] = Vec(0.0f);
  }
  const float* h = p.hidden + b * in;
  for (int64_t k = 0; k < in; ++k) {
    Vec w[kVecs];
    for (int i = 0; i < kVecs; ++i) w[i] = Vec::loadu(panel + k * kFewRowPanel + i * Vec::size());
    for (int j = 0; j < TB; ++j) {
      const Vec hj(h[j * in + k]);
      for (int i = 0; i < kVecs; ++i) acc[j][i] = at::vec::fmadd(hj, w[i], acc[j][i]);
    }
  }
  for (int j = 0; j < TB; ++j) {
    float* out = p.out + (b + j) * p.out_features + first;
    for (int i = 0; i < kVecs; ++i) {
      const int64_t left = columns - i * Vec::size();
      if (left >= Vec::size()) {
        acc[j][i].store(out + i * Vec::size());
      } else if (left > 0) {
        acc[j][i].store(out + i * Vec::size(), static_cast<int>(left));
      }
    }
  }
}

}  // namespace few_row_linear_impl

void few_row_linear_pack_kernel(const FewRowPackParams& p) {
  using namespace few_row_linear_impl;
  switch (p.dtype) {
    case DType::kFloat32:
      return pack_typed<float>(p);
    case DType::kBFloat16:
      return pack_typed<c10::BFloat16>(p);
    case DType::kFloat16:
      return pack_typed<c10::Half>(p);
  }
}

void few_row_linear_forward_kernel(const FewRowLinearParams& p) {
  using namespace few_row_linear_impl;
  const int64_t in = p.in_features;
  // A panel of 32 outputs over 256 features is 8k FMAs per row: one task takes a few panels.
  at::parallel_for(0, panels(p.out_features), 8, [&](int64_t lo, int64_t hi) {
    for (int64_t panel = lo; panel < hi; ++panel) {
      const float* packed = p.packed + panel * in * kFewRowPanel;
      const int64_t first = panel * kFewRowPanel;
      const int64_t columns = std::min(kFewRowPanel, p.out_features - first);
      int64_t b = 0;
      for (; b + kTileRows <= p.n_rows; b += kTileRows) panel_tile<kTileRows>(p, packed, first, columns, b);
      for (; b < p.n_rows; ++b) panel_tile<1>(p, packed, first, columns, b);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
