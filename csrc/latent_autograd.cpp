// Autograd of gaussian_latent, in C++ on the Autograd dispatch key (as csrc/autograd.cpp for the
// other ops): the forward saves the inputs and the (seed, offset) it drew from, never eps; the
// backward calls gaussian_latent_backward, which draws eps again and sums both outputs' gradients.
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "autograd_common.h"
#include "latent.h"
#include "ops.h"

namespace vae_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using LatentOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// gaussian_latent_backward through the dispatcher.
std::tuple<Tensor, Tensor, Tensor, Tensor> call_latent_backward(
    const std::optional<Tensor>& grad_z, const std::optional<Tensor>& row_w, const Tensor& mu, const Tensor& logscale,
    const std::optional<Tensor>& prior_mu, const std::optional<Tensor>& prior_logscale, const Tensor& rng_state,
    const Tensor& unit_w, c10::string_view scale, c10::string_view kl, int64_t num_samples, bool grad_prior) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vae_ext::gaussian_latent_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                           const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                           c10::string_view, c10::string_view, int64_t, bool)>();
  return op.call(grad_z, row_w, mu, logscale, prior_mu, prior_logscale, rng_state, unit_w, scale, kl, num_samples,
                 grad_prior);
}

// d loss / d (each of `rows` KL rows) in the loss dtype `ldtype`, from the incoming gradient of a KL
// reduced per sample (one value a row), summed, or averaged over the rows (`mean`). rows in SymInts:
// a traced backward's batch size stays a symbol (read as an int, torch.compile would specialize it).
Tensor kl_row_weights(const Tensor& grad_kl, const c10::SymInt& rows, bool per_sample, bool mean,
                      at::ScalarType ldtype) {
  const Tensor g = grad_kl.to(ldtype);
  if (per_sample) return g.reshape_symint({rows});
  return (mean ? g.div(c10::Scalar(rows)) : g).reshape({1}).expand_symint({rows});
}

// The tensors the backward reads, as saved: each input itself, or a compact copy (in mu's layout)
// of those that are views into a storage at least twice the bytes they are, which saving them would
// keep alive. VDVAE's prior mean and log-scale are channel slices of the prior network's output,
// whose other channels (the state update) are freed after the forward: the views would pin all of
// it. A chunk(2) of a conv output (q's mean and log-scale) is the whole storage: saved as is.
// Tensor subclasses (torch.compile's fake and functional tensors) are saved as they are.
std::vector<Tensor> saved_inputs(const std::vector<Tensor>& ts, const Tensor& mu) {
  std::vector<Tensor> out(ts);
  for (size_t i = 0; i < ts.size(); ++i) {
    const Tensor& t = ts[i];
    if (!t.defined() || !t.has_storage() || t.unsafeGetTensorImpl()->is_python_dispatch() ||
        !(t.is_cpu() || t.is_cuda()))
      continue;
    const auto& st = t.storage();
    int64_t need = 0;  // the bytes of the saved tensors that share t's storage
    for (const Tensor& u : ts)
      if (u.defined() && u.has_storage() && u.storage().is_alias_of(st)) need += u.numel() * u.element_size();
    if (static_cast<int64_t>(st.nbytes()) >= 2 * need && need > 0)
      out[i] = t.clone(t.dim() == mu.dim() ? latent_format(mu) : at::MemoryFormat::Contiguous);
  }
  return out;
}

struct GaussianLatentFunction : public torch::autograd::Function<GaussianLatentFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logscale,
                               const std::optional<Tensor>& prior_mu, const std::optional<Tensor>& prior_logscale,
                               const std::string& scale, const std::string& kl, const std::string& reduction,
                               double free_bits, int64_t num_samples, const std::optional<at::Generator>& generator) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("vae_ext::gaussian_latent", "")
                         .typed<LatentOutputs(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                              const std::optional<Tensor>&, c10::string_view, c10::string_view,
                                              c10::string_view, double, int64_t, std::optional<at::Generator>)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [z, kl_out, state, unit_w] =
        op.call(mu, logscale, prior_mu, prior_logscale, scale, kl, reduction, free_bits, num_samples, generator);
    const bool prior = prior_mu.has_value();
    auto ins = saved_inputs({mu, logscale, prior ? *prior_mu : Tensor(), prior ? *prior_logscale : Tensor()}, mu);
    ctx->save_for_backward({ins[0], ins[1], ins[2], ins[3], state, unit_w});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["kl"] = kl;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["num_samples"] = num_samples;
    ctx->saved_data["prior"] = prior;
    if (prior) {
      // in SymInts: a traced batch size stays a symbol (read as an int, it would be specialized)
      ctx->saved_data["prior_mu_shape"] = prior_mu->sym_sizes();
      ctx->saved_data["prior_logscale_shape"] = prior_logscale->sym_sizes();
    }
    ctx->mark_non_differentiable({state, unit_w});
    ctx->set_materialize_grads(false);
    return {z, kl_out, state, unit_w};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor &grad_z = grads[0], &grad_kl = grads[1];
    variable_list out(10);
    if (!grad_z.defined() && !grad_kl.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &mu = saved[0], &logscale = saved[1];
    const bool prior = ctx->saved_data["prior"].toBool();
    const int64_t k = ctx->saved_data["num_samples"].toInt();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    // d loss / d (each row's KL), rows k * N + n, in the loss dtype: the reduction's backward
    std::optional<Tensor> row_w;
    if (grad_kl.defined())
      row_w = kl_row_weights(grad_kl, std::max<int64_t>(k, 1) * mu.sym_size(0), reduction == "none", reduction == "mean",
                             loss_dtype(mu.scalar_type()));
    const auto needs = [&](size_t i) { return ctx->needs_input_grad(i); };  // mu, logscale, then the prior
    const bool grad_prior = prior && (needs(2) || needs(3));
    const std::optional<Tensor> pm = prior ? std::optional<Tensor>(saved[2]) : std::nullopt;
    const std::optional<Tensor> pl = prior ? std::optional<Tensor>(saved[3]) : std::nullopt;
    auto [g_mu, g_ls, g_pmu, g_pls] = call_latent_backward(
        grad_z.defined() ? std::optional<Tensor>(grad_z) : std::nullopt, row_w, mu, logscale, pm, pl, saved[4],
        saved[5], ctx->saved_data["scale"].toStringRef(), ctx->saved_data["kl"].toStringRef(), k, grad_prior);
    if (needs(0)) out[0] = g_mu;
    if (needs(1)) out[1] = g_ls;
    if (grad_prior && row_w.has_value()) {  // the prior's gradients come from the KL alone
      const auto dtype = mu.scalar_type();
      if (needs(2)) out[2] = prior_grad(g_pmu, ctx->saved_data["prior_mu_shape"].toSymIntVector(), dtype);
      if (needs(3)) out[3] = prior_grad(g_pls, ctx->saved_data["prior_logscale_shape"].toSymIntVector(), dtype);
    }
    return first_order_only(out,
                            "vae_ext.gaussian_latent supports first derivatives only. For higher-order gradients "
                            "(create_graph=True) use vae_ext.reference.gaussian_latent.");
  }
};

LatentOutputs gaussian_latent_autograd(const Tensor& mu, const Tensor& logscale, const c10::optional<Tensor>& prior_mu,
                                       const c10::optional<Tensor>& prior_logscale, c10::string_view scale,
                                       c10::string_view kl, c10::string_view reduction, double free_bits,
                                       int64_t num_samples, std::optional<at::Generator> generator) {
  check_functorch("vae_ext.gaussian_latent", "vae_ext.reference.gaussian_latent");
  auto out = GaussianLatentFunction::apply(mu, logscale, prior_mu, prior_logscale, std::string(scale), std::string(kl),
                                           std::string(reduction), free_bits, num_samples, generator);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, Autograd, m) { m.impl("gaussian_latent", &gaussian_latent_autograd); }

}  // namespace vae_ext
