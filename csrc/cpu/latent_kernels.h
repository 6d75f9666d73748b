// The gaussian_latent CPU kernels' interface (common/latent_math.h LatentArgs): one table per CPU
// capability (latent_kernel.h, compiled in each kernels_<capability>.cpp), chosen at run time as
// kernels() chooses the others.
#pragma once

#include "../common/latent_math.h"

namespace vae_ext {
namespace cpu {

struct LatentKernelTable {
  // z and each row's KL sum (row_kl, [K N]); with a.kl_elems, each element's KL too
  void (*forward)(const LatentArgs& a, double* row_kl);
  // the gradients of mu and logscale (and of the prior, per element, when a.g_pmu is set)
  void (*backward)(const LatentArgs& a);
};

namespace DEFAULT {
const LatentKernelTable& latent_kernel_table();
}
namespace AVX2 {
const LatentKernelTable& latent_kernel_table();
}
namespace AVX512 {
const LatentKernelTable& latent_kernel_table();
}

// The table for this CPU (the capability kernels() uses).
const LatentKernelTable& latent_kernels();

}  // namespace cpu
}  // namespace vae_ext
