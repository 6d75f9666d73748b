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
#define VAE_EXT_ELBO_ARGS                                                                                    \
  const Tensor &recon, const Tensor &x, const Tensor &mu, const Tensor &logvar, c10::string_view recon_mode, \
      c10::string_view reduction, bool grad_recon, bool grad_latent, bool validate, bool total,              \
      const c10::optional<Tensor>&prior_mu, const c10::optional<Tensor>&prior_logvar,                        \
      const c10::optional<Tensor>&recon_logvar, double free_bits, bool unit_kl
using ReparamOutputs = std::tuple<Tensor, Tensor, Tensor>;

// The kernel arguments that both backends' structs (cpu::ElboArgs, cuda::ElboLaunch) share, from
// the prepared buffers (a gradient pointer only where its buffer is non-empty). g_recon_logvar: the
// recon log-variance's gradient buffer the kernel writes (b's per element, or a backend's own for
// a 0-d one).
template <class Args>
void fill_elbo_args(Args& a, const ElboBuffers& b, Recon mode, Reduction red, bool grad_recon, bool grad_latent,
                    const Tensor& g_recon_logvar) {
  const auto in = [](const Tensor& t) -> const void* { return t.defined() ? t.const_data_ptr() : nullptr; };
  const auto out = [](const Tensor& t, bool wanted) -> void* {
    return wanted && t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr;
  };
  a.dtype = kernel_dtype(b.recon.scalar_type());
  a.mode = mode;
  a.recon = in(b.recon);
  a.x = in(b.x);
  a.grad_recon = out(b.g_recon, grad_recon);
  a.recon_logvar = in(b.recon_logvar);
  a.rlv_scalar = b.rlv_scalar;
  a.grad_recon_logvar = out(g_recon_logvar, true);
  a.mu = in(b.mu);
  a.logvar = in(b.logvar);
  a.grad_mu = out(b.g_mu, grad_latent);
  a.grad_logvar = out(b.g_logvar, grad_latent);
  a.prior_mu = in(b.prior_mu);
  a.prior_logvar = in(b.prior_logvar);
  a.prior_shared = b.prior_shared;
  a.grad_prior_mu = out(b.g_prior_mu, true);
  a.grad_prior_logvar = out(b.g_prior_logvar, true);
  a.kl_elems = out(b.kl_elems, true);
  a.n = b.n;
  a.d = b.d;
  a.l = b.l;
  a.grad_scale = (red == Reduction::Mean && b.n > 0) ? 1.0 / static_cast<double>(b.n) : 1.0;
}

// The sums of g (N, ...) over its first dimension, shape g.shape[1:], in double: on CPU each in a
// fixed order (the same for any thread count). For the KL per unit and a broadcast prior's gradient.
Tensor sum_over_batch(const Tensor& g);
Tensor sum_over_batch_cpu(const Tensor& g);

// The sum of every element of t, 0-d, in double: on CPU in index order, whatever the thread count.
Tensor sum_all(const Tensor& t);
// g (N, ...) summed to `shape` (which broadcasts to g's), in double: on CPU over the batch by
// sum_over_batch, then each output's elements in index order. A broadcast prior's gradient.
Tensor sum_to_shape(const Tensor& g, c10::SymIntArrayRef shape);
Tensor sum_to_shape_cpu(const Tensor& g, at::IntArrayRef shape);

// From each latent element's KL (kl_elems, (n, l)): each unit's KL averaged over the batch, in
// double, shape `unit_shape` (mu.shape[1:]). With free_bits > 0, also the KL term that floors each
// unit at free_bits nats (sum_u max(free_bits, KL_u), times n for reduction sum: a 0-d double tensor
// to *floored) and the gradients in `grads` ((n, l) each, or empty) of the units under the floor
// zeroed in place.
Tensor unit_kl_and_free_bits(const Tensor& kl_elems, at::IntArrayRef unit_shape, double free_bits, Reduction red,
                             const std::vector<Tensor>& grads, Tensor* floored);

#if defined(VAE_EXT_WITH_CUDA)
// g[i] *= s[i] in place for each pair, in one launch per dtype of g (up to 6 pairs each): each g
// contiguous on one CUDA device, each s one element on that device in loss_dtype(g's dtype)
// (float32 for half g: computed in float32, rounded once); a kernel reads s[i] and leaves g[i]
// untouched when it is 1 (no host sync, so it can be captured in a CUDA graph).
void scale_unless_one_cuda(const std::vector<Tensor>& g, const std::vector<Tensor>& s);
#endif

}  // namespace vae_ext
