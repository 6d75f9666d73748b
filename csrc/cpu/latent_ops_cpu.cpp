// The CPU implementations of the gaussian_latent ops: check the arguments and describe the tensors
// (csrc/latent.h), draw the Philox key, call the kernels of this CPU's capability (latent_kernels.h).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <mutex>
#include <string>

#include "../checks.h"
#include "../latent.h"
#include "../layout.h"
#include "latent_kernels.h"
#include "table_choice.h"

namespace vae_ext {

namespace cpu {
const LatentKernelTable& latent_kernels() {
  static const LatentKernelTable& table = VAE_EXT_CPU_TABLE(latent_kernel_table);
  return table;
}
}  // namespace cpu

namespace {

// As reparameterize: a fresh 64-bit key from the CPU generator per call, offset 0.
uint64_t draw_seed(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gaussian_latent_cpu(const Tensor& mu, const Tensor& logscale,
                                                               const c10::optional<Tensor>& prior_mu,
                                                               const c10::optional<Tensor>& prior_logscale,
                                                               c10::string_view scale, c10::string_view kl,
                                                               c10::string_view reduction, double free_bits,
                                                               int64_t num_samples,
                                                               std::optional<at::Generator> generator) {
  LatentInputs in = prepare_latent(mu, logscale, prior_mu, prior_logscale, scale, kl, num_samples);
  check_latent_reduction(reduction, free_bits);
  LatentArgs& a = in.a;
  const auto [z, kl_elems] = fill_latent_forward_args(a, mu, num_samples, free_bits);
  const int64_t rows = a.k * a.n, len = a.c * a.s;
  a.seed = draw_seed(generator);
  a.offset = 0;
  Tensor state = at::empty({2}, at::kLong);
  state.data_ptr<int64_t>()[0] = static_cast<int64_t>(a.seed);
  state.data_ptr<int64_t>()[1] = static_cast<int64_t>(a.offset);
  Tensor row_kl = at::zeros({rows}, at::kDouble);
  if (rows > 0 && len > 0) cpu::latent_kernels().forward(a, row_kl.data_ptr<double>());
  auto [kl_out, unit_w] = latent_kl_outputs(row_kl, kl_elems, mu, num_samples, reduction, free_bits);
  return {z, kl_out, state, unit_w};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gaussian_latent_backward_cpu(
    const c10::optional<Tensor>& grad_z, const c10::optional<Tensor>& row_w, const Tensor& mu, const Tensor& logscale,
    const c10::optional<Tensor>& prior_mu, const c10::optional<Tensor>& prior_logscale, const Tensor& rng_state,
    const Tensor& unit_w, c10::string_view scale, c10::string_view kl, int64_t num_samples, bool grad_prior) {
  LatentInputs in = prepare_latent(mu, logscale, prior_mu, prior_logscale, scale, kl, num_samples);
  check_latent_backward(grad_z, row_w, mu, rng_state, unit_w, num_samples);
  LatentArgs& a = in.a;
  const LatentBackwardBuffers b =
      fill_latent_backward_args(a, in.prior, whole_prior(mu, prior_mu, prior_logscale), grad_z, row_w, mu, unit_w,
                                num_samples, grad_prior);
  const Tensor st = rng_state.cpu();
  a.seed = static_cast<uint64_t>(st.const_data_ptr<int64_t>()[0]);
  a.offset = static_cast<uint64_t>(st.const_data_ptr<int64_t>()[1]);
  if (mu.numel() > 0) cpu::latent_kernels().backward(a);
  return {b.g_mu, b.g_ls, b.g_pmu, b.g_pls};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) {
  m.impl("gaussian_latent", &gaussian_latent_cpu);
  m.impl("gaussian_latent_backward", &gaussian_latent_backward_cpu);
}

}  // namespace vae_ext
