// What the backends' ops (cpu/ops_cpu.cpp, cuda/ops_cuda.cpp) and their autograd (autograd.cpp)
// share: the ops' outputs, the argument checks and layouts, and the backward's in-place scaling
// that each backend provides.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "layout.h"

namespace vae_ext {

using ElboOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using ReparamOutputs = std::tuple<Tensor, Tensor, Tensor>;

// g[r, :] *= s[r] in place, computed in float32 and rounded once: g a dense float16/bfloat16 CPU
// tensor whose samples (first dimension) are blocks of memory (contiguous or channels_last), s
// float32 of one value per sample. The backward's per-sample scaling of a half recon gradient.
void scale_rows_cpu(const Tensor& g, const Tensor& s);

#if defined(VAE_EXT_WITH_CUDA)
// g[i] *= s[i] in place for each pair, in one launch: each g contiguous on one CUDA device, all of
// one dtype, each s one element on that device in loss_dtype(g's dtype) (float32 for half g:
// computed in float32, rounded once); a kernel reads s[i] and leaves g[i]
// untouched when it is 1 (no host sync, so it can be captured in a CUDA graph). At most 3 pairs.
void scale_unless_one_cuda(const std::vector<Tensor>& g, const std::vector<Tensor>& s);
#endif

}  // namespace vae_ext
