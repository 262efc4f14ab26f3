// Masked whitening of an op's float32 output: the shared reduction epilogue of the advantage
// ops (reference.masked_whiten is the spec: float64 mean and unbiased variance over the set positions,
// (x - mean) / sqrt(var + 1e-8), 0 where the mask is unset). The CPU runs the kernel of
// csrc/cpu/masked_whiten.cpp; other devices run the same float64 formula as ATen ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/masked_whiten_params.h"
#include "cpu/dispatch.h"
#include "tensor_params.h"

namespace fastrlhf {

// x: contiguous float32; mask: contiguous uint8 0 / 1 of x's size; out: contiguous float32 of x's size,
// or x itself. Returns the number of set positions (fewer than 2 whiten to 0: there is no spread to
// estimate; callers that need 2 check the count).
inline int64_t masked_whiten_into(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& out) {
  if (x.is_cpu()) {
    int64_t count = 0;
    MaskedWhitenParams p{};
    p.x = x.const_data_ptr<float>();
    p.mask = mask_ptr(mask);
    p.n = x.numel();
    p.out = out.mutable_data_ptr<float>();
    p.count = &count;
    cpu::masked_whiten(p);
    return count;
  }
  const at::Tensor valid = mask.to(at::kBool).view(x.sizes());
  const at::Tensor count = valid.sum();
  const at::Tensor n = count.to(at::kDouble);
  const at::Tensor x64 = x.to(at::kDouble);
  const at::Tensor zero = at::zeros({}, x64.options());
  const at::Tensor mean = at::where(valid, x64, zero).sum() / n.clamp_min(1);
  const at::Tensor centered = at::where(valid, x64 - mean, zero);
  const at::Tensor var = centered.square().sum() / (n - 1).clamp_min(1);
  out.copy_(centered * (var + 1e-8).rsqrt());
  return count.item<int64_t>();
}

}  // namespace fastrlhf
