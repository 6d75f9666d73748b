// Shared by the CPU (g++) and CUDA (nvcc) builds: no torch header may be included from csrc/common.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VAE_HD __host__ __device__ __forceinline__
#else
#define VAE_HD inline
#endif
