// The KL terms computed after the kernels, on either backend: the per-unit KL, free bits, and the
// sum over the batch that a broadcast prior's gradient needs (csrc/ops.h).
#include "ops.h"

namespace vae_ext {

// Our own fixed-order sums on CPU: ATen's split a long sum over the threads, so its bits depend on
// their number. (ATen's CUDA sums add in a fixed order: run-to-run deterministic.) A traced
// backward (torch.compile, opcheck) sees wrapped tensors with no data: ATen's sums there.
static bool own_sum(const Tensor& t) {
  return t.is_cpu() && !t.key_set().has(c10::DispatchKey::Python) &&
         !t.key_set().has(c10::DispatchKey::Functionalize);
}

Tensor sum_over_batch(const Tensor& g) {
  if (own_sum(g)) return sum_over_batch_cpu(g);
  return at::sum(g, {0}, /*keepdim=*/false, at::kDouble);
}

Tensor sum_all(const Tensor& t) {
  if (own_sum(t)) return sum_over_batch_cpu(t.reshape({-1, 1})).squeeze(0);  // one column: in index order
  return at::sum(t, at::kDouble);
}

// shape in SymInts: under torch.compile with a dynamic batch a prior's batch size is a symbol, which
// reading it as an int would specialize (a recompilation for every batch size)
Tensor sum_to_shape(const Tensor& g, c10::SymIntArrayRef shape) {
  if (own_sum(g)) return sum_to_shape_cpu(g, C10_AS_INTARRAYREF_SLOW(shape));  // real tensors: ints
  const auto dims = static_cast<int64_t>(shape.size());
  if (dims < g.dim() || (shape[0] == 1 && g.sym_size(0) != 1)) {  // summed over the batch
    const Tensor s = sum_over_batch(g);                            // g.shape[1:]
    return dims == g.dim() ? s.sum_to_size_symint(shape.slice(1)).reshape_symint(shape) : s.sum_to_size_symint(shape);
  }
  return g.to(at::kDouble).sum_to_size_symint(shape);
}

Tensor unit_kl_and_free_bits(const Tensor& kl_elems, at::IntArrayRef unit_shape, double free_bits, Reduction red,
                             const std::vector<Tensor>& grads, Tensor* floored) {
  const int64_t n = kl_elems.size(0);
  Tensor unit = sum_over_batch(kl_elems).div_(static_cast<double>(n));  // 0 / 0: NaN for an empty batch
  if (free_bits > 0.0) {
    // clamp's gradient: a unit exactly at the floor keeps its gradient, a NaN one loses it
    Tensor term = sum_all(unit.clamp_min(free_bits));
    if (red == Reduction::Sum) term.mul_(static_cast<double>(n));
    *floored = term;
    const Tensor keep = unit.ge(free_bits);
    for (const Tensor& g : grads)
      if (g.numel() > 0) g.view({n, -1}).mul_(keep.to(g.scalar_type()));
  }
  return unit.view(unit_shape);
}

}  // namespace vae_ext
