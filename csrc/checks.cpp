#include "checks.h"

#include <algorithm>
#include <tuple>

#include "layout.h"

namespace vae_ext {

Recon parse_recon(c10::string_view s) {
  if (s == "bce") return Recon::BCE;
  if (s == "bce_logits") return Recon::BCELogits;
  if (s == "mse") return Recon::MSE;
  TORCH_CHECK_VALUE(false, "recon: expected 'bce', 'bce_logits' or 'mse', got '", s, "'");
}

Reduction parse_reduction(c10::string_view s) {
  if (s == "sum") return Reduction::Sum;
  if (s == "mean") return Reduction::Mean;
  if (s == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction: expected 'sum', 'mean' or 'none', got '", s, "'");
}

DType kernel_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", st);
  }
}

at::ScalarType loss_dtype(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t; }

static void check_float(const char* name, const Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
                   ": expected a float32, float64, float16 or bfloat16 tensor, got ", st);
}

static void check_like(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": expected the same dtype as ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected the same device as ", ref_name, " (", ref.device(),
                    "), got ", t.device());
}

// Shapes, dtypes and devices of the elbo_loss inputs; returns {n, d, l}.
static std::tuple<int64_t, int64_t, int64_t> check_elbo_inputs(const Tensor& recon, const Tensor& x, const Tensor& mu,
                                                               const Tensor& logvar) {
  check_float("recon_x", recon);
  check_like("x", x, "recon_x", recon);
  check_like("mu", mu, "recon_x", recon);
  check_like("logvar", logvar, "recon_x", recon);
  TORCH_CHECK_VALUE(recon.dim() >= 1, "recon_x: expected a tensor of shape (N, ...), got a 0-d tensor");
  TORCH_CHECK_VALUE(x.sizes() == recon.sizes(), "x: expected the shape of recon_x ", recon.sizes(), ", got ",
                    x.sizes());
  TORCH_CHECK_VALUE(mu.dim() == 2, "mu: expected shape (N, L), got ", mu.sizes());
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "logvar: expected the shape of mu ", mu.sizes(), ", got ",
                    logvar.sizes());
  const int64_t n = recon.size(0);
  TORCH_CHECK_VALUE(mu.size(0) == n, "mu: expected batch size ", n, " (recon_x.shape[0]), got ", mu.size(0));
  int64_t d = 1;
  for (int64_t i = 1; i < recon.dim(); ++i) d *= recon.size(i);
  return {n, d, mu.size(1)};
}

ElboBuffers prepare_elbo(const Tensor& recon, const Tensor& x, const Tensor& mu, const Tensor& logvar, bool grad_recon,
                         bool grad_latent) {
  const auto [n, d, l] = check_elbo_inputs(recon, x, mu, logvar);
  const auto fmt = kernel_format(recon);
  ElboBuffers b{recon.contiguous(fmt), x.contiguous(fmt), mu.contiguous(), logvar.contiguous(), {}, {}, {}, n, d, l};
  b.g_recon = grad_recon ? at::empty_like(b.recon, fmt) : at::empty({0}, b.recon.options());
  // The latent gradients in the loss dtype (float32 for half inputs) until the backward has scaled
  // them (csrc/autograd.cpp): 0.5 (exp(logvar) - 1) leaves float16's range at logvar > 11.8, and
  // beta = 0 must still give 0. They are N x L, small beside recon's.
  const auto lopts = b.mu.options().dtype(loss_dtype(mu.scalar_type()));
  b.g_mu = grad_latent ? at::empty(b.mu.sizes(), lopts) : at::empty({0}, lopts);
  b.g_logvar = grad_latent ? at::empty(b.logvar.sizes(), lopts) : at::empty({0}, lopts);
  return b;
}

void check_reparam_inputs(const Tensor& mu, const Tensor& logvar, int64_t num_samples) {
  check_float("mu", mu);
  check_like("logvar", logvar, "mu", mu);
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "logvar: expected the shape of mu ", mu.sizes(), ", got ",
                    logvar.sizes());
  TORCH_CHECK_VALUE(num_samples >= 0, "num_samples: expected None or an int >= 1, got ", num_samples);
}

void check_reparam_backward_inputs(const Tensor& grad_z, const Tensor& logvar, const Tensor& rng_state,
                                   int64_t num_samples) {
  check_like("grad_z", grad_z, "logvar", logvar);
  TORCH_CHECK_VALUE(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2,
                    "rng_state: expected the int64 (seed, offset) tensor returned by reparameterize");
  const int64_t k = std::max<int64_t>(num_samples, 1);
  TORCH_CHECK_VALUE(grad_z.numel() == k * logvar.numel(), "grad_z: expected ", k * logvar.numel(),
                    " elements (num_samples x logvar), got ", grad_z.numel());
}

void throw_bce_out_of_range() {
  TORCH_CHECK_VALUE(false,
                    "recon_x: recon='bce' expects probabilities in [0, 1], but found a value outside it; "
                    "pass the decoder's logits with recon='bce_logits' instead");
}

void throw_bce_target_out_of_range() {
  TORCH_CHECK_VALUE(false,
                    "x: recon='bce' expects targets in [0, 1], but found a value outside it (as "
                    "binary_cross_entropy does); scale the data into [0, 1] (e.g. pixels / 255)");
}

}  // namespace vae_ext
