// Included first by each header that holds vector code (vec_io.h, vec_math.h, reduce.h, normals.h,
// elbo_kernel.h, reparam_kernel.h): that code is compiled once per CPU capability, each time into
// vae_ext::cpu::CPU_CAPABILITY, so it must come through kernels_impl.h, which
// kernels_{default,avx2,avx512}.cpp include after defining CPU_CAPABILITY.
#pragma once
#ifndef CPU_CAPABILITY
#error "include through kernels_impl.h, with CPU_CAPABILITY defined"
#endif
