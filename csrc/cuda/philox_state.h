// One call's Philox state from a CUDA generator, for the torch-facing CUDA glue (ops_cuda.cpp,
// ops_dmol_cuda.cpp, latent_ops_cuda.cpp): every op that draws reserves 4 offsets under the
// generator's lock, so that its counters (offset / 4, element group) are disjoint from those of
// every other op drawing from that generator (csrc/common/philox.h), and hands the kernel the state
// as PhiloxArgs, which under CUDA-graph capture it reads on the device.
#pragma once

#include <ATen/cuda/CUDAGeneratorImpl.h>

#include <mutex>
#include <optional>

#include "launchers.h"

namespace vae_ext {

inline cuda::PhiloxArgs reserve_philox(const std::optional<at::Generator>& generator, c10::DeviceIndex device) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator,
                                                                   at::cuda::detail::getDefaultCUDAGenerator(device));
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);
  }
  cuda::PhiloxArgs rng{};
  rng.captured = philox.captured_;
  if (philox.captured_) {
    rng.seed_ptr = philox.seed_.ptr;
    rng.offset_ptr = philox.offset_.ptr;
    rng.offset_intragraph = philox.offset_intragraph_;
  } else {
    rng.seed = philox.seed_.val;
    rng.offset = philox.offset_.val;
  }
  return rng;
}

}  // namespace vae_ext
