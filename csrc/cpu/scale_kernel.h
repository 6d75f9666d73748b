// The backward's last step for a half input's gradient: the float32 buffer the forward wrote, times
// the incoming gradient, rounded once to the half type, in one pass. (ATen's mul_out into a half
// tensor computes a float32 temporary on CPU and then converts it: two passes and a tensor.)
#pragma once
#include "capability.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels.h"
#include "scale_kernels.h"
#include "vec_io.h"

namespace vae_ext::cpu::CPU_CAPABILITY {

template <typename half_t>
void scale_round_typed(const ScaleRoundArgs& a) {
  using V = Vectorized<float>;
  using IO = VecIO<half_t>;
  auto* out = static_cast<half_t*>(a.out);
  const int64_t len = a.row_len, total = a.rows * a.row_len;
  if (total == 0) return;
  at::parallel_for(0, total, kGrainElems, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e;) {
      const int64_t r = i / len, end = std::min(e, (r + 1) * len);
      const V s(a.scale[a.per_row ? r : 0]);
      int64_t j = i;
      // two float vectors make one vector of the half type: a full store (a partial one goes by
      // way of a buffer)
      for (; j + 2 * V::size() <= end; j += 2 * V::size())
        at::vec::convert_from_float<half_t>(V::loadu(a.g + j) * s, V::loadu(a.g + j + V::size()) * s).store(out + j);
      for (; j < end; j += V::size()) {
        const int64_t k = std::min<int64_t>(V::size(), end - j);
        IO::store(out + j, V::loadu(a.g + j, k) * s, k);
      }
      i = end;
    }
  });
}

inline void scale_round_kernel(const ScaleRoundArgs& a) {
  if (a.dtype == DType::BFloat16)
    scale_round_typed<c10::BFloat16>(a);
  else
    scale_round_typed<c10::Half>(a);
}

// This capability's table (scale_kernels() in csrc/scale_round.cpp picks the CPU's).
const ScaleKernelTable& scale_kernel_table() {
  static const ScaleKernelTable table{&scale_round_kernel};
  return table;
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
