// Standard normals of the counter-based Philox stream, vectorized: the numbers of
// csrc/common/philox.h's scalar philox_normal_at, which the CUDA kernels run, to within 4 float ulps.
// The Philox integers are bitwise the same; Box-Muller runs here on Vectorized<float> with the
// inline vector log (vec_math.h) and, on AVX2/AVX-512, FMA contraction, where the scalar one runs on
// the C library's log: about 14% of draws differ, by at most 3 ulps over 200,000 (the tests bound
// it at 4). Each capability gives the same bits for any thread count: a draw depends on (seed,
// offset, element index) alone.
#pragma once
#include "capability.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "../common/philox.h"
#include "kernels.h"
#include "vec_math.h"

namespace vae_ext::cpu::CPU_CAPABILITY {

// Normals of elements [e0, e0 + count) of the (seed, offset) stream, in float: the numbers of
// vae_ext::philox_normal_at (csrc/common/philox.h), to within 4 ulps (above). Philox runs on kGroups groups at a time in
// plain loops over lanes that the compiler vectorizes (exact integer arithmetic), Box-Muller on
// Vectorized<float> through the shared box_muller<M>.
constexpr int64_t kGroups = 64;  // Philox groups per batch: 256 normals
constexpr int64_t kBatch = 4 * kGroups;

// Ten Philox rounds on kGroups counters at once: philox_round's arithmetic, lane by lane. On x86
// the 32x32 -> 64-bit products are written with mul_epu32 on the even and odd lanes: left to
// itself the compiler widens every lane to 64 bits and packs it back (docs/benchmarks.md, "Design
// measurements").
#if defined(CPU_CAPABILITY_AVX512)
struct PhiloxLanes {
  using R = __m512i;
  static constexpr int64_t kWidth = 16;
  static R load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static void store(uint32_t* p, R v) { _mm512_storeu_si512(p, v); }
  static R splat(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static R xor3(R a, R b, R c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static void mulhilo(R a, R m, R* lo, R* hi) {
    const R even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
struct PhiloxLanes {
  using R = __m256i;
  static constexpr int64_t kWidth = 8;
  static R load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const R*>(p)); }
  static void store(uint32_t* p, R v) { _mm256_storeu_si256(reinterpret_cast<R*>(p), v); }
  static R splat(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static R xor3(R a, R b, R c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static void mulhilo(R a, R m, R* lo, R* hi) {
    const R even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
};
#endif

inline void philox10_lanes(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, uint32_t k0, uint32_t k1) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using L = PhiloxLanes;
  using R = typename L::R;
  // Two independent sets of registers per pass: each round is a chain of dependent multiplies
  // and shuffles, and two chains in flight keep the vector units busy.
  constexpr int64_t kSets = L::kWidth == 16 ? 4 : 2;
  static_assert(kGroups % (kSets * L::kWidth) == 0, "whole registers");
  const R m0 = L::splat(kPhiloxM0), m1 = L::splat(kPhiloxM1);
  for (int64_t j = 0; j < kGroups; j += kSets * L::kWidth) {
    R x0[kSets], x1[kSets], x2[kSets], x3[kSets];
    for (int64_t s = 0; s < kSets; ++s) {
      const int64_t o = j + s * L::kWidth;
      x0[s] = L::load(c0 + o), x1[s] = L::load(c1 + o), x2[s] = L::load(c2 + o), x3[s] = L::load(c3 + o);
    }
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {  // as philox_round (csrc/common/philox.h)
      const R ka = L::splat(a), kb = L::splat(b);
      for (int64_t s = 0; s < kSets; ++s) {
        R lo0, hi0, lo1, hi1;
        L::mulhilo(x0[s], m0, &lo0, &hi0);
        L::mulhilo(x2[s], m1, &lo1, &hi1);
        x0[s] = L::xor3(hi1, x1[s], ka);
        x2[s] = L::xor3(hi0, x3[s], kb);
        x1[s] = lo1;
        x3[s] = lo0;
      }
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
    for (int64_t s = 0; s < kSets; ++s) {
      const int64_t o = j + s * L::kWidth;
      L::store(c0 + o, x0[s]);
      L::store(c1 + o, x1[s]);
      L::store(c2 + o, x2[s]);
      L::store(c3 + o, x3[s]);
    }
  }
#else
  for (int round = 0; round < 10; ++round) {
    for (int64_t j = 0; j < kGroups; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
#endif
}

inline void normal_batch(uint64_t seed, uint64_t offset, uint64_t g0, float out[kBatch]) {
  using V = Vectorized<float>;
  uint32_t c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  const uint64_t lo = offset / 4;  // counter = (offset / 4, group), as philox_group
  for (int64_t j = 0; j < kGroups; ++j) {
    const uint64_t g = g0 + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(lo);
    c1[j] = static_cast<uint32_t>(lo >> 32);
    c2[j] = static_cast<uint32_t>(g);
    c3[j] = static_cast<uint32_t>(g >> 32);
  }
  philox10_lanes(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  // Pair p = 2j + h feeds elements 4j + 2h (cos) and 4j + 2h + 1 (sin).
  constexpr int64_t kPairs = 2 * kGroups;
  float u1[kPairs], u2[kPairs], n0[kPairs], n1[kPairs];
  for (int64_t j = 0; j < kGroups; ++j) {
    u1[2 * j] = u32_to_open_unit(c0[j]);
    u2[2 * j] = u32_to_unit(c1[j]);
    u1[2 * j + 1] = u32_to_open_unit(c2[j]);
    u2[2 * j + 1] = u32_to_unit(c3[j]);
  }
  static_assert(kPairs % V::size() == 0, "a batch fills whole vectors");
  for (int64_t p = 0; p < kPairs; p += V::size()) {
    V a, b;
    box_muller<VecMath<V>>(V::loadu(u1 + p), V::loadu(u2 + p), &a, &b);
    a.store(n0 + p);
    b.store(n1 + p);
  }
  for (int64_t p = 0; p < kPairs; ++p) {
    out[2 * p] = n0[p];
    out[2 * p + 1] = n1[p];
  }
}

void fill_normals(uint64_t seed, uint64_t offset, int64_t e0, int64_t count, float* out) {
  float buf[kBatch];
  int64_t e = e0;
  const int64_t end = e0 + count;
  while (e < end) {
    const int64_t g0 = e / 4;
    normal_batch(seed, offset, static_cast<uint64_t>(g0), buf);
    const int64_t first = e - 4 * g0;
    const int64_t take = std::min<int64_t>(kBatch - first, end - e);
    std::memcpy(out + (e - e0), buf + first, sizeof(float) * take);
    e += take;
  }
}

void normal_kernel(float* out, int64_t n, uint64_t seed, uint64_t offset) {
  at::parallel_for(0, n, kGrainElems, [&](int64_t b, int64_t e) { fill_normals(seed, offset, b, e - b, out + b); });
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
