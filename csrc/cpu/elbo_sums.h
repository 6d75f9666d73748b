// The ELBO kernel's sums for one CPU call, shared by the full op (ops_cpu.cpp) and the lean one
// (elbo_basic.cpp): per sample for reduction "none" (row_rec, row_kl, and a 0-d recon_logvar's
// row_grad_rlv), one total each otherwise (no buffer of n); "bce" probabilities and targets out of
// [0, 1] raise their ValueErrors.
#pragma once

#include <ATen/ATen.h>

#include "kernels.h"

namespace vae_ext {
namespace cpu {

struct ElboSums {
  at::Tensor row_rec, row_kl, row_grad_rlv;  // reduction "none" only
  double rec = 0.0, kl = 0.0, grad_rlv = 0.0;
};

// Points `args`' sums at the returned ones and runs the kernel. rlv_grad: a 0-d recon_logvar's
// gradient is wanted (per sample, or over the batch, in double).
ElboSums run_elbo_sums(ElboArgs& args, int64_t n, bool per_sample, bool rlv_grad);

}  // namespace cpu
}  // namespace vae_ext
