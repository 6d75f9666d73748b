// The CUDA implementations of the gaussian_latent ops (compiled only in CUDA builds): the CPU ops'
// twins (cpu/latent_ops_cpu.cpp), with the device guard, the current stream and the generator's
// graph-safe Philox state; the KL's reduction runs on the device, with no host sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>

#include "../checks.h"
#include "../latent.h"
#include "../layout.h"
#include "launchers.h"

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
  const Tensor z = reparam_empty(mu, latent_format(mu), num_samples);
  TORCH_INTERNAL_ASSERT(latent_strides(z, num_samples > 0, &a.z_st));
  a.z = z.numel() ? z.data_ptr() : nullptr;
  const int64_t rows = a.k * a.n, len = a.c * a.s;
  const auto lopts = mu.options().dtype(loss_dtype(mu.scalar_type()));
  const Tensor kl_elems = free_bits > 0.0 ? at::empty({rows, len}, lopts) : Tensor();
  a.kl_elems = kl_elems.defined() && kl_elems.numel() ? kl_elems.data_ptr() : nullptr;
  merge_latent_channels(a, {&a.mu_st, &a.ls_st, &a.pmu_st, &a.pls_st, &a.z_st});
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(mu.device().index()));
  at::PhiloxCudaState philox;
  {
    // 4 offsets per call, as reparameterize: counters (offset / 4, group) of their own
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);
  }
  l.rng.captured = philox.captured_;
  if (philox.captured_) {
    l.rng.seed_ptr = philox.seed_.ptr;
    l.rng.offset_ptr = philox.offset_.ptr;
    l.rng.offset_intragraph = philox.offset_intragraph_;
  } else {
    l.rng.seed = philox.seed_.val;
    l.rng.offset = philox.offset_.val;
  }
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
  const auto fmt = latent_format(mu);
  Tensor g_mu = at::empty(mu.sizes(), mu.options().memory_format(fmt));
  Tensor g_ls = at::empty(mu.sizes(), mu.options().memory_format(fmt));
  TORCH_INTERNAL_ASSERT(latent_strides(g_mu, false, &a.g_st));
  a.g_mu = g_mu.numel() ? g_mu.data_ptr() : nullptr;
  a.g_ls = g_ls.numel() ? g_ls.data_ptr() : nullptr;
  Tensor gz;
  if (grad_z.has_value()) {
    gz = latent_readable(*grad_z, num_samples > 0, &a.gz_st);
    a.grad_z = gz.numel() ? gz.const_data_ptr() : nullptr;
  } else {
    a.gz_st = a.g_st;  // unread
  }
  const Tensor rw = row_w.has_value() ? row_w->contiguous() : Tensor();
  const Tensor uw = unit_w.numel() > 0 ? unit_w.contiguous() : Tensor();
  a.row_w = rw.defined() && rw.numel() ? rw.const_data_ptr() : nullptr;
  a.unit_w = uw.defined() ? uw.const_data_ptr() : nullptr;
  const auto lopts = mu.options().dtype(loss_dtype(mu.scalar_type()));
  const bool prior_grads = grad_prior && in.prior && rw.defined();
  Tensor g_pmu = prior_grads ? at::empty(mu.sizes(), lopts) : at::empty({0}, lopts);
  Tensor g_pls = prior_grads ? at::empty(mu.sizes(), lopts) : at::empty({0}, lopts);
  a.g_pmu = prior_grads && g_pmu.numel() ? g_pmu.data_ptr() : nullptr;
  a.g_pls = prior_grads && g_pls.numel() ? g_pls.data_ptr() : nullptr;
  merge_latent_channels(a, {&a.mu_st, &a.ls_st, &a.pmu_st, &a.pls_st, &a.gz_st, &a.g_st});
  const Tensor st = rng_state.contiguous();
  l.state = st.const_data_ptr<int64_t>();
  C10_CUDA_CHECK(cuda::launch_latent_backward(l, c10::cuda::getCurrentCUDAStream()));
  return {g_mu, g_ls, g_pmu, g_pls};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("gaussian_latent", &gaussian_latent_cuda);
  m.impl("gaussian_latent_backward", &gaussian_latent_backward_cuda);
}

}  // namespace vae_ext
