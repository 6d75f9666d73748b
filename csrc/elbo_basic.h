// elbo_loss_basic: the common elbo_loss call as an op of its own (csrc/ops.cpp has its schema). The
// full op's nine outputs and six optional arguments cost each call about a tenth more instructions
// at MNIST sizes (docs/design.md, "The fixed cost of a call"); this one takes no option but beta
// and pixel_mean and returns the loss and three gradient buffers.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace vae_ext {

using at::Tensor;

// (loss, g_recon, g_mu, g_logvar). loss = rec + beta * kl under `reduction` (rec over every element
// for "pixel_mean", kl as "mean"), in the loss dtype; g_* as elbo_loss's, written with "mean"'s
// 1/N for pixel_mean and without beta: the backward applies 1/D to g_recon (pixel_mean) and beta
// to g_mu and g_logvar with the incoming gradient.
using BasicOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;
#define VAE_EXT_ELBO_BASIC_ARGS                                                                              \
  const Tensor &recon, const Tensor &x, const Tensor &mu, const Tensor &logvar, c10::string_view recon_mode, \
      c10::string_view reduction, double beta, bool grad_recon, bool grad_latent, bool validate

// The values per sample of recon (the product of its non-batch sizes): pixel_mean's divisor.
int64_t values_per_sample(const Tensor& recon);

}  // namespace vae_ext
