// The CPU implementations of the vae_ext ops: check the arguments (csrc/checks.h), lay the tensors
// out, and call the kernels of this CPU's capability (kernels.h), chosen at run time.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "../grad_block.h"
#include "../ops.h"
#include "elbo_sums.h"
#include "kernels.h"
#include "table_choice.h"

namespace vae_ext {

namespace cpu {
const KernelTable& kernels() {
  static const KernelTable& table = VAE_EXT_CPU_TABLE(kernel_table);
  return table;
}

ElboSums run_elbo_sums(ElboArgs& args, int64_t n, bool per_sample, bool rlv_grad) {
  ElboSums s;
  if (per_sample) {
    s.row_rec = at::empty({n}, at::kDouble);
    s.row_kl = at::empty({n}, at::kDouble);
    if (rlv_grad) s.row_grad_rlv = at::empty({n}, at::kDouble);
  }
  std::atomic<bool> bad{false}, bad_target{false};
  args.row_rec = per_sample ? s.row_rec.data_ptr<double>() : nullptr;
  args.row_kl = per_sample ? s.row_kl.data_ptr<double>() : nullptr;
  args.total_rec = &s.rec;
  args.total_kl = &s.kl;
  args.row_grad_rlv = s.row_grad_rlv.defined() ? s.row_grad_rlv.data_ptr<double>() : nullptr;
  args.total_grad_rlv = rlv_grad ? &s.grad_rlv : nullptr;
  args.bad_prob = &bad;
  args.bad_target = &bad_target;
  kernels().elbo(args);
  if (bad.load()) throw_bce_out_of_range();
  if (bad_target.load()) throw_bce_target_out_of_range();
  return s;
}
}  // namespace cpu

namespace {

// The two outputs from the kernel's sums over the batch (sum and mean): (rec, kl), or with
// total (rec + kl, empty). kl_reduced: sk is reduced already (free bits' floored term).
std::tuple<Tensor, Tensor> reduce_terms(double sr, double sk, int64_t n, Reduction red, bool total, at::ScalarType out,
                                        bool kl_reduced) {
  if (red == Reduction::Mean) {
    sr /= static_cast<double>(n);  // 0 / 0 = NaN for an empty batch, as Tensor.mean()
    if (!kl_reduced) sk /= static_cast<double>(n);
  }
  const auto opts = at::TensorOptions().dtype(out);
  // A float32 loss whose double sum exceeds float's range is inf, as the reference's float32 sum
  // (and Tensor.to) give: at::scalar_tensor would check the conversion and raise instead.
  const auto scalar = [&](double v) {
    return at::scalar_tensor(out == at::kFloat ? static_cast<double>(static_cast<float>(v)) : v, opts);
  };
  if (total) return {scalar(sr + sk), at::empty({0}, opts)};
  return {scalar(sr), scalar(sk)};
}

ElboOutputs elbo_loss_cpu(VAE_EXT_ELBO_ARGS) {
  (void)validate;  // the CPU kernel always checks "bce" probabilities and targets (it is free here)
  const Recon mode = parse_recon(recon_mode);
  const Reduction red = parse_reduction(reduction);
  const ElboOptions opt{prior_mu, prior_logvar, recon_logvar, free_bits, unit_kl};
  const ElboBuffers b = prepare_elbo(recon, x, mu, logvar, opt, mode, red, grad_recon, grad_latent);
  const int64_t n = b.n;
  // Per-sample sums only for reduction="none"; sum and mean take one total each (no buffer of n).
  const bool per_sample = red == Reduction::None;
  // a 0-d recon_logvar's gradient: per sample (none) or over the batch, returned in double: scaled
  // by grad_output in the backward it may be finite where this sum is past float's range
  const bool rlv_grad = grad_recon && b.rlv_scalar;
  cpu::ElboArgs args{};
  fill_elbo_args(args, b, mode, red, grad_recon, grad_latent, b.g_recon_logvar);
  args.prior_grads_wide = b.g_prior_mu.defined() && b.g_prior_mu.scalar_type() != b.g_mu.scalar_type();
  cpu::ElboSums sums = cpu::run_elbo_sums(args, n, per_sample, rlv_grad);
  Tensor &row_rec = sums.row_rec, &row_kl = sums.row_kl;
  double &total_rec = sums.rec, &total_kl = sums.kl;
  const at::ScalarType out = loss_dtype(recon.scalar_type());
  Tensor g_rlv = b.g_recon_logvar;
  if (rlv_grad) g_rlv = per_sample ? sums.row_grad_rlv : at::scalar_tensor(sums.grad_rlv, at::dtype(at::kDouble));
  Tensor units = at::empty({0}, at::dtype(out));
  if (unit_kl || free_bits > 0.0) {
    Tensor floored;
    units = unit_kl_and_free_bits(b.kl_elems.view({n, b.l}), mu.sizes().slice(1), free_bits, red,
                                  {b.g_mu, b.g_logvar, b.g_prior_mu, b.g_prior_logvar}, &floored)
                .to(out);
    // not times n for reduce_terms to divide again: a float64 floored mean near the largest
    // double would overflow on the way
    if (free_bits > 0.0) total_kl = floored.item<double>();
  }
  const auto grads = [&](Tensor rec, Tensor kl) {
    return ElboOutputs{rec, kl, units, b.g_recon, b.g_mu, b.g_logvar, b.g_prior_mu, b.g_prior_logvar, g_rlv};
  };
  if (per_sample) {
    if (total) return grads(row_rec.add_(row_kl).to(out), at::empty({0}, row_rec.options().dtype(out)));
    return grads(row_rec.to(out), row_kl.to(out));
  }
  auto [rec, kl] = reduce_terms(total_rec, total_kl, n, red, total, out, /*kl_reduced=*/free_bits > 0.0);
  return grads(rec, kl);
}

// Each column's sum runs over the rows in order, whichever thread takes it.
Tensor sum_over_batch_cpu_impl(const Tensor& g) {
  const Tensor gc = g.contiguous();
  const int64_t n = g.size(0);
  int64_t l = 1;
  for (int64_t i = 1; i < g.dim(); ++i) l *= g.size(i);
  Tensor out = at::zeros({l}, g.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sum_over_batch", [&] {
    const scalar_t* p = gc.const_data_ptr<scalar_t>();
    double* o = out.data_ptr<double>();
    at::parallel_for(0, l, std::max<int64_t>(1, cpu::kGrainElems / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = 0; r < n; ++r)
        for (int64_t u = b; u < e; ++u) o[u] += static_cast<double>(p[r * l + u]);
    });
  });
  return out.view(g.sizes().slice(1));
}

uint64_t draw_cpu_seed(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

ReparamOutputs reparameterize_cpu(const Tensor& mu, const Tensor& logvar, int64_t num_samples, bool return_eps,
                                  std::optional<at::Generator> generator) {
  check_reparam_inputs(mu, logvar, num_samples);
  // CPU: a fresh 64-bit key from the CPU generator per call, offset 0. (seed, offset) go into
  // rng_state, from which the backward (and philox_normal) recompute eps.
  const uint64_t seed = draw_cpu_seed(generator), offset = 0;
  const auto fmt = kernel_format(mu);
  const Tensor mc = mu.contiguous(fmt), lc = logvar.contiguous(fmt);
  Tensor z = reparam_empty(mu, fmt, num_samples);
  Tensor eps = return_eps ? reparam_empty(mu, fmt, num_samples) : at::empty({0}, mu.options());
  Tensor state = at::empty({2}, at::kLong);
  state.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  state.data_ptr<int64_t>()[1] = static_cast<int64_t>(offset);
  if (mu.numel() > 0) {
    cpu::ReparamArgs a{};
    a.dtype = kernel_dtype(mu.scalar_type());
    a.mu = mc.const_data_ptr();
    a.logvar = lc.const_data_ptr();
    a.z = z.data_ptr();
    a.eps = return_eps ? eps.data_ptr() : nullptr;
    a.numel = mu.numel();
    a.k = std::max<int64_t>(num_samples, 1);
    std::tie(a.channels, a.spatial) = reparam_channels_spatial(mu, fmt);
    a.seed = seed;
    a.offset = offset;
    cpu::kernels().reparam(a);
  }
  return {z, eps, state};
}

std::tuple<Tensor, Tensor> reparameterize_backward_cpu(const Tensor& grad_z, const Tensor& logvar,
                                                       const Tensor& rng_state, int64_t num_samples, bool grad_mu) {
  check_reparam_backward_inputs(grad_z, logvar, rng_state, num_samples);
  const auto fmt = kernel_format(logvar);  // the layout the forward computed in (csrc/autograd.cpp)
  const Tensor gc = reparam_in_layout(grad_z, logvar, fmt, num_samples), lc = logvar.contiguous(fmt);
  Tensor g_mu = grad_mu ? advise_huge_pages(at::empty_like(lc, fmt)) : at::empty({0}, lc.options());
  Tensor g_lv = advise_huge_pages(at::empty_like(lc, fmt));
  const Tensor st = rng_state.cpu();
  if (logvar.numel() > 0) {
    cpu::ReparamBackwardArgs a{};
    a.dtype = kernel_dtype(logvar.scalar_type());
    a.grad_z = gc.const_data_ptr();
    a.logvar = lc.const_data_ptr();
    a.grad_mu = grad_mu ? g_mu.data_ptr() : nullptr;
    a.grad_logvar = g_lv.data_ptr();
    a.numel = logvar.numel();
    a.k = std::max<int64_t>(num_samples, 1);
    std::tie(a.channels, a.spatial) = reparam_channels_spatial(logvar, fmt);
    a.seed = static_cast<uint64_t>(st.const_data_ptr<int64_t>()[0]);
    a.offset = static_cast<uint64_t>(st.const_data_ptr<int64_t>()[1]);
    cpu::kernels().reparam_backward(a);
  }
  return {g_mu, g_lv};
}

Tensor philox_normal_cpu(const Tensor& like, int64_t seed, int64_t offset) {
  Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  if (out.numel() > 0)
    cpu::kernels().normal(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(seed),
                          static_cast<uint64_t>(offset));
  return out;
}

}  // namespace

Tensor sum_over_batch_cpu(const Tensor& g) {
  TORCH_CHECK(g.is_cpu() && g.dim() >= 1, "sum_over_batch_cpu: expected a CPU tensor of shape (N, ...)");
  return sum_over_batch_cpu_impl(g);
}

Tensor sum_to_shape_cpu(const Tensor& g, at::IntArrayRef shape) {
  const int64_t dims = g.dim(), pad = dims - static_cast<int64_t>(shape.size());
  TORCH_CHECK(g.is_cpu() && dims >= 1 && pad >= 0 && at::is_expandable_to(shape, g.sizes()),
              "sum_to_shape_cpu: expected a CPU tensor of shape (N, ...) and a shape that broadcasts to it");
  std::vector<int64_t> to(static_cast<size_t>(dims), 1);  // shape with g's rank
  std::copy(shape.begin(), shape.end(), to.begin() + pad);
  // rows: g's samples, or one row (the sums over the batch) when the batch is summed
  const Tensor s =
      (to[0] == 1 && g.size(0) != 1) ? sum_over_batch_cpu_impl(g).unsqueeze(0) : g.to(at::kDouble).contiguous();
  Tensor out = at::zeros(to, g.options().dtype(at::kDouble));
  std::vector<int64_t> sizes(s.sizes().begin() + 1, s.sizes().end()), ostride(sizes.size());
  int64_t inner = 1, out_inner = 1;
  for (int64_t k = 1; k < dims; ++k) {
    inner *= s.size(k);
    out_inner *= to[static_cast<size_t>(k)];
  }
  const int64_t rows = s.size(0);
  for (size_t k = 0; k < sizes.size(); ++k) ostride[k] = to[k + 1] == 1 ? 0 : out.stride(static_cast<int64_t>(k) + 1);
  const double* p = s.const_data_ptr<double>();
  double* o = out.data_ptr<double>();
  // Each row on one thread, its elements in index order: the same bits for any thread count.
  at::parallel_for(0, rows, std::max<int64_t>(1, cpu::kGrainElems / std::max<int64_t>(inner, 1)),
                   [&](int64_t b, int64_t e) {
                     std::vector<int64_t> idx(sizes.size());
                     for (int64_t r = b; r < e; ++r) {
                       std::fill(idx.begin(), idx.end(), 0);
                       int64_t off = 0;  // the output offset of element i of the row
                       for (int64_t i = 0; i < inner; ++i) {
                         o[r * out_inner + off] += p[r * inner + i];
                         for (int64_t k = static_cast<int64_t>(sizes.size()) - 1; k >= 0; --k) {  // next index
                           off += ostride[k];
                           if (++idx[k] < sizes[k]) break;
                           off -= ostride[k] * sizes[k];
                           idx[k] = 0;
                         }
                       }
                     }
                   });
  return out.view(shape);
}

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) {
  m.impl("elbo_loss", &elbo_loss_cpu);
  m.impl("reparameterize", &reparameterize_cpu);
  m.impl("reparameterize_backward", &reparameterize_backward_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
}

}  // namespace vae_ext
