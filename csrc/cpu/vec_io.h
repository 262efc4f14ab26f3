// Two-vector loads and stores of a row as fp32 SIMD vectors, shared by the CPU kernels: fp32 directly,
// bf16 / fp16 through at::vec's conversions (a 16-bit vector converts into two fp32 vectors).
// Compiled once per CPU capability, like the kernel files that include it.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {
namespace vec_io {

using Vec = at::vec::Vectorized<float>;

// 2 * Vec::size() elements from p (unaligned) into a, b.
inline void load2(const float* p, Vec& a, Vec& b) {
  a = Vec::loadu(p);
  b = Vec::loadu(p + Vec::size());
}
template <class T>
inline void load2(const T* p, Vec& a, Vec& b) {
  at::vec::load_to_float<T>(p, a, b);
}

// a, b to 2 * Vec::size() elements at p (unaligned), rounded to T.
inline void store2(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + Vec::size());
}
template <class T>
inline void store2(T* p, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}

}  // namespace vec_io
}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
