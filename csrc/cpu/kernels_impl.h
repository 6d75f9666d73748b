// CPU kernels, written once over at::vec::Vectorized and compiled once per CPU capability:
// kernels_{default,avx2,avx512}.cpp define CPU_CAPABILITY (and the matching target) and include
// this file, which puts everything in vae_ext::cpu::CPU_CAPABILITY and gathers the kernels (one
// header per job: vec_math.h, vec_io.h, reduce.h, elbo_kernel.h, normals.h, reparam_kernel.h, dmol_kernel.h) into
// that capability's KernelTable.
//
// Every element goes through the same vector code (tails are padded, never a scalar path), and
// every sum is split into fixed kChunk-element partials added in a fixed order, so a result
// depends only on the inputs, never on the thread count or on where a parallel range starts.
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including kernels_impl.h"
#endif

#include "dmol_kernel.h"
#include "elbo_kernel.h"
#include "kernels.h"
#include "latent_kernel.h"  // its own table: latent_kernel_table()
#include "normals.h"
#include "reparam_kernel.h"
#include "scale_kernel.h"  // its own table: scale_kernel_table()

namespace vae_ext::cpu::CPU_CAPABILITY {

#define VAE_EXT_STR2(x) #x
#define VAE_EXT_STR(x) VAE_EXT_STR2(x)

const KernelTable& kernel_table() {
  static const KernelTable table{VAE_EXT_STR(CPU_CAPABILITY), &elbo_kernel,   &reparam_kernel,
                                 &reparam_backward_kernel,    &normal_kernel, &dmol_kernel,
                                 &dmol_sample_kernel};
  return table;
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
