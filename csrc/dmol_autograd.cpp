// Autograd for dmol_nll, in C++ as the other ops' (csrc/autograd.cpp): the forward writes the
// gradient with respect to params in the same pass as the loss (it needs the values of every
// component first; recomputing them in the backward costs a second forward: docs/design.md), and
// the backward scales that buffer by grad_output. Nothing else is saved: no M- or C-sized tensor.
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "ops.h"

namespace vae_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kFirstOrder =
    "vae_ext.dmol_nll supports first derivatives only: its backward scales the gradient its forward wrote. For "
    "higher-order gradients (create_graph=True) use vae_ext.reference.dmol_nll.";

template <class Ptr, class T, class... Args>
Ptr make_node(Args&&... args) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<T>(std::forward<Args>(args)...);
  else
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
}

// Under create_graph=True the gradient gets a grad_fn that raises kFirstOrder when a higher-order
// backward reaches it (never a silent zero), as elbo_loss's.
Tensor first_order_only(Tensor g) {
  if (!at::GradMode::is_enabled() || !g.defined()) return g;
  const auto node = torch::autograd::get_current_node();
  TORCH_INTERNAL_ASSERT(node, "first_order_only: called outside a backward");
  auto err = make_node<std::decay_t<decltype(node)>, torch::autograd::Error>(
      kFirstOrder, torch::autograd::edge_list(node->next_edges()));
  g = g.detach();
  torch::autograd::set_history(g, err);
  return g;
}

// g * d rounded once to `out` (params' dtype), d 0-d or (N,) (reduction none) in the loss dtype. g
// is in the loss dtype too (float32 for half params: a local gradient below half's range, or the 1/N of
// mean, survives until grad_output, e.g. GradScaler's 65536, scales it). In place when the graph
// is not kept (g is the forward's buffer, freed after this backward) and g has the dtype of `out`.
Tensor scale(const Tensor& g, const Tensor& d, bool per_sample, at::ScalarType out) {
  Tensor s = d;
  if (per_sample) {
    std::vector<int64_t> shape(static_cast<size_t>(g.dim()), 1);
    shape[0] = -1;
    s = s.reshape(shape);
  } else if (!s.device().is_cpu()) {
    s = s.reshape({1});  // a 0-d device tensor would be rounded to a half g's dtype first
  }
  const auto plain = [](const Tensor& t) {
    return !t.key_set().has(c10::DispatchKey::Python) && !t.key_set().has(c10::DispatchKey::Functionalize);
  };
  if (g.scalar_type() != out) {  // half params: scaled in float32 and rounded once, in g's strides
    Tensor r = at::empty_like(g, g.options().dtype(out));
    at::mul_out(r, g, s);
    return r;
  }
  if (torch::autograd::get_current_graph_task_keep_graph() || !plain(g) || !plain(s))
    return at::mul(g, s).to(out);
  if (s.numel() == 1 && s.device().is_cpu() && s.item<double>() == 1.0) return g;
#if defined(VAE_EXT_WITH_CUDA)
  if (g.is_cuda() && g.is_contiguous() && s.numel() == 1 && s.device() == g.device()) {
    scale_unless_one_cuda({g}, {s});
    return g;
  }
#endif
  return g.mul_(s);
}

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
    const Tensor g = scale(ctx->get_saved_variables()[0], d, ctx->saved_data["per_sample"].toBool(),
                           static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt()));
    return {first_order_only(g), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

void check_functorch() {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return;
  try {
    tls->checkSupportsCppAutogradFunction();
  } catch (const c10::Error&) {
    TORCH_CHECK(false,
                "vae_ext.dmol_nll cannot run inside torch.func transforms (grad, vjp, jacrev, ...): its autograd "
                "is written in C++, which functorch does not support. Use vae_ext.reference.dmol_nll there.");
  }
}

std::tuple<Tensor, Tensor> dmol_nll_autograd(const Tensor& params, const Tensor& x, int64_t num_bits,
                                             c10::string_view reduction, double log_scale_min, bool grad,
                                             bool validate) {
  check_functorch();
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
