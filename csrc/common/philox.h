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

#include "elbo_math.h"  // ScalarMath
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

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // key schedule

// One Philox4x32 round on counter words c0..c3 with key (k0, k1).
VAE_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c0 = n0;
  c1 = static_cast<uint32_t>(p1);
  c2 = n2;
  c3 = static_cast<uint32_t>(p0);
}

VAE_HD U32x4 philox4x32_10(uint64_t seed, uint64_t ctr_lo, uint64_t ctr_hi) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(ctr_lo), c1 = static_cast<uint32_t>(ctr_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(ctr_hi), c3 = static_cast<uint32_t>(ctr_hi >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return U32x4{{c0, c1, c2, c3}};
}

// The four raw 32-bit words of group g for (seed, offset).
VAE_HD U32x4 philox_group(uint64_t seed, uint64_t offset, uint64_t g) { return philox4x32_10(seed, offset / 4, g); }

// Box-Muller on two 32-bit words: u1 in (0, 1] (never 0, so the log is finite), u2 in [0, 1).
// Tail: |n| <= sqrt(-2 ln(2^-33)) = 6.76, reached with probability ~1e-11 per draw.
constexpr float kInv2p32 = 2.3283064365386963e-10f;  // 2^-32

VAE_HD float u32_to_open_unit(uint32_t a) {  // (0, 1]
  return (static_cast<float>(a) + 0.5f) * kInv2p32;
}
VAE_HD float u32_to_unit(uint32_t a) {  // [0, 1): top 24 bits, exactly representable
  return static_cast<float>(a >> 8) * (1.0f / 16777216.0f);
}

// Box-Muller, written once over a math policy M (ScalarMath<float> on CUDA, SIMD vectors on the
// CPU): n0 = r cos(2 pi u2), n1 = r sin(2 pi u2) with r = sqrt(-2 ln u1). The angle is split as
// 2 pi u2 = q pi/2 + a, q = round(4 u2), |a| <= pi/4, where Cephes' sinf/cosf polynomials are
// accurate to about an ulp, then rotated by the quadrant q: no range reduction of a large angle.
// box_muller_parts gives r, q and the polynomials' sin a and cos a; box_muller rotates them, and
// a CPU capability with mask registers may rotate them its own way, to the same bits.
template <class M>
VAE_HD void box_muller_parts(typename M::T u1, typename M::T u2, typename M::T* r, typename M::T* q,
                             typename M::T* sin_a, typename M::T* cos_a) {
  using T = typename M::T;
  *r = M::sqrt(M::fill(-2.0) * M::log(u1));
  const T q4 = u2 * M::fill(4.0);
  *q = M::round(q4);                                    // 0..4; 4 is quadrant 0 again
  const T a = (q4 - *q) * M::fill(1.5707963267948966);  // [-pi/4, pi/4]
  const T a2 = a * a;
  T s = M::fill(-1.9515295891e-4);
  s = s * a2 + M::fill(8.3321608736e-3);
  s = s * a2 + M::fill(-1.6666654611e-1);
  *sin_a = s * a2 * a + a;
  T c = M::fill(2.443315711809948e-5);
  c = c * a2 + M::fill(-1.388731625493765e-3);
  c = c * a2 + M::fill(4.166664568298827e-2);
  *cos_a = c * a2 * a2 - M::fill(0.5) * a2 + M::fill(1.0);
}

template <class M>
VAE_HD void box_muller(typename M::T u1, typename M::T u2, typename M::T* n0, typename M::T* n1) {
  using T = typename M::T;
  T r, q, s, c;
  box_muller_parts<M>(u1, u2, &r, &q, &s, &c);
  // (cos, sin) of q pi/2 + a: q=1 -> (-s, c), q=2 -> (-c, -s), q=3 -> (s, -c)
  const auto odd = (q == M::fill(1.0)) | (q == M::fill(3.0));
  const auto neg_cos = (q == M::fill(1.0)) | (q == M::fill(2.0));
  const auto neg_sin = (q == M::fill(2.0)) | (q == M::fill(3.0));
  const T cs = M::select(odd, s, c), sn = M::select(odd, c, s);
  *n0 = r * M::select(neg_cos, M::fill(0.0) - cs, cs);
  *n1 = r * M::select(neg_sin, M::fill(0.0) - sn, sn);
}

// The normal of one element e: the same value the batched versions give (pair (w0, w1) feeds
// elements 4g and 4g+1 through cos and sin, (w2, w3) elements 4g+2 and 4g+3).
template <class M>
VAE_HD float philox_normal_at(uint64_t seed, uint64_t offset, uint64_t e) {
  const U32x4 w = philox_group(seed, offset, e / 4);
  const unsigned j = static_cast<unsigned>(e % 4);
  float n0, n1;
  box_muller<M>(u32_to_open_unit(j < 2 ? w.v[0] : w.v[2]), u32_to_unit(j < 2 ? w.v[1] : w.v[3]), &n0, &n1);
  return (j & 1u) ? n1 : n0;
}

}  // namespace vae_ext
