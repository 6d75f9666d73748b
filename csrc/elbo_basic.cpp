// The elbo_loss_basic op (csrc/elbo_basic.h) on CPU: the elbo_loss kernel's call with only the
// buffers it returns. (CUDA takes the full op: vae_ext.elbo_loss sends only CPU tensors here, and a
// CUDA call's cost is its launches, not its outputs.) Autograd: csrc/autograd.cpp; fake kernel:
// vae_ext/_ops.py.
#include "elbo_basic.h"

#include <torch/library.h>

#include "cpu/elbo_sums.h"
#include "ops.h"

namespace vae_ext {

int64_t values_per_sample(const Tensor& recon) {
  int64_t d = 1;
  for (int64_t i = 1; i < recon.dim(); ++i) d *= recon.size(i);
  return d;
}

namespace {

// "pixel_mean" is "mean" with the recon term divided by the values per sample.
Reduction parse_basic_reduction(c10::string_view reduction, bool* pixel_mean) {
  *pixel_mean = reduction == "pixel_mean";
  return *pixel_mean ? Reduction::Mean : parse_reduction(reduction);
}

// rec + beta * kl (pixel_mean: rec / D + beta * kl) as the full op's caller forms it from the two
// terms rounded to the loss dtype T (vae_ext/functional.py): the same value whichever path a call
// takes.
template <typename T>
double combine(double rec, double kl, bool pixel_mean, int64_t d, double beta) {
  T r = static_cast<T>(rec);
  if (pixel_mean) r = r / static_cast<T>(d);
  return static_cast<double>(r + static_cast<T>(kl) * static_cast<T>(beta));
}

// A double rounded to `out` as reduce_terms (csrc/cpu/ops_cpu.cpp) does: a float32 loss beyond
// float's range is inf, as the reference's float32 sum gives.
Tensor scalar_in(double v, at::ScalarType out) {
  return at::scalar_tensor(out == at::kFloat ? static_cast<double>(static_cast<float>(v)) : v, at::dtype(out));
}

BasicOutputs elbo_loss_basic_cpu(VAE_EXT_ELBO_BASIC_ARGS) {
  (void)validate;  // the CPU kernel always checks "bce" probabilities and targets
  const Recon mode = parse_recon(recon_mode);
  bool pixel_mean = false;
  const Reduction red = parse_basic_reduction(reduction, &pixel_mean);
  ElboOptions opt{};
  opt.lean = true;
  const ElboBuffers b = prepare_elbo(recon, x, mu, logvar, opt, mode, red, grad_recon, grad_latent);
  const int64_t n = b.n;
  const bool per_sample = red == Reduction::None;
  cpu::ElboArgs args{};
  fill_elbo_args(args, b, mode, red, grad_recon, grad_latent, Tensor());
  cpu::ElboSums sums = cpu::run_elbo_sums(args, n, per_sample, /*rlv_grad=*/false);
  Tensor &row_rec = sums.row_rec, &row_kl = sums.row_kl;
  double &total_rec = sums.rec, &total_kl = sums.kl;
  const at::ScalarType out = loss_dtype(recon.scalar_type());
  Tensor loss;
  // beta = 1 (not pixel_mean): rec + kl in double, rounded once, as the full op's total
  const bool fused = beta == 1.0 && !pixel_mean;
  if (per_sample) {
    loss = fused ? row_rec.add_(row_kl).to(out) : row_rec.to(out).add_(row_kl.to(out).mul_(beta));
  } else {
    if (red == Reduction::Mean) {
      total_rec /= static_cast<double>(n);  // 0 / 0 = NaN for an empty batch, as Tensor.mean()
      total_kl /= static_cast<double>(n);
    }
    if (fused)
      loss = scalar_in(total_rec + total_kl, out);
    else
      loss = scalar_in(out == at::kFloat ? combine<float>(total_rec, total_kl, pixel_mean, b.d, beta)
                                         : combine<double>(total_rec, total_kl, pixel_mean, b.d, beta),
                       out);
  }
  return {loss, b.g_recon, b.g_mu, b.g_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) { m.impl("elbo_loss_basic", &elbo_loss_basic_cpu); }

}  // namespace vae_ext
