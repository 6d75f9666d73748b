// The backward's scale-and-round of a half input's float32 gradient buffer (scale_round.cpp).
#pragma once

#include <ATen/ATen.h>

namespace vae_ext {

using at::Tensor;

// g * s rounded once to `out`: g the float32 buffer the forward wrote, s the incoming gradient in
// float32 (one element, or with per_sample one per sample, shaped to broadcast against g). One
// pass on CPU when `out` is float16/bfloat16; mul_out into a new tensor otherwise. g's layout.
Tensor scale_round(const Tensor& g, const Tensor& s, bool per_sample, at::ScalarType out);

}  // namespace vae_ext
