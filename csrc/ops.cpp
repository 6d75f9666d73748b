// The vae_ext operator library: schemas, argument checks, CPU implementations and the Python
// module. CUDA implementations are registered from cuda/ops_cuda.cpp in CUDA builds; fake
// kernels and autograd formulas from vae_ext/_ops.py.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Version.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>

#include "common/philox.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace vae_ext {

// ------------------------------------------------------------------------------------ checks

Recon parse_recon(c10::string_view s) {
  if (s == "bce") return Recon::BCE;
  if (s == "bce_logits") return Recon::BCELogits;
  if (s == "mse") return Recon::MSE;
  TORCH_CHECK_VALUE(false, "recon: expected 'bce', 'bce_logits' or 'mse', got '", s, "'");
}

Reduction parse_reduction(c10::string_view s) {
  if (s == "sum") return Reduction::Sum;
  if (s == "mean") return Reduction::Mean;
  if (s == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction: expected 'sum', 'mean' or 'none', got '", s, "'");
}

at::ScalarType loss_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

static void check_float(const char* name, const Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
                   ": expected a float32, float64, float16 or bfloat16 tensor, got ", st);
}

static void check_like(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": expected the same dtype as ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected the same device as ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

// Shapes, dtypes and devices of the elbo_loss inputs; returns {n, d, l}.
static std::tuple<int64_t, int64_t, int64_t> check_elbo_inputs(const Tensor& recon, const Tensor& x,
                                                              const Tensor& mu, const Tensor& logvar) {
  check_float("recon_x", recon);
  check_like("x", x, "recon_x", recon);
  check_like("mu", mu, "recon_x", recon);
  check_like("logvar", logvar, "recon_x", recon);
  TORCH_CHECK_VALUE(recon.dim() >= 1, "recon_x: expected a tensor of shape (N, ...), got a 0-d tensor");
  TORCH_CHECK_VALUE(x.sizes() == recon.sizes(), "x: expected the shape of recon_x ", recon.sizes(), ", got ",
                    x.sizes());
  TORCH_CHECK_VALUE(mu.dim() == 2, "mu: expected shape (N, L), got ", mu.sizes());
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "logvar: expected the shape of mu ", mu.sizes(), ", got ",
                    logvar.sizes());
  const int64_t n = recon.size(0);
  TORCH_CHECK_VALUE(mu.size(0) == n, "mu: expected batch size ", n, " (recon_x.shape[0]), got ", mu.size(0));
  int64_t d = 1;
  for (int64_t i = 1; i < recon.dim(); ++i) d *= recon.size(i);
  return {n, d, mu.size(1)};
}

// The layout recon_x and x are read in: channels_last (or channels_last_3d) when recon_x already
// has it, so a conv decoder's output is not copied and its gradient comes back in that layout;
// contiguous otherwise. vae_ext/_ops.py's fake kernel mirrors it.
static at::MemoryFormat flat_format(const Tensor& recon) {
  if (recon.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (recon.dim() == 4 && recon.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (recon.dim() == 5 && recon.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

ElboBuffers prepare_elbo(const Tensor& recon, const Tensor& x, const Tensor& mu, const Tensor& logvar,
                         bool grad_recon, bool grad_latent) {
  const auto [n, d, l] = check_elbo_inputs(recon, x, mu, logvar);
  const auto fmt = flat_format(recon);
  ElboBuffers b{recon.contiguous(fmt), x.contiguous(fmt), mu.contiguous(), logvar.contiguous(), {}, {}, {}, n, d, l};
  b.g_recon = grad_recon ? at::empty_like(b.recon, fmt) : at::empty({0}, b.recon.options());
  // The latent gradients in the loss dtype (float32 for half inputs) until the backward has scaled
  // them (csrc/autograd.cpp): 0.5 (exp(logvar) - 1) leaves float16's range at logvar > 11.8, and
  // beta = 0 must still give 0. They are N x L, small beside recon's.
  const auto lopts = b.mu.options().dtype(loss_dtype(mu.scalar_type()));
  b.g_mu = grad_latent ? at::empty(b.mu.sizes(), lopts) : at::empty({0}, lopts);
  b.g_logvar = grad_latent ? at::empty(b.logvar.sizes(), lopts) : at::empty({0}, lopts);
  return b;
}

at::MemoryFormat reparam_format(const Tensor& mu) {
  if (mu.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (mu.dim() == 4 && mu.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (mu.dim() == 5 && mu.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

std::pair<int64_t, int64_t> reparam_channels_spatial(const Tensor& mu, at::MemoryFormat fmt) {
  if (fmt == at::MemoryFormat::Contiguous) return {0, 0};
  int64_t spatial = 1;
  for (int64_t i = 2; i < mu.dim(); ++i) spatial *= mu.size(i);
  return {mu.size(1), spatial};
}

Tensor reparam_empty(const Tensor& mu, at::MemoryFormat fmt, int64_t num_samples) {
  std::vector<int64_t> shape(mu.sizes().begin(), mu.sizes().end());
  if (num_samples == 0) return at::empty(shape, mu.options().memory_format(fmt));
  if (fmt == at::MemoryFormat::Contiguous) {
    shape.insert(shape.begin(), num_samples);
    return at::empty(shape, mu.options());
  }
  // (K N, C, *S) in the format, viewed as (K, N, C, *S): each z[k] has mu's layout
  shape[0] *= num_samples;
  const Tensor flat = at::empty(shape, mu.options().memory_format(fmt));
  shape[0] = mu.size(0);
  shape.insert(shape.begin(), num_samples);
  return flat.view(shape);
}

Tensor reparam_in_layout(const Tensor& t, const Tensor& mu, at::MemoryFormat fmt, int64_t num_samples) {
  if (fmt == at::MemoryFormat::Contiguous) return t.contiguous();
  Tensor out = reparam_empty(mu, fmt, num_samples);
  if (t.sizes() == out.sizes() && t.strides() == out.strides()) return t;
  return out.copy_(t);
}

void check_reparam_inputs(const Tensor& mu, const Tensor& logvar, int64_t num_samples) {
  check_float("mu", mu);
  check_like("logvar", logvar, "mu", mu);
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "logvar: expected the shape of mu ", mu.sizes(), ", got ",
                    logvar.sizes());
  TORCH_CHECK_VALUE(num_samples >= 0, "num_samples: expected None or an int >= 1, got ", num_samples);
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

void throw_bce_target_out_of_range() {
  TORCH_CHECK_VALUE(false,
                    "x: recon='bce' expects targets in [0, 1], but found a value outside it (as "
                    "binary_cross_entropy does); scale the data into [0, 1] (e.g. pixels / 255)");
}

void scale_rows_cpu(const Tensor& g, const Tensor& s) {
  const auto st = g.scalar_type();
  TORCH_CHECK(g.is_cpu() && (st == at::kHalf || st == at::kBFloat16) && g.dim() >= 1 &&
                  g.is_non_overlapping_and_dense() && (g.size(0) <= 1 || g.stride(0) == g.numel() / g.size(0)) &&
                  s.scalar_type() == at::kFloat && s.dim() == 1 && s.numel() == g.size(0),
              "scale_rows_cpu: expected a dense float16/bfloat16 CPU g whose samples are blocks, and float32 s of ",
              "one value per sample");
  if (g.numel() == 0) return;
  const Tensor sc = s.contiguous();
  cpu::kernels().scale_rows(st == at::kHalf ? cpu::DType::Float16 : cpu::DType::BFloat16, g.data_ptr(),
                            g.size(0), g.numel() / g.size(0), sc.const_data_ptr<float>());
}

void throw_bce_out_of_range() {
  TORCH_CHECK_VALUE(false,
                    "recon_x: recon='bce' expects probabilities in [0, 1], but found a value outside it; "
                    "pass the decoder's logits with recon='bce_logits' instead");
}

// ------------------------------------------------------------------------------------ CPU

namespace {

cpu::DType cpu_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cpu::DType::Float32;
    case at::kDouble: return cpu::DType::Float64;
    case at::kHalf: return cpu::DType::Float16;
    case at::kBFloat16: return cpu::DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", st);
  }
}

void* ptr_or_null(const Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

// The two outputs from the kernel's sums over the batch (sum and mean): (rec, kl), or with
// total (rec + kl, empty).
std::tuple<Tensor, Tensor> reduce_terms(double sr, double sk, int64_t n, Reduction red, bool total,
                                        at::ScalarType out) {
  if (red == Reduction::Mean) {
    sr /= static_cast<double>(n);  // 0 / 0 = NaN for an empty batch, as Tensor.mean()
    sk /= static_cast<double>(n);
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

ElboOutputs elbo_loss_cpu(const Tensor& recon, const Tensor& x, const Tensor& mu, const Tensor& logvar,
                          c10::string_view recon_mode, c10::string_view reduction, bool grad_recon,
                          bool grad_latent, bool validate, bool total) {
  (void)validate;  // the CPU kernel always checks "bce" probabilities and targets (it is free here)
  const Recon mode = parse_recon(recon_mode);
  const Reduction red = parse_reduction(reduction);
  const ElboBuffers b = prepare_elbo(recon, x, mu, logvar, grad_recon, grad_latent);
  const int64_t n = b.n, d = b.d, l = b.l;
  const Tensor &rc = b.recon, &xc = b.x, &mc = b.mu, &lc = b.logvar, &g_r = b.g_recon, &g_mu = b.g_mu,
               &g_lv = b.g_logvar;
  // Per-sample sums only for reduction="none"; sum and mean take one total each (no buffer of n).
  const bool per_sample = red == Reduction::None;
  Tensor row_rec = per_sample ? at::empty({n}, at::kDouble) : Tensor();
  Tensor row_kl = per_sample ? at::empty({n}, at::kDouble) : Tensor();
  double total_rec = 0.0, total_kl = 0.0;
  std::atomic<bool> bad{false};
  cpu::ElboArgs args{};
  args.dtype = cpu_dtype(recon.scalar_type());
  args.mode = mode;
  args.recon = rc.const_data_ptr();
  args.x = xc.const_data_ptr();
  args.grad_recon = grad_recon ? ptr_or_null(g_r) : nullptr;
  args.mu = mc.const_data_ptr();
  args.logvar = lc.const_data_ptr();
  args.grad_mu = grad_latent ? ptr_or_null(g_mu) : nullptr;
  args.grad_logvar = grad_latent ? ptr_or_null(g_lv) : nullptr;
  args.n = n;
  args.d = d;
  args.l = l;
  args.grad_scale = (red == Reduction::Mean && n > 0) ? 1.0 / static_cast<double>(n) : 1.0;
  args.row_rec = per_sample ? row_rec.data_ptr<double>() : nullptr;
  args.row_kl = per_sample ? row_kl.data_ptr<double>() : nullptr;
  args.total_rec = &total_rec;
  args.total_kl = &total_kl;
  std::atomic<bool> bad_target{false};
  args.bad_prob = &bad;
  args.bad_target = &bad_target;
  cpu::kernels().elbo(args);
  if (bad.load()) throw_bce_out_of_range();
  if (bad_target.load()) throw_bce_target_out_of_range();
  const at::ScalarType out = loss_dtype(recon.scalar_type());
  if (per_sample) {
    if (total) return {row_rec.add_(row_kl).to(out), at::empty({0}, row_rec.options().dtype(out)), g_r, g_mu, g_lv};
    return {row_rec.to(out), row_kl.to(out), g_r, g_mu, g_lv};
  }
  auto [rec, kl] = reduce_terms(total_rec, total_kl, n, red, total, out);
  return {rec, kl, g_r, g_mu, g_lv};
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
  const auto fmt = reparam_format(mu);
  const Tensor mc = mu.contiguous(fmt), lc = logvar.contiguous(fmt);
  Tensor z = reparam_empty(mu, fmt, num_samples);
  Tensor eps = return_eps ? reparam_empty(mu, fmt, num_samples) : at::empty({0}, mu.options());
  Tensor state = at::empty({2}, at::kLong);
  state.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  state.data_ptr<int64_t>()[1] = static_cast<int64_t>(offset);
  if (mu.numel() > 0) {
    cpu::ReparamArgs a{};
    a.dtype = cpu_dtype(mu.scalar_type());
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
                                                       const Tensor& rng_state, int64_t num_samples,
                                                       bool grad_mu) {
  check_reparam_backward_inputs(grad_z, logvar, rng_state, num_samples);
  const auto fmt = reparam_format(logvar);  // the layout the forward computed in (csrc/autograd.cpp)
  const Tensor gc = reparam_in_layout(grad_z, logvar, fmt, num_samples), lc = logvar.contiguous(fmt);
  Tensor g_mu = grad_mu ? at::empty_like(lc, fmt) : at::empty({0}, lc.options()), g_lv = at::empty_like(lc, fmt);
  const Tensor st = rng_state.cpu();
  if (logvar.numel() > 0) {
    cpu::ReparamBackwardArgs a{};
    a.dtype = cpu_dtype(logvar.scalar_type());
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

// ------------------------------------------------------------------------------------ dispatch

namespace cpu {
const KernelTable& kernels() {
  static const KernelTable* table = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    if (cap == "AVX512") return &AVX512::kernel_table();
    if (cap == "AVX2") return &AVX2::kernel_table();
#endif
    return &DEFAULT::kernel_table();
  }();
  return *table;
}
}  // namespace cpu

#if defined(VAE_EXT_WITH_CUDA)
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

TORCH_LIBRARY(vae_ext, m) {
  m.def(
      "elbo_loss(Tensor recon, Tensor x, Tensor mu, Tensor logvar, str recon_mode, str reduction, "
      "bool grad_recon, bool grad_latent, bool validate, bool total=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "reparameterize(Tensor mu, Tensor logvar, int num_samples, bool return_eps, Generator? generator=None) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  // grad_mu=False: the first output is empty (with no samples dimension, grad_mu is grad_z itself)
  m.def(
      "reparameterize_backward(Tensor grad_z, Tensor logvar, Tensor rng_state, int num_samples, "
      "bool grad_mu=True) -> (Tensor, Tensor)");
  m.def("philox_normal(Tensor like, int seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) {
  m.impl("elbo_loss", &elbo_loss_cpu);
  m.impl("reparameterize", &reparameterize_cpu);
  m.impl("reparameterize_backward", &reparameterize_backward_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
}

}  // namespace vae_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vae_ext kernels: the ops are torch.ops.vae_ext.*; this module holds build facts";
  m.def("cpu_capability", [] { return std::string(vae_ext::cpu::kernels().name); },
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
