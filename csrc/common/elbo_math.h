// The per-element ELBO formulas and their gradients: one definition, used by the CPU kernels
// (with M = a SIMD vector policy, csrc/cpu) and the CUDA kernels (with M = ScalarMath<float|double>).
//
// Each formula is written once over a "math policy" M, which supplies the type T and the
// primitives (log, log1p, exp, abs, select, clamp_min, ...). NaN must propagate: M::clamp_min(a, lo)
// keeps a NaN `a` (std::max/fmaxf would replace it by `lo`).
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace vae_ext {

enum class Recon : int { BCE = 0, BCELogits = 1, MSE = 2, L1 = 3, Gaussian = 4 };
enum class Reduction : int { Sum = 0, Mean = 1, None = 2 };

// Scalar policy (host and device), T = float or double.
template <typename T_>
struct ScalarMath {
  using T = T_;
  using Mask = bool;  // masks combine with |, as the SIMD policies' do
  static VAE_HD T log(T v) { return std::log(v); }
  static VAE_HD T log1p(T v) { return std::log1p(v); }
  static VAE_HD T exp(T v) { return std::exp(v); }
  static VAE_HD T abs(T v) { return std::fabs(v); }
  static VAE_HD T sqrt(T v) { return std::sqrt(v); }
  static VAE_HD T round(T v) { return std::rint(v); }
  static VAE_HD T select(Mask m, T a, T b) { return m ? a : b; }
  static VAE_HD T clamp_min(T v, T lo) { return v < lo ? lo : v; }  // keeps a NaN v
  static VAE_HD T fill(double v) { return static_cast<T>(v); }
};

// PyTorch's binary_cross_entropy, element-wise: log clamped at -100, backward denominator
// floored at 1e-12 (PyTorch uses the float constant 1e-12f, for double too). Returns the loss;
// writes d loss / d p to *grad.
template <class M>
VAE_HD typename M::T bce_elem(typename M::T p, typename M::T x, typename M::T* grad) {
  using T = typename M::T;
  const T one = M::fill(1.0), lo = M::fill(-100.0), eps = M::fill(static_cast<double>(1e-12f));
  T lp = M::log(p);
  T l1p = M::log1p(M::fill(0.0) - p);
  lp = M::clamp_min(lp, lo);
  l1p = M::clamp_min(l1p, lo);
  T den = (one - p) * p;
  den = M::clamp_min(den, eps);
  *grad = (p - x) / den;
  return (x - one) * l1p - x * lp;
}

// The same function as bce_elem when every x is 0 or 1 (bitwise, given the policy's log1p is
// log(u) - ((u - 1) + p) * (2 - u) with u = 1 - p, as the CPU one is): then only one of the two
// logarithms is needed, log(p) where x = 1 and log(1 - p) where x = 0. Binarized images (the usual
// VAE data) and the background of real ones take this path.
template <class M>
VAE_HD typename M::T bce_binary_elem(typename M::T p, typename M::T x, typename M::T* grad) {
  using T = typename M::T;
  const T one = M::fill(1.0), two = M::fill(2.0), lo = M::fill(-100.0), eps = M::fill(static_cast<double>(1e-12f));
  const auto is_one = x > M::fill(0.5);
  const T u = one - p;
  const T q = M::select(is_one, p, u);
  const T delta = M::select(is_one, M::fill(0.0), (u - one) + p);  // 1 - p's rounding error
  T lq = M::log(q) - delta * (two - q);
  lq = M::clamp_min(lq, lo);
  T den = u * p;
  den = M::clamp_min(den, eps);
  *grad = (p - x) / den;
  return M::fill(0.0) - lq;
}

// BCE on logits l: max(l, 0) - l*x + log1p(exp(-|l|)); gradient sigmoid(l) - x.
// Both share e = exp(-|l|), which never overflows.
template <class M>
VAE_HD typename M::T bce_logits_elem(typename M::T l, typename M::T x, typename M::T* grad) {
  using T = typename M::T;
  const T zero = M::fill(0.0), one = M::fill(1.0);
  const T e = M::exp(zero - M::abs(l));
  const T inv = one / (one + e);
  const auto pos = l >= zero;
  *grad = M::select(pos, inv, e * inv) - x;
  return M::select(pos, l, zero) - l * x + M::log1p(e);
}

// Squared error (r - x)^2; gradient 2 (r - x).
template <class M>
VAE_HD typename M::T mse_elem(typename M::T r, typename M::T x, typename M::T* grad) {
  const typename M::T d = r - x;
  *grad = d + d;
  return d * d;
}

// Absolute error |r - x|; gradient sign(r - x), 0 at a tie and at a NaN difference, as
// F.l1_loss's backward and the reference's abs() give (the loss there is NaN).
template <class M>
VAE_HD typename M::T l1_elem(typename M::T r, typename M::T x, typename M::T* grad) {
  using T = typename M::T;
  const T zero = M::fill(0.0), d = r - x;
  *grad = M::select(d > zero, M::fill(1.0), M::select(d < zero, M::fill(-1.0), zero));
  return M::abs(d);
}

constexpr double kLog2Pi = 1.8378770664093454836;  // log(2 pi)

// Gaussian negative log-likelihood with a log-variance rlv per element:
// 0.5 ((x - r)^2 exp(-rlv) + rlv + log(2 pi)); gradients (r - x) exp(-rlv) to r and
// 0.5 (1 - (x - r)^2 exp(-rlv)) to rlv. (d * d) * inv in the reference's order: where d * d
// overflows the loss is inf there too. The product is halved through inv, before it is formed:
// q = (d * d) * inv may overflow where q / 2, the loss and rlv's gradient, does not (q = 4.1e38 in
// float32); scaling by 0.5 commutes with rounding, so elsewhere this is bitwise the reference's
// 0.5 * (...).
template <class M>
VAE_HD typename M::T gaussian_elem(typename M::T r, typename M::T x, typename M::T rlv, typename M::T* g_r,
                                   typename M::T* g_rlv) {
  using T = typename M::T;
  const T half = M::fill(0.5);
  const T inv = M::exp(M::fill(0.0) - rlv), d = r - x;
  const T half_q = (d * d) * (half * inv);
  *g_r = d * inv;
  *g_rlv = half - half_q;
  return (half_q + half * rlv) + M::fill(0.5 * kLog2Pi);
}

// The same with one log-variance for every element (a 0-d recon_logvar): inv = exp(-rlv) is
// computed once by the caller, and the element returns only q / 2 = (x - r)^2 inv / 2; the sums of
// q / 2 over a row (or the batch) give the loss and rlv's gradient by gaussian_scalar_terms. Halved
// per element, as in gaussian_elem, so that the sum overflows only where the loss does (a row of
// q summed before halving is inf from 1.8e308, where the loss is finite up to twice that).
template <class M>
VAE_HD typename M::T gaussian_q_elem(typename M::T r, typename M::T x, typename M::T inv, typename M::T* g_r) {
  using T = typename M::T;
  const T d = r - x;
  *g_r = d * inv;
  return (d * d) * (M::fill(0.5) * inv);
}

// From H, the sum of q / 2 over `count` elements: their loss H + count (rlv + log(2 pi)) / 2, and
// d loss / d rlv = count / 2 - H to *g_rlv. In double: count may be large. No elements: 0 and 0,
// as the reference's empty sum (0 (rlv + log(2 pi)) would be NaN for an infinite rlv).
VAE_HD double gaussian_scalar_terms(double half_q_sum, double count, double rlv, double* g_rlv) {
  if (count == 0.0) {
    *g_rlv = 0.0;
    return 0.0;
  }
  *g_rlv = 0.5 * count - half_q_sum;
  return half_q_sum + 0.5 * (count * (rlv + kLog2Pi));
}

template <Recon mode, class M>
VAE_HD typename M::T recon_elem(typename M::T r, typename M::T x, typename M::T* grad) {
  if constexpr (mode == Recon::BCE) {
    return bce_elem<M>(r, x, grad);
  } else if constexpr (mode == Recon::BCELogits) {
    return bce_logits_elem<M>(r, x, grad);
  } else if constexpr (mode == Recon::MSE) {
    return mse_elem<M>(r, x, grad);
  } else {
    static_assert(mode == Recon::L1, "recon_elem: Gaussian takes a log-variance (gaussian_elem)");
    return l1_elem<M>(r, x, grad);
  }
}

// KL(N(mu, exp(lv)) || N(0, 1)) per latent unit: 0.5 (mu^2 + exp(lv) - 1 - lv);
// gradients mu and 0.5 (exp(lv) - 1).
template <class M>
VAE_HD typename M::T kl_elem(typename M::T mu, typename M::T lv, typename M::T* g_mu, typename M::T* g_lv) {
  using T = typename M::T;
  const T half = M::fill(0.5), one = M::fill(1.0);
  const T e = M::exp(lv);
  *g_mu = mu;
  *g_lv = half * (e - one);
  return half * (mu * mu + e - one - lv);
}

// KL(N(mu, exp(lv)) || N(pmu, exp(plv))) per latent unit, a learned prior:
// 0.5 (plv - lv + (exp(lv) + (mu - pmu)^2) exp(-plv) - 1), in the reference's order. Gradients:
// (mu - pmu) exp(-plv) to mu (its negative to pmu), 0.5 (exp(lv) exp(-plv) - 1) to lv,
// 0.5 (1 - (exp(lv) + (mu - pmu)^2) exp(-plv)) to plv. The products with exp(-plv) are halved
// through it, as in gaussian_elem: s = (exp(lv) + d^2) exp(-plv) may overflow where s / 2 does not.
template <class M>
VAE_HD typename M::T kl_prior_elem(typename M::T mu, typename M::T lv, typename M::T pmu, typename M::T plv,
                                   typename M::T* g_mu, typename M::T* g_lv, typename M::T* g_plv) {
  using T = typename M::T;
  const T half = M::fill(0.5);
  const T inv = M::exp(M::fill(0.0) - plv), e = M::exp(lv), d = mu - pmu;
  const T half_inv = half * inv;
  const T half_s = (e + d * d) * half_inv;
  *g_mu = d * inv;
  *g_lv = e * half_inv - half;
  *g_plv = half - half_s;
  return (half * (plv - lv) + half_s) - half;
}

// Reparameterization per element: z = mu + exp(logvar / 2) * eps; and the gradient of logvar,
// exp(logvar / 2) / 2 * sum_s g_s eps_s, from the samples' sum of grad_z * eps (that of mu is sum_s g_s).
template <class M>
VAE_HD typename M::T reparam_z(typename M::T mu, typename M::T lv, typename M::T eps) {
  return mu + M::exp(M::fill(0.5) * lv) * eps;
}

template <class M>
VAE_HD typename M::T reparam_grad_logvar(typename M::T lv, typename M::T sum_g_eps) {
  const typename M::T half = M::fill(0.5);
  return half * M::exp(half * lv) * sum_g_eps;
}

// "bce" needs probabilities: true where p lies outside [0, 1] (NaN is not flagged: it gives NaN).
template <class M>
VAE_HD auto prob_out_of_range(typename M::T p) {
  return (p < M::fill(0.0)) | (p > M::fill(1.0));
}

}  // namespace vae_ext
