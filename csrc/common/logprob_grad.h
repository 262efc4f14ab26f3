// Per-element backward of gather_logprobs, shared by the CPU and CUDA kernels.
//
// With p = softmax(z), z = x / T, logprob = log p[label] and H = -sum p log p:
//   dL/dx_j = (1/T) * ( g (1[j == label] - p_j) - h p_j (log p_j + H) )
// Regrouped per row so the per-element work is one exp and two FMAs:
//   dL/dx_j = p_j (c0 + c1 log p_j) + 1[j == label] * label_coef
//   c0 = -(g + h H) / T,   c1 = -h / T,   label_coef = g / T
// Plain C++17, no torch headers: nvcc compiles it standalone.
#pragma once

#include "common/macros.h"
#include "common/online_softmax.h"

namespace fastrlhf {

struct GradCoeffs {
  float c0;
  float c1;
  float label_coef;
};

// g: grad of the row's logprob; h: grad of its entropy (0 when absent); entropy: the saved H.
FASTRLHF_HD GradCoeffs grad_coeffs(float g, float h, float entropy, float inv_temperature) {
  return {-inv_temperature * (g + h * entropy), -inv_temperature * h, inv_temperature * g};
}

// Gradient w.r.t. x_j without the label term, from t_j = shifted_logit(x_j) (= z_j - m) and the
// row's log_s: log p_j = t_j - log_s. log p is clamped at kLogFloor: where p underflows to 0 the
// term is exactly 0 (never 0 * -inf), and a -inf logit gets gradient 0. T is float or a SIMD vector
// of floats.
template <class Math, class T>
FASTRLHF_HD T grad_element(const T& t, const T& log_s, const T& c0, const T& c1) {
  const T logp = Math::max(t - log_s, T(kLogFloor));
  const T p = Math::exp(logp);
  return p * (c0 + c1 * logp);
}

}  // namespace fastrlhf
