// Portability macros for code shared by the C++ CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
// Device helpers are tiny and sit in hot loops: always inline them.
#define FASTRLHF_HD __host__ __device__ __forceinline__
#else
#define FASTRLHF_HD inline
#endif

// Unroll hint for short fixed-trip loops; host compilers unroll those by themselves at -O3.
#if defined(__CUDA_ARCH__)  // device pass only: the host compiler would warn about the pragma
#define FASTRLHF_UNROLL _Pragma("unroll")
#else
#define FASTRLHF_UNROLL
#endif
