// The fused ELBO loss kernel: reconstruction and KL sums with their gradients in one pass, and the
// per-sample scaling of a half gradient (the backward of reduction="none").
#pragma once
#include "capability.h"

#include <atomic>
#include <type_traits>

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
      if (full)
        IO::store(g + i, gv);
      else
        IO::store(g + i, gv, cnt);
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
  dispatch_dtype<c10::Half, c10::BFloat16>(a.dtype, [&](auto* tag) {
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
        if (cnt == W)
          IO::store(g + i, IO::load(g + i) * sv);
        else
          IO::store(g + i, IO::load(g + i, cnt) * sv, cnt);
        i += cnt;
      }
    }
  });
}

void scale_rows_kernel(DType dtype, void* g, int64_t rows, int64_t d, const float* s) {
  if (dtype == DType::Float16) scale_rows_typed(static_cast<c10::Half*>(g), rows, d, s);
  if (dtype == DType::BFloat16) scale_rows_typed(static_cast<c10::BFloat16*>(g), rows, d, s);
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
