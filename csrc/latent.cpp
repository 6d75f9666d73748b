#include "latent.h"

#include <cmath>
#include <vector>

#include "checks.h"
#include "grad_block.h"
#include "layout.h"
#include "ops.h"

namespace vae_ext {

LatentScale parse_latent_scale(c10::string_view s) {
  if (s == "logvar") return LatentScale::LogVar;
  if (s == "logsigma") return LatentScale::LogSigma;
  TORCH_CHECK_VALUE(false, "scale: expected 'logvar' (log sigma^2) or 'logsigma' (log sigma), got '", s, "'");
}

LatentKL parse_latent_kl(c10::string_view s) {
  if (s == "analytic") return LatentKL::Analytic;
  if (s == "sample") return LatentKL::Sample;
  TORCH_CHECK_VALUE(false, "kl: expected 'analytic' or 'sample', got '", s, "'");
}

Reduction check_latent_reduction(c10::string_view reduction, double free_bits) {
  const Reduction red = parse_reduction(reduction);
  TORCH_CHECK_VALUE(free_bits >= 0.0 && std::isfinite(free_bits),
                    "free_bits: expected a finite float >= 0 (nats per latent unit), got ", free_bits);
  TORCH_CHECK_VALUE(free_bits == 0.0 || red != Reduction::None,
                    "free_bits: the floor applies to each unit's KL averaged over the batch, so it needs "
                    "reduction 'sum' or 'mean', not 'none'");
  return red;
}

at::MemoryFormat latent_format(const Tensor& mu) {
  if (mu.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (mu.dim() == 4 || mu.dim() == 5) return mu.suggest_memory_format();
  return at::MemoryFormat::Contiguous;
}

bool latent_strides(const Tensor& t, bool samples, LatentStrides* st) {
  const int64_t lead = samples ? 1 : 0, dims = t.dim();
  if (t.numel() == 0) {  // nothing is read or written; a size-0 dimension merges with no stride
    *st = LatentStrides{};
    return true;
  }
  st->k = samples ? t.stride(0) : 0;
  st->n = t.stride(lead);
  // spatial dimensions lead+2.. merged: the innermost one of size > 1 gives the stride, each outer
  // one must step over the inner ones
  int64_t ss = 0, inner = 1;
  bool first = true;
  for (int64_t d = dims - 1; d >= lead + 2; --d) {
    if (t.size(d) == 1) continue;
    if (first) {
      ss = t.stride(d);
      first = false;
    } else if (t.stride(d) != ss * inner) {
      return false;
    }
    inner *= t.size(d);
  }
  st->c = dims > lead + 1 ? t.stride(lead + 1) : 0;
  st->s = first ? st->c : ss;  // S == 1: any stride; the c one lets (c, s) merge
  return true;
}

Tensor latent_readable(const Tensor& t, bool samples, LatentStrides* st) {
  if (latent_strides(t, samples, st)) return t;
  Tensor c = t.contiguous();
  TORCH_INTERNAL_ASSERT(latent_strides(c, samples, st));
  return c;
}

void merge_latent_channels(LatentArgs& a, std::initializer_list<LatentStrides*> strides) {
  if (a.c == 1) return;
  for (const LatentStrides* st : strides)
    if (st->c != st->s * a.s) return;
  for (LatentStrides* st : strides) st->c = 0;  // only channel 0 is left
  a.s *= a.c;
  a.c = 1;
}

static void check_float(const char* name, const Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
                   ": expected a float32, float64, float16 or bfloat16 tensor, got ", st);
}

static void check_like(const char* name, const Tensor& t, const Tensor& mu) {
  TORCH_CHECK_TYPE(t.scalar_type() == mu.scalar_type(), name, ": expected the same dtype as mu (", mu.scalar_type(),
                   "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == mu.device(), name, ": expected the same device as mu (", mu.device(), "), got ",
                    t.device());
}

LatentInputs prepare_latent(const Tensor& mu, const Tensor& logscale, const c10::optional<Tensor>& prior_mu,
                            const c10::optional<Tensor>& prior_logscale, c10::string_view scale, c10::string_view kl,
                            int64_t num_samples) {
  check_float("mu", mu);
  check_like("logscale", logscale, mu);
  TORCH_CHECK_VALUE(mu.dim() >= 1, "mu: expected a tensor of shape (N, ...), got a 0-d tensor");
  TORCH_CHECK_VALUE(logscale.sizes() == mu.sizes(), "logscale: expected the shape of mu ", mu.sizes(), ", got ",
                    logscale.sizes());
  TORCH_CHECK_VALUE(prior_mu.has_value() == prior_logscale.has_value(),
                    prior_mu.has_value() ? "prior_logscale" : "prior_mu",
                    ": expected a tensor, as prior_mu and prior_logscale go together (both or neither)");
  for (const auto& [name, p] :
       {std::make_pair("prior_mu", &prior_mu), std::make_pair("prior_logscale", &prior_logscale)}) {
    if (!p->has_value()) continue;
    check_like(name, **p, mu);
    TORCH_CHECK_VALUE((*p)->dim() <= mu.dim() && at::is_expandable_to((*p)->sizes(), mu.sizes()), name,
                      ": expected a shape that broadcasts to mu's ", mu.sizes(), " (mu's own, or one like ",
                      "mu.shape[1:] shared by every sample), got ", (*p)->sizes());
  }
  check_num_samples(num_samples, mu);
  LatentInputs in;
  LatentArgs& a = in.a;
  a = LatentArgs{};
  a.dtype = kernel_dtype(mu.scalar_type());
  a.scale = parse_latent_scale(scale);
  a.kl = parse_latent_kl(kl);
  a.k = std::max<int64_t>(num_samples, 1);
  a.n = mu.size(0);
  a.c = mu.dim() > 1 ? mu.size(1) : 1;
  a.s = 1;
  for (int64_t d = 2; d < mu.dim(); ++d) a.s *= mu.size(d);
  in.mu = latent_readable(mu, false, &a.mu_st);
  in.ls = latent_readable(logscale, false, &a.ls_st);
  in.prior = prior_mu.has_value();
  if (in.prior) {
    in.pmu = latent_readable(prior_mu->expand(mu.sizes()), false, &a.pmu_st);
    in.pls = latent_readable(prior_logscale->expand(mu.sizes()), false, &a.pls_st);
  } else if (!mu.is_cpu()) {
    in.pmu = in.pls = at::zeros({1}, mu.options());  // N(0, I): 0 and 0, read with stride 0
  }
  a.mu = in.mu.const_data_ptr();
  a.ls = in.ls.const_data_ptr();
  if (in.pmu.defined()) {
    a.pmu = in.pmu.const_data_ptr();
    a.pls = in.pls.const_data_ptr();
  } else {  // N(0, I) on the CPU: a static zero (all-zero bytes are 0 in every float dtype), no tensor
    alignas(16) static const double kZero[1] = {0.0};
    a.pmu = a.pls = kZero;
  }
  if (!in.prior) a.pmu_st = a.pls_st = LatentStrides{0, 0, 0, 0};
  return in;
}

std::tuple<Tensor, Tensor> latent_kl_outputs(const Tensor& row_kl, const Tensor& kl_elems, const Tensor& mu,
                                             int64_t num_samples, c10::string_view reduction, double free_bits) {
  const Reduction red = parse_reduction(reduction);
  const at::ScalarType out = loss_dtype(mu.scalar_type());
  const auto opts = row_kl.options().dtype(out);
  const int64_t rows = row_kl.numel();
  if (red == Reduction::None) {
    std::vector<int64_t> shape = {mu.size(0)};
    if (num_samples > 0) shape.insert(shape.begin(), num_samples);
    return {row_kl.to(out).view(shape), at::empty({0}, opts)};
  }
  // A float32 result whose double sum exceeds float's range is inf, as a float32 sum gives (a
  // double scalar would be checked on its conversion).
  const auto scalar = [&](double v) {
    return at::scalar_tensor(out == at::kFloat ? static_cast<double>(static_cast<float>(v)) : v, opts.device(at::kCPU))
        .to(row_kl.device());
  };
  if (free_bits > 0.0) {
    Tensor floored;
    const Tensor units = unit_kl_and_free_bits(kl_elems, mu.sizes().slice(1), free_bits, red, {}, &floored);
    // clamp's gradient: a unit at the floor keeps its gradient, a NaN one loses it
    Tensor unit_w = units.reshape({-1}).ge(free_bits).to(out);
    return {floored.to(out), unit_w};
  }
  Tensor total;
  if (row_kl.is_cpu()) {  // rows in order: the same sum for any thread count
    double s = 0.0;
    const double* p = row_kl.const_data_ptr<double>();
    for (int64_t r = 0; r < rows; ++r) s += p[r];
    if (red == Reduction::Mean) s /= static_cast<double>(rows);  // 0 / 0 = NaN for an empty batch
    total = scalar(s);
  } else {
    total = row_kl.sum();
    if (red == Reduction::Mean) total = total.div(static_cast<double>(rows));
    total = total.to(out);
  }
  return {total, at::empty({0}, opts)};
}

void check_latent_backward(const c10::optional<Tensor>& grad_z, const c10::optional<Tensor>& row_w, const Tensor& mu,
                           const Tensor& rng_state, const Tensor& unit_w, int64_t num_samples) {
  const int64_t k = std::max<int64_t>(num_samples, 1);
  if (grad_z.has_value()) {
    std::vector<int64_t> shape(mu.sizes().begin(), mu.sizes().end());
    if (num_samples > 0) shape.insert(shape.begin(), num_samples);
    TORCH_CHECK_VALUE(grad_z->sizes() == at::IntArrayRef(shape), "grad_z: expected shape ", at::IntArrayRef(shape),
                      ", got ", grad_z->sizes());
    check_like("grad_z", *grad_z, mu);
  }
  if (row_w.has_value()) {
    TORCH_CHECK_VALUE(row_w->numel() == k * mu.size(0) && row_w->device() == mu.device(), "row_w: expected ",
                      k * mu.size(0), " elements on ", mu.device(), ", got ", row_w->sizes());
    TORCH_CHECK_TYPE(row_w->scalar_type() == loss_dtype(mu.scalar_type()), "row_w: expected dtype ",
                     loss_dtype(mu.scalar_type()), ", got ", row_w->scalar_type());
  }
  TORCH_CHECK_VALUE(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2,
                    "rng_state: expected the 2 int64 values the forward returned");
  int64_t units = 1;
  for (int64_t d = 1; d < mu.dim(); ++d) units *= mu.size(d);
  TORCH_CHECK_VALUE(unit_w.numel() == 0 || (unit_w.numel() == units && unit_w.device() == mu.device() &&
                                            unit_w.scalar_type() == loss_dtype(mu.scalar_type())),
                    "unit_w: expected the free-bits weights the forward returned (", units, " elements)");
}

LatentForwardBuffers fill_latent_forward_args(LatentArgs& a, const Tensor& mu, int64_t num_samples, double free_bits) {
  LatentForwardBuffers b;
  b.z = reparam_empty(mu, latent_format(mu), num_samples);
  TORCH_INTERNAL_ASSERT(latent_strides(b.z, num_samples > 0, &a.z_st));
  a.z = b.z.numel() ? b.z.data_ptr() : nullptr;
  const int64_t rows = a.k * a.n, len = a.c * a.s;
  if (free_bits > 0.0) b.kl_elems = at::empty({rows, len}, mu.options().dtype(loss_dtype(mu.scalar_type())));
  a.kl_elems = b.kl_elems.defined() && b.kl_elems.numel() ? b.kl_elems.data_ptr() : nullptr;
  merge_latent_channels(a, {&a.mu_st, &a.ls_st, &a.pmu_st, &a.pls_st, &a.z_st});
  return b;
}

bool whole_prior(const Tensor& mu, const c10::optional<Tensor>& prior_mu, const c10::optional<Tensor>& prior_logscale) {
  return prior_mu.has_value() && prior_logscale.has_value() && prior_mu->sizes() == mu.sizes() &&
         prior_logscale->sizes() == mu.sizes();
}

LatentBackwardBuffers fill_latent_backward_args(LatentArgs& a, bool prior, bool whole,
                                                const c10::optional<Tensor>& grad_z, const c10::optional<Tensor>& row_w,
                                                const Tensor& mu, const Tensor& unit_w, int64_t num_samples,
                                                bool grad_prior) {
  LatentBackwardBuffers b;
  const auto fmt = latent_format(mu);
  const bool prior_grads = grad_prior && prior && row_w.has_value();
  // A prior of mu's shape gets its gradients as the kernel writes them: on the CPU in mu's dtype
  // (rounded once, no conversion pass for a half prior); a broadcast one's are summed over the
  // batch in the loss dtype, then rounded (and CUDA's kernels write the loss dtype).
  a.g_prior_in_dtype = whole && mu.is_cpu();
  const auto lopts = mu.options().dtype(a.g_prior_in_dtype ? mu.scalar_type() : loss_dtype(mu.scalar_type()));
  // The gradients the caller gets as they are and frees together (.grad = None, zero_grad): mu's,
  // logscale's and, where they are handed on as they are, the prior's. One block on the CPU
  // (csrc/grad_block.h): four separate ones were new pages on every call under glibc's defaults.
  const bool prior_whole = prior_grads && whole && lopts.dtype() == mu.dtype();
  std::vector<at::TensorOptions> opts(2, mu.options().memory_format(fmt));
  if (prior_whole) opts.insert(opts.end(), 2, lopts);
  auto g = empty_together(mu.sizes(), opts);
  b.g_mu = std::move(g[0]);
  b.g_ls = std::move(g[1]);
  TORCH_INTERNAL_ASSERT(latent_strides(b.g_mu, false, &a.g_st));
  a.g_mu = b.g_mu.numel() ? b.g_mu.data_ptr() : nullptr;
  a.g_ls = b.g_ls.numel() ? b.g_ls.data_ptr() : nullptr;
  if (grad_z.has_value()) {
    b.gz = latent_readable(*grad_z, num_samples > 0, &a.gz_st);
    a.grad_z = b.gz.numel() ? b.gz.const_data_ptr() : nullptr;
  } else {
    a.gz_st = a.g_st;  // unread
  }
  b.rw = row_w.has_value() ? row_w->contiguous() : Tensor();
  b.uw = unit_w.numel() > 0 ? unit_w.contiguous() : Tensor();
  a.row_w = b.rw.defined() && b.rw.numel() ? b.rw.const_data_ptr() : nullptr;
  a.unit_w = b.uw.defined() ? b.uw.const_data_ptr() : nullptr;
  if (prior_whole) {
    b.g_pmu = std::move(g[2]);
    b.g_pls = std::move(g[3]);
  } else {
    b.g_pmu = prior_grads ? advise_huge_pages(at::empty(mu.sizes(), lopts)) : at::empty({0}, lopts);
    b.g_pls = prior_grads ? advise_huge_pages(at::empty(mu.sizes(), lopts)) : at::empty({0}, lopts);
  }
  a.g_pmu = prior_grads && b.g_pmu.numel() ? b.g_pmu.data_ptr() : nullptr;
  a.g_pls = prior_grads && b.g_pls.numel() ? b.g_pls.data_ptr() : nullptr;
  merge_latent_channels(a, {&a.mu_st, &a.ls_st, &a.pmu_st, &a.pls_st, &a.gz_st, &a.g_st});
  return b;
}

}  // namespace vae_ext
