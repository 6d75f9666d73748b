// What the backends' ops (cpu/ops_cpu.cpp, cuda/ops_cuda.cpp) and their autograd (autograd.cpp)
// share: the ops' outputs, the argument checks and layouts, and the backward's in-place scaling
// that each backend provides.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include <c10/util/Optional.h>

#include "checks.h"
#include "layout.h"

namespace vae_ext {

// (rec, kl, unit_kl, g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar): the
// schema's outputs (csrc/ops.cpp).
using ElboOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
// The signature of the elbo_loss op's kernels, after the schema.
#define VAE_EXT_ELBO_ARGS                                                                                          \
  const Tensor &recon, const Tensor &x, const Tensor &mu, const Tensor &logvar, c10::string_view recon_mode,      \
      c10::string_view reduction, bool grad_recon, bool grad_latent, bool validate, bool total,                   \
      const c10::optional<Tensor>&prior_mu, const c10::optional<Tensor>&prior_logvar,                            \
      const c10::optional<Tensor>&recon_logvar, double free_bits, bool unit_kl
using ReparamOutputs = std::tuple<Tensor, Tensor, Tensor>;

// g[r, :] *= s[r] in place, computed in float32 and rounded once: g a dense float16/bfloat16 CPU
// tensor whose samples (first dimension) are blocks of memory (contiguous or channels_last), s
// float32 of one value per sample. The backward's per-sample scaling of a half recon gradient.
void scale_rows_cpu(const Tensor& g, const Tensor& s);

// The sums of g (N, ...) over its first dimension, shape g.shape[1:], in double: on CPU each in a
// fixed order (the same for any thread count). For the KL per unit and a broadcast prior's gradient.
Tensor sum_over_batch(const Tensor& g);
Tensor sum_over_batch_cpu(const Tensor& g);

// From each latent element's KL (kl_elems, (n, l)): each unit's KL averaged over the batch, in
// double, shape `unit_shape` (mu.shape[1:]). With free_bits > 0, also the KL term that floors each
// unit at free_bits nats (sum_u max(free_bits, KL_u), times n for reduction sum: a 0-d double tensor
// to *floored) and the gradients in `grads` ((n, l) each, or empty) of the units under the floor
// zeroed in place.
Tensor unit_kl_and_free_bits(const Tensor& kl_elems, at::IntArrayRef unit_shape, double free_bits, Reduction red,
                             const std::vector<Tensor>& grads, Tensor* floored);

#if defined(VAE_EXT_WITH_CUDA)
// g[i] *= s[i] in place for each pair, in one launch: each g contiguous on one CUDA device, all of
// one dtype, each s one element on that device in loss_dtype(g's dtype) (float32 for half g:
// computed in float32, rounded once); a kernel reads s[i] and leaves g[i]
// untouched when it is 1 (no host sync, so it can be captured in a CUDA graph). At most 3 pairs.
void scale_unless_one_cuda(const std::vector<Tensor>& g, const std::vector<Tensor>& s);
#endif

}  // namespace vae_ext
