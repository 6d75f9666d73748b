// What the backends' DMoL ops (cpu/ops_dmol.cpp, cuda/ops_cuda.cpp) share: the argument checks and
// the layouts the kernels read. The math: csrc/common/dmol_math.h.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace vae_ext {

// A (N, K, *S) tensor as the kernels read it: its element strides per sample, per channel or
// parameter (k) and per pixel (the spatial dimensions flattened). A channels-first or a
// channels_last tensor (each pixel's K values contiguous: VDVAE's (N, *S, K) output permuted) is
// read as it is; any other is copied once, channels-first.
struct PixelLayout {
  Tensor t;  // the tensor read: the argument itself, or its copy
  bool channels_last = false;
  int64_t sample = 0, k = 0, pixel = 0;
};
PixelLayout pixel_layout(const Tensor& t);
// An uninitialized tensor of t's shape and dtype (or `dtype`) whose strides are those of a PixelLayout of t.
Tensor empty_in_layout(const PixelLayout& l, std::optional<at::ScalarType> dtype = std::nullopt);

struct DmolInputs {
  PixelLayout params, x;
  int64_t n, s, nmix, channels;
};
// Checks dmol_nll's arguments (TypeError/ValueError naming the argument) and lays them out.
DmolInputs prepare_dmol(const Tensor& params, const Tensor& x, int64_t num_bits, double log_scale_min);
// dmol_sample's: params (N, P, *S) and the number of channels.
DmolInputs prepare_dmol_sample(const Tensor& params, int64_t num_channels, double log_scale_min);

[[noreturn]] void throw_dmol_x_out_of_range();

}  // namespace vae_ext
