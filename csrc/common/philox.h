// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// Box-Muller transform that turns its output into normals: shared by the CPU and CUDA kernels, so
// both draw the same eps for the same (seed, offset, element index).
//
// Stream layout (the same as curand_init(seed, subsequence = g, offset) for offset % 4 == 0):
//   key     = seed (64 bits)
//   counter = (offset / 4 : 64 bits, g : 64 bits), g = element index / 4
// One Philox call gives the 4 normals of elements 4g .. 4g+3. An op that reserves `offset` from a
// PyTorch generator (which hands out disjoint offset ranges) therefore never shares a counter
// with another op that drew from the same generator.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace vae_ext {

struct U32x4 {
  uint32_t v[4];
};

VAE_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

VAE_HD U32x4 philox4x32_10(uint64_t seed, uint64_t ctr_lo, uint64_t ctr_hi) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(ctr_lo), c1 = static_cast<uint32_t>(ctr_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(ctr_hi), c3 = static_cast<uint32_t>(ctr_hi >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += kW0; k1 += kW1;
  }
  return U32x4{{c0, c1, c2, c3}};
}

// The four raw 32-bit words of group g for (seed, offset).
VAE_HD U32x4 philox_group(uint64_t seed, uint64_t offset, uint64_t g) {
  return philox4x32_10(seed, offset / 4, g);
}

// Box-Muller on two 32-bit words: u1 in (0, 1] (never 0, so the log is finite), u2 in [0, 1).
// Tail: |n| <= sqrt(-2 ln(2^-33)) = 6.76, reached with probability ~1e-11 per draw.
struct Radius {
  float r, theta;
};
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kInv2p32 = 2.3283064365386963e-10f;  // 2^-32

VAE_HD float u32_to_open_unit(uint32_t a) {  // (0, 1]
  return (static_cast<float>(a) + 0.5f) * kInv2p32;
}
VAE_HD float u32_to_unit(uint32_t a) {  // [0, 1): top 24 bits, exactly representable
  return static_cast<float>(a >> 8) * (1.0f / 16777216.0f);
}

// Scalar Box-Muller, the definition of the transform (the CPU kernels run a SIMD version of the
// same steps; CUDA runs this one).
VAE_HD void box_muller(uint32_t a, uint32_t b, float* n0, float* n1) {
  const float r = std::sqrt(-2.0f * std::log(u32_to_open_unit(a)));
  const float t = kTwoPi * u32_to_unit(b);
  *n0 = r * std::cos(t);
  *n1 = r * std::sin(t);
}

// The normal of one element e: the same value the batched versions give (pair (w0, w1) feeds
// elements 4g and 4g+1 through cos and sin, (w2, w3) elements 4g+2 and 4g+3).
VAE_HD float philox_normal_at(uint64_t seed, uint64_t offset, uint64_t e) {
  const U32x4 w = philox_group(seed, offset, e / 4);
  const unsigned j = static_cast<unsigned>(e % 4);
  const uint32_t a = j < 2 ? w.v[0] : w.v[2];
  const uint32_t b = j < 2 ? w.v[1] : w.v[3];
  const float r = std::sqrt(-2.0f * std::log(u32_to_open_unit(a)));
  const float t = kTwoPi * u32_to_unit(b);
  return (j & 1u) ? r * std::sin(t) : r * std::cos(t);
}

}  // namespace vae_ext
