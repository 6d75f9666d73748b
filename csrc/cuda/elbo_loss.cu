// Fused ELBO loss on CUDA: one pass over recon/x writes the reconstruction gradient and a
// partial sum per (row, chunk); the KL rows ride in the same launch; a one-block second stage
// (elbo_finalize.cu) adds the partials in a fixed order (no floating-point atomics: run-to-run
// deterministic).
#include "../common/elbo_math.h"
#include "device_utils.cuh"
#include "elbo_layout.cuh"
#include "launchers.h"

#include <type_traits>

namespace vae_ext {
namespace cuda {
namespace {

// The math policy of the loss kernels: ScalarMath (libdevice's logf/log1pf, IEEE division).
// EXPERIMENT, off by default and never run on a GPU (docs/gpu.md): the forward looked
// compute-bound on the H100 (f32 and bf16 took the same time though bf16 moves half the bytes:
// docs/benchmarks.md, "Design measurements"), and the "bce" element costs ~88 SASS instructions,
// ~46 of them in logf/log1pf. Building with
//   NVCC_APPEND_FLAGS="-DVAE_EXT_FAST_LOG --prec-div=false"
// takes float logarithms from the SFU (__logf: abs. error ~1e-7 in [0.5, 2], 3 ulp elsewhere;
// log1p(v) as log(u) corrected by u's rounding error, u = 1 + v, as the CPU kernels do) and divides
// approximately (2 ulp). It is off because neither its accuracy against the tests' tolerances nor
// its speed has been measured.
template <typename A>
struct LossMath {
  using type = ScalarMath<A>;
};
#ifdef VAE_EXT_FAST_LOG
struct FastLogMath : ScalarMath<float> {
  static __device__ float log(float v) { return __logf(v); }
  static __device__ float log1p(float v) {
    const float u = 1.0f + v;
    return __logf(u) - ((u - 1.0f) - v) * (2.0f - u);
  }
};
template <>
struct LossMath<float> {
  using type = FastLogMath;
};
#endif

constexpr int kThreads = 256;
constexpr int kUnroll = 4;              // 16-byte vectors of each input loaded per thread before use
constexpr int64_t kScaleBlocks = 2048;  // 16 blocks per SM of a 128-SM GPU

// The piece of a row that unit k covers, for rows of `width` elements cut in `cpr` chunks.
struct Segment {
  int64_t base, len, col;  // first element (flat index), element count, and the first's column
};
__device__ __forceinline__ Segment segment(int64_t k, int64_t cpr, int64_t width) {
  const int64_t row = k / cpr, begin = (k % cpr) * kChunk;
  return {row * width + begin, (width - begin) < kChunk ? (width - begin) : kChunk, begin};
}

// What a loss kernel computes beside its dtype and mode, fixed at compile time. Each mode is
// instantiated with the variants it uses only (launch_elbo): 7 (mode, variant) pairs.
enum class Variant : int {
  Plain = 0,     // the mode's element; Gaussian: a log-variance per element (gaussian_elem)
  CheckRange,    // BCE with validate=True: also flags probabilities and targets outside [0, 1]
  ScalarLogvar,  // Gaussian with one log-variance: the partials sum q (gaussian_q_elem), and
                 // elbo_finalize turns each sum into the loss and the log-variance's gradient
};

// The KL of the latent elements [base, base + len) of one row (col: the column of the first), summed
// by this thread; writes their gradients (* scale) and, when asked for, each element's KL. With a
// prior (PRIOR), a shared one (l) is read at the column, a per-sample one (n, l) at the element.
template <typename T, bool PRIOR>
__device__ __forceinline__ typename Acc<T>::type kl_segment(const ElboLaunch& a, int64_t base, int64_t col, int64_t len,
                                                            typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  using M = typename LossMath<A>::type;
  const T* mu = static_cast<const T*>(a.mu) + base;
  const T* lv = static_cast<const T*>(a.logvar) + base;
  // the gradients and kl_elems in the accumulation type (float for half types; launchers.h)
  A* gmu = a.grad_mu ? static_cast<A*>(a.grad_mu) + base : nullptr;
  A* glv = a.grad_logvar ? static_cast<A*>(a.grad_logvar) + base : nullptr;
  A* kel = a.kl_elems ? static_cast<A*>(a.kl_elems) + base : nullptr;
  A acc = A(0);
  if constexpr (PRIOR) {
    const int64_t at = a.prior_shared ? col : base;
    const T* pmu = static_cast<const T*>(a.prior_mu) + at;
    const T* plv = static_cast<const T*>(a.prior_logvar) + at;
    A* gpmu = a.grad_prior_mu ? static_cast<A*>(a.grad_prior_mu) + base : nullptr;
    A* gplv = a.grad_prior_logvar ? static_cast<A*>(a.grad_prior_logvar) + base : nullptr;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      A gm, gl, gp;
      const A k = kl_prior_elem<M>(to_acc(mu[i]), to_acc(lv[i]), to_acc(pmu[i]), to_acc(plv[i]), &gm, &gl, &gp);
      acc += k;
      if (kel) kel[i] = k;
      if (gmu) {
        gmu[i] = gm * scale;
        glv[i] = gl * scale;
      }
      if (gpmu) {
        gpmu[i] = -(gm * scale);  // d KL / d prior_mu = -(d KL / d mu)
        gplv[i] = gp * scale;
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      A gm, gl;
      const A k = kl_elem<M>(to_acc(mu[i]), to_acc(lv[i]), &gm, &gl);
      acc += k;
      if (kel) kel[i] = k;
      if (gmu) {
        gmu[i] = gm * scale;
        glv[i] = gl * scale;
      }
    }
  }
  return acc;
}

// Blocks of kThreads per SM that a loss kernel must fit (__launch_bounds__' second argument; 0: ptxas
// chooses). ptxas's own choice for the float64 kernels, whose log and exp take many registers, made
// some of them spill a few bytes; at 2 (at most 128 registers) none does.
template <typename T>
constexpr int kMinBlocks = std::is_same_v<T, double> ? 2 : 0;

// The VEC gradients of one vector of elements to g, in the accumulation type: as 16-byte stores
// where VEC fills them (g + 0 then 16-byte aligned, launch_partials_aligned), one by one otherwise.
template <typename A, int VEC>
__device__ __forceinline__ void store_grads(A* g, const A (&v)[VEC]) {
  constexpr int kPer = static_cast<int>(16 / sizeof(A));
  if constexpr (VEC % kPer == 0) {
#pragma unroll
    for (int k = 0; k < VEC / kPer; ++k) {
      Vec<A, kPer> w;
#pragma unroll
      for (int j = 0; j < kPer; ++j) w.v[j] = v[k * kPer + j];
      reinterpret_cast<Vec<A, kPer>*>(g)[k] = w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = v[j];
  }
}

template <typename T, int VEC, Recon mode, Variant V>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    elbo_partials(ElboLaunch a, Layout u, double* part_rec, double* part_kl) {
  using A = typename Acc<T>::type;
  using M = typename LossMath<A>::type;
  using TV = Vec<T, VEC>;
  constexpr bool kCheck = V == Variant::CheckRange;
  constexpr bool kRlv = mode == Recon::Gaussian && V == Variant::Plain;  // a log-variance per element
  constexpr bool kScalarRlv = V == Variant::ScalarLogvar;
  static_assert(!kCheck || mode == Recon::BCE, "CheckRange is BCE's");
  static_assert(!kScalarRlv || mode == Recon::Gaussian, "ScalarLogvar is Gaussian's");
  const A scale = static_cast<A>(a.grad_scale);
  A inv = A(0);  // ScalarLogvar: exp(-rlv), the same for every element
  if constexpr (kScalarRlv) inv = M::exp(M::fill(0.0) - to_acc(*static_cast<const T*>(a.recon_logvar)));
  const int64_t total = u.rec_units + u.kl_units;
  // ScalarLogvar: each thread sums q / 2 in double (rlv's gradient, count / 2 minus that sum, is
  // scaled by grad_output later and may be finite where a float sum would be inf), as the CPU's lanes
  using S = std::conditional_t<kScalarRlv, double, A>;
  for (int64_t unit = blockIdx.x; unit < total; unit += gridDim.x) {
    S acc = S(0);
    bool bad = false, bad_x = false;
    if (unit < u.rec_units) {
      const auto [base, len, col] = segment(unit, u.rec_cpr, a.d);
      const T* r = static_cast<const T*>(a.recon) + base;
      const T* x = static_cast<const T*>(a.x) + base;
      // the gradients in the accumulation type (float for half types: launchers.h)
      A* g = a.grad_recon ? static_cast<A*>(a.grad_recon) + base : nullptr;
      // kRlv: the log-variance and its gradient, laid out as recon and its gradient
      const T* s = kRlv ? static_cast<const T*>(a.recon_logvar) + base : nullptr;
      A* gs = (kRlv && a.grad_recon_logvar) ? static_cast<A*>(a.grad_recon_logvar) + base : nullptr;
      // The loss (ScalarLogvar: q) of one element, added to acc; its gradients * scale go to *gr
      // and (kRlv) *gsv.
      auto one = [&](A rv, A xv, A sv, A* gr, A* gsv) {
        A lv;
        if constexpr (kRlv) {
          lv = gaussian_elem<M>(rv, xv, sv, gr, gsv);
          *gsv *= scale;
        } else if constexpr (kScalarRlv) {
          lv = gaussian_q_elem<M>(rv, xv, inv, gr);
        } else {
          lv = recon_elem<mode, M>(rv, xv, gr);
        }
        if constexpr (kCheck) {
          bad |= static_cast<bool>(prob_out_of_range<M>(rv));
          bad_x |= static_cast<bool>(prob_out_of_range<M>(xv));
        }
        acc += static_cast<S>(lv);
        *gr *= scale;
      };
      auto at = [&](int64_t i) {  // one element outside the vectors
        A gr, gsv;
        if constexpr (kRlv)
          one(to_acc(r[i]), to_acc(x[i]), to_acc(s[i]), &gr, &gsv);
        else
          one(to_acc(r[i]), to_acc(x[i]), A(0), &gr, &gsv);
        if (g) g[i] = gr;
        if constexpr (kRlv) {
          if (gs) gs[i] = gsv;
        }
      };
      int64_t head = 0;
      if (VEC > 1) {  // scalar elements up to the first 16-byte boundary (the other streams share r's alignment)
        const uintptr_t addr = reinterpret_cast<uintptr_t>(r);
        head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(T));
        if (head > len) head = len;
      }
      for (int64_t i = threadIdx.x; i < head; i += blockDim.x) at(i);
      const int64_t nvec = (len - head) / VEC;
      const auto* rv = reinterpret_cast<const TV*>(r + head);
      const auto* xv = reinterpret_cast<const TV*>(x + head);
      const auto* sv = kRlv ? reinterpret_cast<const TV*>(s + head) : nullptr;
      A* gvec = g ? g + head : nullptr;  // vector v's gradients start at gvec + v * VEC
      A* gsvec = gs ? gs + head : nullptr;
      // kUnroll vectors of each input per thread are loaded before the first is used, so that
      // enough bytes are in flight to keep HBM busy; the elements are still summed in the order of
      // the plain loop (v, v + blockDim.x, ...).
      auto body = [&](const TV& rr, const TV& xx, const TV& ss, int64_t v) {
        A gg[VEC], gl[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if constexpr (kRlv)
            one(to_acc(rr.v[j]), to_acc(xx.v[j]), to_acc(ss.v[j]), &gg[j], &gl[j]);
          else
            one(to_acc(rr.v[j]), to_acc(xx.v[j]), A(0), &gg[j], &gl[j]);
        }
        if (gvec) store_grads<A, VEC>(gvec + v * VEC, gg);
        if constexpr (kRlv) {
          if (gsvec) store_grads<A, VEC>(gsvec + v * VEC, gl);
        }
      };
      const int64_t stride = blockDim.x;
      int64_t v = threadIdx.x;
      for (; v + (kUnroll - 1) * stride < nvec; v += kUnroll * stride) {
        TV rr[kUnroll], xx[kUnroll], ss[kRlv ? kUnroll : 1];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          rr[k] = rv[v + k * stride];
          xx[k] = xv[v + k * stride];
          if constexpr (kRlv) ss[k] = sv[v + k * stride];
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) body(rr[k], xx[k], ss[kRlv ? k : 0], v + k * stride);
      }
      for (; v < nvec; v += stride) {
        if constexpr (kRlv)
          body(rv[v], xv[v], sv[v], v);
        else
          body(rv[v], xv[v], TV{}, v);  // no log-variance: the third vector is not read
      }
      for (int64_t i = head + nvec * VEC + threadIdx.x; i < len; i += blockDim.x) at(i);
    } else {
      const auto [base, len, col] = segment(unit - u.rec_units, u.kl_cpr, a.l);
      // One branch per unit, the same for the whole grid: each path's loop is specialized.
      acc = a.prior_mu ? kl_segment<T, true>(a, base, col, len, scale) : kl_segment<T, false>(a, base, col, len, scale);
    }
    const S sum = block_sum(acc);
    if constexpr (kCheck) {
      const int flags = (__syncthreads_or(bad) ? 1 : 0) | (__syncthreads_or(bad_x) ? 2 : 0);
      if (flags && threadIdx.x == 0) atomicOr(a.bad_flag, flags);
    }
    if (threadIdx.x == 0) {
      if (unit < u.rec_units)
        part_rec[unit] = static_cast<double>(sum);
      else
        part_kl[unit - u.rec_units] = static_cast<double>(sum);
    }
    __syncthreads();  // block_sum's shared memory is reused by the next unit
  }
}

template <typename T, int VEC, Recon mode, Variant V>
void launch_partials(const ElboLaunch& a, const Layout& u, double* part_rec, double* part_kl, cudaStream_t s) {
  const int64_t total = u.rec_units + u.kl_units;
  const unsigned grid = static_cast<unsigned>(total < (1LL << 31) - 1 ? total : (1LL << 31) - 1);
  elbo_partials<T, VEC, mode, V><<<grid, kThreads, 0, s>>>(a, u, part_rec, part_kl);
}

// 16-byte vectors when every (n, d) input shares recon's alignment and it is a whole element, and
// each gradient (in the accumulation type, whose 16-byte vectors hold fewer elements for half
// types) has its 16-byte boundaries at the same elements.
template <typename T, Recon mode, Variant V>
void launch_partials_aligned(const ElboLaunch& a, const Layout& u, double* pr, double* pk, cudaStream_t s) {
  using A = typename Acc<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  const auto mis = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
  // where p's elements of `size` bytes sit on the grid of n-element steps: two arrays of the same
  // phase reach a boundary of that grid at the same element index
  const auto phase = [](const void* p, size_t size, size_t n) { return (reinterpret_cast<uintptr_t>(p) / size) % n; };
  const auto grad_like_recon = [&](const void* p) {
    constexpr size_t kPer = 16 / sizeof(A);  // gradient elements per 16-byte store
    const bool whole = reinterpret_cast<uintptr_t>(p) % sizeof(A) == 0;
    return p == nullptr || (whole && phase(p, sizeof(A), kPer) == phase(a.recon, sizeof(T), kPer));
  };
  bool same = mis(a.recon) == mis(a.x) && grad_like_recon(a.grad_recon);
  if (mode == Recon::Gaussian && V == Variant::Plain)
    same = same && mis(a.recon_logvar) == mis(a.recon) && grad_like_recon(a.grad_recon_logvar);
  if (same && mis(a.recon) % sizeof(T) == 0)
    launch_partials<T, kVec, mode, V>(a, u, pr, pk, s);
  else
    launch_partials<T, 1, mode, V>(a, u, pr, pk, s);
}

struct ScaleJobs {
  ScaleJob job[kMaxScaleJobs];
  int count;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_unless_one(ScaleJobs jobs) {
  using A = typename Acc<T>::type;
  // Unrolled over the fixed capacity: constant indices keep jobs in parameter space (a loop to
  // jobs.count indexes it at run time, which copies the struct to a local-memory stack frame).
#pragma unroll
  for (int k = 0; k < kMaxScaleJobs; ++k) {
    if (k >= jobs.count) break;
    const A sv = *static_cast<const A*>(jobs.job[k].s);  // the loss dtype: float for half g, never rounded to T
    if (sv == A(1)) continue;                            // loss.backward(): grad_output is exactly 1, nothing to do
    T* g = static_cast<T*>(jobs.job[k].g);
    const int64_t n = jobs.job[k].n;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
      g[i] = from_acc<T>(to_acc(g[i]) * sv);
  }
}

}  // namespace

cudaError_t launch_scale_unless_one(DType dtype, const ScaleJob* jobs, int count, cudaStream_t stream) {
  ScaleJobs all{};
  int64_t most = 0;
  for (int k = 0; k < count && k < kMaxScaleJobs; ++k) {
    if (jobs[k].n == 0) continue;
    all.job[all.count++] = jobs[k];
    most = jobs[k].n > most ? jobs[k].n : most;
  }
  if (all.count == 0) return cudaSuccess;
  dispatch_dtype<__half, __nv_bfloat16>(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // Grid-stride over at most kScaleBlocks blocks: when every *s == 1 each block only reads them
    // and exits, and a grid of n / 256 blocks (65536 at 16M elements) would cost microseconds for that.
    scale_unless_one<T><<<blocks_for(most, kThreads, kScaleBlocks), kThreads, 0, stream>>>(all);
  });
  return cudaGetLastError();
}

size_t elbo_workspace_bytes(int64_t n, int64_t d, int64_t l) {
  const Layout u = layout(n, d, l);
  return static_cast<size_t>(u.rec_units + u.kl_units) * sizeof(double);
}

cudaError_t launch_elbo(const ElboLaunch& a, cudaStream_t s) {
  const Layout u = layout(a.n, a.d, a.l);
  double* part_rec = static_cast<double*>(a.workspace);
  double* part_kl = part_rec + u.rec_units;
  dispatch_dtype<__half, __nv_bfloat16>(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (u.rec_units + u.kl_units > 0) {
      switch (a.mode) {
        case Recon::BCE:
          if (a.bad_flag != nullptr)
            launch_partials_aligned<T, Recon::BCE, Variant::CheckRange>(a, u, part_rec, part_kl, s);
          else
            launch_partials_aligned<T, Recon::BCE, Variant::Plain>(a, u, part_rec, part_kl, s);
          break;
        case Recon::BCELogits:
          launch_partials_aligned<T, Recon::BCELogits, Variant::Plain>(a, u, part_rec, part_kl, s);
          break;
        case Recon::MSE: launch_partials_aligned<T, Recon::MSE, Variant::Plain>(a, u, part_rec, part_kl, s); break;
        case Recon::L1: launch_partials_aligned<T, Recon::L1, Variant::Plain>(a, u, part_rec, part_kl, s); break;
        case Recon::Gaussian:
          if (a.rlv_scalar)
            launch_partials_aligned<T, Recon::Gaussian, Variant::ScalarLogvar>(a, u, part_rec, part_kl, s);
          else
            launch_partials_aligned<T, Recon::Gaussian, Variant::Plain>(a, u, part_rec, part_kl, s);
          break;
      }
    }
  });
  return launch_elbo_finalize(a, u, part_rec, part_kl, s);
}

}  // namespace cuda
}  // namespace vae_ext
