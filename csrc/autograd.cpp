// Autograd for the vae_ext ops, in C++ (the Autograd dispatch key): a Python autograd.Function
// costs tens of microseconds per call, as much as the whole loss kernel at VAE sizes. The forward
// redispatches to the CPU/CUDA kernel; the backward scales the gradients the forward wrote
// (elbo_loss) or calls reparameterize_backward, which recomputes eps (reparameterize).
#include <torch/library.h>

#include <algorithm>

#include "autograd_common.h"
#include "elbo_basic.h"
#include "ops.h"

namespace vae_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether elbo_loss recomputes the latent gradients in its backward instead of writing them in the
// forward: float16 on the CPU, where the forward's buffers would be float32 (twice the bytes of the
// inputs, written then read) and the backward must round them to float16 anyway. Free bits keep
// the forward's buffers (the units under the floor are known there).
bool recomputes_kl(const Tensor& mu, double free_bits) {
  return mu.is_cpu() && mu.scalar_type() == at::kHalf && free_bits == 0.0;
}

// The latent gradients of elbo_loss's KL at the incoming gradient d_kl, recomputed from the saved
// inputs (saved[6..9]: mu, logvar, the prior or undefined) by gaussian_latent_backward: its analytic
// KL at scale "logvar" is this KL, each row's weight d_kl (per sample), or d_kl (/ N for the mean)
// for all. (g_mu, g_logvar, g_prior_mu, g_prior_logvar), the prior's summed to its shape.
std::vector<Tensor> kl_grads_again(const variable_list& saved, const Tensor& d_kl, bool per_sample, bool mean,
                                   bool grad_prior) {
  const Tensor &mu = saved[6], &logvar = saved[7];
  const bool prior = saved[8].defined();
  const auto ldtype = loss_dtype(mu.scalar_type());
  const Tensor w = kl_row_weights(d_kl, mu.size(0), per_sample, mean, ldtype);
  const std::optional<Tensor> pm = prior ? std::optional<Tensor>(saved[8]) : std::nullopt;
  const std::optional<Tensor> pl = prior ? std::optional<Tensor>(saved[9]) : std::nullopt;
  // no draw (z is not differentiated): the generator state is unread
  const Tensor no_state = at::zeros({2}, at::kLong), no_units = at::empty({0}, mu.options().dtype(ldtype));
  auto [g_mu, g_lv, g_pmu, g_plv] =
      call_latent_backward(std::nullopt, w, mu, logvar, pm, pl, no_state, no_units, "logvar", "analytic", 0, prior && grad_prior);
  if (prior && grad_prior) {
    g_pmu = prior_grad(g_pmu, saved[8].sizes(), mu.scalar_type());
    g_plv = prior_grad(g_plv, saved[9].sizes(), mu.scalar_type());
  } else {
    g_pmu = g_plv = Tensor();
  }
  return {g_mu, g_lv, g_pmu, g_plv};
}

struct ElboLossFunction : public torch::autograd::Function<ElboLossFunction> {
  // An absent optional tensor is no input of the node: needs_input_grad counts the present ones
  // (ctx->saved_data["edges"] maps the inputs to them).
  static variable_list forward(AutogradContext* ctx, const Tensor& recon, const Tensor& x, const Tensor& mu,
                               const Tensor& logvar, const std::optional<Tensor>& prior_mu,
                               const std::optional<Tensor>& prior_logvar, const std::optional<Tensor>& recon_logvar,
                               const std::string& recon_mode, const std::string& reduction, bool grad_recon,
                               bool grad_latent, bool validate, bool total, double free_bits, bool unit_kl,
                               bool recorded) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("vae_ext::elbo_loss", "")
            .typed<ElboOutputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view,
                               c10::string_view, bool, bool, bool, bool, const c10::optional<Tensor>&,
                               const c10::optional<Tensor>&, const c10::optional<Tensor>&, double, bool)>();
    at::AutoDispatchBelowADInplaceOrView below;
    // float16 on the CPU: the latent gradients are recomputed in the backward from the inputs
    // (gaussian_latent_backward, the analytic KL's kernel), scaled and rounded once; the forward
    // writes no float32 buffer for them (docs/design.md, "Half precision").
    const bool kl_again = grad_latent && recomputes_kl(mu, free_bits);
    auto out = op.call(recon, x, mu, logvar, recon_mode, reduction, grad_recon, grad_latent && !kl_again, validate,
                       total, prior_mu, prior_logvar, recon_logvar, free_bits, unit_kl);
    auto& [rec, kl, units, g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar] = out;
    const auto input = [&](const std::optional<Tensor>& t) { return kl_again && t.has_value() ? *t : Tensor(); };
    ctx->save_for_backward({g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar, input(mu),
                            input(logvar), input(prior_mu), input(prior_logvar)});
    ctx->saved_data["kl_again"] = kl_again;
    ctx->saved_data["mean"] = reduction == "mean";
    ctx->saved_data["dtype"] = static_cast<int64_t>(recon.scalar_type());
    ctx->saved_data["per_sample"] = reduction == "none";
    ctx->saved_data["grad_recon"] = grad_recon;
    ctx->saved_data["grad_latent"] = grad_latent;
    ctx->saved_data["total"] = total;
    ctx->saved_data["rlv_scalar"] = recon_logvar.has_value() && recon_logvar->dim() == 0;
    // the node's input (edge) of each of the seven tensor arguments, -1 for an absent one
    std::vector<int64_t> edges = {0, 1, 2, 3};
    for (const auto* t : {&prior_mu, &prior_logvar, &recon_logvar})
      edges.push_back(t->has_value() ? static_cast<int64_t>(
                                           std::count_if(edges.begin(), edges.end(), [](int64_t e) { return e >= 0; }))
                                     : -1);
    ctx->saved_data["edges"] = edges;
    if (prior_mu.has_value()) {
      ctx->saved_data["prior_mu_shape"] = prior_mu->sizes();
      ctx->saved_data["prior_logvar_shape"] = prior_logvar->sizes();
    }
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs nobody differentiates
    // The backward scales the saved buffers in place, so while a graph can reach them (`recorded`:
    // grad mode was on and an input requires grad) they are not handed to the caller, whose copy a
    // later backward would change: empty tensors stand in.
    variable_list bufs = {g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar};
    if (recorded)
      for (auto& t : bufs) t = at::empty({0}, t.options());
    ctx->mark_non_differentiable({units, bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5]});
    return {rec, kl, units, bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool per_sample = ctx->saved_data["per_sample"].toBool();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const auto needs = [&](size_t i) { return edges[i] >= 0 && ctx->needs_input_grad(static_cast<size_t>(edges[i])); };
    const bool need_recon = needs(0) || needs(6), need_latent = needs(2) || needs(3) || needs(4) || needs(5);
    TORCH_CHECK(!needs(1), "vae_ext::elbo_loss does not differentiate with respect to the target x");
    TORCH_CHECK((!need_recon || ctx->saved_data["grad_recon"].toBool()) &&
                    (!need_latent || ctx->saved_data["grad_latent"].toBool()),
                "vae_ext::elbo_loss: backward needs the gradient buffers, but the op was called with "
                "grad_recon/grad_latent=False; call it through vae_ext.elbo_loss");
    // total: the first output is rec + kl, the second is empty (both terms get its gradient).
    const bool total = ctx->saved_data["total"].toBool();
    const Tensor &d_rec = grads[0], &d_kl = total ? grads[0] : grads[1];
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const auto ldtype = loss_dtype(dtype);  // float32 for half inputs
    Tensor g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar;
    DeviceScales device;
    if (d_rec.defined()) {
      if (needs(0)) g_recon = scale_grad(saved[0], d_rec, per_sample, dtype, device);
      if (needs(6)) {
        const Tensor& g = saved[5];
        // a 0-d recon_logvar: its gradient per sample (none) or over the batch, in double (past
        // float's range unscaled, it may be finite scaled); scaled and summed in a fixed order
        if (ctx->saved_data["rlv_scalar"].toBool())
          g_recon_logvar = sum_all(at::mul(g.to(at::kDouble), d_rec.to(at::kDouble))).to(dtype);
        else
          g_recon_logvar = scale_grad(g, d_rec, per_sample, dtype, device);
      }
    }
    if (d_kl.defined() && ctx->saved_data["kl_again"].toBool()) {
      auto g = kl_grads_again(saved, d_kl, per_sample, ctx->saved_data["mean"].toBool(), needs(4) || needs(5));
      if (needs(2)) g_mu = std::move(g[0]);
      if (needs(3)) g_logvar = std::move(g[1]);
      if (needs(4)) g_prior_mu = std::move(g[2]);
      if (needs(5)) g_prior_logvar = std::move(g[3]);
    } else if (d_kl.defined()) {
      if (needs(2)) g_mu = scale_grad(saved[1], d_kl, per_sample, dtype, device);
      if (needs(3)) g_logvar = scale_grad(saved[2], d_kl, per_sample, dtype, device);
      // the prior's: where it was broadcast, scaled in the loss dtype, summed, then rounded; one of
      // mu's shape on the CPU scaled and rounded in one pass (CUDA: scaled, then rounded)
      const auto pdtype = [&](const Tensor& g, const char* shape) {
        return g.is_cpu() && g.sizes() == at::IntArrayRef(ctx->saved_data[shape].toIntVector()) ? dtype : ldtype;
      };
      if (needs(4)) g_prior_mu = scale_grad(saved[3], d_kl, per_sample, pdtype(saved[3], "prior_mu_shape"), device);
      if (needs(5))
        g_prior_logvar = scale_grad(saved[4], d_kl, per_sample, pdtype(saved[4], "prior_logvar_shape"), device);
    }
    device.launch();
    if (g_prior_mu.defined())
      g_prior_mu = prior_grad(g_prior_mu, ctx->saved_data["prior_mu_shape"].toIntVector(), dtype);
    if (g_prior_logvar.defined())
      g_prior_logvar = prior_grad(g_prior_logvar, ctx->saved_data["prior_logvar_shape"].toIntVector(), dtype);
    // The gradients are the buffers the forward wrote, scaled: no graph back to the inputs.
    return first_order_only({g_recon, Tensor(), g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar, Tensor(),
                             Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()},
                            "vae_ext.elbo_loss supports first derivatives only: its backward scales the gradients "
                            "its forward wrote. For higher-order gradients (create_graph=True) use "
                            "vae_ext.reference.elbo_loss.");
  }
};

ElboOutputs elbo_loss_autograd(VAE_EXT_ELBO_ARGS) {
  check_functorch("vae_ext.elbo_loss (torch.ops.vae_ext.elbo_loss)", "vae_ext.reference.elbo_loss");
  const auto req = [](const std::optional<Tensor>& t) { return t.has_value() && t->requires_grad(); };
  // (forward runs with grad mode off: whether a graph is recorded is known only here)
  const bool recorded =
      at::GradMode::is_enabled() && (recon.requires_grad() || mu.requires_grad() || logvar.requires_grad() ||
                                     req(prior_mu) || req(prior_logvar) || req(recon_logvar));
  auto out = ElboLossFunction::apply(recon, x, mu, logvar, prior_mu, prior_logvar, recon_logvar,
                                     std::string(recon_mode), std::string(reduction), grad_recon, grad_latent, validate,
                                     total, free_bits, unit_kl, recorded);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
}

struct ReparameterizeFunction : public torch::autograd::Function<ReparameterizeFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar, int64_t num_samples,
                               bool return_eps, const std::optional<at::Generator>& generator) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("vae_ext::reparameterize", "")
            .typed<ReparamOutputs(const Tensor&, const Tensor&, int64_t, bool, std::optional<at::Generator>)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [z, eps, state] = op.call(mu, logvar, num_samples, return_eps, generator);
    // The backward computes in logvar's layout (reparameterize_backward cannot see mu): give it the
    // one the forward used, mu's (a copy only when the two differ).
    const auto fmt = kernel_format(mu);
    ctx->save_for_backward({kernel_format(logvar) == fmt ? logvar : logvar.contiguous(fmt), state});
    ctx->saved_data["num_samples"] = num_samples;
    ctx->mark_non_differentiable({eps, state});
    ctx->set_materialize_grads(false);
    return {z, eps, state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("vae_ext::reparameterize_backward", "")
            .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, bool)>();
    const Tensor& grad_z = grads[0];
    if (!grad_z.defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    const int64_t k = ctx->saved_data["num_samples"].toInt();
    if (at::GradMode::is_enabled()) return differentiable_backward(ctx, grad_z, saved[0], saved[1], k);
    // Without a samples dimension d z / d mu is the identity: grad_mu is grad_z itself.
    auto [g_mu, g_logvar] = op.call(grad_z, saved[0], saved[1], k, /*grad_mu=*/k > 0);
    if (k == 0) g_mu = grad_z;
    return {ctx->needs_input_grad(0) ? g_mu : Tensor(), ctx->needs_input_grad(1) ? g_logvar : Tensor(), Tensor(),
            Tensor(), Tensor()};
  }

  // create_graph=True: the same gradients from differentiable ATen ops, eps redrawn (a constant)
  // by philox_normal from the forward's (seed, offset), so higher-order gradients are right:
  // grad_mu = sum_s g_s, grad_logvar = 0.5 exp(0.5 logvar) sum_s g_s eps_s. Reads the two state
  // values on the host (a device sync on CUDA), which this rare path can afford.
  static variable_list differentiable_backward(AutogradContext* ctx, const Tensor& grad_z, const Tensor& logvar,
                                               const Tensor& state, int64_t k) {
    static auto normal = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_ext::philox_normal", "")
                             .typed<Tensor(const Tensor&, int64_t, int64_t)>();
    const Tensor st = state.cpu();
    const Tensor eps = normal.call(grad_z, st.const_data_ptr<int64_t>()[0], st.const_data_ptr<int64_t>()[1])
                           .to(logvar.scalar_type());  // the kernels' eps: float32, then the input dtype
    Tensor g_eps = grad_z * eps, g_mu = grad_z;
    if (k > 0) {
      // summed over the samples as a cumulative sum, one sequential scan per element: Tensor.sum
      // splits a long sum (one element, more than 32768 samples) over threads, and its bits would
      // depend on their number
      g_eps = g_eps.cumsum(0).select(0, -1);
      g_mu = grad_z.cumsum(0).select(0, -1);
    }
    const Tensor g_logvar = 0.5 * at::exp(0.5 * logvar) * g_eps;
    return {ctx->needs_input_grad(0) ? g_mu : Tensor(), ctx->needs_input_grad(1) ? g_logvar : Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

ReparamOutputs reparameterize_autograd(const Tensor& mu, const Tensor& logvar, int64_t num_samples, bool return_eps,
                                       std::optional<at::Generator> generator) {
  check_functorch("vae_ext.reparameterize (torch.ops.vae_ext.reparameterize)", "vae_ext.reference.reparameterize");
  auto out = ReparameterizeFunction::apply(mu, logvar, num_samples, return_eps, generator);
  return {out[0], out[1], out[2]};
}

// elbo_loss_basic (csrc/elbo_basic.h): the common call's autograd, as ElboLossFunction's with three
// buffers. Its backward applies pixel_mean's 1/D to the recon gradient and beta to the latent ones
// together with the incoming gradient: one scaling each, none at all when the product is 1.
struct ElboBasicFunction : public torch::autograd::Function<ElboBasicFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& recon, const Tensor& x, const Tensor& mu,
                               const Tensor& logvar, c10::string_view recon_mode, c10::string_view reduction,
                               double beta, bool grad_recon, bool grad_latent, bool validate, bool recorded) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("vae_ext::elbo_loss_basic", "")
                         .typed<BasicOutputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             c10::string_view, c10::string_view, double, bool, bool, bool)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, g_recon, g_mu, g_logvar] =
        op.call(recon, x, mu, logvar, recon_mode, reduction, beta, grad_recon, grad_latent, validate);
    ctx->save_for_backward({g_recon, g_mu, g_logvar});
    // dtype, then one bit each: per sample, grad_recon, grad_latent
    ctx->saved_data["flags"] = static_cast<int64_t>(recon.scalar_type()) | (reduction == "none" ? 256 : 0) |
                               (grad_recon ? 512 : 0) | (grad_latent ? 1024 : 0);
    // pixel_mean's divisor of the recon term (1: none), applied to grad_output as autograd's
    // division of the full op's path would (the same bits either way)
    ctx->saved_data["recon_div"] = reduction == "pixel_mean" ? static_cast<double>(values_per_sample(recon)) : 1.0;
    ctx->saved_data["beta"] = beta;
    ctx->set_materialize_grads(false);
    // as ElboLossFunction: while a graph can reach the buffers, empty tensors stand in for them
    variable_list bufs = {g_recon, g_mu, g_logvar};
    if (recorded)
      for (auto& t : bufs) t = at::empty({0}, t.options());
    ctx->mark_non_differentiable(bufs);
    return {loss, bufs[0], bufs[1], bufs[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& d = grads[0];
    variable_list out(11);
    if (!d.defined()) return out;
    TORCH_CHECK(!ctx->needs_input_grad(1), "vae_ext::elbo_loss does not differentiate with respect to the target x");
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool per_sample = flags & 256, need_recon = ctx->needs_input_grad(0),
               need_latent = ctx->needs_input_grad(2) || ctx->needs_input_grad(3);
    TORCH_CHECK((!need_recon || (flags & 512)) && (!need_latent || (flags & 1024)),
                "vae_ext::elbo_loss_basic: backward needs the gradient buffers, but the op was called with "
                "grad_recon/grad_latent=False; call it through vae_ext.elbo_loss");
    const auto dtype = static_cast<at::ScalarType>(flags & 255);
    const auto saved = ctx->get_saved_variables();
    DeviceScales device;
    if (need_recon) {
      const double div = ctx->saved_data["recon_div"].toDouble();
      out[0] = scale_grad(saved[0], div == 1.0 ? d : d / div, per_sample, dtype, device);
    }
    if (need_latent) {
      const double beta = ctx->saved_data["beta"].toDouble();
      const Tensor dk = beta == 1.0 ? d : d * beta;
      if (ctx->needs_input_grad(2)) out[2] = scale_grad(saved[1], dk, per_sample, dtype, device);
      if (ctx->needs_input_grad(3)) out[3] = scale_grad(saved[2], dk, per_sample, dtype, device);
    }
    device.launch();
    return first_order_only(std::move(out),
                            "vae_ext.elbo_loss supports first derivatives only: its backward scales the gradients "
                            "its forward wrote. For higher-order gradients (create_graph=True) use "
                            "vae_ext.reference.elbo_loss.");
  }
};

BasicOutputs elbo_loss_basic_autograd(VAE_EXT_ELBO_BASIC_ARGS) {
  check_functorch("vae_ext.elbo_loss (torch.ops.vae_ext.elbo_loss_basic)", "vae_ext.reference.elbo_loss");
  const bool recorded =
      at::GradMode::is_enabled() && (recon.requires_grad() || mu.requires_grad() || logvar.requires_grad());
  auto out = ElboBasicFunction::apply(recon, x, mu, logvar, recon_mode, reduction, beta, grad_recon, grad_latent,
                                      validate, recorded);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, Autograd, m) {
  m.impl("elbo_loss", &elbo_loss_autograd);
  m.impl("elbo_loss_basic", &elbo_loss_basic_autograd);
  m.impl("reparameterize", &reparameterize_autograd);
  // The normals depend on (seed, offset) alone: `like` gives only the shape and device.
  m.impl("philox_normal", torch::CppFunction::makeFallthrough());
}

}  // namespace vae_ext
