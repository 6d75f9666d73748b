// CPU kernels, written once over at::vec::Vectorized and compiled once per CPU capability:
// kernels_{default,avx2,avx512}.cpp define CPU_CAPABILITY (and the matching target) and include
// this file, which puts everything in vae_ext::cpu::CPU_CAPABILITY.
//
// Every element goes through the same vector code (tails are padded, never a scalar path), and
// every sum is split into fixed kChunk-element partials added in a fixed order, so a result
// depends only on the inputs, never on the thread count or on where a parallel range starts.
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including kernels_impl.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/elbo_math.h"
#include "../common/philox.h"
#include "kernels.h"

namespace vae_ext {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------- helpers

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
// 3.5). 0 -> -inf, x < 0 -> NaN, +inf and NaN -> themselves, subnormals exact. Inline, the "bce"
// pass took 41 instead of 53 us (128x784 float32, one thread, AVX-512).
// log1p(v) is computed as log(u) - ((u - 1) - v) / u with u = 1 + v, the second term being
// 1 + v's rounding error; it is used for v in [-1, 1] only (log1p(-p), log1p(exp(-|l|))), where
// 1/u is replaced by 2 - u: wherever the rounding error is non-zero, u lies in [0.5, 2] and the
// correction (at most an ulp of the result) keeps > 75% of its digits. No division.
using VecF = Vectorized<float>;

// e ln2 + 2 atanh(s) from s = (m - 1) / (m + 1) and e (at::vec's float operators are inline)
inline VecF log_from_parts(const VecF& m, const VecF& e) {
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
inline void split_avx2(__m256i bits, __m256* m, __m256* e) {
  const __m256i k = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f400000)), 23);
  *m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(k, 23)));
  *e = _mm256_cvtepi32_ps(k);
}

// fast_log for any lanes: subnormals are scaled by 2^23 first; 0 -> -inf, x < 0 -> NaN, and
// +inf and NaN are their own log.
inline __m256 log_avx2_any(__m256 x) {
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
inline VecF exp_reduced(VecF x, VecF* n) {
  // clamp_min/max are max(lo, x) and min(hi, x): x86 returns the second operand for a NaN
  x = at::vec::clamp_max(at::vec::clamp_min(x, VecF(-104.0f)), VecF(89.0f));
  *n = (x * VecF(1.44269504088896341f)).round();
  VecF r = at::vec::fmadd(*n, VecF(-0.693359375f), x);  // 0.693359375: few bits, n * it is exact
  r = at::vec::fmadd(*n, VecF(2.12194440e-4f), r);      // -(ln2 - 0.693359375)
  VecF p(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = at::vec::fmadd(p, r, VecF(c));
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
inline VecF VecMath<VecF>::log(const VecF& v) { return fast_log(v); }
template <>
inline VecF VecMath<VecF>::log1p(const VecF& v) { return fast_log1p(v); }
template <>
inline VecF VecMath<VecF>::exp(const VecF& v) { return fast_exp(v); }

// Loads/stores one vector of the accumulation type (float for float/half types, double for
// double) from/to a tensor of scalar_t; the `n` overloads touch only the first n lanes.
template <typename scalar_t>
struct VecIO {
  using acc_t = scalar_t;
  using V = Vectorized<acc_t>;
  static V load(const scalar_t* p) { return V::loadu(p); }
  static V load(const scalar_t* p, int64_t n) { return V::loadu(p, n); }
  static void store(scalar_t* p, const V& v) { v.store(p); }
  static void store(scalar_t* p, const V& v, int64_t n) { v.store(p, n); }
};

template <typename half_t>
struct HalfVecIO {
  using acc_t = float;
  using V = Vectorized<float>;
  static V load(const half_t* p) {
    V out;
    at::vec::load_to_float<half_t>(p, out);
    return out;
  }
  static V load(const half_t* p, int64_t n) {
    float buf[V::size()] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return V::loadu(buf);
  }
  static void store(half_t* p, const V& v) {
    at::vec::convert_from_float<half_t>(v, v).store(p, V::size());
  }
  static void store(half_t* p, const V& v, int64_t n) {
    at::vec::convert_from_float<half_t>(v, v).store(p, n);
  }
};
template <>
struct VecIO<c10::BFloat16> : HalfVecIO<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : HalfVecIO<c10::Half> {};

template <class V>
double hsum(const V& v) {  // horizontal sum in lane order, in double
  typename V::value_type buf[V::size()];
  v.store(buf);
  double s = 0.0;
  for (int64_t i = 0; i < V::size(); ++i) s += static_cast<double>(buf[i]);
  return s;
}

template <class V>
bool any_lane_set(const V& mask) {
  unsigned char buf[sizeof(typename V::value_type) * V::size()];
  mask.store(buf);
  for (unsigned char c : buf)
    if (c) return true;
  return false;
}

// Calls fn(dtype tag) with a null pointer of the tensor's C++ type.
template <class F>
void dispatch_dtype(DType dt, F&& fn) {
  switch (dt) {
    case DType::Float32: fn(static_cast<float*>(nullptr)); break;
    case DType::Float64: fn(static_cast<double*>(nullptr)); break;
    case DType::Float16: fn(static_cast<c10::Half*>(nullptr)); break;
    case DType::BFloat16: fn(static_cast<c10::BFloat16*>(nullptr)); break;
  }
}

constexpr int64_t kGrainElems = 32768;  // elements per task below which parallel_for stays serial

// row_out[r] = sum over the row's elements, as seg(r, begin, end) partial sums over kChunk-sized
// pieces added in order. seg must be a pure function of its arguments (plus the data).
template <class Seg>
void reduce_rows(int64_t n, int64_t d, double* row_out, const Seg& seg) {
  if (n == 0) return;
  if (d == 0) {
    std::fill(row_out, row_out + n, 0.0);
    return;
  }
  const int64_t cpr = (d + kChunk - 1) / kChunk;  // chunks per row
  if (cpr == 1) {
    at::parallel_for(0, n, std::max<int64_t>(1, kGrainElems / d), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) row_out[r] = seg(r, 0, d);
    });
    return;
  }
  std::vector<double> part(static_cast<size_t>(n * cpr));
  at::parallel_for(0, n * cpr, std::max<int64_t>(1, kGrainElems / kChunk), [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const int64_t r = u / cpr, c = u % cpr;
      part[u] = seg(r, c * kChunk, std::min(d, (c + 1) * kChunk));
    }
  });
  for (int64_t r = 0; r < n; ++r) {
    double s = 0.0;
    for (int64_t c = 0; c < cpr; ++c) s += part[r * cpr + c];
    row_out[r] = s;
  }
}

// The sum over [0, total) as seg(begin, end) partial sums over kChunk-sized pieces added in order
// (a reduction over everything, where the rows need no sums of their own). Scratch: one double
// per kChunk elements.
template <class Seg>
double reduce_flat(int64_t total, const Seg& seg) {
  if (total <= kChunk) return total > 0 ? seg(0, total) : 0.0;
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, std::max<int64_t>(1, kGrainElems / kChunk), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) part[c] = seg(c * kChunk, std::min(total, (c + 1) * kChunk));
  });
  double s = 0.0;
  for (double v : part) s += v;
  return s;
}

// ---------------------------------------------------------------------------------- ELBO loss

// "bce" helpers on the vector loop's hot path. Generic: through at::vec's comparisons, which on
// x86 turn every mask into a vector and back; for float on AVX2/AVX-512 a few instructions.

// True when every lane of x is exactly 0 or 1 (x * x - x == 0 holds for those alone, rounded or
// not; NaN and inf give NaN).
template <class V>
bool all_binary(const V& x) {
  return ((x == V(0)) | (x == V(1))).zero_mask() == 0;
}

// Tracks whether any p seen lies outside [0, 1]; NaN is not flagged (it gives NaN).
template <class V>
struct ProbRange {
  V bad = V(0);
  void add(const V& p) { bad = bad | prob_out_of_range<VecMath<V>>(p); }
  bool out_of_range() const { return any_lane_set(bad); }
};

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline bool all_binary(const VecF& x) {
  const __m512 v = x;
  return _mm512_cmp_ps_mask(_mm512_fmsub_ps(v, v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ) == 0;
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline bool all_binary(const VecF& x) {
  const __m256 v = x;
  return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_fmsub_ps(v, v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ)) == 0;
}
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The running min and max instead: clamp_max(lo, p) is x86's min(p, lo), which returns lo for a
// NaN p (the second operand), as max(p, hi) returns hi.
template <>
struct ProbRange<VecF> {
  VecF lo = VecF(0.0f), hi = VecF(0.0f);
  void add(const VecF& p) {
    lo = at::vec::clamp_max(lo, p);
    hi = at::vec::clamp_min(hi, p);
  }
  bool out_of_range() const {
    using M = VecMath<VecF>;
    return any_lane_set(prob_out_of_range<M>(lo) | prob_out_of_range<M>(hi));
  }
};
#endif

// One pass over a row segment of recon/x: returns the segment's loss sum and writes the scaled
// gradient when g is not null. Checks "bce" probabilities on the fly.
template <typename scalar_t, Recon mode>
double recon_segment(const scalar_t* r, const scalar_t* x, scalar_t* g, int64_t len, double scale,
                     std::atomic<bool>* bad_prob, std::atomic<bool>* bad_target) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using M = VecMath<V>;
  constexpr int64_t W = V::size();
  const V vscale(static_cast<typename IO::acc_t>(scale));
  const bool scaled = scale != 1.0;  // "mean" only
  V acc0(0), acc1(0);
  ProbRange<V> range, target_range;  // recon_x's and x's (binary x vectors are in range: skipped)
  auto step = [&](int64_t i, int64_t cnt, V& acc) {
    const bool full = cnt == W;
    const V rv = full ? IO::load(r + i) : IO::load(r + i, cnt);
    const V xv = full ? IO::load(x + i) : IO::load(x + i, cnt);
    V gv;
    V lv;
    if constexpr (mode == Recon::BCE) {  // x all 0 or 1: one log instead of two, same numbers
      if (all_binary(xv)) {
        lv = bce_binary_elem<M>(rv, xv, &gv);
      } else {
        lv = bce_elem<M>(rv, xv, &gv);
        target_range.add(xv);
      }
    } else {
      lv = recon_elem<mode, M>(rv, xv, &gv);
    }
    if (!full) lv = V::set(V(0), lv, cnt);  // padded lanes add nothing
    acc = acc + lv;
    if constexpr (mode == Recon::BCE) range.add(rv);
    if (g != nullptr) {
      if (scaled) gv = gv * vscale;
      if (full) IO::store(g + i, gv);
      else IO::store(g + i, gv, cnt);
    }
  };
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    step(i, W, acc0);
    step(i + W, W, acc1);
  }
  for (; i + W <= len; i += W) step(i, W, acc0);
  if (i < len) step(i, len - i, acc1);
  if constexpr (mode == Recon::BCE) {
    if (range.out_of_range()) bad_prob->store(true, std::memory_order_relaxed);
    if (target_range.out_of_range()) bad_target->store(true, std::memory_order_relaxed);
  }
  return hsum(acc0) + hsum(acc1);
}

// The gradients go to gmu and glv in the accumulation type (float for half types).
template <typename scalar_t>
double kl_segment(const scalar_t* mu, const scalar_t* lv, typename VecIO<scalar_t>::acc_t* gmu,
                  typename VecIO<scalar_t>::acc_t* glv, int64_t len, double scale) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using M = VecMath<V>;
  constexpr int64_t W = V::size();
  const V vscale(static_cast<typename IO::acc_t>(scale));
  V acc(0);
  for (int64_t i = 0; i < len; i += W) {
    const int64_t cnt = std::min(W, len - i);
    const bool full = cnt == W;
    const V m = full ? IO::load(mu + i) : IO::load(mu + i, cnt);
    const V l = full ? IO::load(lv + i) : IO::load(lv + i, cnt);
    V gm, gl;
    V k = kl_elem<M>(m, l, &gm, &gl);
    acc = acc + (full ? k : V::set(V(0), k, cnt));
    if (gmu != nullptr) {
      if (full) {
        (gm * vscale).store(gmu + i);
        (gl * vscale).store(glv + i);
      } else {
        (gm * vscale).store(gmu + i, cnt);
        (gl * vscale).store(glv + i, cnt);
      }
    }
  }
  return hsum(acc);
}

template <typename scalar_t, Recon mode>
void elbo_typed(const ElboArgs& a) {
  const auto* r = static_cast<const scalar_t*>(a.recon);
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* g = static_cast<scalar_t*>(a.grad_recon);
  const int64_t d = a.d;
  const auto rec_seg = [&](int64_t off, int64_t len) {
    return recon_segment<scalar_t, mode>(r + off, x + off, g ? g + off : nullptr, len, a.grad_scale, a.bad_prob,
                                         a.bad_target);
  };
  const auto* mu = static_cast<const scalar_t*>(a.mu);
  const auto* lv = static_cast<const scalar_t*>(a.logvar);
  auto* gmu = static_cast<typename VecIO<scalar_t>::acc_t*>(a.grad_mu);
  auto* glv = static_cast<typename VecIO<scalar_t>::acc_t*>(a.grad_logvar);
  const int64_t l = a.l;
  const auto kl_seg = [&](int64_t off, int64_t len) {
    return kl_segment<scalar_t>(mu + off, lv + off, gmu ? gmu + off : nullptr, glv ? glv + off : nullptr, len,
                                a.grad_scale);
  };
  if (a.row_rec == nullptr) {  // one sum over everything: no per-row sums needed
    *a.total_rec = reduce_flat(a.n * d, [&](int64_t b, int64_t e) { return rec_seg(b, e - b); });
    *a.total_kl = reduce_flat(a.n * l, [&](int64_t b, int64_t e) { return kl_seg(b, e - b); });
    return;
  }
  reduce_rows(a.n, d, a.row_rec, [&](int64_t row, int64_t b, int64_t e) { return rec_seg(row * d + b, e - b); });
  reduce_rows(a.n, l, a.row_kl, [&](int64_t row, int64_t b, int64_t e) { return kl_seg(row * l + b, e - b); });
}

void elbo_kernel(const ElboArgs& a) {
  dispatch_dtype(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    switch (a.mode) {
      case Recon::BCE: elbo_typed<scalar_t, Recon::BCE>(a); break;
      case Recon::BCELogits: elbo_typed<scalar_t, Recon::BCELogits>(a); break;
      case Recon::MSE: elbo_typed<scalar_t, Recon::MSE>(a); break;
    }
  });
}

// g *= s[row], in float, rounded once to the half type (the backward of reduction="none").
template <typename scalar_t>
void scale_rows_typed(scalar_t* g, int64_t rows, int64_t d, const float* s) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  constexpr int64_t W = V::size();
  at::parallel_for(0, rows * d, kGrainElems, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e;) {
      const int64_t row = i / d, end = std::min(e, (row + 1) * d);
      const V sv(s[row]);
      while (i < end) {
        const int64_t cnt = std::min(W, end - i);
        if (cnt == W) IO::store(g + i, IO::load(g + i) * sv);
        else IO::store(g + i, IO::load(g + i, cnt) * sv, cnt);
        i += cnt;
      }
    }
  });
}

void scale_rows_kernel(DType dtype, void* g, int64_t rows, int64_t d, const float* s) {
  if (dtype == DType::Float16) scale_rows_typed(static_cast<c10::Half*>(g), rows, d, s);
  if (dtype == DType::BFloat16) scale_rows_typed(static_cast<c10::BFloat16*>(g), rows, d, s);
}

// ---------------------------------------------------------------------------------- normals

// Normals of elements [e0, e0 + count) of the (seed, offset) stream, in float: the same numbers
// as vae_ext::philox_normal_at (csrc/common/philox.h). Philox runs on kGroups groups at a time in
// plain loops over lanes that the compiler vectorizes (exact integer arithmetic), Box-Muller on
// Vectorized<float> through the shared box_muller<M>.
constexpr int64_t kGroups = 64;  // Philox groups per batch: 256 normals
constexpr int64_t kBatch = 4 * kGroups;

// Ten Philox rounds on kGroups counters at once: philox_round's arithmetic, lane by lane. On x86
// the 32x32 -> 64-bit products are written with mul_epu32 on the even and odd lanes: left to
// itself the compiler widens every lane to 64 bits and packs it back, at twice the cost (measured:
// the rounds were two thirds of the time of a batch of normals).
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

// ---------------------------------------------------------------------------------- reparameterize

constexpr int64_t kTile = 512;  // elements of eps generated per step (stays in L1)

// eps of elements [e0, e0 + count) in the accumulation type, rounded to scalar_t first: z is
// computed from exactly the eps that return_eps hands back (a no-op for float and double).
template <typename scalar_t, typename acc_t>
void eps_tile(uint64_t seed, uint64_t offset, int64_t e0, int64_t count, acc_t* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if constexpr (std::is_same_v<acc_t, float>) {
      fill_normals(seed, offset, e0, count, out);
      return;
    }
  }
  float tmp[kTile];
  fill_normals(seed, offset, e0, count, tmp);
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<acc_t>(static_cast<scalar_t>(tmp[i]));
}

template <typename scalar_t>
void reparam_typed(const ReparamArgs& a) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = V::size();
  const auto* mu = static_cast<const scalar_t*>(a.mu);
  const auto* lv = static_cast<const scalar_t*>(a.logvar);
  auto* z = static_cast<scalar_t*>(a.z);
  auto* eps_out = static_cast<scalar_t*>(a.eps);
  const int64_t numel = a.numel, total = a.k * a.numel;
  at::parallel_for(0, total, kGrainElems, [&](int64_t b, int64_t e) {
    acc_t eps[kTile];
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int64_t tlen = std::min(kTile, e - t0);
      eps_tile<scalar_t, acc_t>(a.seed, a.offset, t0, tlen, eps);
      // Runs of the tile that stay inside one sample, so mu/logvar are contiguous too.
      for (int64_t pos = t0; pos < t0 + tlen;) {
        const int64_t i0 = pos % numel;
        const int64_t run = std::min(t0 + tlen - pos, numel - i0);
        const acc_t* ep = eps + (pos - t0);
        for (int64_t j = 0; j < run; j += W) {
          const int64_t cnt = std::min(W, run - j);
          const bool full = cnt == W;
          const V m = full ? IO::load(mu + i0 + j) : IO::load(mu + i0 + j, cnt);
          const V l = full ? IO::load(lv + i0 + j) : IO::load(lv + i0 + j, cnt);
          const V ev = V::loadu(ep + j, cnt);
          const V zv = reparam_z<VecMath<V>>(m, l, ev);
          if (full) IO::store(z + pos + j, zv);
          else IO::store(z + pos + j, zv, cnt);
          if (eps_out != nullptr) {
            if (full) IO::store(eps_out + pos + j, ev);
            else IO::store(eps_out + pos + j, ev, cnt);
          }
        }
        pos += run;
      }
    }
  });
}

template <typename scalar_t>
void reparam_backward_typed(const ReparamBackwardArgs& a) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = V::size();
  const auto* gz = static_cast<const scalar_t*>(a.grad_z);
  const auto* lv = static_cast<const scalar_t*>(a.logvar);
  auto* gmu = static_cast<scalar_t*>(a.grad_mu);
  auto* glv = static_cast<scalar_t*>(a.grad_logvar);
  const int64_t numel = a.numel;
  // Writes elements [i, i + cnt): grad_mu = gm (sum_s g_s) and grad_logvar from sum_s g_s eps_s.
  const auto write = [&](int64_t i, int64_t cnt, const V& gm, const V& sum_ge) {
    const V l = cnt == W ? IO::load(lv + i) : IO::load(lv + i, cnt);
    const V gl = reparam_grad_logvar<VecMath<V>>(l, sum_ge);
    if (cnt == W) {
      if (gmu) IO::store(gmu + i, gm);
      IO::store(glv + i, gl);
    } else {
      if (gmu) IO::store(gmu + i, gm, cnt);
      IO::store(glv + i, gl, cnt);
    }
  };
  at::parallel_for(0, numel, std::max<int64_t>(1, kGrainElems / a.k), [&](int64_t b, int64_t e) {
    acc_t eps[kTile], sum_g[kTile], sum_ge[kTile];
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int64_t tlen = std::min(kTile, e - t0);
      if (a.k == 1) {  // one sample: straight from grad_z and eps, no per-sample sums
        eps_tile<scalar_t, acc_t>(a.seed, a.offset, t0, tlen, eps);
        for (int64_t j = 0; j < tlen; j += W) {
          const int64_t cnt = std::min(W, tlen - j), i = t0 + j;
          const V gv = cnt == W ? IO::load(gz + i) : IO::load(gz + i, cnt);
          write(i, cnt, gv, gv * V::loadu(eps + j, cnt));
        }
        continue;
      }
      std::fill(sum_g, sum_g + tlen, acc_t(0));
      std::fill(sum_ge, sum_ge + tlen, acc_t(0));
      for (int64_t s = 0; s < a.k; ++s) {  // samples in order: a fixed summation order
        eps_tile<scalar_t, acc_t>(a.seed, a.offset, s * numel + t0, tlen, eps);
        const scalar_t* g = gz + s * numel + t0;
        for (int64_t j = 0; j < tlen; j += W) {
          const int64_t cnt = std::min(W, tlen - j);
          const V gv = cnt == W ? IO::load(g + j) : IO::load(g + j, cnt);
          (V::loadu(sum_g + j, cnt) + gv).store(sum_g + j, cnt);
          (V::loadu(sum_ge + j, cnt) + gv * V::loadu(eps + j, cnt)).store(sum_ge + j, cnt);
        }
      }
      for (int64_t j = 0; j < tlen; j += W) {
        const int64_t cnt = std::min(W, tlen - j);
        write(t0 + j, cnt, V::loadu(sum_g + j, cnt), V::loadu(sum_ge + j, cnt));
      }
    }
  });
}

// ---------------------------------------------------------------------------------- channels_last

// mu (and so z, eps and the gradients) channels_last or channels_last_3d: logical element
// (n, c, s) of a (N, C, *S) tensor (S the spatial sizes, flattened) sits at memory index
// (n S + s) C + c, while its eps is that of logical index (n C + c) S + s, so that z.contiguous() is
// bitwise what a contiguous mu gives. Each sample is one block of C S elements in either order.
// A tile is channels [c0, c0 + tc) x positions [s0, s0 + ts) of one block: its eps is drawn as tc
// logical runs of ts (one run when ts == S), transposed in L1 to memory order, and the tile is then
// computed in memory order, vectorized: ts memory runs of tc (one run of ts C when tc == C).
constexpr int64_t kClTile = 4096;  // elements per tile

struct ClTiling {
  int64_t c, s, ts, tc, tiles_s, tiles_c;
  ClTiling(int64_t channels, int64_t spatial) : c(channels), s(spatial) {
    ts = std::min(s, std::max<int64_t>(256, kClTile / c));  // runs of >= 256 normals where S allows
    tc = std::min(c, std::max<int64_t>(1, kClTile / ts));
    tiles_s = (s + ts - 1) / ts;
    tiles_c = (c + tc - 1) / tc;
  }
  int64_t per_block() const { return tiles_s * tiles_c; }
};

// The eps of one tile in memory order (out[j * tcn + i] for position s0 + j, channel c0 + i), from
// the logical stream starting at `base` (the block's first logical element), rounded to scalar_t
// as eps_tile does. tmp: kClTile floats.
template <typename scalar_t, typename acc_t>
void cl_eps_tile(uint64_t seed, uint64_t offset, int64_t base, const ClTiling& t, int64_t c0, int64_t tcn,
                 int64_t s0, int64_t tsn, float* tmp, acc_t* out) {
  if (tsn == t.s) {
    fill_normals(seed, offset, base + c0 * t.s, tcn * tsn, tmp);  // whole channels: one logical run
  } else {
    for (int64_t i = 0; i < tcn; ++i) fill_normals(seed, offset, base + (c0 + i) * t.s + s0, tsn, tmp + i * tsn);
  }
  for (int64_t j = 0; j < tsn; ++j)
    for (int64_t i = 0; i < tcn; ++i) out[j * tcn + i] = static_cast<acc_t>(static_cast<scalar_t>(tmp[i * tsn + j]));
}

// Calls fn(mem, tile, len) for the memory runs of a tile: `mem` the offset in the block, `tile` the
// offset in the tile's memory-order buffer.
template <class F>
void cl_runs(const ClTiling& t, int64_t c0, int64_t tcn, int64_t s0, int64_t tsn, const F& fn) {
  if (tcn == t.c) {
    fn(s0 * t.c, 0, tsn * t.c);
    return;
  }
  for (int64_t j = 0; j < tsn; ++j) fn((s0 + j) * t.c + c0, j * tcn, tcn);
}

template <typename scalar_t>
void reparam_cl_typed(const ReparamArgs& a) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = V::size();
  const auto* mu = static_cast<const scalar_t*>(a.mu);
  const auto* lv = static_cast<const scalar_t*>(a.logvar);
  auto* z = static_cast<scalar_t*>(a.z);
  auto* eps_out = static_cast<scalar_t*>(a.eps);
  const ClTiling t(a.channels, a.spatial);
  const int64_t p = t.c * t.s, blocks = a.k * (a.numel / p), units = blocks * t.per_block();
  at::parallel_for(0, units, std::max<int64_t>(1, kGrainElems / std::min(p, kClTile)), [&](int64_t b, int64_t e) {
    std::vector<float> tmp(kClTile);
    std::vector<acc_t> eps(kClTile);
    for (int64_t u = b; u < e; ++u) {
      const int64_t blk = u / t.per_block(), r = u % t.per_block();
      const int64_t c0 = (r / t.tiles_s) * t.tc, s0 = (r % t.tiles_s) * t.ts;
      const int64_t tcn = std::min(t.tc, t.c - c0), tsn = std::min(t.ts, t.s - s0);
      const int64_t zbase = blk * p, mbase = zbase % a.numel;  // z block (k, n); mu block n
      cl_eps_tile<scalar_t, acc_t>(a.seed, a.offset, zbase, t, c0, tcn, s0, tsn, tmp.data(), eps.data());
      cl_runs(t, c0, tcn, s0, tsn, [&](int64_t mem, int64_t tile, int64_t len) {
        for (int64_t j = 0; j < len; j += W) {
          const int64_t cnt = std::min(W, len - j);
          const bool full = cnt == W;
          const int64_t mi = mbase + mem + j, zi = zbase + mem + j;
          const V m = full ? IO::load(mu + mi) : IO::load(mu + mi, cnt);
          const V l = full ? IO::load(lv + mi) : IO::load(lv + mi, cnt);
          const V ev = V::loadu(eps.data() + tile + j, cnt);
          const V zv = reparam_z<VecMath<V>>(m, l, ev);
          if (full) IO::store(z + zi, zv);
          else IO::store(z + zi, zv, cnt);
          if (eps_out != nullptr) {
            if (full) IO::store(eps_out + zi, ev);
            else IO::store(eps_out + zi, ev, cnt);
          }
        }
      });
    }
  });
}

template <typename scalar_t>
void reparam_backward_cl_typed(const ReparamBackwardArgs& a) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = V::size();
  const auto* gz = static_cast<const scalar_t*>(a.grad_z);
  const auto* lv = static_cast<const scalar_t*>(a.logvar);
  auto* gmu = static_cast<scalar_t*>(a.grad_mu);
  auto* glv = static_cast<scalar_t*>(a.grad_logvar);
  const ClTiling t(a.channels, a.spatial);
  const int64_t p = t.c * t.s, units = (a.numel / p) * t.per_block();
  at::parallel_for(0, units, std::max<int64_t>(1, kGrainElems / (a.k * std::min(p, kClTile))), [&](int64_t b, int64_t e) {
    std::vector<float> tmp(kClTile);
    std::vector<acc_t> eps(kClTile), sum_g(kClTile), sum_ge(kClTile);
    for (int64_t u = b; u < e; ++u) {
      const int64_t blk = u / t.per_block(), r = u % t.per_block();
      const int64_t c0 = (r / t.tiles_s) * t.tc, s0 = (r % t.tiles_s) * t.ts;
      const int64_t tcn = std::min(t.tc, t.c - c0), tsn = std::min(t.ts, t.s - s0);
      const int64_t mbase = blk * p;
      std::fill(sum_g.begin(), sum_g.begin() + tcn * tsn, acc_t(0));
      std::fill(sum_ge.begin(), sum_ge.begin() + tcn * tsn, acc_t(0));
      for (int64_t k = 0; k < a.k; ++k) {  // samples in order: a fixed summation order
        const int64_t zbase = k * a.numel + mbase;
        cl_eps_tile<scalar_t, acc_t>(a.seed, a.offset, zbase, t, c0, tcn, s0, tsn, tmp.data(), eps.data());
        cl_runs(t, c0, tcn, s0, tsn, [&](int64_t mem, int64_t tile, int64_t len) {
          for (int64_t j = 0; j < len; j += W) {
            const int64_t cnt = std::min(W, len - j);
            const V gv = cnt == W ? IO::load(gz + zbase + mem + j) : IO::load(gz + zbase + mem + j, cnt);
            acc_t* sg = sum_g.data() + tile + j;
            acc_t* sge = sum_ge.data() + tile + j;
            (V::loadu(sg, cnt) + gv).store(sg, cnt);
            (V::loadu(sge, cnt) + gv * V::loadu(eps.data() + tile + j, cnt)).store(sge, cnt);
          }
        });
      }
      cl_runs(t, c0, tcn, s0, tsn, [&](int64_t mem, int64_t tile, int64_t len) {
        for (int64_t j = 0; j < len; j += W) {
          const int64_t cnt = std::min(W, len - j), i = mbase + mem + j;
          const V l = cnt == W ? IO::load(lv + i) : IO::load(lv + i, cnt);
          const V gl = reparam_grad_logvar<VecMath<V>>(l, V::loadu(sum_ge.data() + tile + j, cnt));
          const V gm = V::loadu(sum_g.data() + tile + j, cnt);
          if (cnt == W) {
            if (gmu) IO::store(gmu + i, gm);
            IO::store(glv + i, gl);
          } else {
            if (gmu) IO::store(gmu + i, gm, cnt);
            IO::store(glv + i, gl, cnt);
          }
        }
      });
    }
  });
}

void reparam_kernel(const ReparamArgs& a) {
  dispatch_dtype(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if (a.channels > 0) reparam_cl_typed<scalar_t>(a);
    else reparam_typed<scalar_t>(a);
  });
}

void reparam_backward_kernel(const ReparamBackwardArgs& a) {
  dispatch_dtype(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if (a.channels > 0) reparam_backward_cl_typed<scalar_t>(a);
    else reparam_backward_typed<scalar_t>(a);
  });
}

#define VAE_EXT_STR2(x) #x
#define VAE_EXT_STR(x) VAE_EXT_STR2(x)

const KernelTable& kernel_table() {
  static const KernelTable table{VAE_EXT_STR(CPU_CAPABILITY), &elbo_kernel, &reparam_kernel,
                                 &reparam_backward_kernel, &normal_kernel, &scale_rows_kernel};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace vae_ext
