// A hierarchical VAE's latent layer (vae_ext.gaussian_latent): z = mu + sigma * eps and the KL of
// q = N(mu, sigma^2) to the prior p = N(pmu, psigma^2), per element, with the gradients. Written
// once over a math policy M (csrc/common/elbo_math.h), for the CPU kernels (SIMD vectors) and the
// CUDA ones (scalars) alike; plus the kernels' arguments, which both backends share.
//
// The log-scale ls is log sigma^2 (scale "logvar") or log sigma ("logsigma"), for q and p alike:
// log sigma = c ls with c = 1/2 or 1, so the log-variance is 2c ls, exactly (a product by 1 or 2).
#pragma once

#include <cstdint>

#include "dtype.h"
#include "elbo_math.h"
#include "macros.h"

namespace vae_ext {

enum class LatentScale : int { LogVar = 0, LogSigma = 1 };
enum class LatentKL : int { Analytic = 0, Sample = 1 };

// c: log sigma = c * logscale.
VAE_HD double latent_c(LatentScale s) { return s == LatentScale::LogVar ? 0.5 : 1.0; }

// z = mu + sigma eps with sigma = exp(c ls): for "logvar" the arithmetic of reparam_z, so z is
// bitwise reparameterize's. latent_z_sigma takes the sigma the KL needs too (one exp per element).
template <class M>
VAE_HD typename M::T latent_z_sigma(typename M::T mu, typename M::T sigma, typename M::T eps) {
  return mu + sigma * eps;
}
template <class M>
VAE_HD typename M::T latent_z(typename M::T mu, typename M::T ls, typename M::T c, typename M::T eps) {
  return latent_z_sigma<M>(mu, M::exp(c * ls), eps);
}

// The prior's 1 / psigma^2 = exp(-2c pls), and 1 / psigma = exp(-c pls) = exp(-ph): once per prior
// value (a prior broadcast along a run, or none, takes it once per run, not per element).
template <class M>
VAE_HD typename M::T latent_prior_inv_var(typename M::T pls, typename M::T c) {
  return M::exp(M::fill(0.0) - (c + c) * pls);
}
template <class M>
VAE_HD typename M::T latent_prior_inv_sigma(typename M::T ph) {
  return M::exp(M::fill(0.0) - ph);
}

// The analytic KL per element, kl_prior_elem's formula on the log-variances lv = 2c ls and
// plv = 2c pls, with exp(lv) = sigma^2 from the sigma = exp(c ls) that z needs (one exp fewer) and
// inv = exp(-plv) (latent_prior_inv_var): 0.5 (plv - lv) + (sigma^2 + d^2) inv / 2 - 1/2, d = mu - pmu;
// gradients to mu, ls, pmu, pls. The log-ratio is c (pls - ls): no log of an exp.
// (With no prior the kernels read pmu = pls = 0: N(0, I).)
template <class M>
VAE_HD typename M::T latent_kl_analytic_inv(typename M::T mu, typename M::T ls, typename M::T sigma,
                                            typename M::T pmu, typename M::T pls, typename M::T inv, typename M::T c,
                                            typename M::T* g_mu, typename M::T* g_ls, typename M::T* g_pmu,
                                            typename M::T* g_pls) {
  using T = typename M::T;
  const T half = M::fill(0.5), two_c = c + c;
  const T d = mu - pmu;
  const T half_inv = half * inv;
  const T half_s = (sigma * sigma + d * d) * half_inv;
  *g_mu = d * inv;
  *g_pmu = M::fill(0.0) - *g_mu;
  *g_ls = two_c * (sigma * sigma * half_inv - half);
  *g_pls = two_c * (half - half_s);
  return (c * (pls - ls) + half_s) - half;
}
template <class M>
VAE_HD typename M::T latent_kl_analytic(typename M::T mu, typename M::T ls, typename M::T sigma, typename M::T pmu,
                                        typename M::T pls, typename M::T c, typename M::T* g_mu, typename M::T* g_ls,
                                        typename M::T* g_pmu, typename M::T* g_pls) {
  return latent_kl_analytic_inv<M>(mu, ls, sigma, pmu, pls, latent_prior_inv_var<M>(pls, c), c, g_mu, g_ls, g_pmu,
                                   g_pls);
}

// The single-sample KL at the drawn z: log q(z) - log p(z) with q's log density written at
// z = mu + sigma eps, -eps^2/2 - h, and p's -w^2/2 - ph, w = (z - pmu) / psigma (h = c ls, ph = c pls
// the log-scales, pinv = 1 / psigma = latent_prior_inv_sigma(ph); the log(2 pi) / 2 of the two cancel).
template <class M>
VAE_HD typename M::T latent_kl_sample_inv(typename M::T z, typename M::T eps, typename M::T h, typename M::T pmu,
                                          typename M::T ph, typename M::T pinv) {
  using T = typename M::T;
  const T half = M::fill(0.5);
  const T w = (z - pmu) * pinv;
  return (half * (w * w) + ph) - (half * (eps * eps) + h);
}
template <class M>
VAE_HD typename M::T latent_kl_sample(typename M::T z, typename M::T eps, typename M::T h, typename M::T pmu,
                                      typename M::T ph) {
  return latent_kl_sample_inv<M>(z, eps, h, pmu, ph, latent_prior_inv_sigma<M>(ph));
}

// The pathwise gradients of g z + b kl_sample for one draw, through z = mu + exp(h) eps:
// log q(z) is -eps^2/2 - h there, so mu reaches the KL through log p(z) alone. With
// t = (z - pmu) / psigma^2: to mu g + b t; to h (g + b t) sigma eps - b; to pmu -b t; to ph
// b (1 - w^2). se = sigma eps, recomputed from the Philox stream; pinv = 1 / psigma.
template <class M>
VAE_HD void latent_sample_grads_inv(typename M::T g, typename M::T b, typename M::T z, typename M::T se,
                                    typename M::T pmu, typename M::T pinv, typename M::T* d_mu, typename M::T* d_h,
                                    typename M::T* d_pmu, typename M::T* d_ph) {
  using T = typename M::T;
  const T w = (z - pmu) * pinv;
  const T bt = b * (w * pinv);
  *d_mu = g + bt;
  *d_h = *d_mu * se - b;
  *d_pmu = M::fill(0.0) - bt;
  *d_ph = b * (M::fill(1.0) - w * w);
}
template <class M>
VAE_HD void latent_sample_grads(typename M::T g, typename M::T b, typename M::T z, typename M::T se,
                                typename M::T pmu, typename M::T ph, typename M::T* d_mu, typename M::T* d_h,
                                typename M::T* d_pmu, typename M::T* d_ph) {
  latent_sample_grads_inv<M>(g, b, z, se, pmu, latent_prior_inv_sigma<M>(ph), d_mu, d_h, d_pmu, d_ph);
}

// The gradient of ls through z alone: c sigma sum_k g_k eps_k.
template <class M>
VAE_HD typename M::T latent_grad_ls_z(typename M::T sigma, typename M::T c, typename M::T sum_g_eps) {
  return c * sigma * sum_g_eps;
}

// Element strides of a tensor over the kernels' logical index (k, n, c, s): draw k (0 for the
// inputs), batch n, channel c and s, the spatial dimensions flattened (they must merge into one
// stride). A strided view is read where it lies: a channel slice of an NCHW tensor (s stride 1), of
// a channels_last one (c stride 1), a broadcast prior (stride 0).
struct LatentStrides {
  int64_t k, n, c, s;
};

// The kernels' arguments (csrc/cpu/latent_kernel.h, csrc/cuda/gaussian_latent.cu). The logical
// element (k, n, c, s) of the K x N x C x S draws has eps of Philox index ((k N + n) C + c) S + s,
// as reparameterize draws them, whatever the layouts.
struct LatentArgs {
  DType dtype;
  LatentScale scale;
  LatentKL kl;
  int64_t k, n, c, s;  // k >= 1 draws
  const void* mu;
  const void* ls;
  const void* pmu;  // the prior, broadcast to mu's shape; with no prior a 0 read with stride 0
  const void* pls;
  LatentStrides mu_st, ls_st, pmu_st, pls_st;
  uint64_t seed, offset;  // the CPU's; the CUDA kernels read the launch's PhiloxArgs or state
  // forward
  void* z;  // (K, N, C, S) with z_st
  LatentStrides z_st;
  void* kl_elems;  // (K N, C S) contiguous in the accumulation type, each element's KL, or nullptr
  // backward
  const void* grad_z;  // with gz_st, or nullptr (z not differentiated)
  LatentStrides gz_st;
  const void* row_w;   // [K N] in the accumulation type: d loss / d (row's KL), or nullptr
  const void* unit_w;  // [C S] in the accumulation type (free bits: 1 kept, 0 floored), or nullptr
  void* g_mu;          // mu's dtype with g_st
  void* g_ls;
  LatentStrides g_st;
  void* g_pmu;  // (N, C, S) contiguous in the accumulation type, per element, or nullptr (both)
  void* g_pls;
  bool g_prior_in_dtype = false;  // the CPU's, for a prior of mu's shape: g_pmu, g_pls in mu's dtype instead
};

}  // namespace vae_ext
