// Torch-facing helpers shared by ops.cpp (schemas, CPU) and cuda/ops_cuda.cpp (CUDA): argument
// checks and the small pieces of glue that both backends use the same way.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/elbo_math.h"

namespace vae_ext {

using at::Tensor;
using ElboOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using ReparamOutputs = std::tuple<Tensor, Tensor, Tensor>;

Recon parse_recon(c10::string_view s);
Reduction parse_reduction(c10::string_view s);

// Checks shapes, dtypes and devices of the elbo_loss inputs (ValueError/TypeError naming the
// argument); returns {n, d, l}.
std::tuple<int64_t, int64_t, int64_t> check_elbo_inputs(const Tensor& recon, const Tensor& x, const Tensor& mu,
                                                       const Tensor& logvar);
void check_reparam_inputs(const Tensor& mu, const Tensor& logvar, int64_t num_samples);
void check_reparam_backward_inputs(const Tensor& grad_z, const Tensor& logvar, const Tensor& rng_state,
                                   int64_t num_samples);

// The memory format the kernels read recon_x and x in (their flat (N, D) view): channels_last
// (or channels_last_3d) when recon_x already has it, so a conv decoder's output is not copied and
// its gradient comes back in the same layout; contiguous otherwise. Each sample is one block of
// memory in both.
at::MemoryFormat flat_format(const Tensor& recon);

// float32 for half types, the input dtype otherwise.
at::ScalarType loss_dtype(at::ScalarType t);

[[noreturn]] void throw_bce_out_of_range();

#if defined(VAE_EXT_WITH_CUDA)
// g *= s in place, g contiguous on a CUDA device and s one element on the same device; a kernel
// reads s and leaves g untouched when it is 1 (no host sync, so it can be captured in a CUDA graph).
void scale_unless_one_cuda(const Tensor& g, const Tensor& s);
#endif

}  // namespace vae_ext
