// The fused ELBO loss kernel: reconstruction and KL sums with their gradients in one pass.
#pragma once
#include "capability.h"

#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/dtype.h"
#include "../common/elbo_math.h"
#include "kernels.h"
#include "reduce.h"
#include "vec_io.h"
#include "vec_math.h"

namespace vae_ext::cpu::CPU_CAPABILITY {

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

// The type of the gradient buffers (csrc/checks.cpp grad_buffer_dtype): the input's for the half
// types. bfloat16 has float32's range: each local gradient is rounded once here, and once more by
// the backward's scaling unless that is by 1. float16's is the gradient as the backward hands it on
// for an incoming gradient of 1, rounded once; for any other the backward computes it again in
// float32 (csrc/autograd.cpp), since a float16 local gradient may have left the range or lost the
// digits a loss scale would bring back.
template <typename scalar_t>
using grad_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>,
                                  scalar_t, typename VecIO<scalar_t>::acc_t>;

// One pass over a row segment of recon/x: returns the segment's loss sum and writes the scaled
// gradient, in grad_t, when g is not null. Checks "bce"
// probabilities on the fly.
// Recon::Gaussian: rlv is the log-variance per element (g_rlv its gradient, or nullptr), or, when
// scalar_rlv, the segment returns the sum of q / 2 = (x - r)^2 inv / 2 (gaussian_q_elem) with inv = exp(-rlv)
// of the one log-variance, added per lane in double: rlv's gradient, count / 2 minus that sum, is
// scaled by grad_output later and may be finite where a float lane's sum would be inf.
template <typename scalar_t, Recon mode, bool scalar_rlv = false>
double recon_segment(const scalar_t* r, const scalar_t* x, grad_t<scalar_t>* g, int64_t len, double scale,
                     std::atomic<bool>* bad_prob, std::atomic<bool>* bad_target, const scalar_t* rlv = nullptr,
                     grad_t<scalar_t>* g_rlv = nullptr, typename VecIO<scalar_t>::acc_t inv = 0) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using M = VecMath<V>;
  constexpr int64_t W = V::size();
  const V vscale(static_cast<typename IO::acc_t>(scale));
  const V vinv(inv);
  const bool scaled = scale != 1.0;  // "mean" only
  V acc0(0), acc1(0);
  // scalar_rlv with a float accumulator: q / 2 summed per lane in double instead (acc0, acc1 unused)
  constexpr bool wide = scalar_rlv && !std::is_same_v<typename IO::acc_t, double>;
  double wacc[wide ? 2 * W : 1] = {};
  ProbRange<V> range, target_range;  // recon_x's and x's (binary x vectors are in range: skipped)
  // always inline: called as a function the step passes every vector through memory
  auto step = [&](int64_t i, int64_t cnt, V& acc) VAE_ALWAYS_INLINE {
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
    } else if constexpr (mode == Recon::Gaussian && scalar_rlv) {
      lv = gaussian_q_elem<M>(rv, xv, vinv, &gv);
    } else if constexpr (mode == Recon::Gaussian) {
      V glv;
      lv = gaussian_elem<M>(rv, xv, load_n(rlv + i, cnt), &gv, &glv);
      if (g_rlv != nullptr) store_n(g_rlv + i, scaled ? glv * vscale : glv, cnt);
    } else {
      lv = recon_elem<mode, M>(rv, xv, &gv);
    }
    if (!full) lv = V::set(V(0), lv, cnt);  // padded lanes add nothing
    if constexpr (wide) {
      typename IO::acc_t buf[W];
      lv.store(buf);
      double* w = wacc + (&acc == &acc0 ? 0 : W);
      for (int64_t k = 0; k < W; ++k) w[k] += static_cast<double>(buf[k]);
    } else {
      acc = acc + lv;
    }
    if constexpr (mode == Recon::BCE) range.add(rv);
    if (g != nullptr) store_n(g + i, scaled ? gv * vscale : gv, cnt);
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
  if constexpr (wide) {  // lane order, acc0's then acc1's, as hsum(acc0) + hsum(acc1)
    double s0 = 0.0, s1 = 0.0;
    for (int64_t k = 0; k < W; ++k) s0 += wacc[k];
    for (int64_t k = 0; k < W; ++k) s1 += wacc[W + k];
    return s0 + s1;
  }
  return hsum(acc0) + hsum(acc1);
}

// The KL of a run of latent units, with its gradients (to gmu and glv, in grad_t, * scale) and
// each element's KL (to kle, unscaled) where those are not null.
// has_prior: the prior N(pmu, exp(plv)), read at the same offsets as mu (a shared prior's caller
// points them at the row's columns), its gradients to gpmu and gplv when not null.
// pgrad_t: the prior gradients' type (float for a broadcast bfloat16 prior's, summed later).
template <typename scalar_t, bool has_prior, typename pgrad_t>
double kl_segment(const scalar_t* mu, const scalar_t* lv, const scalar_t* pmu, const scalar_t* plv,
                  grad_t<scalar_t>* gmu, grad_t<scalar_t>* glv, pgrad_t* gpmu, pgrad_t* gplv,
                  typename VecIO<scalar_t>::acc_t* kle, int64_t len, double scale) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using M = VecMath<V>;
  constexpr int64_t W = V::size();
  const V vscale(static_cast<typename IO::acc_t>(scale));
  V acc(0);
  // the first n lanes of v to p (all of them when full)
  const auto put = [](auto* p, const V& v, bool full, int64_t n) {
    if (full)
      VecIO<std::remove_pointer_t<decltype(p)>>::store(p, v);
    else
      VecIO<std::remove_pointer_t<decltype(p)>>::store(p, v, n);
  };
  for (int64_t i = 0; i < len; i += W) {
    const int64_t cnt = std::min(W, len - i);
    const bool full = cnt == W;
    const V m = full ? IO::load(mu + i) : IO::load(mu + i, cnt);
    const V l = full ? IO::load(lv + i) : IO::load(lv + i, cnt);
    V gm, gl, gpl;
    V k;
    if constexpr (has_prior) {
      const V pm = full ? IO::load(pmu + i) : IO::load(pmu + i, cnt);
      const V pl = full ? IO::load(plv + i) : IO::load(plv + i, cnt);
      k = kl_prior_elem<M>(m, l, pm, pl, &gm, &gl, &gpl);
    } else {
      k = kl_elem<M>(m, l, &gm, &gl);
    }
    acc = acc + (full ? k : V::set(V(0), k, cnt));
    if (kle != nullptr) put(kle + i, k, full, cnt);
    if (gmu != nullptr) {
      put(gmu + i, gm * vscale, full, cnt);
      put(glv + i, gl * vscale, full, cnt);
    }
    if constexpr (has_prior) {
      if (gpmu != nullptr) {
        put(gpmu + i, (V(0) - gm) * vscale, full, cnt);
        put(gplv + i, gpl * vscale, full, cnt);
      }
    }
  }
  return hsum(acc);
}

// The KL part of elbo_typed: per-row sums (row_kl) or the total.
template <typename scalar_t, bool has_prior, typename pgrad_t = grad_t<scalar_t>>
void kl_typed(const ElboArgs& a) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const auto* mu = static_cast<const scalar_t*>(a.mu);
  const auto* lv = static_cast<const scalar_t*>(a.logvar);
  const auto* pmu = static_cast<const scalar_t*>(a.prior_mu);
  const auto* plv = static_cast<const scalar_t*>(a.prior_logvar);
  auto* gmu = static_cast<grad_t<scalar_t>*>(a.grad_mu);
  auto* glv = static_cast<grad_t<scalar_t>*>(a.grad_logvar);
  auto* gpmu = static_cast<pgrad_t*>(a.grad_prior_mu);
  auto* gplv = static_cast<pgrad_t*>(a.grad_prior_logvar);
  auto* kle = static_cast<acc_t*>(a.kl_elems);
  const int64_t l = a.l;
  const auto from = [](auto* p, int64_t off) { return p ? p + off : nullptr; };
  // units [off, off + len) of the flat (n, l) latents; the prior's offset is the column's when shared
  const auto seg = [&](int64_t off, int64_t len, int64_t prior_off) {
    return kl_segment<scalar_t, has_prior, pgrad_t>(mu + off, lv + off, from(pmu, prior_off), from(plv, prior_off),
                                                    from(gmu, off), from(glv, off), from(gpmu, off), from(gplv, off),
                                                    from(kle, off), len, a.grad_scale);
  };
  const auto row_seg = [&](int64_t row, int64_t b, int64_t e) {
    return seg(row * l + b, e - b, a.prior_shared ? b : row * l + b);
  };
  if (a.row_kl != nullptr) {
    reduce_rows(a.n, l, a.row_kl, row_seg);
  } else if (has_prior && a.prior_shared) {  // segments must not cross rows: row sums, added in order
    std::vector<double> rows(static_cast<size_t>(a.n));
    reduce_rows(a.n, l, rows.data(), row_seg);
    double s = 0.0;
    for (double v : rows) s += v;
    *a.total_kl = s;
  } else {
    *a.total_kl = reduce_flat(a.n * l, [&](int64_t b, int64_t e) { return seg(b, e - b, b); });
  }
}

// A 0-d Gaussian log-variance: the reconstruction sums are sums of q / 2; turn them into the loss and
// the log-variance's gradient (gaussian_scalar_terms).
template <typename scalar_t>
void finish_scalar_gaussian(const ElboArgs& a, double rlv) {
  double g = 0.0;
  if (a.row_rec != nullptr) {
    for (int64_t r = 0; r < a.n; ++r) {
      a.row_rec[r] = gaussian_scalar_terms(a.row_rec[r], static_cast<double>(a.d), rlv, &g);
      if (a.row_grad_rlv != nullptr) a.row_grad_rlv[r] = g * a.grad_scale;
    }
    return;
  }
  *a.total_rec = gaussian_scalar_terms(*a.total_rec, static_cast<double>(a.n) * static_cast<double>(a.d), rlv, &g);
  if (a.total_grad_rlv != nullptr) *a.total_grad_rlv = g * a.grad_scale;
}

template <typename scalar_t, Recon mode, bool scalar_rlv = false>
void elbo_typed(const ElboArgs& a) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const auto* r = static_cast<const scalar_t*>(a.recon);
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* g = static_cast<grad_t<scalar_t>*>(a.grad_recon);
  const auto* rlv = static_cast<const scalar_t*>(a.recon_logvar);
  auto* g_rlv = static_cast<grad_t<scalar_t>*>(a.grad_recon_logvar);
  const double rlv0 = scalar_rlv ? static_cast<double>(static_cast<acc_t>(rlv[0])) : 0.0;
  const acc_t inv = scalar_rlv ? std::exp(-static_cast<acc_t>(rlv0)) : acc_t(0);
  const int64_t d = a.d;
  const auto rec_seg = [&](int64_t off, int64_t len) {
    return recon_segment<scalar_t, mode, scalar_rlv>(
        r + off, x + off, g ? g + off : nullptr, len, a.grad_scale, a.bad_prob, a.bad_target,
        (rlv && !scalar_rlv) ? rlv + off : nullptr, g_rlv ? g_rlv + off : nullptr, inv);
  };
  if (a.row_rec == nullptr)  // one sum over everything: no per-row sums needed
    *a.total_rec = reduce_flat(a.n * d, [&](int64_t b, int64_t e) { return rec_seg(b, e - b); });
  else
    reduce_rows(a.n, d, a.row_rec, [&](int64_t row, int64_t b, int64_t e) { return rec_seg(row * d + b, e - b); });
  if constexpr (scalar_rlv) finish_scalar_gaussian<scalar_t>(a, rlv0);
  if (a.prior_mu == nullptr)
    kl_typed<scalar_t, false>(a);
  else if (a.prior_grads_wide && !std::is_same_v<grad_t<scalar_t>, acc_t>)
    kl_typed<scalar_t, true, acc_t>(a);
  else
    kl_typed<scalar_t, true>(a);
}

void elbo_kernel(const ElboArgs& a) {
  dispatch_dtype<c10::Half, c10::BFloat16>(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    switch (a.mode) {
      case Recon::BCE: elbo_typed<scalar_t, Recon::BCE>(a); break;
      case Recon::BCELogits: elbo_typed<scalar_t, Recon::BCELogits>(a); break;
      case Recon::MSE: elbo_typed<scalar_t, Recon::MSE>(a); break;
      case Recon::L1: elbo_typed<scalar_t, Recon::L1>(a); break;
      case Recon::Gaussian:
        if (a.rlv_scalar)
          elbo_typed<scalar_t, Recon::Gaussian, true>(a);
        else
          elbo_typed<scalar_t, Recon::Gaussian>(a);
        break;
    }
  });
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
