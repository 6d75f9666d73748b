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

// The forward's step, in either layout: z (and eps, when returned) of cnt <= W elements at zi of z,
// from mu and logvar at mi and the tile's eps at ep.
template <typename scalar_t>
struct ReparamStep {
  using V = typename VecIO<scalar_t>::V;
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const scalar_t* mu;
  const scalar_t* lv;
  scalar_t* z;
  scalar_t* eps_out;
  explicit ReparamStep(const ReparamArgs& a)
      : mu(static_cast<const scalar_t*>(a.mu)),
        lv(static_cast<const scalar_t*>(a.logvar)),
        z(static_cast<scalar_t*>(a.z)),
        eps_out(static_cast<scalar_t*>(a.eps)) {}
  void operator()(int64_t mi, int64_t zi, const acc_t* ep, int64_t cnt) const {
    const V ev = V::loadu(ep, cnt);
    store_n(z + zi, reparam_z<VecMath<V>>(load_n(mu + mi, cnt), load_n(lv + mi, cnt), ev), cnt);
    if (eps_out != nullptr) store_n(eps_out + zi, ev, cnt);
  }
};

// The backward's steps, in either layout, on cnt <= W elements: the sums over the samples of g and
// g eps, and the gradients from them.
template <typename scalar_t>
struct ReparamBackwardStep {
  using V = typename VecIO<scalar_t>::V;
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const scalar_t* gz;
  const scalar_t* lv;
  scalar_t* gmu;
  scalar_t* glv;
  explicit ReparamBackwardStep(const ReparamBackwardArgs& a)
      : gz(static_cast<const scalar_t*>(a.grad_z)),
        lv(static_cast<const scalar_t*>(a.logvar)),
        gmu(static_cast<scalar_t*>(a.grad_mu)),
        glv(static_cast<scalar_t*>(a.grad_logvar)) {}
  // sum_g += g and sum_ge += g eps, for g at element gi of grad_z and eps at ep. The product is
  // added with one rounding (an fma where the capability has one, as on CUDA) in every layout:
  // written out, not left to the compiler, whose contraction of a * b + c depends on the code
  // around it.
  void accumulate(int64_t gi, const acc_t* ep, acc_t* sum_g, acc_t* sum_ge, int64_t cnt) const {
    const V gv = load_n(gz + gi, cnt);
    (V::loadu(sum_g, cnt) + gv).store(sum_g, cnt);
    at::vec::fmadd(gv, V::loadu(ep, cnt), V::loadu(sum_ge, cnt)).store(sum_ge, cnt);
  }
  // Elements [i, i + cnt) of the gradients: grad_mu = gm (sum_s g_s), grad_logvar from sum_s g_s eps_s.
  void write(int64_t i, const V& gm, const V& sum_ge, int64_t cnt) const {
    const V gl = reparam_grad_logvar<VecMath<V>>(load_n(lv + i, cnt), sum_ge);
    if (gmu) store_n(gmu + i, gm, cnt);
    store_n(glv + i, gl, cnt);
  }
  void write(int64_t i, const acc_t* sum_g, const acc_t* sum_ge, int64_t cnt) const {
    write(i, V::loadu(sum_g, cnt), V::loadu(sum_ge, cnt), cnt);
  }
  // One sample: the gradients straight from grad_z and the eps at ep, no sums.
  void one_sample(int64_t i, const acc_t* ep, int64_t cnt) const {
    const V gv = load_n(gz + i, cnt);
    write(i, gv, gv * V::loadu(ep, cnt), cnt);
  }
};

template <typename scalar_t>
void reparam_typed(const ReparamArgs& a) {
  const ReparamStep<scalar_t> step(a);
  using acc_t = typename decltype(step)::acc_t;
  constexpr int64_t W = decltype(step)::V::size();
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
        for (int64_t j = 0; j < run; j += W) step(i0 + j, pos + j, ep + j, std::min(W, run - j));
        pos += run;
      }
    }
  });
}

template <typename scalar_t>
void reparam_backward_typed(const ReparamBackwardArgs& a) {
  const ReparamBackwardStep<scalar_t> step(a);
  using acc_t = typename decltype(step)::acc_t;
  constexpr int64_t W = decltype(step)::V::size();
  const int64_t numel = a.numel;
  at::parallel_for(0, numel, std::max<int64_t>(1, kGrainElems / a.k), [&](int64_t b, int64_t e) {
    acc_t eps[kTile], sum_g[kTile], sum_ge[kTile];
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int64_t tlen = std::min(kTile, e - t0);
      if (a.k == 1) {  // one sample: straight from grad_z and eps, no per-sample sums
        eps_tile<scalar_t, acc_t>(a.seed, a.offset, t0, tlen, eps);
        for (int64_t j = 0; j < tlen; j += W) step.one_sample(t0 + j, eps + j, std::min(W, tlen - j));
        continue;
      }
      std::fill(sum_g, sum_g + tlen, acc_t(0));
      std::fill(sum_ge, sum_ge + tlen, acc_t(0));
      for (int64_t s = 0; s < a.k; ++s) {  // samples in order: a fixed summation order
        eps_tile<scalar_t, acc_t>(a.seed, a.offset, s * numel + t0, tlen, eps);
        for (int64_t j = 0; j < tlen; j += W)
          step.accumulate(s * numel + t0 + j, eps + j, sum_g + j, sum_ge + j, std::min(W, tlen - j));
      }
      for (int64_t j = 0; j < tlen; j += W) step.write(t0 + j, sum_g + j, sum_ge + j, std::min(W, tlen - j));
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

  // Tile u of a run of blocks: block blk, channels [c0, c0 + tcn) x positions [s0, s0 + tsn).
  struct Tile {
    int64_t blk, c0, tcn, s0, tsn;
  };
  Tile tile(int64_t u) const {
    const int64_t r = u % per_block();
    const int64_t c0 = (r / tiles_s) * tc, s0 = (r % tiles_s) * ts;
    return {u / per_block(), c0, std::min(tc, c - c0), s0, std::min(ts, s - s0)};
  }
};

// The eps of one tile in memory order (out[j * tcn + i] for position s0 + j, channel c0 + i), from
// the logical stream starting at `base` (the block's first logical element), rounded to scalar_t
// as eps_tile does. tmp: kClTile floats.
template <typename scalar_t, typename acc_t>
void cl_eps_tile(uint64_t seed, uint64_t offset, int64_t base, const ClTiling& t, const ClTiling::Tile& u, float* tmp,
                 acc_t* out) {
  if (u.tsn == t.s) {
    fill_normals(seed, offset, base + u.c0 * t.s, u.tcn * u.tsn, tmp);  // whole channels: one logical run
  } else {
    for (int64_t i = 0; i < u.tcn; ++i)
      fill_normals(seed, offset, base + (u.c0 + i) * t.s + u.s0, u.tsn, tmp + i * u.tsn);
  }
  for (int64_t j = 0; j < u.tsn; ++j)
    for (int64_t i = 0; i < u.tcn; ++i)
      out[j * u.tcn + i] = static_cast<acc_t>(static_cast<scalar_t>(tmp[i * u.tsn + j]));
}

// Calls fn(mem, tile, cnt) for the vectors of a tile's memory runs: `mem` the offset in the block,
// `tile` the offset in the tile's memory-order buffer, cnt <= W elements.
template <int64_t W, class F>
void cl_vectors(const ClTiling& t, const ClTiling::Tile& u, const F& fn) {
  const auto run = [&](int64_t mem, int64_t tile, int64_t len) {
    for (int64_t j = 0; j < len; j += W) fn(mem + j, tile + j, std::min(W, len - j));
  };
  if (u.tcn == t.c) {
    run(u.s0 * t.c, 0, u.tsn * t.c);
    return;
  }
  for (int64_t j = 0; j < u.tsn; ++j) run((u.s0 + j) * t.c + u.c0, j * u.tcn, u.tcn);
}

template <typename scalar_t>
void reparam_cl_typed(const ReparamArgs& a) {
  const ReparamStep<scalar_t> step(a);
  using acc_t = typename decltype(step)::acc_t;
  constexpr int64_t W = decltype(step)::V::size();
  const ClTiling t(a.channels, a.spatial);
  const int64_t p = t.c * t.s, blocks = a.k * (a.numel / p), units = blocks * t.per_block();
  at::parallel_for(0, units, std::max<int64_t>(1, kGrainElems / std::min(p, kClTile)), [&](int64_t b, int64_t e) {
    std::vector<float> tmp(kClTile);
    std::vector<acc_t> eps(kClTile);
    for (int64_t u = b; u < e; ++u) {
      const ClTiling::Tile tile = t.tile(u);
      const int64_t zbase = tile.blk * p, mbase = zbase % a.numel;  // z block (k, n); mu block n
      cl_eps_tile<scalar_t, acc_t>(a.seed, a.offset, zbase, t, tile, tmp.data(), eps.data());
      cl_vectors<W>(t, tile, [&](int64_t mem, int64_t off, int64_t cnt) {
        step(mbase + mem, zbase + mem, eps.data() + off, cnt);
      });
    }
  });
}

template <typename scalar_t>
void reparam_backward_cl_typed(const ReparamBackwardArgs& a) {
  const ReparamBackwardStep<scalar_t> step(a);
  using acc_t = typename decltype(step)::acc_t;
  constexpr int64_t W = decltype(step)::V::size();
  const ClTiling t(a.channels, a.spatial);
  const int64_t p = t.c * t.s, units = (a.numel / p) * t.per_block();
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (a.k * std::min(p, kClTile)));
  at::parallel_for(0, units, grain, [&](int64_t b, int64_t e) {
    std::vector<float> tmp(kClTile);
    std::vector<acc_t> eps(kClTile), sum_g(kClTile), sum_ge(kClTile);
    for (int64_t u = b; u < e; ++u) {
      const ClTiling::Tile tile = t.tile(u);
      const int64_t mbase = tile.blk * p;
      std::fill(sum_g.begin(), sum_g.begin() + tile.tcn * tile.tsn, acc_t(0));
      std::fill(sum_ge.begin(), sum_ge.begin() + tile.tcn * tile.tsn, acc_t(0));
      for (int64_t k = 0; k < a.k; ++k) {  // samples in order: a fixed summation order
        const int64_t zbase = k * a.numel + mbase;
        cl_eps_tile<scalar_t, acc_t>(a.seed, a.offset, zbase, t, tile, tmp.data(), eps.data());
        cl_vectors<W>(t, tile, [&](int64_t mem, int64_t off, int64_t cnt) {
          step.accumulate(zbase + mem, eps.data() + off, sum_g.data() + off, sum_ge.data() + off, cnt);
        });
      }
      cl_vectors<W>(t, tile, [&](int64_t mem, int64_t off, int64_t cnt) {
        step.write(mbase + mem, sum_g.data() + off, sum_ge.data() + off, cnt);
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
