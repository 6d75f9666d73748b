// The CUDA implementations of the gaussian_latent ops (compiled only in CUDA builds): the CPU ops'
// twins (cpu/latent_ops_cpu.cpp), with the device guard, the current stream and the generator's
// graph-safe Philox state; the KL's reduction runs on the device, with no host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>


#include "../checks.h"
#include "../latent.h"
#include "../layout.h"
#include "launchers.h"
#include "philox_state.h"

namespace vae_ext {
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> gaussian_latent_cuda(const Tensor& mu, const Tensor& logscale,
                                                                const c10::optional<Tensor>& prior_mu,
                                                                const c10::optional<Tensor>& prior_logscale,
                                                                c10::string_view scale, c10::string_view kl,
                                                                c10::string_view reduction, double free_bits,
                                                                int64_t num_samples,
                                                                std::optional<at::Generator> generator) {
  // checks before the guard: a CPU tensor beside CUDA ones gets the ValueError naming it
  LatentInputs in = prepare_latent(mu, logscale, prior_mu, prior_logscale, scale, kl, num_samples);
  check_latent_reduction(reduction, free_bits);
  const c10::cuda::CUDAGuard guard(mu.device());
  cuda::LatentLaunch l{};
  l.a = in.a;
  LatentArgs& a = l.a;
  const auto [z, kl_elems] = fill_latent_forward_args(a, mu, num_samples, free_bits);
  const int64_t rows = a.k * a.n, len = a.c * a.s;
  l.rng = reserve_philox(generator, mu.device().index());
  Tensor state = at::zeros({2}, mu.options().dtype(at::kLong));
  Tensor partials = at::empty({std::max<int64_t>(rows * cuda::latent_chunks(len), 1)}, mu.options().dtype(at::kDouble));
  Tensor row_kl = at::empty({rows}, mu.options().dtype(at::kDouble));
  l.state_out = state.data_ptr<int64_t>();
  l.partials = partials.data_ptr<double>();
  l.row_kl = rows ? row_kl.data_ptr<double>() : nullptr;
  C10_CUDA_CHECK(cuda::launch_latent_forward(l, c10::cuda::getCurrentCUDAStream()));
  auto [kl_out, unit_w] = latent_kl_outputs(row_kl, kl_elems, mu, num_samples, reduction, free_bits);
  return {z, kl_out, state, unit_w};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gaussian_latent_backward_cuda(
    const c10::optional<Tensor>& grad_z, const c10::optional<Tensor>& row_w, const Tensor& mu, const Tensor& logscale,
    const c10::optional<Tensor>& prior_mu, const c10::optional<Tensor>& prior_logscale, const Tensor& rng_state,
    const Tensor& unit_w, c10::string_view scale, c10::string_view kl, int64_t num_samples, bool grad_prior) {
  LatentInputs in = prepare_latent(mu, logscale, prior_mu, prior_logscale, scale, kl, num_samples);
  check_latent_backward(grad_z, row_w, mu, rng_state, unit_w, num_samples);
  TORCH_CHECK_VALUE(rng_state.device() == mu.device(), "rng_state: expected a tensor on ", mu.device());
  const c10::cuda::CUDAGuard guard(mu.device());
  cuda::LatentLaunch l{};
  l.a = in.a;
  LatentArgs& a = l.a;
  const LatentBackwardBuffers b =
      fill_latent_backward_args(a, in.prior, whole_prior(mu, prior_mu, prior_logscale), grad_z, row_w, mu, unit_w,
                                num_samples, grad_prior);
  const Tensor st = rng_state.contiguous();
  l.state = st.const_data_ptr<int64_t>();
  C10_CUDA_CHECK(cuda::launch_latent_backward(l, c10::cuda::getCurrentCUDAStream()));
  return {b.g_mu, b.g_ls, b.g_pmu, b.g_pls};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("gaussian_latent", &gaussian_latent_cuda);
  m.impl("gaussian_latent_backward", &gaussian_latent_backward_cuda);
}

}  // namespace vae_ext
