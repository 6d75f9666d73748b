// CUDA implementations of the vae_ext ops (compiled only in CUDA builds): unpack tensors, pick the
// device guard, the current stream and the generator's graph-safe Philox state, then call the
// launchers of the .cu files.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>

#include "../ops.h"
#include "launchers.h"

namespace vae_ext {
namespace {

ElboOutputs elbo_loss_cuda(const Tensor& recon, const Tensor& x, const Tensor& mu, const Tensor& logvar,
                           c10::string_view recon_mode, c10::string_view reduction, bool grad_recon, bool grad_latent,
                           bool validate, bool total) {
  const Recon mode = parse_recon(recon_mode);
  const Reduction red = parse_reduction(reduction);
  const c10::cuda::CUDAGuard guard(recon.device());
  const ElboBuffers b = prepare_elbo(recon, x, mu, logvar, grad_recon, grad_latent);
  const int64_t n = b.n, d = b.d, l = b.l;
  const Tensor &rc = b.recon, &xc = b.x, &mc = b.mu, &lc = b.logvar, &g_r = b.g_recon, &g_mu = b.g_mu,
               &g_lv = b.g_logvar;
  const auto out_opts = rc.options().dtype(loss_dtype(recon.scalar_type()));
  Tensor rec = red == Reduction::None ? at::empty({n}, out_opts) : at::empty({}, out_opts);
  // total: the finalize kernel writes rec + kl into rec, and kl stays empty.
  Tensor kl = total                    ? at::empty({0}, out_opts)
              : red == Reduction::None ? at::empty({n}, out_opts)
                                       : at::empty({}, out_opts);
  const size_t ws_bytes = cuda::elbo_workspace_bytes(n, d, l);
  Tensor ws = at::empty({static_cast<int64_t>(ws_bytes > 0 ? ws_bytes : 1)}, rc.options().dtype(at::kByte));
  Tensor bad = (validate && mode == Recon::BCE) ? at::zeros({1}, rc.options().dtype(at::kInt)) : Tensor();

  cuda::ElboLaunch a{};
  a.dtype = kernel_dtype(recon.scalar_type());
  a.mode = mode;
  a.reduction = red;
  a.recon = rc.const_data_ptr();
  a.x = xc.const_data_ptr();
  a.grad_recon = (grad_recon && g_r.numel()) ? g_r.data_ptr() : nullptr;
  a.mu = mc.const_data_ptr();
  a.logvar = lc.const_data_ptr();
  a.grad_mu = (grad_latent && g_mu.numel()) ? g_mu.data_ptr() : nullptr;
  a.grad_logvar = (grad_latent && g_lv.numel()) ? g_lv.data_ptr() : nullptr;
  a.n = n;
  a.d = d;
  a.l = l;
  a.grad_scale = (red == Reduction::Mean && n > 0) ? 1.0 / static_cast<double>(n) : 1.0;
  a.rec_out = rec.data_ptr();
  a.kl_out = total ? nullptr : kl.data_ptr();
  a.workspace = ws.data_ptr();
  a.bad_flag = bad.defined() ? bad.data_ptr<int>() : nullptr;
  C10_CUDA_CHECK(cuda::launch_elbo(a, c10::cuda::getCurrentCUDAStream()));
  if (bad.defined()) {  // validate=True: one sync
    const int flags = bad.item<int>();
    if (flags & 1) throw_bce_out_of_range();
    if (flags & 2) throw_bce_target_out_of_range();
  }
  return {rec, kl, g_r, g_mu, g_lv};
}

ReparamOutputs reparameterize_cuda(const Tensor& mu, const Tensor& logvar, int64_t num_samples, bool return_eps,
                                   std::optional<at::Generator> generator) {
  check_reparam_inputs(mu, logvar, num_samples);
  const c10::cuda::CUDAGuard guard(mu.device());
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(mu.device().index()));
  at::PhiloxCudaState philox;
  {
    // Each call reserves 4 offsets: our counters are (offset / 4, element group), disjoint from
    // those of every other op that draws from this generator (csrc/common/philox.h).
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);
  }
  const auto fmt = kernel_format(mu);
  const Tensor mc = mu.contiguous(fmt), lc = logvar.contiguous(fmt);
  Tensor z = reparam_empty(mu, fmt, num_samples);
  Tensor eps = return_eps ? reparam_empty(mu, fmt, num_samples) : at::empty({0}, mu.options());
  Tensor state = at::empty({2}, mu.options().dtype(at::kLong));

  cuda::ReparamLaunch a{};
  a.dtype = kernel_dtype(mu.scalar_type());
  a.mu = mc.const_data_ptr();
  a.logvar = lc.const_data_ptr();
  a.z = z.numel() ? z.data_ptr() : nullptr;
  a.eps = (return_eps && eps.numel()) ? eps.data_ptr() : nullptr;
  a.numel = mu.numel();
  a.k = std::max<int64_t>(num_samples, 1);
  std::tie(a.layout.channels, a.layout.spatial) = reparam_channels_spatial(mu, fmt);
  a.rng.captured = philox.captured_;
  if (philox.captured_) {
    a.rng.seed_ptr = philox.seed_.ptr;
    a.rng.offset_ptr = philox.offset_.ptr;
    a.rng.offset_intragraph = philox.offset_intragraph_;
  } else {
    a.rng.seed = philox.seed_.val;
    a.rng.offset = philox.offset_.val;
  }
  a.state_out = state.data_ptr<int64_t>();
  C10_CUDA_CHECK(cuda::launch_reparam(a, c10::cuda::getCurrentCUDAStream()));
  return {z, eps, state};
}

std::tuple<Tensor, Tensor> reparameterize_backward_cuda(const Tensor& grad_z, const Tensor& logvar,
                                                        const Tensor& rng_state, int64_t num_samples, bool grad_mu) {
  check_reparam_backward_inputs(grad_z, logvar, rng_state, num_samples);
  TORCH_CHECK_VALUE(rng_state.device() == logvar.device(), "rng_state: expected a tensor on ", logvar.device());
  const c10::cuda::CUDAGuard guard(logvar.device());
  const auto fmt = kernel_format(logvar);  // the layout the forward computed in (csrc/autograd.cpp)
  const Tensor gc = reparam_in_layout(grad_z, logvar, fmt, num_samples), lc = logvar.contiguous(fmt),
               st = rng_state.contiguous();
  Tensor g_mu = grad_mu ? at::empty_like(lc, fmt) : at::empty({0}, lc.options()), g_lv = at::empty_like(lc, fmt);
  cuda::ReparamBackwardLaunch a{};
  a.dtype = kernel_dtype(logvar.scalar_type());
  a.grad_z = gc.const_data_ptr();
  a.logvar = lc.const_data_ptr();
  a.grad_mu = (grad_mu && g_mu.numel()) ? g_mu.data_ptr() : nullptr;
  a.grad_logvar = g_lv.numel() ? g_lv.data_ptr() : nullptr;
  a.numel = logvar.numel();
  a.k = std::max<int64_t>(num_samples, 1);
  std::tie(a.layout.channels, a.layout.spatial) = reparam_channels_spatial(logvar, fmt);
  a.state = st.const_data_ptr<int64_t>();
  C10_CUDA_CHECK(cuda::launch_reparam_backward(a, c10::cuda::getCurrentCUDAStream()));
  return {g_mu, g_lv};
}

Tensor philox_normal_cuda(const Tensor& like, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(like.device());
  Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_philox_normal(out.numel() ? out.data_ptr<float>() : nullptr, out.numel(),
                                            static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                            c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

void scale_unless_one_cuda(const std::vector<Tensor>& g, const std::vector<Tensor>& s) {
  TORCH_CHECK(!g.empty() && g.size() == s.size() && g.size() <= static_cast<size_t>(cuda::kMaxScaleJobs),
              "scale_unless_one_cuda: expected 1 to ", cuda::kMaxScaleJobs, " (g, s) pairs");
  cuda::ScaleJob jobs[cuda::kMaxScaleJobs];
  for (size_t k = 0; k < g.size(); ++k) {
    TORCH_CHECK(g[k].is_cuda() && g[k].is_contiguous() && g[k].device() == g[0].device() &&
                    g[k].scalar_type() == g[0].scalar_type() && s[k].numel() == 1 && s[k].device() == g[k].device() &&
                    s[k].scalar_type() == loss_dtype(g[k].scalar_type()),
                "scale_unless_one_cuda: expected contiguous CUDA g of one device and dtype, and one-element s of "
                "that device in g's loss dtype");
    jobs[k] = {g[k].data_ptr(), s[k].const_data_ptr(), g[k].numel()};
  }
  const c10::cuda::CUDAGuard guard(g[0].device());
  C10_CUDA_CHECK(cuda::launch_scale_unless_one(kernel_dtype(g[0].scalar_type()), jobs, static_cast<int>(g.size()),
                                               c10::cuda::getCurrentCUDAStream()));
}

TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("elbo_loss", &elbo_loss_cuda);
  m.impl("reparameterize", &reparameterize_cuda);
  m.impl("reparameterize_backward", &reparameterize_backward_cuda);
  m.impl("philox_normal", &philox_normal_cuda);
}

}  // namespace vae_ext
