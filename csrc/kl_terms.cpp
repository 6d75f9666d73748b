// The KL terms computed after the kernels, on either backend: the per-unit KL, free bits, and the
// sum over the batch that a broadcast prior's gradient needs (csrc/ops.h).
#include "ops.h"

namespace vae_ext {

Tensor sum_over_batch(const Tensor& g) {
  // A traced backward (torch.compile, opcheck) sees wrapped tensors with no data: ATen's sum there.
  const bool traced = g.key_set().has(c10::DispatchKey::Python) || g.key_set().has(c10::DispatchKey::Functionalize);
  if (g.is_cpu() && !traced) return sum_over_batch_cpu(g);
  return at::sum(g, {0}, /*keepdim=*/false, at::kDouble);
}

Tensor unit_kl_and_free_bits(const Tensor& kl_elems, at::IntArrayRef unit_shape, double free_bits, Reduction red,
                             const std::vector<Tensor>& grads, Tensor* floored) {
  const int64_t n = kl_elems.size(0);
  Tensor unit = sum_over_batch(kl_elems).div_(static_cast<double>(n));  // 0 / 0: NaN for an empty batch
  if (free_bits > 0.0) {
    // clamp's gradient: a unit exactly at the floor keeps its gradient, a NaN one loses it
    Tensor term = unit.clamp_min(free_bits).sum();
    if (red == Reduction::Sum) term.mul_(static_cast<double>(n));
    *floored = term;
    const Tensor keep = unit.ge(free_bits);
    for (const Tensor& g : grads)
      if (g.numel() > 0) g.view({n, -1}).mul_(keep.to(g.scalar_type()));
  }
  return unit.view(unit_shape);
}

}  // namespace vae_ext
