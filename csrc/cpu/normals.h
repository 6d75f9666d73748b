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
// vae_ext::philox_normal_at (csrc/common/philox.h), to within 4 ulps (above).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Philox keeps each 32-bit word of a counter in the low half of a 64-bit lane, so one mul_epu32
// gives a round's whole product: its low half is the next word as it stands, its high half one
// shift away (the upper halves carry garbage, which mul_epu32 and the final packing ignore).
// Packing the words in 32-bit lanes instead takes seven instructions per product (two multiplies,
// three shifts, two blends) for twice the lanes. The groups sit in the lanes in the order
// (0, H, 1, H + 1, ...), H = half the lanes, so that Box-Muller's cos and sin, interleaved within
// 128-bit lanes (unpacklo / unpackhi), come out in element order and go straight to memory.
struct NormalLanes {
#if defined(CPU_CAPABILITY_AVX512)
  using R = __m512i;
  using F = __m512;
  static constexpr int64_t kLanes = 8;  // 64-bit lanes: counters per register
  static R splat32(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static R splat64(uint64_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
  static R lane_groups() { return _mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0); }
  static R add64(R a, R b) { return _mm512_add_epi64(a, b); }
  static R mul(R a, R m) { return _mm512_mul_epu32(a, m); }
  static R hi(R p) { return _mm512_srli_epi64(p, 32); }
  static R xor3(R a, R b, R c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  // 32-bit lanes (low(a_0), low(b_0), low(a_1), low(b_1), ...)
  static R pack(R a, R b) { return _mm512_mask_blend_epi32(0xAAAA, a, _mm512_slli_epi64(b, 32)); }
  static F open_unit(R w) {  // u32_to_open_unit: (float(w) + 0.5) 2^-32
    return _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepu32_ps(w), _mm512_set1_ps(0.5f)), _mm512_set1_ps(kInv2p32));
  }
  static F unit(R w) {  // u32_to_unit: float(w >> 8) 2^-24, exact
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), _mm512_set1_ps(1.0f / 16777216.0f));
  }
  static void store_interleaved(float* out, F c, F s) {
    _mm512_storeu_ps(out, _mm512_unpacklo_ps(c, s));
    _mm512_storeu_ps(out + 16, _mm512_unpackhi_ps(c, s));
  }
  // box_muller's rotation by the quadrant q (0..4, integral), the same arithmetic on the same
  // lanes, with the quadrant's bits tested into mask registers: at::vec's comparisons make vectors
  // of all-ones lanes that each select turns back into a mask.
  static void box_muller(F u1, F u2, F* n0, F* n1) {
    using V = Vectorized<float>;
    V r, q, s, c;
    box_muller_parts<VecMath<V>>(V(u1), V(u2), &r, &q, &s, &c);
    const R qi = _mm512_cvtps_epi32(q), one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2);
    const __mmask16 odd = _mm512_test_epi32_mask(qi, one);                               // q = 1, 3
    const __mmask16 neg_sin = _mm512_test_epi32_mask(qi, two);                           // q = 2, 3
    const __mmask16 neg_cos = _mm512_test_epi32_mask(_mm512_add_epi32(qi, one), two);  // q = 1, 2
    const F cs = _mm512_mask_blend_ps(odd, c, s), sn = _mm512_mask_blend_ps(odd, s, c), zero = _mm512_setzero_ps();
    *n0 = _mm512_mul_ps(r, _mm512_mask_sub_ps(cs, neg_cos, zero, cs));
    *n1 = _mm512_mul_ps(r, _mm512_mask_sub_ps(sn, neg_sin, zero, sn));
  }
#else
  using R = __m256i;
  using F = __m256;
  static constexpr int64_t kLanes = 4;
  static R splat32(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static R splat64(uint64_t v) { return _mm256_set1_epi64x(static_cast<long long>(v)); }
  static R lane_groups() { return _mm256_set_epi64x(3, 1, 2, 0); }
  static R add64(R a, R b) { return _mm256_add_epi64(a, b); }
  static R mul(R a, R m) { return _mm256_mul_epu32(a, m); }
  static R hi(R p) { return _mm256_srli_epi64(p, 32); }
  static R xor3(R a, R b, R c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static R pack(R a, R b) { return _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA); }
  static F open_unit(R w) {
    // AVX2 converts signed integers only: float(w) = float(w >> 16) 2^16 + float(w & 0xffff), the
    // product exact and the sum rounded once, as the scalar conversion rounds.
    const F h = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 16)), _mm256_set1_ps(65536.0f));
    const F f = _mm256_add_ps(h, _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(0xffff))));
    return _mm256_mul_ps(_mm256_add_ps(f, _mm256_set1_ps(0.5f)), _mm256_set1_ps(kInv2p32));
  }
  static F unit(R w) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
  }
  static void store_interleaved(float* out, F c, F s) {
    _mm256_storeu_ps(out, _mm256_unpacklo_ps(c, s));
    _mm256_storeu_ps(out + 8, _mm256_unpackhi_ps(c, s));
  }
  static void box_muller(F u1, F u2, F* n0, F* n1) {
    using V = Vectorized<float>;
    V a, b;
    vae_ext::box_muller<VecMath<V>>(V(u1), V(u2), &a, &b);
    *n0 = a;
    *n1 = b;
  }
#endif
};

// Counters in flight: each round is a chain of dependent multiplies, and several chains keep the
// vector units busy (two sets were slower on AVX2, whose 16 registers four sets overflow a little).
constexpr int64_t kSets = 4;
constexpr int64_t kBatch = kSets * 4 * NormalLanes::kLanes;  // normals per batch: 128 or 32

// The kBatch normals of elements 4 g0 .. 4 g0 + kBatch - 1, into out.
inline void normal_batch(uint64_t seed, uint64_t offset, uint64_t g0, float* out) {
  using L = NormalLanes;
  using R = L::R;
  const uint64_t lo = offset / 4;  // counter = (offset / 4, group), as philox_group
  const R m0 = L::splat32(kPhiloxM0), m1 = L::splat32(kPhiloxM1), order = L::lane_groups();
  R x0[kSets], x1[kSets], x2[kSets], x3[kSets];
  for (int64_t s = 0; s < kSets; ++s) {
    const R g = L::add64(L::splat64(g0 + static_cast<uint64_t>(s * L::kLanes)), order);
    x0[s] = L::splat64(lo);
    x1[s] = L::splat64(lo >> 32);
    x2[s] = g;
    x3[s] = L::hi(g);
  }
  uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
  // Unrolled, the rounds' results are renamed, not moved back into the loop's registers.
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {  // as philox_round (csrc/common/philox.h)
    const R ka = L::splat32(a), kb = L::splat32(b);
    for (int64_t s = 0; s < kSets; ++s) {
      const R p0 = L::mul(x0[s], m0), p1 = L::mul(x2[s], m1);
      x0[s] = L::xor3(L::hi(p1), x1[s], ka);
      x2[s] = L::xor3(L::hi(p0), x3[s], kb);
      x1[s] = p1;
      x3[s] = p0;
    }
    a += kPhiloxW0;
    b += kPhiloxW1;
  }
  // A group's pair (w0, w1) feeds its elements 0 (cos) and 1 (sin), (w2, w3) elements 2 and 3.
  for (int64_t s = 0; s < kSets; ++s) {
    L::F c, sn;
    L::box_muller(L::open_unit(L::pack(x0[s], x2[s])), L::unit(L::pack(x1[s], x3[s])), &c, &sn);
    L::store_interleaved(out + s * 4 * L::kLanes, c, sn);
  }
}
#else
constexpr int64_t kGroups = 64;  // Philox groups per batch
constexpr int64_t kBatch = 4 * kGroups;

// The kBatch normals of elements 4 g0 .. 4 g0 + kBatch - 1, into out: Philox in plain loops over
// the groups, round by round (which the compiler may vectorize), and Box-Muller on Vectorized<float>.
inline void normal_batch(uint64_t seed, uint64_t offset, uint64_t g0, float* out) {
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
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t j = 0; j < kGroups; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
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
  for (int64_t p = 0; p < kPairs; ++p) {  // pair p = 2j + h: elements 4j + 2h (cos) and 4j + 2h + 1 (sin)
    out[2 * p] = n0[p];
    out[2 * p + 1] = n1[p];
  }
}
#endif

// Whole batches are written in place; one cut by e0 or by the end goes through a buffer.
void fill_normals(uint64_t seed, uint64_t offset, int64_t e0, int64_t count, float* out) {
  float buf[kBatch];
  int64_t e = e0;
  const int64_t end = e0 + count;
  while (e < end) {
    const int64_t g0 = e / 4;
    const int64_t first = e - 4 * g0;
    if (first == 0 && end - e >= kBatch) {
      normal_batch(seed, offset, static_cast<uint64_t>(g0), out + (e - e0));
      e += kBatch;
      continue;
    }
    normal_batch(seed, offset, static_cast<uint64_t>(g0), buf);
    const int64_t take = std::min<int64_t>(kBatch - first, end - e);
    std::memcpy(out + (e - e0), buf + first, sizeof(float) * take);
    e += take;
  }
}

void normal_kernel(float* out, int64_t n, uint64_t seed, uint64_t offset) {
  at::parallel_for(0, n, kGrainElems, [&](int64_t b, int64_t e) { fill_normals(seed, offset, b, e - b, out + b); });
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
