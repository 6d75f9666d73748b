// The discretized mixture of logistics on the CPU: the NLL per sample and (when wanted) its
// gradient in one pass, and the sampler. The formulas are csrc/common/dmol_math.h's, run on SIMD
// vectors whose lanes are W consecutive pixels of one sample.
//
// A tile of W pixels is gathered into a small buffer, parameter-major (param p of lane j at
// p W + j), from either layout: a channels-first tensor row by row with vector loads, a
// channels_last one (each pixel's P parameters contiguous) by a transposing copy. The gradient is
// built in a second buffer of that shape and scattered back in the params' layout (in the computation
// type: float32 for half params, rounded once when the backward scales it). Pass 1 over the
// components keeps each one's local derivatives (dl/dmu, dl/ds, the tanh'd coefficients) in the
// gradient buffer's own slots and its log-likelihood in the logit's slot; pass 2, once the
// responsibilities are known, turns them into the gradient: no recomputation, no M- or C-sized
// tensor, scratch of two P x W tiles per thread.
//
// Determinism: each sample's pixels are split into fixed kDmolChunk-pixel chunks, each summed in
// lane order, the chunks added in order: the sums depend on the shapes alone, not on the threads.
#pragma once
#include "capability.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "../common/dmol_math.h"
#include "../common/dtype.h"
#include "kernels.h"
#include "vec_io.h"
#include "vec_math.h"

namespace vae_ext::cpu::CPU_CAPABILITY {

// Pixels per partial sum (a multiple of every vector width); also the unit threads share out: one
// chunk of a C = 3, M = 10 mixture is about 80 thousand transcendentals.
constexpr int64_t kDmolChunk = 256;

// dmol_math.h's policy over SIMD vectors: VecMath plus expm1, exp_expm1, recip and all.
template <class V>
struct DmolVecMath : VecMath<V> {
  using T = V;
  using Mask = V;
  static T expm1(const T& v) { return v.expm1(); }
  static void exp_expm1(const T& v, T* ex, T* em) {
    *ex = v.exp();
    *em = v.expm1();
  }
  static bool all(const Mask& m) { return m.zero_mask() == 0; }  // set lanes are all ones (never 0)
  static T recip(const T& v) { return T(1) / v; }
};

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// float exp(v) and expm1(v) from one reduction v = n ln2 + r, |r| <= ln2 / 2 (as vec_math.h's
// fast_exp): q = exp(r) - 1 is the series without its constant term (relative truncation error
// < 2e-8), expm1(v) = 2^n q + (2^n - 1) and exp(v) = 2^n q + 2^n, each rounded once after exact
// scalings. expm1 has no cancellation for n = 0 (|v| <= 0.35) and loses at most ~1.5 bits for
// n = -1 and 1; exp is as accurate as fast_exp. NaN gives NaN, v beyond [-104, 89] is clamped.
inline void fast_exp_expm1(VecF v, VecF* ex, VecF* em) {
  v = at::vec::clamp_max(at::vec::clamp_min(v, VecF(-104.0f)), VecF(89.0f));
  const VecF n = (v * VecF(1.44269504088896341f)).round();
  VecF r = at::vec::fmadd(n, VecF(-0.693359375f), v);
  r = at::vec::fmadd(n, VecF(2.12194440e-4f), r);
  VecF c(1.0f / 5040);
  for (const float k : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f}) c = at::vec::fmadd(c, r, VecF(k));
  const VecF q = c * r;
#if defined(CPU_CAPABILITY_AVX512)
  const VecF scaled(_mm512_scalef_ps(q, n)), pow2(_mm512_scalef_ps(VecF(1.0f), n));
#else
  const __m256i ni = _mm256_cvtps_epi32(n), bias = _mm256_set1_epi32(127);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const VecF s1(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23)));
  const VecF s2(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23)));
  const VecF scaled = (q * s1) * s2, pow2 = s1 * s2;
#endif
  *ex = scaled + pow2;
  *em = scaled + (pow2 - VecF(1.0f));
}

template <>
inline VecF DmolVecMath<VecF>::expm1(const VecF& v) {
  VecF ex, em;
  fast_exp_expm1(v, &ex, &em);
  return em;
}

template <>
inline void DmolVecMath<VecF>::exp_expm1(const VecF& v, VecF* ex, VecF* em) {
  fast_exp_expm1(v, ex, em);
}
#endif

// Gathers n (<= W) pixels' `rows` values (row stride rs, pixel stride ps, in elements) into
// buf[row * W + lane], the lanes past n zero.
template <typename scalar_t, typename acc_t, int64_t W>
void gather_tile(const scalar_t* src, int64_t rows, int64_t rs, int64_t ps, int64_t n, acc_t* buf) {
  if (ps == 1) {
    for (int64_t p = 0; p < rows; ++p) load_n(src + p * rs, n).store(buf + p * W);
    return;
  }
  if (n < W) std::fill(buf, buf + rows * W, acc_t(0));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < rows; ++p) buf[p * W + j] = static_cast<acc_t>(src[j * ps + p * rs]);
}

// The reverse: buf's first n lanes of every row to dst, in dst's strides.
template <typename scalar_t, typename acc_t, int64_t W>
void scatter_tile(const acc_t* buf, int64_t rows, int64_t rs, int64_t ps, int64_t n, scalar_t* dst) {
  using V = typename VecIO<scalar_t>::V;
  if (ps == 1) {
    for (int64_t p = 0; p < rows; ++p) store_n(dst + p * rs, V::loadu(buf + p * W), n);
    return;
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < rows; ++p) dst[j * ps + p * rs] = static_cast<scalar_t>(buf[p * W + j]);
}

// Tiles ahead of the one computed whose rows are prefetched (channels-first layouts). Each row of a
// tile is a separate stream (P of them for params, P more for the gradient, S elements apart):
// more than the hardware prefetchers follow, so without this each tile's gather (and the previous
// tile's scatter) waits a full memory latency. Two tiles ahead cover it at M = 1 too.
constexpr int64_t kDmolPrefetchTiles = 2;

// Prefetches into L2 (not L1: image rows 4 KiB apart all fall into one L1 set) the `rows` rows of a
// tile of W pixels whose pixels are contiguous (row stride rs elements): the line of each row's
// first element, and of its last where the rows are not all 64-byte aligned (a row may then
// straddle two lines). On x86 by inline asm: GCC 12 dropped __builtin_prefetch from some
// instantiations (dmol_chunk<float, 3, true>). A read prefetch serves the gradient's stores too:
// no other core holds those lines, so they arrive writable.
template <int64_t W, typename T>
inline void prefetch_tile_rows(const T* src, int64_t rows, int64_t rs) {
  constexpr int64_t kLast = W * static_cast<int64_t>(sizeof(T)) - 1;
  const bool aligned =
      kLast < 64 && (reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(rs * sizeof(T))) % 64 == 0;
  for (int64_t p = 0; p < rows; ++p) {
    const char* row = reinterpret_cast<const char*>(src + p * rs);
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    asm volatile("prefetcht1 %0" : : "m"(*row));
    if (!aligned) asm volatile("prefetcht1 %0" : : "m"(*(row + kLast)));
#elif defined(__GNUC__)
    __builtin_prefetch(row, 0, 2);
    if (!aligned) __builtin_prefetch(row + kLast, 0, 2);
#else
    (void)row;
    (void)aligned;
#endif
  }
}

// The NLL summed over pixels [s0, s1) of sample r; the gradient of those pixels when Grad.
template <typename scalar_t, int C, bool Grad>
double dmol_chunk(const DmolArgs& a, int64_t r, int64_t s0, int64_t s1, typename VecIO<scalar_t>::acc_t* pbuf,
                  typename VecIO<scalar_t>::acc_t* gbuf, typename VecIO<scalar_t>::acc_t* fbuf, bool* bad) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  using V = typename VecIO<scalar_t>::V;
  using M = DmolVecMath<V>;
  constexpr int64_t W = V::size();
  const int64_t nmix = a.nmix, np = nmix * (C == 3 ? 10 : 3);
  const auto* params = static_cast<const scalar_t*>(a.params) + r * a.p_sample;
  const auto* xs = static_cast<const scalar_t*>(a.x) + r * a.x_sample;
  auto* grad = Grad ? static_cast<acc_t*>(a.grad) + r * a.p_sample : nullptr;
  const DmolConsts<V> k{V(static_cast<acc_t>(dmol_half_bin(a.num_bits))),
                        V(static_cast<acc_t>(dmol_log_half_bins(a.num_bits))), V(static_cast<acc_t>(a.log_scale_min)),
                        dmol_narrow_bins(a.num_bits, a.log_scale_min)};
  const V scale(static_cast<acc_t>(a.grad_scale)), zero(0), edge(static_cast<acc_t>(kDmolEdge));
  V out_of_range(0);
  double total = 0.0;
  for (int64_t t0 = s0; t0 < s1; t0 += W) {
    const int64_t cnt = std::min(W, s1 - t0);
    // (into the sample's next chunk too: this thread's next chunk, usually)
    const int64_t ahead = t0 + kDmolPrefetchTiles * W;
    if (ahead < a.s) {
      if (a.p_pixel == 1) prefetch_tile_rows<W>(params + ahead, np, a.p_param);
      if (a.x_pixel == 1) prefetch_tile_rows<W>(xs + ahead, C, a.x_channel);
      if constexpr (Grad)
        if (a.p_pixel == 1) prefetch_tile_rows<W>(grad + ahead, np, a.p_param);
    }
    gather_tile<scalar_t, acc_t, W>(params + t0 * a.p_pixel, np, a.p_param, a.p_pixel, cnt, pbuf);
    acc_t xbuf[3 * W];
    gather_tile<scalar_t, acc_t, W>(xs + t0 * a.x_pixel, C, a.x_channel, a.x_pixel, cnt, xbuf);
    V x[C], left[C], right[C];
    for (int c = 0; c < C; ++c) {
      x[c] = V::loadu(xbuf + c * W);
      left[c] = x[c] < zero - edge;
      right[c] = x[c] > edge;
      out_of_range = out_of_range | (x[c] < V(-1)) | (x[c] > V(1));
    }
    const auto row = [&](int64_t p) { return V::loadu(pbuf + p * W); };
    // pass 1: each component's log-likelihood (to the logit's gradient slot) and local derivatives
    V vmax(-INFINITY), lmax(-INFINITY);
    for (int64_t m = 0; m < nmix; ++m) {
      V mean[C], sraw[C], coef[C], gmu[C], gs[C], alpha[C];
      for (int c = 0; c < C; ++c) {
        const int64_t pm = nmix * (1 + 3 * c) + m;
        mean[c] = row(pm);
        sraw[c] = row(pm + nmix);
        if constexpr (C == 3) coef[c] = row(pm + 2 * nmix);
      }
      const V logit = row(m);
      const V v = logit + dmol_component<M, C, Grad>(mean, sraw, coef, x, left, right, k, gmu, gs, alpha);
      v.store(gbuf + m * W);
      vmax = V::blendv(vmax, v, v > vmax);  // a NaN v is skipped here and reaches the sum below
      lmax = V::blendv(lmax, logit, logit > lmax);
      if constexpr (Grad) {
        for (int c = 0; c < C; ++c) {
          const int64_t pm = nmix * (1 + 3 * c) + m;
          gmu[c].store(gbuf + pm * W);
          gs[c].store(gbuf + (pm + nmix) * W);
          if constexpr (C == 3) alpha[c].store(gbuf + (pm + 2 * nmix) * W);
        }
      }
    }
    const V vshift = dmol_lse_shift<M>(vmax), lshift = dmol_lse_shift<M>(lmax);
    V sv(0), sl(0);
    for (int64_t m = 0; m < nmix; ++m) {
      // (no subnormal weights: dmol_exp_normal; the sums, at least 1, are the same)
      const V e = dmol_exp_normal<M>(V::loadu(gbuf + m * W) - vshift), f = dmol_exp_normal<M>(row(m) - lshift);
      sv = sv + e;
      sl = sl + f;
      if constexpr (Grad) {
        e.store(gbuf + m * W);
        f.store(fbuf + m * W);
      }
    }
    const V nll = (lshift + M::log(sl)) - (vshift + M::log(sv));
    total += hsum(cnt == W ? nll : V::set(zero, nll, cnt));
    if constexpr (Grad) {
      // pass 2: responsibilities r_m = e_m / sum e, softmax f_m / sum f, each 0 where it is below
      // exp(dmol_exp_floor) (as CUDA's dmol_exp_normal(v_m - logsumexp)): e_m < that times sum e
      const V inv_sv = V(1) / sv, inv_sl = V(1) / sl;
      const V least(static_cast<acc_t>(std::exp(dmol_exp_floor<V>())));
      const V e_floor = sv * least, f_floor = sl * least;
      for (int64_t m = 0; m < nmix; ++m) {
        const V e = V::loadu(gbuf + m * W), f = V::loadu(fbuf + m * W);
        const V resp = M::select(e < e_floor, zero, e) * inv_sv;
        (M::select(f < f_floor, zero, f) * inv_sl - resp).store(gbuf + m * W);
        V gmu[C], gs[C], alpha[C], g_mean[C], g_scale[C], g_coef[C];
        for (int c = 0; c < C; ++c) {
          const int64_t pm = nmix * (1 + 3 * c) + m;
          gmu[c] = V::loadu(gbuf + pm * W);
          gs[c] = V::loadu(gbuf + (pm + nmix) * W);
          if constexpr (C == 3) alpha[c] = V::loadu(gbuf + (pm + 2 * nmix) * W);
        }
        dmol_component_grads<M, C>(resp, gmu, gs, alpha, x, g_mean, g_scale, g_coef);
        for (int c = 0; c < C; ++c) {
          const int64_t pm = nmix * (1 + 3 * c) + m;
          g_mean[c].store(gbuf + pm * W);
          g_scale[c].store(gbuf + (pm + nmix) * W);
          if constexpr (C == 3) g_coef[c].store(gbuf + (pm + 2 * nmix) * W);
        }
      }
      if (a.grad_scale != 1.0)
        for (int64_t p = 0; p < np; ++p) (V::loadu(gbuf + p * W) * scale).store(gbuf + p * W);
      scatter_tile<acc_t, acc_t, W>(gbuf, np, a.p_param, a.p_pixel, cnt, grad + t0 * a.p_pixel);
    }
  }
  if (out_of_range.zero_mask() != (1 << W) - 1) *bad = true;  // a lane not 0: some x outside [-1, 1]
  return total;
}

template <typename scalar_t, int C, bool Grad>
void dmol_typed(const DmolArgs& a) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  constexpr int64_t W = VecIO<scalar_t>::V::size();
  const int64_t cpr = (a.s + kDmolChunk - 1) / kDmolChunk;  // chunks per sample
  const int64_t np = a.nmix * (C == 3 ? 10 : 3);
  std::vector<double> part(static_cast<size_t>(a.n * cpr));
  at::parallel_for(0, a.n * cpr, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> scratch(static_cast<size_t>((2 * np + a.nmix) * W));
    bool bad = false;
    for (int64_t u = b; u < e; ++u) {
      const int64_t r = u / cpr, c = u % cpr;
      part[u] = dmol_chunk<scalar_t, C, Grad>(a, r, c * kDmolChunk, std::min(a.s, (c + 1) * kDmolChunk),
                                              scratch.data(), scratch.data() + np * W,
                                              scratch.data() + 2 * np * W, &bad);
    }
    if (bad) a.bad_x->store(true, std::memory_order_relaxed);
  });
  for (int64_t r = 0; r < a.n; ++r) {
    double s = 0.0;
    for (int64_t c = 0; c < cpr; ++c) s += part[r * cpr + c];
    a.row_nll[r] = s;
  }
}

void dmol_kernel(const DmolArgs& a) {
  dispatch_dtype<c10::Half, c10::BFloat16>(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const bool grad = a.grad != nullptr;
    if (a.channels == 3)
      grad ? dmol_typed<scalar_t, 3, true>(a) : dmol_typed<scalar_t, 3, false>(a);
    else
      grad ? dmol_typed<scalar_t, 1, true>(a) : dmol_typed<scalar_t, 1, false>(a);
  });
}

// One sample per pixel, pixel by pixel (scalar: the sampler is cheap beside the loss). Each
// pixel's numbers depend only on (seed, offset, pixel index).
template <typename scalar_t, int C>
void dmol_sample_typed(const DmolSampleArgs& a) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  using M = DmolScalarMath<acc_t>;
  const auto* params = static_cast<const scalar_t*>(a.params);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t total = a.n * a.s;
  at::parallel_for(0, total, 256, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t r = q / a.s, s = q % a.s;
      const scalar_t* px = params + r * a.p_sample + s * a.p_pixel;
      const auto param = [&](int64_t p) { return static_cast<acc_t>(px[p * a.p_param]); };
      acc_t v[C];
      dmol_sample_pixel<M, C>(param, a.nmix, a.seed, a.offset, static_cast<uint64_t>(q),
                              static_cast<acc_t>(a.log_scale_min), v);
      for (int c = 0; c < C; ++c) out[(r * C + c) * a.s + s] = static_cast<scalar_t>(v[c]);
    }
  });
}

void dmol_sample_kernel(const DmolSampleArgs& a) {
  dispatch_dtype<c10::Half, c10::BFloat16>(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if (a.channels == 3)
      dmol_sample_typed<scalar_t, 3>(a);
    else
      dmol_sample_typed<scalar_t, 1>(a);
  });
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
