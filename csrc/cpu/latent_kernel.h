// The gaussian_latent kernels (a hierarchical VAE's latent layer): the forward draws eps from the
// Philox stream as reparameterize does, writes z and sums each row's KL in fixed kChunk pieces;
// the backward draws eps again and sums each element's gradients over the draws in order. Every
// tensor is read and written through its strides (common/latent_math.h LatentStrides).
#pragma once
#include "capability.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "../common/latent_math.h"
#include "kernels.h"
#include "latent_kernels.h"
#include "reduce.h"
#include "reparam_kernel.h"  // eps_tile, kTile
#include "vec_io.h"
#include "vec_math.h"

namespace vae_ext::cpu::CPU_CAPABILITY {

VAE_HD int64_t latent_at(const LatentStrides& st, int64_t k, int64_t n, int64_t c, int64_t s) {
  return k * st.k + n * st.n + c * st.c + s * st.s;
}

// How a run of elements is read or written: through its stride (any: a gather for a channels_last
// channel slice), or known to be contiguous (kUnit) or one value broadcast (kBroadcast, a prior of
// stride 0). The known cases are template arguments, chosen once per call from the strides
// (latent_modes), so the inner loops carry no per-vector test.
enum LoadMode : int { kStrided = 0, kUnit = 1, kBroadcast = 2 };

// cnt <= W elements at p, `st` apart: a vector load where they are contiguous, one value where the
// stride is 0 (a broadcast prior), a gather otherwise (a channels_last channel slice).
template <typename scalar_t>
struct StridedIO {
  using V = typename VecIO<scalar_t>::V;
  using acc_t = typename VecIO<scalar_t>::acc_t;
  template <int kMode = kStrided>
  VAE_HD static V load(const scalar_t* p, int64_t st, int64_t cnt) {
    if (kMode == kUnit || (kMode == kStrided && st == 1)) return load_n(p, cnt);
    if (kMode == kBroadcast || st == 0) return V(static_cast<acc_t>(*p));
    acc_t buf[V::size()] = {};
    for (int64_t i = 0; i < cnt; ++i) buf[i] = static_cast<acc_t>(p[i * st]);
    return V::loadu(buf);
  }
  template <int kMode = kStrided>
  VAE_HD static void store(scalar_t* p, int64_t st, const V& v, int64_t cnt) {
    if (kMode == kUnit || st == 1) {
      store_n(p, v, cnt);
      return;
    }
    acc_t buf[V::size()];
    v.store(buf);
    for (int64_t i = 0; i < cnt; ++i) p[i * st] = static_cast<scalar_t>(buf[i]);
  }
};

// The inputs of one run of elements (n, ch, s0 ..): mu, logscale and the prior, with their strides.
template <typename scalar_t>
struct LatentRun {
  using IO = StridedIO<scalar_t>;
  using V = typename IO::V;
  const scalar_t *mu, *ls, *pmu, *pls;
  int64_t smu, sls, spmu, spls;
  LatentRun(const LatentArgs& a, int64_t n, int64_t ch, int64_t s0)
      : mu(static_cast<const scalar_t*>(a.mu) + latent_at(a.mu_st, 0, n, ch, s0)),
        ls(static_cast<const scalar_t*>(a.ls) + latent_at(a.ls_st, 0, n, ch, s0)),
        pmu(static_cast<const scalar_t*>(a.pmu) + latent_at(a.pmu_st, 0, n, ch, s0)),
        pls(static_cast<const scalar_t*>(a.pls) + latent_at(a.pls_st, 0, n, ch, s0)),
        smu(a.mu_st.s),
        sls(a.ls_st.s),
        spmu(a.pmu_st.s),
        spls(a.pls_st.s) {}
  // kMain: how mu and logscale are read; kPrior: the prior
  template <int kMain = kStrided, int kPrior = kStrided>
  VAE_HD void load(int64_t j, int64_t cnt, V* m, V* l, V* pm, V* pl) const {
    const auto at = [j](const scalar_t* p, int64_t st, int kMode) {
      return p + (kMode == kUnit ? j : kMode == kBroadcast ? 0 : j * st);
    };
    *m = IO::template load<kMain>(at(mu, smu, kMain), smu, cnt);
    *l = IO::template load<kMain>(at(ls, sls, kMain), sls, cnt);
    *pm = IO::template load<kPrior>(at(pmu, spmu, kPrior), spmu, cnt);
    *pl = IO::template load<kPrior>(at(pls, spls, kPrior), spls, cnt);
  }
};

// Calls f(integral_constant<kMain>, integral_constant<kPrior>) with the modes of this call: kUnit
// for mu, logscale and `outs` (the other big tensors' strides) when all are contiguous runs, the
// prior kUnit or kBroadcast when both of its tensors are; float and the half types (double always
// kStrided, to keep the build small).
template <typename scalar_t, class F>
void latent_modes(const LatentArgs& a, std::initializer_list<int64_t> outs, const F& f) {
  using M0 = std::integral_constant<int, kStrided>;
  using M1 = std::integral_constant<int, kUnit>;
  using M2 = std::integral_constant<int, kBroadcast>;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    bool unit = a.mu_st.s == 1 && a.ls_st.s == 1;
    for (int64_t st : outs) unit = unit && st == 1;
    if (unit && a.pmu_st.s == 1 && a.pls_st.s == 1) return f(M1{}, M1{});
    if (unit && a.pmu_st.s == 0 && a.pls_st.s == 0) return f(M1{}, M2{});
  }
  f(M0{}, M0{});
}

// 1 / psigma^2 (analytic) or 1 / psigma (sample) of prior log-scales pl: the KL's one exp of the prior.
template <class M, LatentKL kKL>
VAE_HD typename M::T latent_prior_inv(const typename M::T& pl, const typename M::T& c) {
  if constexpr (kKL == LatentKL::Analytic)
    return latent_prior_inv_var<M>(pl, c);
  else
    return latent_prior_inv_sigma<M>(c * pl);
}

template <typename scalar_t, LatentKL kKL>
void latent_forward_typed(const LatentArgs& a, double* row_kl) {
  using IO = StridedIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  using M = VecMath<V>;
  constexpr int64_t W = V::size();
  scalar_t* z = static_cast<scalar_t*>(a.z);
  acc_t* kl_el = static_cast<acc_t*>(a.kl_elems);
  const int64_t len = a.c * a.s, rows = a.k * a.n;
  const V c(static_cast<acc_t>(latent_c(a.scale)));
  latent_modes<scalar_t>(a, {a.z_st.s}, [&](auto main_mode, auto prior_mode) {
    constexpr int kMain = decltype(main_mode)::value, kPrior = decltype(prior_mode)::value;
    reduce_rows(rows, len, row_kl, [&](int64_t r, int64_t b, int64_t e) VAE_ALWAYS_INLINE {
      const int64_t kk = r / a.n, n = r - kk * a.n;
      acc_t eps[kTile];
      V acc(0);
      for (int64_t p = b; p < e;) {  // runs inside one channel: constant strides
        const int64_t ch = p / a.s, s0 = p - ch * a.s;
        const int64_t run = std::min({e - p, a.s - s0, kTile});
        eps_tile<scalar_t, acc_t>(a.seed, a.offset, r * len + p, run, eps);
        const LatentRun<scalar_t> in(a, n, ch, s0);
        // a prior broadcast along the run (or none): its exp once for the run
        const V pinv_run = kPrior == kBroadcast ? latent_prior_inv<M, kKL>(IO::template load<kBroadcast>(in.pls, 0, 1), c)
                                                : V(0);
        scalar_t* zp = z + latent_at(a.z_st, kk, n, ch, s0);
        // in registers for the loop (stores through float pointers could alias a's fields)
        const int64_t sz = kMain == kUnit ? 1 : a.z_st.s;
        acc_t* const klp = kl_el ? kl_el + r * len + p : nullptr;
        for (int64_t j = 0; j < run; j += W) {
          const int64_t cnt = std::min(W, run - j);
          V m, l, pm, pl;
          in.template load<kMain, kPrior>(j, cnt, &m, &l, &pm, &pl);
          const V ev = V::loadu(eps + j, cnt);
          const V sigma = M::exp(c * l);  // z's and the KL's: one exp of q per element
          const V zv = latent_z_sigma<M>(m, sigma, ev);
          IO::template store<kMain>(zp + j * sz, sz, zv, cnt);
          const V pinv = kPrior == kBroadcast ? pinv_run : latent_prior_inv<M, kKL>(pl, c);
          V kl;
          if constexpr (kKL == LatentKL::Analytic) {
            V g0, g1, g2, g3;
            kl = latent_kl_analytic_inv<M>(m, l, sigma, pm, pl, pinv, c, &g0, &g1, &g2, &g3);
          } else {
            kl = latent_kl_sample_inv<M>(zv, ev, c * l, pm, c * pl, pinv);
          }
          if (cnt < W) kl = V::set(V(0), kl, cnt);  // padded lanes add nothing
          if (klp) kl.store(klp + j, cnt);
          acc = acc + kl;
        }
        p += run;
      }
      return hsum(acc);
    });
  });
}

// The backward, per tile of one channel run: for each draw in order, eps drawn again (where z's
// gradient or the sampled KL needs it) and its terms; with one draw (a layer's usual call) the
// gradients are written straight from them, with K summed per element over the draws first (a
// fixed summation order), then written.
// pg_t: the prior gradients' type (the accumulation type, or scalar_t: LatentArgs::g_prior_in_dtype).
template <typename scalar_t, LatentKL kKL, typename pg_t>
void latent_backward_typed(const LatentArgs& a) {
  using IO = StridedIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  using M = VecMath<V>;
  constexpr int64_t W = V::size();
  constexpr bool kAnalytic = kKL == LatentKL::Analytic;
  const scalar_t* gz = static_cast<const scalar_t*>(a.grad_z);
  const acc_t* row_w = static_cast<const acc_t*>(a.row_w);
  const acc_t* unit_w = static_cast<const acc_t*>(a.unit_w);
  scalar_t* gmu = static_cast<scalar_t*>(a.g_mu);
  scalar_t* gls = static_cast<scalar_t*>(a.g_ls);
  pg_t* gpmu = static_cast<pg_t*>(a.g_pmu);
  pg_t* gpls = static_cast<pg_t*>(a.g_pls);
  const int64_t len = a.c * a.s, per_ch = (a.s + kTile - 1) / kTile, units = a.n * a.c * per_ch;
  const V c(static_cast<acc_t>(latent_c(a.scale)));
  const bool one = a.k == 1;
  // eps is needed for z's gradient, and for the sampled KL's
  const bool draw = gz != nullptr || (!kAnalytic && row_w != nullptr);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (a.k * std::min(a.s, kTile)));
  latent_modes<scalar_t>(a, {a.g_st.s, gz ? a.gz_st.s : 1}, [&](auto main_mode, auto prior_mode) {
    constexpr int kMain = decltype(main_mode)::value, kPrior = decltype(prior_mode)::value;
    at::parallel_for(0, units, grain, [&](int64_t ub, int64_t ue) {
      // with K draws, per element summed over them: analytic g and g eps (s0_, s1_); sample the
      // gradients to mu, h, pmu and ph (s0_ .. s3_)
      acc_t eps[kTile], s0_[kTile], s1_[kTile], s2_[kTile], s3_[kTile];
      for (int64_t u = ub; u < ue; ++u) {
        const int64_t t = u % per_ch, nc = u / per_ch, ch = nc % a.c, n = nc / a.c;
        const int64_t s0 = t * kTile, run = std::min(kTile, a.s - s0), l0 = ch * a.s + s0;
        const LatentRun<scalar_t> in(a, n, ch, s0);
        scalar_t* const gm = gmu + latent_at(a.g_st, 0, n, ch, s0);
        scalar_t* const gl = gls + latent_at(a.g_st, 0, n, ch, s0);
        // the prior's gradients: (N, C S) contiguous; all in registers for the loop (stores through
        // float pointers could alias a's fields)
        pg_t* const pmo = gpmu ? gpmu + n * len + l0 : nullptr;
        pg_t* const plo = gpls ? gpls + n * len + l0 : nullptr;
        const int64_t sgz = kMain == kUnit ? 1 : a.gz_st.s, sg = kMain == kUnit ? 1 : a.g_st.s;
        const V pinv_run = kPrior == kBroadcast ? latent_prior_inv<M, kKL>(IO::template load<kBroadcast>(in.pls, 0, 1), c)
                                                : V(0);
        // the KL's weight of elements [j, j + cnt): the row's (summed over the draws), free bits' mask
        const auto weight = [&](acc_t b_row, int64_t j, int64_t cnt) VAE_ALWAYS_INLINE {
          if (!row_w) return V(0);
          return unit_w ? V(b_row) * V::loadu(unit_w + l0 + j, cnt) : V(b_row);
        };
        // Elements [j, j + cnt): the gradients from z's terms (analytic: sum g, sum g eps; sample: the
        // four sums) and, analytic, the KL's at weight b, written.
        const auto write = [&](int64_t j, int64_t cnt, const V& t0, const V& t1, const V& t2, const V& t3,
                               const V& b) VAE_ALWAYS_INLINE {
          V d_mu = t0, d_ls, d_pmu = t2, d_pls;
          if constexpr (kAnalytic) {
            V m, l, pm, pl, km, kl, kpm, kpl;
            in.template load<kMain, kPrior>(j, cnt, &m, &l, &pm, &pl);
            const V sigma = M::exp(c * l);
            d_ls = latent_grad_ls_z<M>(sigma, c, t1);
            d_pmu = d_pls = V(0);
            if (row_w) {
              const V pinv = kPrior == kBroadcast ? pinv_run : latent_prior_inv<M, kKL>(pl, c);
              latent_kl_analytic_inv<M>(m, l, sigma, pm, pl, pinv, c, &km, &kl, &kpm, &kpl);
              d_mu = d_mu + b * km;
              d_ls = d_ls + b * kl;
              d_pmu = b * kpm;
              d_pls = b * kpl;
            }
          } else {
            d_ls = c * t1;
            d_pls = c * t3;
          }
          IO::template store<kMain>(gm + j * sg, sg, d_mu, cnt);
          IO::template store<kMain>(gl + j * sg, sg, d_ls, cnt);
          if (pmo) {
            store_n(pmo + j, d_pmu, cnt);
            store_n(plo + j, d_pls, cnt);
          }
        };
        if (!one) {
          std::fill(s0_, s0_ + run, acc_t(0));
          std::fill(s1_, s1_ + run, acc_t(0));
          if (!kAnalytic) {
            std::fill(s2_, s2_ + run, acc_t(0));
            std::fill(s3_, s3_ + run, acc_t(0));
          }
        }
        acc_t b_sum = 0;
        for (int64_t kk = 0; kk < a.k; ++kk) {  // draws in order: a fixed summation order
          const int64_t r = kk * a.n + n;
          const acc_t b_row = row_w ? row_w[r] : acc_t(0);
          b_sum += b_row;
          if (!draw && !one) continue;  // the draw adds nothing (analytic, z not differentiated)
          if (draw) eps_tile<scalar_t, acc_t>(a.seed, a.offset, r * len + l0, run, eps);
          const scalar_t* gp = gz ? gz + latent_at(a.gz_st, kk, n, ch, s0) : nullptr;
          for (int64_t j = 0; j < run; j += W) {
            const int64_t cnt = std::min(W, run - j);
            const V gv = gp ? IO::template load<kMain>(gp + j * sgz, sgz, cnt) : V(0);
            const V ev = draw ? V::loadu(eps + j, cnt) : V(0);
            if constexpr (kAnalytic) {
              if (one) {
                write(j, cnt, gv, gv * ev, V(0), V(0), weight(b_row, j, cnt));
              } else {
                (V::loadu(s0_ + j, cnt) + gv).store(s0_ + j, cnt);
                at::vec::fmadd(gv, ev, V::loadu(s1_ + j, cnt)).store(s1_ + j, cnt);
              }
            } else {
              V m, l, pm, pl, dm, dh, dpm, dph;
              in.template load<kMain, kPrior>(j, cnt, &m, &l, &pm, &pl);
              const V sigma = M::exp(c * l);
              const V pinv = kPrior == kBroadcast ? pinv_run : latent_prior_inv<M, kKL>(pl, c);
              latent_sample_grads_inv<M>(gv, weight(b_row, j, cnt), latent_z_sigma<M>(m, sigma, ev), sigma * ev, pm,
                                         pinv, &dm, &dh, &dpm, &dph);
              if (one) {
                write(j, cnt, dm, dh, dpm, dph, V(0));
              } else {
                (V::loadu(s0_ + j, cnt) + dm).store(s0_ + j, cnt);
                (V::loadu(s1_ + j, cnt) + dh).store(s1_ + j, cnt);
                (V::loadu(s2_ + j, cnt) + dpm).store(s2_ + j, cnt);
                (V::loadu(s3_ + j, cnt) + dph).store(s3_ + j, cnt);
              }
            }
          }
        }
        if (one) continue;
        for (int64_t j = 0; j < run; j += W) {
          const int64_t cnt = std::min(W, run - j);
          const V t2 = kAnalytic ? V(0) : V::loadu(s2_ + j, cnt), t3 = kAnalytic ? V(0) : V::loadu(s3_ + j, cnt);
          write(j, cnt, V::loadu(s0_ + j, cnt), V::loadu(s1_ + j, cnt), t2, t3, weight(b_sum, j, cnt));
        }
      }
    });
  });
}

inline void latent_forward_kernel(const LatentArgs& a, double* row_kl) {
  dispatch_dtype<c10::Half, c10::BFloat16>(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if (a.kl == LatentKL::Analytic)
      latent_forward_typed<scalar_t, LatentKL::Analytic>(a, row_kl);
    else
      latent_forward_typed<scalar_t, LatentKL::Sample>(a, row_kl);
  });
}

inline void latent_backward_kernel(const LatentArgs& a) {
  dispatch_dtype<c10::Half, c10::BFloat16>(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    using acc_t = typename VecIO<scalar_t>::acc_t;
    const auto run = [&](auto* pg_tag) {
      using pg_t = std::remove_pointer_t<decltype(pg_tag)>;
      if (a.kl == LatentKL::Analytic)
        latent_backward_typed<scalar_t, LatentKL::Analytic, pg_t>(a);
      else
        latent_backward_typed<scalar_t, LatentKL::Sample, pg_t>(a);
    };
    if constexpr (std::is_same_v<scalar_t, acc_t>)
      run(static_cast<acc_t*>(nullptr));
    else if (a.g_prior_in_dtype)
      run(static_cast<scalar_t*>(nullptr));
    else
      run(static_cast<acc_t*>(nullptr));
  });
}

// This capability's latent kernels (latent_kernels() in csrc/cpu/latent_ops_cpu.cpp picks the CPU's).
const LatentKernelTable& latent_kernel_table() {
  static const LatentKernelTable table{&latent_forward_kernel, &latent_backward_kernel};
  return table;
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
