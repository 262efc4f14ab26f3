// SIMD helpers shared by the CPU kernels: two-vector loads and stores of a row as fp32 vectors (fp32
// directly, bf16 / fp16 through at::vec's conversions: a 16-bit vector converts into two fp32 vectors),
// the step they move in, a prefetch of a step ahead, and horizontal reductions.
// Compiled once per CPU capability, like the kernel files that include it.
#pragma once

#include <cstdint>

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

// a, b (one step of kStep elements) with every lane whose byte in mask[0, kStep) is 0 set to 0, NaN and
// inf there included: a bool mask applied in registers, so the kernels need no second pass over their
// stored output to mask it.
inline void zero_where_dropped(const uint8_t* mask, Vec& a, Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask));
  const __mmask32 keep = _mm256_test_epi8_mask(bytes, bytes);
  a = _mm512_maskz_mov_ps(static_cast<__mmask16>(keep), a);
  b = _mm512_maskz_mov_ps(static_cast<__mmask16>(keep >> 16), b);
#elif defined(CPU_CAPABILITY_AVX2)
  // 0xFF per dropped byte, sign-extended to an all-ones lane: the bits that and-not clears.
  const __m128i dropped = _mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mask)), _mm_setzero_si128());
  a = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cvtepi8_epi32(dropped)), a);
  b = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(dropped, 8))), b);
#else
  alignas(64) float lanes[kStep];
  store2(lanes, a, b);
  for (int64_t j = 0; j < kStep; ++j) lanes[j] = mask[j] != 0 ? lanes[j] : 0.0f;
  load2(lanes, a, b);
#endif
}

// The number of nonzero bytes in mask[0, n): the positions a mask keeps. One test and a popcount per
// 64 (AVX-512) or 32 (AVX2) bytes. The compiler vectorised the plain loop by widening every byte to a
// 64-bit lane: KL's token-mean over 131k masked tokens took 52-54 µs on one Intel Xeon thread with it,
// 45 µs with this (the per-token kernel, which counts nothing: 42-44 µs).
inline int64_t count_kept(const uint8_t* mask, int64_t n) {
  int64_t kept = 0;
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; j + 64 <= n; j += 64) {
    const __m512i bytes = _mm512_loadu_si512(mask + j);
    kept += _mm_popcnt_u64(_mm512_test_epi8_mask(bytes, bytes));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  for (; j + 32 <= n; j += 32) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + j));
    const auto dropped = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_setzero_si256())));
    kept += 32 - _mm_popcnt_u32(dropped);
  }
#endif
  for (; j < n; ++j) kept += mask[j] != 0;
  return kept;
}

// Asks for the cache lines of the SIMD step (kStep elements of T) that starts `ahead` elements after p,
// before it is used. The blocked two-pass kernels call it on the next block while they compute on the
// current one from L1, so that memory keeps streaming during the compute pass: without it the
// hardware prefetcher stops at the block's end and the passes alternate between memory-bound and
// compute-bound. The lines go to L2 (prefetcht1), not L1: a prefetch to L1 holds one of the core's
// few L1 fill buffers until its line arrives, which capped a thread's stream at the number of those
// buffers; L2's queue is about three times deeper. (Intel Xeon, AVX-512, gather forward N=8192,
// V=32000: 50-55 -> 43 ms, one read of the logits 33 ms.) The next block is read from L2 then,
// which is fast enough for its max pass. A prefetch never faults, so addresses past the end of a
// row or tensor are harmless; the address is formed as an integer, never as an out-of-range pointer.
template <class T>
inline void prefetch_step(const T* p, int64_t ahead) {
  constexpr uintptr_t kLine = 64;
  constexpr uintptr_t kBytes = kStep * sizeof(T);
  const uintptr_t start = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead) * sizeof(T);
  for (uintptr_t offset = 0; offset < kBytes; offset += kLine) {
    __builtin_prefetch(reinterpret_cast<const void*>(start + offset), 0, 2);  // 2: prefetcht1
  }
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
