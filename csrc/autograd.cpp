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

// float16 on the CPU: the forward's buffers are float16, the gradients as handed on for an
// incoming gradient of exactly 1 (loss.backward() on a sum or mean). For any other the backward
// computes them again in float32 from the saved inputs (the forward's kernel computes in float32
// from the float16 values it loads: the same numbers) and scales and rounds those once, as a loss
// scale or a small weight needs (csrc/checks.cpp prepare_elbo).
bool final_in_half(const Tensor& recon) { return recon.is_cpu() && recon.scalar_type() == at::kHalf; }

// An optional tensor in float32.
std::optional<Tensor> in_float(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t.to(at::kFloat)) : std::nullopt;
}

struct ElboLossFunction : public torch::autograd::Function<ElboLossFunction> {
  static auto& elbo_op() {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("vae_ext::elbo_loss", "")
            .typed<ElboOutputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view,
                               c10::string_view, bool, bool, bool, bool, const c10::optional<Tensor>&,
                               const c10::optional<Tensor>&, const c10::optional<Tensor>&, double, bool)>();
    return op;
  }

  // An absent optional tensor is no input of the node: needs_input_grad counts the present ones
  // (ctx->saved_data["edges"] maps the inputs to them).
  static variable_list forward(AutogradContext* ctx, const Tensor& recon, const Tensor& x, const Tensor& mu,
                               const Tensor& logvar, const std::optional<Tensor>& prior_mu,
                               const std::optional<Tensor>& prior_logvar, const std::optional<Tensor>& recon_logvar,
                               const std::string& recon_mode, const std::string& reduction, bool grad_recon,
                               bool grad_latent, bool validate, bool total, double free_bits, bool unit_kl,
                               bool recorded) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto out = elbo_op().call(recon, x, mu, logvar, recon_mode, reduction, grad_recon, grad_latent, validate, total,
                              prior_mu, prior_logvar, recon_logvar, free_bits, unit_kl);
    auto& [rec, kl, units, g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar] = out;
    // float16 on the CPU: the inputs too, for a backward that computes the buffers again
    const bool half = final_in_half(recon);
    const auto input = [&](const std::optional<Tensor>& t) { return half && t.has_value() ? *t : Tensor(); };
    ctx->save_for_backward({g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar, input(recon), input(x),
                            input(mu), input(logvar), input(prior_mu), input(prior_logvar), input(recon_logvar)});
    if (half) {
      ctx->saved_data["recon_mode"] = recon_mode;
      ctx->saved_data["reduction"] = reduction;
      ctx->saved_data["free_bits"] = free_bits;
    }
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
      // in SymInts: a traced batch size stays a symbol (read as an int, it would be specialized)
      ctx->saved_data["prior_mu_shape"] = prior_mu->sym_sizes();
      ctx->saved_data["prior_logvar_shape"] = prior_logvar->sym_sizes();
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

  // saved[0..5], the float16 buffers, replaced by the float32 ones of the same call on the inputs
  // saved[6..12] in float32 (final_in_half).
  static void buffers_in_float32(AutogradContext* ctx, variable_list& saved, bool grad_recon, bool grad_latent) {
    const auto f = [](const Tensor& t) { return t.to(at::kFloat); };
    const std::string mode = ctx->saved_data["recon_mode"].toStringRef(),
                      reduction = ctx->saved_data["reduction"].toStringRef();
    auto out =
        elbo_op().call(f(saved[6]), f(saved[7]), f(saved[8]), f(saved[9]), mode, reduction, grad_recon, grad_latent,
                       /*validate=*/false, ctx->saved_data["total"].toBool(), in_float(saved[10]), in_float(saved[11]),
                       in_float(saved[12]), ctx->saved_data["free_bits"].toDouble(),
                       /*unit_kl=*/false);
    saved[0] = std::get<3>(out);
    saved[1] = std::get<4>(out);
    saved[2] = std::get<5>(out);
    saved[3] = std::get<6>(out);
    saved[4] = std::get<7>(out);
    saved[5] = std::get<8>(out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
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
    // float16 (saved[6..12]: the inputs, recon_x's defined): the buffers are the gradients for d = 1
    if (saved[6].defined() && !((!need_recon || all_ones(d_rec)) && (!need_latent || all_ones(d_kl))))
      buffers_in_float32(ctx, saved, need_recon, need_latent);
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
    if (d_kl.defined()) {
      if (needs(2)) g_mu = scale_grad(saved[1], d_kl, per_sample, dtype, device);
      if (needs(3)) g_logvar = scale_grad(saved[2], d_kl, per_sample, dtype, device);
      // the prior's: where it was broadcast, scaled in the loss dtype, summed, then rounded; one of
      // mu's shape on the CPU scaled and rounded in one pass (CUDA: scaled, then rounded)
      const auto pdtype = [&](const Tensor& g, const char* shape) {
        const auto saved_shape = ctx->saved_data[shape].toSymIntVector();
        return g.is_cpu() && g.sym_sizes() == c10::SymIntArrayRef(saved_shape) ? dtype : ldtype;
      };
      if (needs(4)) g_prior_mu = scale_grad(saved[3], d_kl, per_sample, pdtype(saved[3], "prior_mu_shape"), device);
      if (needs(5))
        g_prior_logvar = scale_grad(saved[4], d_kl, per_sample, pdtype(saved[4], "prior_logvar_shape"), device);
    }
    device.launch();
    if (g_prior_mu.defined())
      g_prior_mu = prior_grad(g_prior_mu, ctx->saved_data["prior_mu_shape"].toSymIntVector(), dtype);
    if (g_prior_logvar.defined())
      g_prior_logvar = prior_grad(g_prior_logvar, ctx->saved_data["prior_logvar_shape"].toSymIntVector(), dtype);
    // The gradients are the buffers the forward wrote, scaled: no graph back to the inputs.
    return first_order_only({g_recon, Tensor(), g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar, Tensor(),
                             Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()},
                            "vae_ext.elbo_loss and vae_ext.gaussian_kl support first derivatives only: their "
                            "backward scales the gradients their forward wrote. For higher-order gradients "
                            "(create_graph=True) use vae_ext.reference.elbo_loss or vae_ext.reference.gaussian_kl.");
  }
};

ElboOutputs elbo_loss_autograd(VAE_EXT_ELBO_ARGS) {
  check_functorch("vae_ext.elbo_loss or vae_ext.gaussian_kl (torch.ops.vae_ext.elbo_loss)",
                  "vae_ext.reference.elbo_loss or vae_ext.reference.gaussian_kl");
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
  static auto& basic_op() {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("vae_ext::elbo_loss_basic", "")
                         .typed<BasicOutputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             c10::string_view, c10::string_view, double, bool, bool, bool)>();
    return op;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& recon, const Tensor& x, const Tensor& mu,
                               const Tensor& logvar, c10::string_view recon_mode, c10::string_view reduction,
                               double beta, bool grad_recon, bool grad_latent, bool validate, bool recorded) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, g_recon, g_mu, g_logvar] =
        basic_op().call(recon, x, mu, logvar, recon_mode, reduction, beta, grad_recon, grad_latent, validate);
    // float16 on the CPU: the inputs too, for a backward that computes the buffers again
    if (final_in_half(recon)) {
      ctx->save_for_backward({g_recon, g_mu, g_logvar, recon, x, mu, logvar});
      ctx->saved_data["recon_mode"] = std::string(recon_mode);
      ctx->saved_data["reduction"] = std::string(reduction);
    } else {
      ctx->save_for_backward({g_recon, g_mu, g_logvar});
    }
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

  // saved[0..2], the float16 buffers, replaced by the float32 ones of the same call on the inputs
  // saved[3..6] in float32 (final_in_half).
  static void buffers_in_float32(AutogradContext* ctx, variable_list& saved, bool grad_recon, bool grad_latent,
                                 double beta) {
    const auto f = [](const Tensor& t) { return t.to(at::kFloat); };
    auto [loss, g_recon, g_mu, g_logvar] =
        basic_op().call(f(saved[3]), f(saved[4]), f(saved[5]), f(saved[6]), ctx->saved_data["recon_mode"].toStringRef(),
                        ctx->saved_data["reduction"].toStringRef(), beta, grad_recon, grad_latent, /*validate=*/false);
    saved[0] = g_recon;
    saved[1] = g_mu;
    saved[2] = g_logvar;
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
    auto saved = ctx->get_saved_variables();
    const double div = ctx->saved_data["recon_div"].toDouble(), beta = ctx->saved_data["beta"].toDouble();
    // float16 (saved[3..6]: the inputs): the buffers are the gradients for d = 1 / div = beta = 1
    if (saved.size() > 3 && !(all_ones(d) && (!need_recon || div == 1.0) && (!need_latent || beta == 1.0)))
      buffers_in_float32(ctx, saved, need_recon, need_latent, beta);
    DeviceScales device;
    if (need_recon) out[0] = scale_grad(saved[0], div == 1.0 ? d : d / div, per_sample, dtype, device);
    if (need_latent) {
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
  // Called by a backward node: without a kernel here each call went through PyTorch's boxed
  // autograd fallback, boxing its arguments and unboxing them again. First order only: their
  // outputs take no history (a create_graph backward runs differentiable ops instead, or an Error
  // node, first_order_only).
  m.impl("reparameterize_backward", torch::CppFunction::makeFallthrough());
  m.impl("gaussian_latent_backward", torch::CppFunction::makeFallthrough());
}

}  // namespace vae_ext
