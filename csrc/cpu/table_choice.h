// The kernel table for this CPU's capability: each family of CPU kernels (kernels.h,
// latent_kernels.h, scale_kernels.h) is compiled once per capability into a table of its own, and
// every family must run the capability ATen chooses (ATEN_CPU_CAPABILITY honoured): one chooser.
#pragma once

#include <ATen/Context.h>

#include <string>

namespace vae_ext {
namespace cpu {

// The AVX variants are compiled (and so may be chosen) on x86 with GCC-compatible compilers only.
template <class Table>
const Table& choose_table(const Table& (*scalar)(), const Table& (*avx2)(), const Table& (*avx512)()) {
  const std::string cap = at::get_cpu_capability();
  if (avx512 != nullptr && cap == "AVX512") return avx512();
  if (avx2 != nullptr && cap == "AVX2") return avx2();
  return scalar();
}

}  // namespace cpu
}  // namespace vae_ext

// The table that `fn` (DEFAULT::fn, AVX2::fn, AVX512::fn) returns for this CPU, chosen once.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define VAE_EXT_CPU_TABLE(fn) ::vae_ext::cpu::choose_table(&DEFAULT::fn, &AVX2::fn, &AVX512::fn)
#else
#define VAE_EXT_CPU_TABLE(fn) \
  ::vae_ext::cpu::choose_table(&DEFAULT::fn, decltype(&DEFAULT::fn){nullptr}, decltype(&DEFAULT::fn){nullptr})
#endif
