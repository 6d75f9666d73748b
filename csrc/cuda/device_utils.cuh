// Small device helpers shared by the .cu files: storage-type conversion, aligned vectors,
// deterministic block reductions. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace vae_ext {
namespace cuda {

// Storage type -> arithmetic type (float for float/half/bfloat16, double for double) and the
// conversions between them (to the half types: rounded to nearest).
template <typename T>
struct Acc {  // float, double: themselves
  using type = T;
  static __device__ __forceinline__ T to(T v) { return v; }
  static __device__ __forceinline__ T from(T v) { return v; }
};
template <>
struct Acc<__half> {
  using type = float;
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return Acc<T>::to(v);
}
template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return Acc<T>::from(v);
}

// N elements loaded or stored with one 16-byte access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, in a fixed order (so run-to-run deterministic); the result is valid in
// thread 0. blockDim.x must be a multiple of 32. Call it at most once per __syncthreads epoch.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T shared[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = (threadIdx.x < warps) ? shared[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

inline unsigned blocks_for(int64_t work, int threads, int64_t max_blocks = 65535LL * 8) {
  int64_t b = (work + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b < max_blocks ? b : max_blocks);
}

}  // namespace cuda
}  // namespace vae_ext
