// The memory layouts the kernels compute in, shared by the CPU and CUDA ops. vae_ext/_ops.py's
// fake kernels mirror them.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace vae_ext {

using at::Tensor;

// The layout a kernel reads t in: channels_last (or channels_last_3d) when t already has it (a conv
// decoder's recon_x, whose gradient then comes back in that layout, or a conv encoder's mu, whose
// z, each z[k], eps and gradients then have it too, as mu + std * torch.randn_like(mu) would),
// contiguous otherwise. Either way each sample is one block of memory.
at::MemoryFormat kernel_format(const Tensor& t);

// {C, product of the spatial sizes} for a channels_last format, {0, 0} for contiguous.
std::pair<int64_t, int64_t> reparam_channels_spatial(const Tensor& mu, at::MemoryFormat fmt);
// An uninitialized z-like tensor: mu's shape, with a leading samples dimension when num_samples > 0,
// each sample in `fmt`.
Tensor reparam_empty(const Tensor& mu, at::MemoryFormat fmt, int64_t num_samples);
// t (z-shaped) in that layout: t itself when it has it, else a copy.
Tensor reparam_in_layout(const Tensor& t, const Tensor& mu, at::MemoryFormat fmt, int64_t num_samples);

}  // namespace vae_ext
