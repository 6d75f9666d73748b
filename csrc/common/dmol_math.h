// The discretized mixture of logistics (DMoL): every formula of the loss, its gradient and the
// sampler, written once over a math policy M (elbo_math.h), used by the CPU kernels (M a SIMD
// policy, lanes = pixels, csrc/cpu/dmol_kernel.h) and the CUDA kernels (M = DmolScalarMath<float|
// double>, one thread per pixel, csrc/cuda/dmol.cu). The math and its derivatives: docs/design.md.
//
// Besides elbo_math.h's primitives M supplies expm1(v), exp_expm1(v, &ex, &em) (exp(v) and expm1(v),
// both to a few ulps), recip(v) (1 / v) and all(mask) (whether every lane is set).
//
// Parameter layout per pixel (P = M (3C + 1) for C = 3, 3M for C = 1): M logits, then per channel c
// a block of M means, M log-scales and (C = 3) M coupling coefficients: the mean of (c, m) is at
// nmix (1 + 3c) + m, its log-scale nmix later, its coefficient 2 nmix later. The coefficients of
// channel R's block (alpha_0) couple G to x_R; G's (alpha_1) and B's (alpha_2) couple B to x_R and x_G.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "elbo_math.h"
#include "macros.h"
#include "philox.h"

namespace vae_ext {

constexpr double kDmolEdge = 0.999;     // x < -edge: the left tail's mass; x > edge: the right tail's
constexpr double kDmolMinProb = 1e-5;   // below it the bin's mass gives way to the bin-centre density
constexpr double kDmolUniformLo = 1e-5;  // the sampler's uniforms lie in [lo, 1 - lo], as VDVAE's
// Half-bins up to this many logistic scales (delta = h exp(-s) for every s >= log_scale_min) take
// dmol_channel_narrow: its exp(-delta) stays far above float's underflow.
constexpr double kDmolNarrow = 40.0;

// The scalar policy with the two extra primitives.
template <typename T_>
struct DmolScalarMath : ScalarMath<T_> {
  using T = T_;
  static VAE_HD T expm1(T v) { return std::expm1(v); }
  static VAE_HD void exp_expm1(T v, T* ex, T* em) {
    *ex = std::exp(v);
    *em = std::expm1(v);
  }
  static VAE_HD bool all(bool m) { return m; }
  static VAE_HD T recip(T v) { return T(1) / v; }
};
#if defined(__CUDACC__)
// The double division's slow path is a subroutine in SASS, whose call spills live registers to
// local memory; the reciprocal's correctly rounded intrinsic is not (the same value as 1 / v).
template <>
__device__ __forceinline__ double DmolScalarMath<double>::recip(double v) {
#if defined(__CUDA_ARCH__)
  return __drcp_rn(v);
#else
  return 1.0 / v;
#endif
}
#endif

// The element type of a policy's T: T itself for a scalar, its value_type for a SIMD vector.
template <class T, class = void>
struct DmolElem {
  using type = T;
};
template <class T>
struct DmolElem<T, std::void_t<typename T::value_type>> {
  using type = typename T::value_type;
};

// The exponent below which dmol_exp_normal gives 0: exp of it is a normal number (e^-87 =
// 1.6e-38 > FLT_MIN = 1.2e-38; e^-708 = 3.3e-308 > DBL_MIN = 2.2e-308), as is exp of anything above.
template <class T>
VAE_HD constexpr double dmol_exp_floor() {
  return std::is_same_v<typename DmolElem<T>::type, double> ? -708.0 : -87.0;
}

// exp(v), or 0 where v < dmol_exp_floor (where exp(v) would be within a few ulps of the smallest
// normal, subnormal or 0). For the factors exp(-|t|) and the mixture weights exp(v_m - max) that
// underflow for a component far from the pixel: a subnormal operand or result costs x86 a slow
// path (tens of cycles per instruction, paid by the whole vector) in every product it then enters.
// What changes (float): terms added to 1 or to a larger number, which absorb them anyway, and
// gradient entries of a component with such a weight, which come out 0 instead of a weight under
// e^-87 times a local derivative (at most 2.4e-36 on the benchmark's inputs). NaN gives NaN.
template <class M>
VAE_HD typename M::T dmol_exp_normal(typename M::T v) {
  const typename M::T lo = M::fill(dmol_exp_floor<typename M::T>());
  return M::select(v < lo, M::fill(0.0), M::exp(M::clamp_min(v, lo)));
}

// The per-call constants: the half-bin h = 1 / (2^bits - 1), log((2^bits - 1) / 2) and the
// log-scale floor, in the computation type, and whether every half-bin is narrow (dmol_narrow_bins).
template <class T>
struct DmolConsts {
  T h, log_half_bins, smin;
  bool narrow;
};

VAE_HD double dmol_half_bin(int64_t num_bits) { return 1.0 / (std::ldexp(1.0, static_cast<int>(num_bits)) - 1.0); }
VAE_HD double dmol_log_half_bins(int64_t num_bits) {
  return std::log((std::ldexp(1.0, static_cast<int>(num_bits)) - 1.0) / 2.0);
}

// Whether h exp(-s) <= kDmolNarrow for every s >= log_scale_min: true for num_bits >= 5 at the
// usual floor -7 (5 bits: 35.4), false for 1..4 bits there.
VAE_HD bool dmol_narrow_bins(int64_t num_bits, double log_scale_min) {
  return std::exp(-log_scale_min) * dmol_half_bin(num_bits) <= kDmolNarrow;
}

// tanh(r) = -e / (2 + e) with e = expm1(-2|r|), the sign of r restored: no cancellation near 0,
// +-1 for large |r|, NaN for NaN.
template <class M>
VAE_HD typename M::T dmol_tanh(typename M::T r) {
  using T = typename M::T;
  const T zero = M::fill(0.0);
  const T e = M::expm1(M::fill(-2.0) * M::abs(r));
  const T t = (zero - e) * M::recip(M::fill(2.0) + e);
  return M::select(r < zero, zero - t, t);
}

// l = log P(x | one logistic of mean mu and clamped log-scale s) for one channel: the left tail
// where `left` (x < -0.999), the right tail where `right` (x > 0.999), else the bin's mass
// sigmoid(A) - sigmoid(B) where that exceeds 1e-5, else the bin-centre density. With Grad,
// *g_mu = dl/dmu and *g_s = dl/ds (s the clamped log-scale). i = exp(-s), u = x - mu,
// A = i (u + h), B = i (u - h). Unselected branches are dropped by select, never multiplied by 0:
// their infinities and NaNs never reach the result. Two exact forms of the same l: _narrow, the
// one taken for bins no wider than kDmolNarrow scales (num_bits >= 5 at the usual floor), and _wide.
//
// _wide: every tail and the mass come from eA = exp(-|A|) and eB = exp(-|B|), which never overflow:
// sigmoid(A) = 1 / (1 + eA) for A >= 0, eA / (1 + eA) otherwise. The mass has no cancellation: D = sigmoid(A) - sigmoid(B) =
// E sigmoid(A) sigmoid(-B) with E = 1 - exp(-(A - B)) = -expm1(-2 h i), a product of accurate
// factors (rounded 4 times), so log D is accurate wherever D is a normal number. The three
// logarithms (two tails' log1p, log D) are one log of a selected argument, log1p's rounding of
// 1 + e corrected.
template <class M, bool Grad>
VAE_HD typename M::T dmol_channel_wide(typename M::T x, typename M::T mu, typename M::T s,
                                       const DmolConsts<typename M::T>& k, typename M::Mask left,
                                       typename M::Mask right, typename M::T* g_mu, typename M::T* g_s) {
  using T = typename M::T;
  const T zero = M::fill(0.0), one = M::fill(1.0);
  const T i = M::exp(zero - s);
  const T u = x - mu;
  const T a = i * (u + k.h), b = i * (u - k.h);
  const T ea = M::exp(zero - M::abs(a)), eb = M::exp(zero - M::abs(b));
  const T pa = one + ea, pb = one + eb;
  const T ra = M::recip(pa), rb = M::recip(pb);
  const auto a_pos = a >= zero, b_pos = b >= zero;
  const T sig_a = M::select(a_pos, ra, ea * ra);      // sigmoid(A)
  const T sig_nb = M::select(b_pos, eb * rb, rb);     // sigmoid(-B)
  const T e = zero - M::expm1(zero - (k.h + k.h) * i);  // 1 - exp(-(A - B))
  const T d = (e * sig_a) * sig_nb;
  const auto mid = d > M::fill(kDmolMinProb);
  const T lg = M::log(M::select(left, pa, M::select(right, pb, d)));
  // log sigmoid(A) = min(A, 0) - log1p(eA), log sigmoid(-B) = -max(B, 0) - log1p(eB)
  const T lsig_a = M::select(a_pos, zero, a) - (lg - ((pa - one) - ea) * ra);
  const T lsig_nb = zero - M::select(b_pos, b, zero) - (lg - ((pb - one) - eb) * rb);
  // the bin-centre density t - s - 2 softplus(t) - log((2^bits - 1) / 2), t = i u: only where some
  // lane takes it (parameters far from x: early training)
  T lpdf = zero, g_t = zero, t = zero;
  if (!M::all(left | right | mid)) {
    t = i * u;
    const T et = M::exp(zero - M::abs(t));
    const T pt = one + et, rt = M::recip(pt);
    const auto t_pos = t >= zero;
    const T softplus = M::select(t_pos, t, zero) + (M::log(pt) - ((pt - one) - et) * rt);
    lpdf = ((t - s) - (softplus + softplus)) - k.log_half_bins;
    g_t = one - M::fill(2.0) * M::select(t_pos, rt, et * rt);  // 1 - 2 sigmoid(t)
  }
  if constexpr (Grad) {
    const T sig_na = M::select(a_pos, ea * ra, ra);  // sigmoid(-A)
    const T sig_b = M::select(b_pos, rb, eb * rb);   // sigmoid(B)
    // the mass: dl/dA = sigmoid(A) sigmoid(-A) / D, dl/dB = -sigmoid(B) sigmoid(-B) / D
    const T inv_d = M::recip(d);
    const T ga = (sig_a * sig_na) * inv_d, gb = zero - (sig_b * sig_nb) * inv_d;
    // dl/dA + dl/dB (dA/dmu = dB/dmu = -i), and A dl/dA + B dl/dB (dA/ds = -A, dB/ds = -B)
    const T sum = M::select(left, sig_na, M::select(right, zero - sig_b, M::select(mid, ga + gb, g_t)));
    const T weighted =
        M::select(left, a * sig_na, M::select(right, zero - b * sig_b, M::select(mid, a * ga + b * gb, t * g_t + one)));
    *g_mu = zero - i * sum;
    *g_s = zero - weighted;
  }
  return M::select(left, lsig_a, M::select(right, lsig_nb, M::select(mid, lg, lpdf)));
}

// _narrow: with t = i u (the bin's centre), delta = i h, E = exp(-|t|), p = exp(-delta) and
// e = 1 - p^2 = -expm1(-2 delta) (from expm1(-delta)), every sigmoid of the bin's edges is a ratio of
// P1 = 1 + E p, P2 = p + E and P3 = 1 + E, positive sums without cancellation (t >= 0; t < 0 is its
// mirror): sigmoid(A) = 1 / P1, sigmoid(-A) = E p / P1, sigmoid(B) = p / P2, sigmoid(-B) = E / P2, so
//   the tail nearer the centre   log sigmoid(A) (t >= 0) = -log(P1) = -log1p(E p),
//   the tail beyond it           log sigmoid(-B) (t >= 0) = -(|t| + log(P2)) = -(|t| + log1p(expm1(-delta) + E)),
//   the mass                     D = E e / (P1 P2), its log where D > 1e-5 (a product of accurate factors),
//   the bin-centre density       -|t| - s - 2 log1p(E) - log((2^bits - 1) / 2).
// Each lane takes one of them: one log of the selected argument, log1p's rounding of 1 + y
// corrected (as vec_math.h's log1p), and one division, 1 / (P1 P2 P3 e'), for every reciprocal
// (e' = e where the mass is taken: the gradient there needs 1 / e). Three exponentials in all,
// where _wide takes up to five and three logs. It needs p far from underflow (delta <= 40): with
// delta larger, E and p could both underflow while E / p = exp(-B) does not.
// The derivatives, with sg = sign(t) (1 - E) and W = 1 / (P1 P2 P3):
//   tails: dl/dt = sigmoid(-A) (left), -sigmoid(B) (right); t-weighted sums A dl/dA + B dl/dB as A, -B times them
//   mass: dl/dt = -sg p P3^2 W (= dl/dA + dl/dB without their cancellation),
//         A dl/dA + B dl/dB = t dl/dt + delta p (P1^2 + P2^2) / (P1 P2 e)
//   density: dl/dt = -sg / P3 (1 - 2 sigmoid(t)), A dl/dA + B dl/dB = t dl/dt + 1.
template <class M, bool Grad>
VAE_HD typename M::T dmol_channel_narrow(typename M::T x, typename M::T mu, typename M::T s,
                                         const DmolConsts<typename M::T>& k, typename M::Mask left,
                                         typename M::Mask right, typename M::T* g_mu, typename M::T* g_s) {
  using T = typename M::T;
  using Mask = typename M::Mask;
  const T zero = M::fill(0.0), one = M::fill(1.0), two = M::fill(2.0);
  const T i = M::exp(zero - s);
  const T t = i * (x - mu), delta = i * k.h;
  T p, em;
  M::exp_expm1(zero - delta, &p, &em);
  const T e = zero - em * (two + em);  // 1 - p^2
  const T abs_t = M::abs(t);
  const T big_e = dmol_exp_normal<M>(zero - abs_t);
  const T ep = big_e * p;
  const T p1 = one + ep, p2 = p + big_e, p3 = one + big_e;
  const Mask t_pos = t >= zero, t_neg = t < zero;
  const Mask close = (left & t_pos) | (right & t_neg), beyond = (left & t_neg) | (right & t_pos);
  // D > 1e-5 without the division (a NaN compares false: the density, NaN). The mass needs
  // E e > 1e-5 P1 P2 >= 1e-5 p >= 1e-5 exp(-40) = 4e-23: the test and D take E no smaller than
  // 2^-80 (8e-25), which leaves both the same and keeps E e, with e ~ 2 delta, clear of subnormals.
  const T big_e_mid = M::clamp_min(big_e, M::fill(0x1p-80));
  const T mass = big_e_mid * e;
  const Mask mid = mass > M::fill(kDmolMinProb) * (p1 * p2);
  const T e1 = M::select(mid, e, one);
  const T q = M::recip(((p1 * p2) * p3) * e1);  // 1 / (P1 P2 P3 e')
  const T w = e1 * q;                            // 1 / (P1 P2 P3)
  const T d = mass * (p3 * w);
  // one log: log1p(y) = log(1 + y) - ((1 + y) - 1 - y) / (1 + y) for y = E p, expm1(-delta) + E, E;
  // log D as it is (y = D - 1: no correction)
  const T arg = M::select(close, p1, M::select(beyond, p2, M::select(mid, d, p3)));
  const T y = M::select(close, ep, M::select(beyond, em + big_e, M::select(mid, d - one, big_e)));
  const T lg = M::log(arg) - ((arg - one) - y) * (two - arg);
  if constexpr (Grad) {
    const T r1 = (p2 * p3) * w, r2 = (p1 * p3) * w, r3 = (p1 * p2) * w;
    const T a = t + delta, b = t - delta;
    const T sv = M::select(close, ep * r1, p * r2);  // sigmoid(-A) (left), sigmoid(B) (right)
    const T om = one - big_e;
    const T sg = M::select(t_pos, om, zero - om);
    const T mid_sum = zero - (p * sg) * ((p3 * p3) * w);
    const T mid_w = t * mid_sum + (delta * p) * ((p3 * q) * (p1 * p1 + p2 * p2));
    const T pdf_sum = zero - sg * r3;
    const T sum = M::select(left, sv, M::select(right, zero - sv, M::select(mid, mid_sum, pdf_sum)));
    const T weighted = M::select(left, a * sv, M::select(right, zero - b * sv,
                                                         M::select(mid, mid_w, t * pdf_sum + one)));
    *g_mu = zero - i * sum;
    *g_s = zero - weighted;
  }
  const T lpdf = zero - ((abs_t + s) + k.log_half_bins) - (lg + lg);
  return M::select(close, zero - lg, M::select(beyond, zero - (abs_t + lg), M::select(mid, lg, lpdf)));
}

template <class M, bool Grad>
VAE_HD typename M::T dmol_channel(typename M::T x, typename M::T mu, typename M::T s, const DmolConsts<typename M::T>& k,
                                  typename M::Mask left, typename M::Mask right, typename M::T* g_mu,
                                  typename M::T* g_s) {
  if (k.narrow) return dmol_channel_narrow<M, Grad>(x, mu, s, k, left, right, g_mu, g_s);
  return dmol_channel_wide<M, Grad>(x, mu, s, k, left, right, g_mu, g_s);
}

// The log-likelihood sum_c l_cm of one component m at one pixel: its C means, raw log-scales and
// (C = 3) raw coefficients, the pixel's x and edge masks per channel. The means of G and B are
// coupled to the true lower channels: mu_G + alpha_0 x_R, mu_B + alpha_1 x_R + alpha_2 x_G. With
// Grad: g_mu[c] = dl/d(coupled mean), g_s[c] = dl/d(raw log-scale) (0 where the clamp holds it:
// s_raw < log_scale_min; at the tie it passes, as torch.clamp's gradient), alpha[j] the coefficients.
template <class M, int C, bool Grad>
VAE_HD typename M::T dmol_component(const typename M::T* mean, const typename M::T* s_raw,
                                    const typename M::T* coef_raw, const typename M::T* x,
                                    const typename M::Mask* left, const typename M::Mask* right,
                                    const DmolConsts<typename M::T>& k, typename M::T* g_mu, typename M::T* g_s,
                                    typename M::T* alpha) {
  using T = typename M::T;
  static_assert(C == 1 || C == 3, "dmol: C is 1 or 3");
  T mu[C];
  mu[0] = mean[0];
  if constexpr (C == 3) {
    const T a0 = dmol_tanh<M>(coef_raw[0]), a1 = dmol_tanh<M>(coef_raw[1]), a2 = dmol_tanh<M>(coef_raw[2]);
    mu[1] = mean[1] + a0 * x[0];
    mu[2] = (mean[2] + a1 * x[0]) + a2 * x[1];
    if constexpr (Grad) {
      alpha[0] = a0;
      alpha[1] = a1;
      alpha[2] = a2;
    }
  } else {
    (void)coef_raw;
    (void)alpha;
  }
  T total = M::fill(0.0);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int c = 0; c < C; ++c) {
    const T s = M::clamp_min(s_raw[c], k.smin);
    T gm, gs;
    total = total + dmol_channel<M, Grad>(x[c], mu[c], s, k, left[c], right[c], &gm, &gs);
    if constexpr (Grad) {
      g_mu[c] = gm;
      g_s[c] = M::select(s_raw[c] >= k.smin, gs, M::fill(0.0));
    }
  }
  return total;
}

// The NLL's gradient for component m from its responsibility r_m (and the dl's of dmol_component):
// d NLL / d mean_c = -r g_mu[c], d NLL / d s_raw_c = -r g_s[c], and the coefficients through the
// coupling, d mu_G / d alpha_0 = x_R etc., times d tanh = 1 - alpha^2. (The logit's, softmax_m - r_m,
// is the caller's.)
template <class M, int C>
VAE_HD void dmol_component_grads(typename M::T r, const typename M::T* g_mu, const typename M::T* g_s,
                                 const typename M::T* alpha, const typename M::T* x, typename M::T* g_mean,
                                 typename M::T* g_scale, typename M::T* g_coef) {
  using T = typename M::T;
  const T zero = M::fill(0.0), one = M::fill(1.0);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int c = 0; c < C; ++c) {
    g_mean[c] = zero - r * g_mu[c];
    g_scale[c] = zero - r * g_s[c];
  }
  if constexpr (C == 3) {
    g_coef[0] = (g_mean[1] * x[0]) * (one - alpha[0] * alpha[0]);
    g_coef[1] = (g_mean[2] * x[0]) * (one - alpha[1] * alpha[1]);
    g_coef[2] = (g_mean[2] * x[1]) * (one - alpha[2] * alpha[2]);
  } else {
    (void)alpha;
    (void)x;
    (void)g_coef;
  }
}

// The shift of a logsumexp by its maximum m: 0 where m is infinite (all -inf: the sum is 0 and
// its log -inf, as torch.logsumexp; +inf: inf), so that v - shift is never inf - inf.
template <class M>
VAE_HD typename M::T dmol_lse_shift(typename M::T m) {
  const typename M::T inf = M::fill(INFINITY);
  return M::select(M::abs(m) == inf, M::fill(0.0), m);
}

// The sampler's stream: pixel q takes Philox blocks q B .. q B + B - 1 (B = dmol_blocks_per_pixel)
// at counter (offset / 4, block); word j of the pixel is word j % 4 of block q B + j / 4. Words
// 0 .. M-1 choose the component (Gumbel-max), words M .. M+C-1 draw the logistic of each channel.
VAE_HD int64_t dmol_blocks_per_pixel(int64_t nmix, int64_t channels) { return (nmix + channels + 3) / 4; }

// Word j % 4 of a block, by selects: an index into w.v unknown at compile time would put w in a
// CUDA thread's local memory.
VAE_HD uint32_t dmol_word(const U32x4& w, int64_t j) {
  const int64_t k = j & 3;
  return k == 0 ? w.v[0] : (k == 1 ? w.v[1] : (k == 2 ? w.v[2] : w.v[3]));
}

// A uniform in [1e-5, 1 - 1e-5] from a 32-bit word (its top 24 bits).
VAE_HD float dmol_uniform(uint32_t w) {
  return static_cast<float>(kDmolUniformLo) + static_cast<float>(1.0 - 2.0 * kDmolUniformLo) * u32_to_unit(w);
}

// One sample of one pixel q, computed in T with a scalar policy M: the component
// argmax_m(logit_m - log(-log(u_m))) (the first of equals), then per channel
// mu + exp(max(s_raw, smin)) (log u - log(1 - u)), G and B coupled to the sampled lower channels
// after their clamp to [-1, 1] (a NaN stays NaN), as VDVAE and PixelCNN++ sample. param(p) reads
// the pixel's parameter p as T; the C values go to out.
template <class M, int C, class Param>
VAE_HD void dmol_sample_pixel(const Param& param, int64_t nmix, uint64_t seed, uint64_t offset, uint64_t q,
                              typename M::T smin, typename M::T* out) {
  using T = typename M::T;
  const int64_t blocks = dmol_blocks_per_pixel(nmix, C);
  const uint64_t first = q * static_cast<uint64_t>(blocks);
  U32x4 w = philox_group(seed, offset, first);
  int64_t have = 0;  // the block of the pixel that w holds
  int64_t best = 0;
  T best_g = M::fill(0.0);
  for (int64_t m = 0; m < nmix; ++m) {
    if (m / 4 != have) {
      have = m / 4;
      w = philox_group(seed, offset, first + static_cast<uint64_t>(have));
    }
    const T u = static_cast<T>(dmol_uniform(dmol_word(w, m)));
    const T g = param(m) - M::log(M::fill(0.0) - M::log(u));
    if (m == 0 || g > best_g) {
      best = m;
      best_g = g;
    }
  }
  const T lo = M::fill(-1.0), hi = M::fill(1.0);
  T v[C];
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int c = 0; c < C; ++c) {
    const int64_t j = nmix + c;
    if (j / 4 != have) {
      have = j / 4;
      w = philox_group(seed, offset, first + static_cast<uint64_t>(have));
    }
    const T u = static_cast<T>(dmol_uniform(dmol_word(w, j)));
    const int64_t pm = nmix * (1 + 3 * c) + best;
    const T s = M::clamp_min(param(pm + nmix), smin);
    v[c] = param(pm) + M::exp(s) * (M::log(u) - M::log(M::fill(1.0) - u));
  }
  const auto clamp = [&](T a) { return M::select(a < lo, lo, M::select(a > hi, hi, a)); };
  out[0] = clamp(v[0]);
  if constexpr (C == 3) {
    const T a0 = dmol_tanh<M>(param(nmix * 3 + best)), a1 = dmol_tanh<M>(param(nmix * 6 + best)),
            a2 = dmol_tanh<M>(param(nmix * 9 + best));
    out[1] = clamp(v[1] + a0 * out[0]);
    out[2] = clamp((v[2] + a1 * out[0]) + a2 * out[1]);
  }
}

}  // namespace vae_ext
