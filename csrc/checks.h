// The ops' argument checks, shared by the CPU (cpu/ops_cpu.cpp) and CUDA (cuda/ops_cuda.cpp) ops:
// the single source of the tensors' dtype, shape and device checks. A bad argument raises
// ValueError or TypeError naming it and what was expected.
#pragma once

#include <ATen/ATen.h>

#include "common/dtype.h"
#include "common/elbo_math.h"

namespace vae_ext {

using at::Tensor;

Recon parse_recon(c10::string_view s);
Reduction parse_reduction(c10::string_view s);

// The kernels' DType of a float32/float64/float16/bfloat16 scalar type (TypeError for another).
DType kernel_dtype(at::ScalarType st);

// float32 for half types, the input dtype otherwise.
at::ScalarType loss_dtype(at::ScalarType t);

// The dtype of the gradient buffers elbo_loss's forward writes for inputs of dtype t on `device`:
// the input's own for the half types on the CPU, loss_dtype(t) otherwise (docs/design.md, "Half
// precision"). A broadcast prior's, summed in the backward, are loss_dtype(t) everywhere.
at::ScalarType grad_buffer_dtype(at::ScalarType t, const at::Device& device);

// The elbo_loss inputs, checked (shapes, dtypes, devices, options: ValueError/TypeError naming the
// argument) and laid out as the kernels read them (a flat (N, D) view of recon_x and x, each sample
// one block of memory; latents (N, L) contiguous, L the product of mu.shape[1:]), with the gradient
// buffers the kernels write (empty when not wanted).
struct ElboOptions {
  c10::optional<Tensor> prior_mu, prior_logvar, recon_logvar;
  double free_bits = 0.0;
  bool unit_kl = false;  // the per-unit KL (free bits need it too)
  // The buffers of options not given (prior, per-element KL, recon log-variance) left undefined
  // instead of empty: for a caller that returns none of them (csrc/elbo_basic.cpp).
  bool lean = false;
};
struct ElboBuffers {
  Tensor recon, x, mu, logvar;
  Tensor prior_mu, prior_logvar;  // undefined (no prior), (n, l) per sample, or (l) when prior_shared
  bool prior_shared = false;
  Tensor recon_logvar;  // undefined, recon's layout per element, or 0-d (rlv_scalar)
  bool rlv_scalar = false;
  // g_prior_*: per element, mu's shape, the loss dtype (the backward sums a broadcast prior's);
  // g_recon_logvar: per element like g_recon (empty for a 0-d recon_logvar: the op makes it);
  // kl_elems: (n, l) in the loss dtype, each element's KL, when the per-unit KL is wanted.
  Tensor g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar, kl_elems;
  int64_t n, d, l;
};
ElboBuffers prepare_elbo(const Tensor& recon, const Tensor& x, const Tensor& mu, const Tensor& logvar,
                         const ElboOptions& opt, Recon mode, Reduction red, bool grad_recon, bool grad_latent);

void check_reparam_inputs(const Tensor& mu, const Tensor& logvar, int64_t num_samples);
// num_samples: 0 (none) or the draws per element of mu, as many as one tensor can hold.
void check_num_samples(int64_t num_samples, const Tensor& mu);
void check_reparam_backward_inputs(const Tensor& grad_z, const Tensor& logvar, const Tensor& rng_state,
                                   int64_t num_samples);

// The errors of recon="bce" values that the kernels find outside [0, 1].
[[noreturn]] void throw_bce_out_of_range();
[[noreturn]] void throw_bce_target_out_of_range();

}  // namespace vae_ext
