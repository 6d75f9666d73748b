// Autograd for dmol_nll, in C++ as the other ops' (csrc/autograd.cpp): the forward writes the
// gradient with respect to params in the same pass as the loss (it needs the values of every
// component first; recomputing them in the backward costs a second forward: docs/design.md), and
// the backward scales that buffer by grad_output. Nothing else is saved: no M- or C-sized tensor.
#include <torch/library.h>

#include "autograd_common.h"
#include "ops.h"

namespace vae_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kFirstOrder =
    "vae_ext.dmol_nll supports first derivatives only: its backward scales the gradient its forward wrote. For "
    "higher-order gradients (create_graph=True) use vae_ext.reference.dmol_nll.";

struct DmolNllFunction : public torch::autograd::Function<DmolNllFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& params, const Tensor& x, int64_t num_bits,
                               const std::string& reduction, double log_scale_min, bool grad, bool validate,
                               bool recorded) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("vae_ext::dmol_nll", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, c10::string_view,
                                                           double, bool, bool)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, g] = op.call(params, x, num_bits, reduction, log_scale_min, grad, validate);
    ctx->save_for_backward({g});
    ctx->saved_data["per_sample"] = reduction == "none";
    ctx->saved_data["grad"] = grad;
    ctx->saved_data["dtype"] = static_cast<int64_t>(params.scalar_type());
    ctx->set_materialize_grads(false);
    // the backward scales g in place: while a graph can reach it, the caller gets an empty stand-in
    Tensor g_out = recorded ? at::empty({0}, g.options()) : g;
    ctx->mark_non_differentiable({g_out});
    return {loss, g_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->needs_input_grad(1), "vae_ext::dmol_nll does not differentiate with respect to the data x");
    const Tensor& d = grads[0];
    if (!d.defined() || !ctx->needs_input_grad(0)) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
                                                            Tensor(), Tensor(), Tensor()};
    TORCH_CHECK(ctx->saved_data["grad"].toBool(),
                "vae_ext::dmol_nll: backward needs the gradient buffer, but the op was called with grad=False; "
                "call it through vae_ext.dmol_nll");
    const Tensor saved = ctx->get_saved_variables()[0];
    DeviceScales device;
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());  // params'
    const Tensor g = scale_grad(saved, d, ctx->saved_data["per_sample"].toBool(), dtype, device);
    device.launch();
    return first_order_only({g, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()}, kFirstOrder);
  }
};

std::tuple<Tensor, Tensor> dmol_nll_autograd(const Tensor& params, const Tensor& x, int64_t num_bits,
                                             c10::string_view reduction, double log_scale_min, bool grad,
                                             bool validate) {
  check_functorch("vae_ext.dmol_nll", "vae_ext.reference.dmol_nll");
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && x.requires_grad()),
                    "x: the data must not require grad (dmol_nll treats it as a constant); pass x.detach()");
  const bool recorded = at::GradMode::is_enabled() && params.requires_grad();
  auto out = DmolNllFunction::apply(params, x, num_bits, std::string(reduction), log_scale_min, grad, validate,
                                    recorded);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, Autograd, m) {
  m.impl("dmol_nll", &dmol_nll_autograd);
  // samples are not differentiable: the output gets no graph
  m.impl("dmol_sample", torch::CppFunction::makeFallthrough());
}

}  // namespace vae_ext
