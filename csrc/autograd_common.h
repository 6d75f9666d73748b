// What the three C++ autograd files share (autograd.cpp: elbo_loss and reparameterize;
// dmol_autograd.cpp; latent_autograd.cpp): the grad_output scaling of a gradient the forward wrote,
// a broadcast prior's gradient, whether an incoming gradient is all ones, the error of a second
// derivative, and the error under torch.func.
// Inline: each file's autograd node calls them from its backward.
#pragma once

#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>

#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"
#include "scale_round.h"

namespace vae_ext {

// The CUDA scalings of one backward, launched together when it ends: one launch per dtype for all
// the gradient buffers instead of one each (each launch costs microseconds of device time, even
// when the kernel only reads grad_output, finds 1 and exits).
struct DeviceScales {
  std::vector<Tensor> g, s;
  void launch() {
#if defined(VAE_EXT_WITH_CUDA)
    if (!g.empty()) scale_unless_one_cuda(g, s);
#endif
  }
};

// Not a tensor being traced (torch.compile, opcheck), which wants no mutation of a saved output
// and has no values to read.
inline bool is_plain(const Tensor& t) {
  return !t.key_set().has(c10::DispatchKey::Python) && !t.key_set().has(c10::DispatchKey::Functionalize);
}

// Whether the incoming gradient d is undefined (none flows) or a plain CPU tensor every element of
// which is exactly 1: float16's buffers are then the gradients themselves (autograd.cpp
// final_in_half). Read on the host, so a device tensor answers false (no sync).
inline bool all_ones(const Tensor& d) {
  if (!d.defined()) return true;
  if (!d.is_cpu() || !is_plain(d)) return false;
  if (d.numel() == 1) return d.item<double>() == 1.0;
  return at::eq(d, 1).all().item<bool>();
}

// g * d, rounded once to `out` (the dtype of the input g is the gradient of): d is a 0-d tensor
// (sum, mean) or one value per sample (none), in the loss dtype (float32 for half inputs), and is
// never rounded to a half dtype first (grad_output = 65536 or 1e-10 would become inf or 0). g is
// the buffer the forward wrote: the input's dtype on the CPU (the loss dtype on CUDA and for a
// broadcast prior's), or a float16 input's computed again in float32 (autograd.cpp final_in_half).
// When the graph is not kept (no retain_graph, the usual case) g is freed right after this
// backward, so it is scaled in place and handed on: no second tensor the size of recon_x (on CPU a
// fresh one costs its page faults, as much as the pass itself), and AccumulateGrad can take it as
// .grad without a copy. With retain_graph=True (gradcheck, a second backward) it stays intact.
// A CUDA scaling by a one-element d is queued in `device` (DeviceScales::launch does it).
inline Tensor scale_grad(const Tensor& g, const Tensor& d, bool per_sample, at::ScalarType out, DeviceScales& device) {
  Tensor s = d;
  if (per_sample) {
    std::vector<int64_t> shape(static_cast<size_t>(g.dim()), 1);
    shape[0] = -1;
    s = s.reshape(shape);
  } else if (!s.device().is_cpu()) {
    // A 0-d device tensor takes no part in type promotion, so a half g would get it rounded to
    // its dtype; one dimension makes the multiplication run in float32. (A 0-d CPU tensor is a
    // CPU scalar, which TensorIterator reads in float32 for a half g without a copy of g.)
    s = s.reshape({1});
  }
  // the float32 gradients of half inputs: scaled and rounded in one pass (csrc/scale_round.h)
  if (g.scalar_type() != out) return scale_round(g, s, per_sample, out);
  if (torch::autograd::get_current_graph_task_keep_graph() || !is_plain(g) || !is_plain(s))
    return at::mul(g, s).to(out);
  // loss.backward() on a sum or mean sends exactly 1: nothing to scale (read only from a CPU
  // scalar, which costs no device sync).
  if (s.numel() == 1 && s.device().is_cpu() && s.item<double>() == 1.0) return g;
#if defined(VAE_EXT_WITH_CUDA)
  // On CUDA the 1 is on the device: a kernel reads it and skips the pass over g when it is 1 (a
  // read and a write of the whole gradient saved, with no sync).
  if (g.is_cuda() && g.is_contiguous() && s.numel() == 1 && s.device() == g.device()) {
    device.g.push_back(g);
    device.s.push_back(s);
    return g;
  }
#endif
  // (a half g times a float32 s: computed in float32, rounded once to g's dtype)
  return g.mul_(s);
}

// A node, held the way this torch holds nodes (std::shared_ptr before torch 2.13, intrusive_ptr after).
template <class Ptr, class T, class... Args>
Ptr make_node(Args&&... args) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<T>(std::forward<Args>(args)...);
  else
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
}

// A backward under create_graph=True whose gradients have no derivative of their own: they get a
// grad_fn that raises `msg` when a higher-order backward reaches it, with this node's edges, so
// that differentiating them with respect to the op's inputs raises `msg` (not "does not require
// grad" or "appears to not have been used in the graph", and never a silent zero).
inline torch::autograd::variable_list first_order_only(torch::autograd::variable_list grads, const char* msg) {
  if (!at::GradMode::is_enabled()) return grads;
  const auto node = torch::autograd::get_current_node();  // the node whose backward is running
  TORCH_INTERNAL_ASSERT(node, "first_order_only: called outside a backward");
  auto err = make_node<std::decay_t<decltype(node)>, torch::autograd::Error>(
      msg, torch::autograd::edge_list(node->next_edges()));
  for (auto& g : grads) {
    if (!g.defined()) continue;
    g = g.detach();
    torch::autograd::set_history(g, err);
  }
  return grads;
}

// A broadcast prior's gradient: g (per element, mu's shape, scaled, in the loss dtype) summed over
// the dimensions the prior was broadcast along, in double and a fixed order (csrc/ops.h
// sum_to_shape), then rounded once to `out`.
// shape as the forward saved it, in SymInts (csrc/kl_terms.cpp sum_to_shape).
inline Tensor prior_grad(const Tensor& g, c10::SymIntArrayRef shape, at::ScalarType out) {
  if (g.sym_sizes() == shape) return g.to(out);
  return sum_to_shape(g, shape).to(out);
}

// Under a torch.func transform (grad, vjp, jacrev, ...) functorch refuses a C++ autograd Function
// with a generic error: raise one that names the op and the way out. Outside a transform this is
// one read of a thread-local pointer.
inline void check_functorch(const char* op, const char* reference) {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return;
  try {
    tls->checkSupportsCppAutogradFunction();
  } catch (const c10::Error&) {
    TORCH_CHECK(false, op,
                " cannot run inside torch.func transforms (grad, vjp, jacrev, ...): its autograd is "
                "written in C++, which functorch does not support. Use ",
                reference, " (plain PyTorch ops) inside torch.func transforms.");
  }
}

}  // namespace vae_ext
