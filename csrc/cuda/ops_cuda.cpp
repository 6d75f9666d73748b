// CUDA implementations of the vae_ext ops (compiled only in CUDA builds): unpack tensors, pick the
// device guard, the current stream and the generator's graph-safe Philox state, then call the
// launchers of the .cu files.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>


#include "../ops.h"
#include "launchers.h"
#include "philox_state.h"

namespace vae_ext {
namespace {

// The CUDA twin of elbo_loss_cpu (csrc/cpu/ops_cpu.cpp): the same buffers (prepare_elbo), the same
// outputs; the sums and the finalization run on the device, with no host sync unless validate.
ElboOutputs elbo_loss_cuda(VAE_EXT_ELBO_ARGS) {
  const Recon mode = parse_recon(recon_mode);
  const Reduction red = parse_reduction(reduction);
  const ElboOptions opt{prior_mu, prior_logvar, recon_logvar, free_bits, unit_kl};
  // The checks come before the guard: the op runs here when any tensor is on CUDA, and a CPU
  // recon_x beside them must get the ValueError naming the argument, not CUDAGuard's error for a
  // CPU device. (prepare_elbo's allocations name their device in their options.)
  const ElboBuffers b = prepare_elbo(recon, x, mu, logvar, opt, mode, red, grad_recon, grad_latent);
  const c10::cuda::CUDAGuard guard(b.recon.device());
  const int64_t n = b.n, d = b.d, l = b.l;
  const at::ScalarType out = loss_dtype(recon.scalar_type());
  const auto out_opts = b.recon.options().dtype(out);
  const auto term = [&] { return red == Reduction::None ? at::empty({n}, out_opts) : at::empty({}, out_opts); };
  // With free bits the KL term is the floored one, formed from each element's KL after the kernel
  // (free bits are refused with "none"), so the kernel writes the two terms apart even for total.
  const bool floored_kl = free_bits > 0.0;
  Tensor rec = term();
  // total (and no free bits): the finalize kernel writes rec + kl into rec, and kl stays empty.
  Tensor kl = (total && !floored_kl) ? at::empty({0}, out_opts) : term();
  // A 0-d recon_logvar's gradient, written by the finalize kernel: per sample (none) or over the
  // batch, in double until the backward scales it (as the CPU op's).
  const bool rlv_grad = grad_recon && b.rlv_scalar;
  Tensor g_rlv = rlv_grad ? (red == Reduction::None ? at::empty({n}, out_opts.dtype(at::kDouble))
                                                    : at::empty({}, out_opts.dtype(at::kDouble)))
                          : b.g_recon_logvar;
  const size_t ws_bytes = cuda::elbo_workspace_bytes(n, d, l);
  Tensor ws = at::empty({static_cast<int64_t>(ws_bytes > 0 ? ws_bytes : 1)}, b.recon.options().dtype(at::kByte));
  Tensor bad = (validate && mode == Recon::BCE) ? at::zeros({1}, b.recon.options().dtype(at::kInt)) : Tensor();
  cuda::ElboLaunch a{};
  fill_elbo_args(a, b, mode, red, grad_recon, grad_latent, g_rlv);
  a.reduction = red;
  a.rec_out = rec.data_ptr();
  a.kl_out = (total && !floored_kl) ? nullptr : kl.data_ptr();
  a.workspace = ws.data_ptr();
  a.bad_flag = bad.defined() ? bad.data_ptr<int>() : nullptr;
  C10_CUDA_CHECK(cuda::launch_elbo(a, c10::cuda::getCurrentCUDAStream()));
  if (bad.defined()) {  // validate=True: one sync
    const int flags = bad.item<int>();
    if (flags & 1) throw_bce_out_of_range();
    if (flags & 2) throw_bce_target_out_of_range();
  }
  Tensor units = at::empty({0}, out_opts);
  if (unit_kl || floored_kl) {
    Tensor floored;  // 0-d double on the device: the KL term of the loss, already reduced
    units = unit_kl_and_free_bits(b.kl_elems.view({n, l}), mu.sizes().slice(1), free_bits, red,
                                  {b.g_mu, b.g_logvar, b.g_prior_mu, b.g_prior_logvar}, &floored)
                .to(out);
    if (floored_kl) {
      if (total) {
        rec = rec.to(at::kDouble).add_(floored).to(out);
        kl = at::empty({0}, out_opts);
      } else {
        kl = floored.to(out);
      }
    }
  }
  return {rec, kl, units, b.g_recon, b.g_mu, b.g_logvar, b.g_prior_mu, b.g_prior_logvar, g_rlv};
}

ReparamOutputs reparameterize_cuda(const Tensor& mu, const Tensor& logvar, int64_t num_samples, bool return_eps,
                                   std::optional<at::Generator> generator) {
  check_reparam_inputs(mu, logvar, num_samples);
  const c10::cuda::CUDAGuard guard(mu.device());
  const cuda::PhiloxArgs rng = reserve_philox(generator, mu.device().index());
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
  a.rng = rng;
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
  TORCH_CHECK(!g.empty() && g.size() == s.size(), "scale_unless_one_cuda: expected (g, s) pairs");
  for (size_t k = 0; k < g.size(); ++k) {
    TORCH_CHECK(g[k].is_cuda() && g[k].is_contiguous() && g[k].device() == g[0].device() && s[k].numel() == 1 &&
                    s[k].device() == g[k].device() && s[k].scalar_type() == loss_dtype(g[k].scalar_type()),
                "scale_unless_one_cuda: expected contiguous CUDA g of one device, and one-element s of that "
                "device in g's loss dtype");
  }
  const c10::cuda::CUDAGuard guard(g[0].device());
  // One launch per dtype (a half input's recon gradients and its float32 prior gradients) and
  // kMaxScaleJobs buffers; every index not yet taken starts the next launch.
  std::vector<bool> done(g.size(), false);
  for (size_t first = 0; first < g.size(); ++first) {
    if (done[first]) continue;
    const at::ScalarType st = g[first].scalar_type();
    cuda::ScaleJob jobs[cuda::kMaxScaleJobs];
    int count = 0;
    for (size_t k = first; k < g.size(); ++k) {
      if (done[k] || g[k].scalar_type() != st) continue;
      jobs[count++] = {g[k].data_ptr(), s[k].const_data_ptr(), g[k].numel()};
      done[k] = true;
      if (count == cuda::kMaxScaleJobs) break;
    }
    C10_CUDA_CHECK(cuda::launch_scale_unless_one(kernel_dtype(st), jobs, count, c10::cuda::getCurrentCUDAStream()));
  }
}

TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("elbo_loss", &elbo_loss_cuda);
  m.impl("reparameterize", &reparameterize_cuda);
  m.impl("reparameterize_backward", &reparameterize_backward_cuda);
  m.impl("philox_normal", &philox_normal_cuda);
}

}  // namespace vae_ext
