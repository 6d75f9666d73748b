#include "checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "grad_block.h"
#include "layout.h"

namespace vae_ext {

Recon parse_recon(c10::string_view s) {
  if (s == "bce") return Recon::BCE;
  if (s == "bce_logits") return Recon::BCELogits;
  if (s == "mse") return Recon::MSE;
  if (s == "l1") return Recon::L1;
  if (s == "gaussian") return Recon::Gaussian;
  TORCH_CHECK_VALUE(false, "recon: expected 'bce', 'bce_logits', 'mse', 'l1' or 'gaussian', got '", s, "'");
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

at::ScalarType grad_buffer_dtype(at::ScalarType t, const at::Device& device) {
  return (t == at::kBFloat16 || t == at::kHalf) && device.is_cpu() ? t : loss_dtype(t);
}

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
  TORCH_CHECK_VALUE(mu.dim() >= 1, "mu: expected a tensor of shape (N, ...), got a 0-d tensor");
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "logvar: expected the shape of mu ", mu.sizes(), ", got ",
                    logvar.sizes());
  const int64_t n = recon.size(0);
  TORCH_CHECK_VALUE(mu.size(0) == n, "mu: expected batch size ", n, " (recon_x.shape[0]), got ", mu.size(0));
  int64_t d = 1, l = 1;
  for (int64_t i = 1; i < recon.dim(); ++i) d *= recon.size(i);
  for (int64_t i = 1; i < mu.dim(); ++i) l *= mu.size(i);
  return {n, d, l};
}

// A prior tensor: mu's dtype and device, a shape that broadcasts to mu's.
static void check_prior(const char* name, const Tensor& p, const Tensor& mu) {
  check_like(name, p, "mu", mu);
  TORCH_CHECK_VALUE(p.dim() <= mu.dim() && at::is_expandable_to(p.sizes(), mu.sizes()), name,
                    ": expected a shape that broadcasts to mu's ", mu.sizes(), " (mu's own, or one like ",
                    "mu.shape[1:] shared by every sample), got ", p.sizes());
}

// A prior that is the same for every sample: it has no batch dimension, or one of size 1.
static bool shared_prior(const Tensor& p, const Tensor& mu) {
  return p.dim() < mu.dim() || (p.size(0) == 1 && mu.size(0) != 1);
}

static void check_options(const Tensor& recon, const Tensor& mu, const ElboOptions& opt, Recon mode, Reduction red) {
  TORCH_CHECK_VALUE(opt.prior_mu.has_value() == opt.prior_logvar.has_value(),
                    opt.prior_mu.has_value() ? "prior_logvar" : "prior_mu",
                    ": expected a tensor, as prior_mu and prior_logvar go together (both or neither)");
  if (opt.prior_mu.has_value()) {
    check_prior("prior_mu", *opt.prior_mu, mu);
    check_prior("prior_logvar", *opt.prior_logvar, mu);
  }
  TORCH_CHECK_VALUE(opt.free_bits >= 0.0 && std::isfinite(opt.free_bits),
                    "free_bits: expected a finite float >= 0 (nats per latent unit), got ", opt.free_bits);
  TORCH_CHECK_VALUE(opt.free_bits == 0.0 || red != Reduction::None,
                    "free_bits: the floor applies to each unit's KL averaged over the batch, so it needs "
                    "reduction 'sum' or 'mean', not 'none'");
  if (mode != Recon::Gaussian) {
    TORCH_CHECK_VALUE(!opt.recon_logvar.has_value(),
                      "recon_logvar: only recon='gaussian' takes a log-variance; drop it or use recon='gaussian'");
    return;
  }
  TORCH_CHECK_VALUE(opt.recon_logvar.has_value(),
                    "recon_logvar: recon='gaussian' needs the decoder's log-variance, a 0-d tensor or one of "
                    "recon_x's shape");
  const Tensor& rlv = *opt.recon_logvar;
  check_like("recon_logvar", rlv, "recon_x", recon);
  TORCH_CHECK_VALUE(rlv.dim() == 0 || rlv.sizes() == recon.sizes(),
                    "recon_logvar: expected a 0-d tensor (one learned log-variance) or the shape of recon_x ",
                    recon.sizes(), ", got ", rlv.sizes());
}

ElboBuffers prepare_elbo(const Tensor& recon, const Tensor& x, const Tensor& mu, const Tensor& logvar,
                         const ElboOptions& opt, Recon mode, Reduction red, bool grad_recon, bool grad_latent) {
  const auto [n, d, l] = check_elbo_inputs(recon, x, mu, logvar);
  check_options(recon, mu, opt, mode, red);
  const auto fmt = kernel_format(recon);
  ElboBuffers b;
  b.n = n;
  b.d = d;
  b.l = l;
  b.recon = recon.contiguous(fmt);
  b.x = x.contiguous(fmt);
  b.mu = mu.contiguous();
  b.logvar = logvar.contiguous();
  // The half types' buffers are in their own dtype on the CPU: half the bytes of float32 to write
  // and read. bfloat16's are scaled by the backward; float16's hold the gradient for an incoming
  // gradient of 1 (what the backward hands on), and any other has the backward compute them again
  // in float32: 0.5 (exp(logvar) - 1) leaves float16's range at logvar > 11.8 (beta = 0 must still
  // give 0), and a recon gradient divided by N (mean) may underflow before a loss scale could
  // rescue it (docs/design.md, "Half precision"; grad_buffer_dtype; csrc/autograd.cpp).
  const auto lopts = b.mu.options().dtype(grad_buffer_dtype(mu.scalar_type(), mu.device()));
  const auto latent_buf = [&](bool wanted) { return wanted ? at::empty(mu.sizes(), lopts) : at::empty({0}, lopts); };
  const auto ropts = b.recon.options().dtype(grad_buffer_dtype(recon.scalar_type(), recon.device()));
  // A per-element log-variance's gradient is recon_x's size and freed with it: one block for the
  // two, as for the latents' below (contiguous ones; csrc/grad_block.h).
  const bool rlv_grad = grad_recon && mode == Recon::Gaussian && opt.recon_logvar->dim() != 0;
  const bool recon_together = rlv_grad && fmt == at::MemoryFormat::Contiguous;
  if (recon_together) {
    auto g = empty_together(b.recon.sizes(), ropts, 2);
    b.g_recon = std::move(g[0]);
    b.g_recon_logvar = std::move(g[1]);
  } else {
    b.g_recon = grad_recon ? advise_huge_pages(at::empty_like(b.recon, ropts, fmt)) : at::empty({0}, ropts);
  }
  const bool prior = opt.prior_mu.has_value();
  // The latent gradients the caller gets as they are and frees together (.grad = None, zero_grad):
  // one block on the CPU (csrc/grad_block.h); a broadcast prior's are summed in the backward and
  // freed there, so they stay blocks of their own.
  const bool prior_whole =
      prior && grad_latent && opt.prior_mu->sizes() == mu.sizes() && opt.prior_logvar->sizes() == mu.sizes();
  if (grad_latent) {
    auto g = empty_together(mu.sizes(), lopts, prior_whole ? 4 : 2);
    b.g_mu = std::move(g[0]);
    b.g_logvar = std::move(g[1]);
    if (prior_whole) {
      b.g_prior_mu = std::move(g[2]);
      b.g_prior_logvar = std::move(g[3]);
    }
  } else {
    b.g_mu = latent_buf(false);
    b.g_logvar = latent_buf(false);
  }
  if (prior) {
    const Tensor &pm = *opt.prior_mu, &pl = *opt.prior_logvar;
    // Both shared: (l) each, read for every row; otherwise both (n, l) (a copy where broadcast).
    b.prior_shared = shared_prior(pm, mu) && shared_prior(pl, mu);
    const auto lay = [&](const Tensor& p) {
      if (!b.prior_shared) return p.sizes() == mu.sizes() ? p.contiguous() : p.expand(mu.sizes()).contiguous();
      const Tensor q = p.dim() == mu.dim() ? p.squeeze(0) : p;  // no batch dimension
      return q.expand(mu.sizes().slice(1)).contiguous();
    };
    b.prior_mu = lay(pm);
    b.prior_logvar = lay(pl);
  }
  if ((!opt.lean || prior) && !prior_whole) {
    // a broadcast prior's, summed over the batch in the backward: in the loss dtype, where a
    // bfloat16 rounding of each term would be amplified by the cancellation of the sum
    const auto popts = b.mu.options().dtype(loss_dtype(mu.scalar_type()));
    const bool wanted = prior && grad_latent;
    b.g_prior_mu = wanted ? advise_huge_pages(at::empty(mu.sizes(), popts)) : at::empty({0}, lopts);
    b.g_prior_logvar = wanted ? advise_huge_pages(at::empty(mu.sizes(), popts)) : at::empty({0}, lopts);
  }
  const bool kl_elems = opt.unit_kl || opt.free_bits > 0.0;
  const auto kopts = b.mu.options().dtype(loss_dtype(mu.scalar_type()));  // each element's KL: summed later
  if (!opt.lean || kl_elems) b.kl_elems = kl_elems ? at::empty({n, l}, kopts) : at::empty({0}, kopts);
  if (mode == Recon::Gaussian) {
    const Tensor& rlv = *opt.recon_logvar;
    b.rlv_scalar = rlv.dim() == 0;
    b.recon_logvar = b.rlv_scalar ? rlv : rlv.contiguous(fmt);
  }
  if (!recon_together && (!opt.lean || mode == Recon::Gaussian))
    b.g_recon_logvar = rlv_grad ? advise_huge_pages(at::empty_like(b.recon, ropts, fmt)) : at::empty({0}, ropts);
  return b;
}

void check_reparam_inputs(const Tensor& mu, const Tensor& logvar, int64_t num_samples) {
  check_float("mu", mu);
  check_like("logvar", logvar, "mu", mu);
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "logvar: expected the shape of mu ", mu.sizes(), ", got ",
                    logvar.sizes());
  check_num_samples(num_samples, mu);
}

void check_num_samples(int64_t num_samples, const Tensor& mu) {
  TORCH_CHECK_VALUE(num_samples >= 0, "num_samples: expected None or an int >= 1, got ", num_samples);
  // z holds num_samples x numel(mu) elements, and a tensor's size in bytes is an int64
  const int64_t per_draw = std::max<int64_t>(mu.numel(), 1) * static_cast<int64_t>(mu.element_size());
  TORCH_CHECK_VALUE(num_samples <= std::numeric_limits<int64_t>::max() / per_draw, "num_samples: ", num_samples,
                    " draws of mu's ", mu.numel(), " elements are more than one tensor can hold");
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
