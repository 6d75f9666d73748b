// The interface of the backward's scale-and-round kernel (scale_kernel.h): one table per CPU
// capability, chosen at run time as kernels() chooses the others (csrc/scale_round.cpp).
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace vae_ext {
namespace cpu {

// out[r, j] = g[r, j] * scale[per_row ? r : 0], computed in float32 and rounded once to `dtype`
// (Float16 or BFloat16); g and out dense, rows x row_len in memory order.
struct ScaleRoundArgs {
  DType dtype;
  const float* g;
  void* out;
  int64_t rows, row_len;
  const float* scale;
  bool per_row;
};

struct ScaleKernelTable {
  void (*scale_round)(const ScaleRoundArgs& a);
};

namespace DEFAULT {
const ScaleKernelTable& scale_kernel_table();
}
namespace AVX2 {
const ScaleKernelTable& scale_kernel_table();
}
namespace AVX512 {
const ScaleKernelTable& scale_kernel_table();
}

// The table for this CPU (the capability kernels() uses).
const ScaleKernelTable& scale_kernels();

}  // namespace cpu
}  // namespace vae_ext
