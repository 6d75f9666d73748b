#include "layout.h"

#include <vector>

#include "grad_block.h"

namespace vae_ext {

at::MemoryFormat kernel_format(const Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
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
  if (num_samples == 0) return advise_huge_pages(at::empty(shape, mu.options().memory_format(fmt)));
  if (fmt == at::MemoryFormat::Contiguous) {
    shape.insert(shape.begin(), num_samples);
    return advise_huge_pages(at::empty(shape, mu.options()));
  }
  // (K N, C, *S) in the format, viewed as (K, N, C, *S): each z[k] has mu's layout
  shape[0] *= num_samples;
  const Tensor flat = advise_huge_pages(at::empty(shape, mu.options().memory_format(fmt)));
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

}  // namespace vae_ext
