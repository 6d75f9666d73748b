// The vae_ext operator library: the op schemas, and the Python module with the build facts. The
// implementations are registered beside their kernels (cpu/ops_cpu.cpp; cuda/ops_cuda.cpp in CUDA
// builds), autograd in autograd.cpp, and the fake kernels in vae_ext/_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "common/philox.h"
#include "cpu/kernels.h"

namespace vae_ext {

#if defined(VAE_EXT_WITH_CUDA)
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

TORCH_LIBRARY(vae_ext, m) {
  // Outputs: the reduced reconstruction and KL terms (with free bits, the floored KL), the per-unit
  // KL (mu.shape[1:], when unit_kl or free bits; else empty), and the gradient buffers the forward
  // writes (csrc/ops.h ElboOutputs; vae_ext/_ops.py's fake kernel gives their shapes).
  m.def(
      "elbo_loss(Tensor recon, Tensor x, Tensor mu, Tensor logvar, str recon_mode, str reduction, "
      "bool grad_recon, bool grad_latent, bool validate, bool total=False, Tensor? prior_mu=None, "
      "Tensor? prior_logvar=None, Tensor? recon_logvar=None, float free_bits=0., bool unit_kl=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The common call, lean (csrc/elbo_basic.h): no prior, free bits or recon log-variance, the loss
  // rec + beta * kl alone; reduction may be "pixel_mean" (the recon term over every element). Its
  // outputs: (loss, g_recon, g_mu, g_logvar), the gradient buffers as elbo_loss's ("mean"'s for
  // pixel_mean; its backward applies the 1/D and beta).
  m.def(
      "elbo_loss_basic(Tensor recon, Tensor x, Tensor mu, Tensor logvar, str recon_mode, str reduction, "
      "float beta, bool grad_recon, bool grad_latent, bool validate) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "reparameterize(Tensor mu, Tensor logvar, int num_samples, bool return_eps, Generator? generator=None) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  // grad_mu=False: the first output is empty (with no samples dimension, grad_mu is grad_z itself)
  m.def(
      "reparameterize_backward(Tensor grad_z, Tensor logvar, Tensor rng_state, int num_samples, "
      "bool grad_mu=True) -> (Tensor, Tensor)");
  m.def("philox_normal(Tensor like, int seed, int offset) -> Tensor");
  // The discretized mixture of logistics (csrc/dmol.h): the reduced NLL and, when grad, its
  // gradient with respect to params (params' layout, times 1/N for mean; else empty).
  m.def(
      "dmol_nll(Tensor params, Tensor x, int num_bits, str reduction, float log_scale_min, bool grad, "
      "bool validate) -> (Tensor, Tensor)");
  m.def("dmol_sample(Tensor params, int num_channels, float log_scale_min, Generator? generator=None) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  // A hierarchical VAE's latent layer: (z, kl, rng_state, unit_w); unit_w: free bits' per-unit
  // weights (1 kept, 0 floored) for the backward, else empty (csrc/latent_autograd.cpp).
  m.def(
      "gaussian_latent(Tensor mu, Tensor logscale, Tensor? prior_mu, Tensor? prior_logscale, str scale, str kl, "
      "str reduction, float free_bits, int num_samples, Generator? generator=None) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "gaussian_latent_backward(Tensor? grad_z, Tensor? row_w, Tensor mu, Tensor logscale, Tensor? prior_mu, "
      "Tensor? prior_logscale, Tensor rng_state, Tensor unit_w, str scale, str kl, int num_samples, bool grad_prior) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace vae_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vae_ext kernels: the ops are torch.ops.vae_ext.*; this module holds build facts";
  m.def(
      "cpu_capability", [] { return std::string(vae_ext::cpu::kernels().name); },
      "The CPU kernel variant in use: DEFAULT, AVX2 or AVX512");
  m.def("has_cuda", [] { return vae_ext::kHasCuda; }, "Whether CUDA kernels were built");
  m.def(
      "_philox4x32_10",
      [](uint64_t seed, uint64_t ctr_lo, uint64_t ctr_hi) {
        const auto w = vae_ext::philox4x32_10(seed, ctr_lo, ctr_hi);
        return std::make_tuple(w.v[0], w.v[1], w.v[2], w.v[3]);
      },
      "Raw Philox4x32-10 block for (key, counter): for known-answer tests");
  m.def(
      "_philox_normal_scalar",
      [](uint64_t seed, uint64_t offset, uint64_t e) {
        return vae_ext::philox_normal_at<vae_ext::ScalarMath<float>>(seed, offset, e);
      },
      "eps of element e by the scalar code the CUDA kernels run (host build): for tests");
}
