// An op input as the contiguous dtype and shape its kernel reads, without a dispatcher call when it
// already is one.
//
// `t.to(dtype)` and `t.reshape(shape)` go through the dispatcher even when they return `t` or a view of
// it: each is a few hundred nanoseconds and, for reshape, a fresh TensorImpl. On the ops' smallest calls
// (a few tokens) those calls were most of the op's own cost, so the ops convert through these helpers.
#pragma once

#include <ATen/ATen.h>

namespace fastrlhf {

// `t` as a contiguous tensor of `dtype`: `t` itself when it is one already.
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t.contiguous() : t.to(dtype).contiguous();
}

// A contiguous tensor's values in one dimension: `t` itself when it is 1-D.
inline at::Tensor flat(const at::Tensor& t) { return t.dim() == 1 ? t : t.reshape({-1}); }

// `t` with the rows of its last dimension: `t` itself when it is 2-D.
inline at::Tensor matrix_of_rows(const at::Tensor& t) { return t.dim() == 2 ? t : t.reshape({-1, t.size(-1)}); }

}  // namespace fastrlhf
