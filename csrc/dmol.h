// What the backends' DMoL ops (cpu/ops_dmol.cpp, cuda/ops_dmol_cuda.cpp) share: the argument checks,
// the layouts the kernels read and the kernel arguments they give. The math: csrc/common/dmol_math.h.
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

// What every DMoL kernel reads (cpu::DmolArgs and DmolSampleArgs, cuda::DmolLaunch and
// DmolSampleLaunch): the params, the sizes and the params' strides.
template <class Args>
void fill_dmol_params(Args& a, const DmolInputs& in, double log_scale_min) {
  a.dtype = kernel_dtype(in.params.t.scalar_type());
  a.params = in.params.t.const_data_ptr();
  a.n = in.n;
  a.s = in.s;
  a.nmix = in.nmix;
  a.channels = in.channels;
  a.p_sample = in.params.sample;
  a.p_param = in.params.k;
  a.p_pixel = in.params.pixel;
  a.log_scale_min = log_scale_min;
}

// dmol_nll's, from the laid-out inputs: g is the gradient buffer the kernel writes (a pointer only
// where `grad` and g is non-empty); grad_scale is 1/N for the mean.
template <class Args>
void fill_dmol_args(Args& a, const DmolInputs& in, const Tensor& g, bool grad, int64_t num_bits, double log_scale_min,
                    Reduction red) {
  fill_dmol_params(a, in, log_scale_min);
  a.grad = grad && g.numel() > 0 ? g.data_ptr() : nullptr;
  a.x = in.x.t.const_data_ptr();
  a.x_sample = in.x.sample;
  a.x_channel = in.x.k;
  a.x_pixel = in.x.pixel;
  a.num_bits = num_bits;
  a.grad_scale = red == Reduction::Mean && in.n > 0 ? 1.0 / static_cast<double>(in.n) : 1.0;
}

// dmol_sample's (the generator's state is each backend's): out is the samples' tensor (a pointer
// only where it is non-empty).
template <class Args>
void fill_dmol_sample_args(Args& a, const DmolInputs& in, const Tensor& out, double log_scale_min) {
  fill_dmol_params(a, in, log_scale_min);
  a.out = out.numel() ? out.data_ptr() : nullptr;
}

}  // namespace vae_ext
