// Shared by the CPU (g++) and CUDA (nvcc) builds: no torch header may be included from csrc/common.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VAE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inline: the formulas are small, and called out of line on SIMD vectors they would pass
// every vector through memory (g++ declines to inline the larger ones on its own).
#define VAE_HD inline __attribute__((always_inline))
#else
#define VAE_HD inline
#endif

// The same for a lambda (`[&](...) VAE_ALWAYS_INLINE { ... }`), a kernel's loop body, which g++
// otherwise may call out of line as the translation unit grows.
#if defined(__GNUC__) && !defined(__CUDACC__)
#define VAE_ALWAYS_INLINE __attribute__((always_inline))
#else
#define VAE_ALWAYS_INLINE
#endif
