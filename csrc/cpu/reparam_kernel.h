// The reparameterize kernels, forward and backward, contiguous and channels_last: eps drawn from
// the Philox stream (normals.h) in tiles and recomputed in the backward.
#pragma once
#include "capability.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/dtype.h"
#include "../common/elbo_math.h"
#include "kernels.h"
#include "normals.h"
#include "vec_io.h"
#include "vec_math.h"

namespace vae_ext::cpu::CPU_CAPABILITY {

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
          if (full)
            IO::store(z + pos + j, zv);
          else
            IO::store(z + pos + j, zv, cnt);
          if (eps_out != nullptr) {
            if (full)
              IO::store(eps_out + pos + j, ev);
            else
              IO::store(eps_out + pos + j, ev, cnt);
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
          // g eps added with one rounding (an fma where the capability has one; nvcc contracts the
          // CUDA loop the same way), written out: the compiler's own contraction of a + b * c
          // depends on the code around it, and so did the result, from layout to layout
          at::vec::fmadd(gv, V::loadu(eps + j, cnt), V::loadu(sum_ge + j, cnt)).store(sum_ge + j, cnt);
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
void cl_eps_tile(uint64_t seed, uint64_t offset, int64_t base, const ClTiling& t, int64_t c0, int64_t tcn, int64_t s0,
                 int64_t tsn, float* tmp, acc_t* out) {
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
          if (full)
            IO::store(z + zi, zv);
          else
            IO::store(z + zi, zv, cnt);
          if (eps_out != nullptr) {
            if (full)
              IO::store(eps_out + zi, ev);
            else
              IO::store(eps_out + zi, ev, cnt);
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
  at::parallel_for(
      0, units, std::max<int64_t>(1, kGrainElems / (a.k * std::min(p, kClTile))), [&](int64_t b, int64_t e) {
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
                // one rounding, as in reparam_backward_typed
                at::vec::fmadd(gv, V::loadu(eps.data() + tile + j, cnt), V::loadu(sge, cnt)).store(sge, cnt);
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
  dispatch_dtype<c10::Half, c10::BFloat16>(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if (a.channels > 0)
      reparam_cl_typed<scalar_t>(a);
    else
      reparam_typed<scalar_t>(a);
  });
}

void reparam_backward_kernel(const ReparamBackwardArgs& a) {
  dispatch_dtype<c10::Half, c10::BFloat16>(a.dtype, [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if (a.channels > 0)
      reparam_backward_cl_typed<scalar_t>(a);
    else
      reparam_backward_typed<scalar_t>(a);
  });
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
