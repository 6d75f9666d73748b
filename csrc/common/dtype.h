// The floating dtypes the kernels take, and the switch from one to its C++ storage type. Shared by
// the CPU (g++) and CUDA (nvcc) builds, so no torch header: each backend names its own 16-bit
// storage types (c10::Half and c10::BFloat16 on the CPU, __half and __nv_bfloat16 in the .cu
// files). The conversion from at::ScalarType is csrc/checks.h's kernel_dtype.
#pragma once

namespace vae_ext {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Calls fn(tag), tag a null pointer of dt's storage type: float, double, Half or BFloat16.
template <class Half, class BFloat16, class F>
inline void dispatch_dtype(DType dt, F&& fn) {
  switch (dt) {
    case DType::Float32: fn(static_cast<float*>(nullptr)); break;
    case DType::Float64: fn(static_cast<double*>(nullptr)); break;
    case DType::Float16: fn(static_cast<Half*>(nullptr)); break;
    case DType::BFloat16: fn(static_cast<BFloat16*>(nullptr)); break;
  }
}

}  // namespace vae_ext
