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

// The layout reparameterize computes in: mu's channels_last (or channels_last_3d) when mu has it (a
// conv encoder's output; z, each z[k], eps and the gradients then have it too, as
// mu + std * torch.randn_like(mu) would), contiguous otherwise. vae_ext/_ops.py's fake kernels
// mirror it.
at::MemoryFormat reparam_format(const Tensor& mu);
// {C, product of the spatial sizes} for a channels_last format, {0, 0} for contiguous.
std::pair<int64_t, int64_t> reparam_channels_spatial(const Tensor& mu, at::MemoryFormat fmt);
// An uninitialized z-like tensor: mu's shape, with a leading samples dimension when num_samples > 0,
// each sample in `fmt`.
Tensor reparam_empty(const Tensor& mu, at::MemoryFormat fmt, int64_t num_samples);
// t (z-shaped) in that layout: t itself when it has it, else a copy.
Tensor reparam_in_layout(const Tensor& t, const Tensor& mu, at::MemoryFormat fmt, int64_t num_samples);

void check_reparam_inputs(const Tensor& mu, const Tensor& logvar, int64_t num_samples);
void check_reparam_backward_inputs(const Tensor& grad_z, const Tensor& logvar, const Tensor& rng_state,
                                   int64_t num_samples);

// The elbo_loss inputs, checked (shapes, dtypes, devices: ValueError/TypeError naming the
// argument) and laid out as the kernels read them (a flat (N, D) view of recon_x and x, each
// sample one block of memory), with the gradient buffers the kernels write (empty when not
// wanted). Shared by the CPU and CUDA ops.
struct ElboBuffers {
  Tensor recon, x, mu, logvar;
  Tensor g_recon, g_mu, g_logvar;
  int64_t n, d, l;
};
ElboBuffers prepare_elbo(const Tensor& recon, const Tensor& x, const Tensor& mu, const Tensor& logvar,
                         bool grad_recon, bool grad_latent);

// float32 for half types, the input dtype otherwise.
at::ScalarType loss_dtype(at::ScalarType t);

[[noreturn]] void throw_bce_out_of_range();
[[noreturn]] void throw_bce_target_out_of_range();

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
