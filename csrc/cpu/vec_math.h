// The math policy that runs csrc/common/elbo_math.h's formulas on at::vec::Vectorized, with float
// log, log1p and exp written inline for the capability's instructions.
#pragma once
#include "capability.h"

#include <limits>

#include "../common/elbo_math.h"
#include "vec_io.h"  // at::vec, Vectorized

namespace vae_ext::cpu::CPU_CAPABILITY {

// Math policy for elbo_math.h over a SIMD vector.
template <class V>
struct VecMath {
  using T = V;
  using Mask = V;
  static T log(const T& v) { return v.log(); }
  static T log1p(const T& v) { return v.log1p(); }
  static T exp(const T& v) { return v.exp(); }
  static T abs(const T& v) { return v.abs(); }
  static T sqrt(const T& v) { return v.sqrt(); }
  static T round(const T& v) { return v.round(); }
  static T select(const Mask& m, const T& a, const T& b) { return V::blendv(b, a, m); }
  static T clamp_min(const T& v, const T& lo) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    return at::vec::clamp_min(v, lo);  // max(lo, v): one instruction, and x86 max keeps a NaN v
#else
    return V::blendv(v, lo, v < lo);  // the generic clamp_min would drop a NaN
#endif
  }
  static T fill(double v) { return T(static_cast<typename V::value_type>(v)); }
};

// float: the BCE pass is bound by its logarithms. at::vec's log (Sleef's 1-ulp one) and even
// Sleef's 3.5-ulp one are calls into libtorch: every call spills all the live vector registers
// (the x86-64 ABI saves none), twice per element vector in "bce". fast_log is inline instead:
//   x = m 2^e with m in [0.75, 1.5), s = (m - 1) / (m + 1) in [-1/7, 1/5],
//   log x = e ln2 + 2 atanh(s) = e ln2 + 2s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9 + ...),
// the series cut after s^8/9 (relative truncation error < 2e-9). Measured against double log
// over every 7th positive float (AVX-512; every 13th for AVX2): at most 2.14 ulp (Sleef's u35:
// 3.5). 0 -> -inf, x < 0 -> NaN, +inf and NaN -> themselves, subnormals exact. (Timings: "Design
// measurements" in docs/benchmarks.md.)
// log1p(v) is computed as log(u) - ((u - 1) - v) / u with u = 1 + v, the second term being
// 1 + v's rounding error; it is used for v in [-1, 1] only (log1p(-p), log1p(exp(-|l|))), where
// 1/u is replaced by 2 - u: wherever the rounding error is non-zero, u lies in [0.5, 2] and the
// correction (at most an ulp of the result) keeps > 75% of its digits. No division.
using VecF = Vectorized<float>;

// e ln2 + 2 atanh(s) from s = (m - 1) / (m + 1) and e (at::vec's float operators are inline)
VAE_HD VecF log_from_parts(const VecF& m, const VecF& e) {
  const VecF one(1.0f);
  const VecF s = (m - one) / (m + one);
  const VecF s2 = s * s;
  VecF t = at::vec::fmadd(VecF(1.0f / 9), s2, VecF(1.0f / 7));
  t = at::vec::fmadd(t, s2, VecF(1.0f / 5));
  t = at::vec::fmadd(t, s2, VecF(1.0f / 3));
  const VecF two_s = s + s;
  return at::vec::fmadd(two_s * s2, t, at::vec::fmadd(e, VecF(0.693147180559945f), two_s));
}

#if defined(CPU_CAPABILITY_AVX2)
// x = m 2^e with m in [0.75, 1.5), from the bits of a normal positive x: (bits - bits(0.75)) >> 23
// is that e.
VAE_HD void split_avx2(__m256i bits, __m256* m, __m256* e) {
  const __m256i k = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f400000)), 23);
  *m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(k, 23)));
  *e = _mm256_cvtepi32_ps(k);
}

// fast_log for any lanes: subnormals are scaled by 2^23 first; 0 -> -inf, x < 0 -> NaN, and
// +inf and NaN are their own log.
VAE_HD __m256 log_avx2_any(__m256 x) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 sub = _mm256_cmp_ps(x, _mm256_set1_ps(std::numeric_limits<float>::min()), _CMP_LT_OQ);
  __m256 m, e;
  split_avx2(_mm256_castps_si256(_mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), sub)), &m, &e);
  e = _mm256_sub_ps(e, _mm256_and_ps(sub, _mm256_set1_ps(23.0f)));
  __m256 r = log_from_parts(VecF(m), VecF(e));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _mm256_cmp_ps(x, zero, _CMP_EQ_OQ));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, inf, _CMP_EQ_UQ));  // EQ_UQ: +inf or NaN
}
#endif

VAE_HD VecF fast_log(const VecF& v) {
#if defined(CPU_CAPABILITY_AVX512)
  // getmant/getexp split x (subnormals too; getmant gives NaN for x < 0) and carry 0, inf and
  // NaN through to -inf, inf and NaN. getexp is that of [1, 2): one more where m < 1.
  const __m512 x = v, one = _mm512_set1_ps(1.0f);
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan);
  __m512 e = _mm512_getexp_ps(x);
  e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, one, _CMP_LT_OQ), e, one);
  return log_from_parts(VecF(m), VecF(e));
#elif defined(CPU_CAPABILITY_AVX2)
  // split_avx2 holds for normal positive x; a vector with any other lane (0, subnormal, negative,
  // inf, NaN: bits - bits(FLT_MIN) outside [0, bits(inf) - bits(FLT_MIN)) as unsigned) takes
  // log_avx2_any.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i off = _mm256_xor_si256(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x00800000)),
                                       _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256i special = _mm256_cmpgt_epi32(off, _mm256_set1_epi32(static_cast<int>(0xfeffffffu)));
  if (C10_UNLIKELY(!_mm256_testz_si256(special, special))) return VecF(log_avx2_any(v));
  __m256 m, e;
  split_avx2(bits, &m, &e);
  return log_from_parts(VecF(m), VecF(e));
#else
  return v.log();
#endif
}

// exp, inline for the same reason (bce_logits takes one per element; so do KL and reparameterize):
//   x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite),
//   exp x = 2^n (1 + r + r^2/2! + ... + r^7/7!)   (relative truncation error < 6e-9).
// x is clamped to [-104, 89] first (exp(-104) rounds to 0, exp(89) overflows; NaN passes).
// Measured against double exp over every 5th float in (-110, 110): at most 0.93 ulp; subnormal
// results within one subnormal step, and 0, inf and NaN where std::exp gives them.

// exp(r) (the series) and n, for x = n ln2 + r
VAE_HD VecF exp_reduced(VecF x, VecF* n) {
  // clamp_min/max are max(lo, x) and min(hi, x): x86 returns the second operand for a NaN
  x = at::vec::clamp_max(at::vec::clamp_min(x, VecF(-104.0f)), VecF(89.0f));
  *n = (x * VecF(1.44269504088896341f)).round();
  VecF r = at::vec::fmadd(*n, VecF(-0.693359375f), x);  // 0.693359375: few bits, n * it is exact
  r = at::vec::fmadd(*n, VecF(2.12194440e-4f), r);      // -(ln2 - 0.693359375)
  VecF p(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = at::vec::fmadd(p, r, VecF(c));
  return p;
}

VAE_HD VecF fast_exp(const VecF& v) {
#if defined(CPU_CAPABILITY_AVX512)
  VecF n;
  const VecF p = exp_reduced(v, &n);
  return VecF(_mm512_scalef_ps(p, n));  // p 2^n, rounded once: overflow and subnormals included
#elif defined(CPU_CAPABILITY_AVX2)
  VecF n;
  const VecF p = exp_reduced(v, &n);
  // 2^n as two factors 2^(n/2) 2^(n - n/2), each a normal float for n in [-150, 128]; p times
  // the first is exact, so the result is rounded once (subnormals too)
  const __m256i ni = _mm256_cvtps_epi32(n), bias = _mm256_set1_epi32(127);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return VecF(_mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
#else
  return v.exp();
#endif
}

VAE_HD VecF fast_log1p(const VecF& v) {
  const VecF u = v + VecF(1.0f);
  const VecF corr = ((u - VecF(1.0f)) - v) * (VecF(2.0f) - u);
  return fast_log(u) - corr;
}

template <>
VAE_HD VecF VecMath<VecF>::log(const VecF& v) {
  return fast_log(v);
}
template <>
VAE_HD VecF VecMath<VecF>::log1p(const VecF& v) {
  return fast_log1p(v);
}
template <>
VAE_HD VecF VecMath<VecF>::exp(const VecF& v) {
  return fast_exp(v);
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
