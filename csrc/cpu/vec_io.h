// SIMD helpers shared by the CPU kernels: two-vector loads and stores of a row as fp32 vectors (fp32
// directly, bf16 / fp16 through at::vec's conversions: a 16-bit vector converts into two fp32 vectors),
// the step they move in, and horizontal reductions.
// Compiled once per CPU capability, like the kernel files that include it.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace fastrlhf::cpu {
inline namespace CPU_CAPABILITY {
namespace vec_io {

using Vec = at::vec::Vectorized<float>;

// Elements per SIMD step: two float vectors, the unit in which 16-bit types convert, and two
// independent accumulator chains to hide add latency.
constexpr int64_t kStep = 2 * Vec::size();

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

// Horizontal reductions (Vectorized::reduce_add/reduce_max don't compile for DEFAULT in torch 2.13).
inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}
inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

}  // namespace vec_io
}  // namespace CPU_CAPABILITY
}  // namespace fastrlhf::cpu
