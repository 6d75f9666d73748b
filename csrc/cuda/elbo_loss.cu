// Fused ELBO loss on CUDA: one pass over recon/x writes the reconstruction gradient and a
// partial sum per (row, chunk); the KL rows ride in the same launch; a one-block second stage adds
// the partials in a fixed order (no floating-point atomics: run-to-run deterministic).
#include "../common/elbo_math.h"
#include "device_utils.cuh"
#include "launchers.h"

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
constexpr int kFinalizeThreads = 1024;
constexpr int64_t kChunk = 16384;       // elements of one row per block
constexpr int kUnroll = 4;              // 16-byte vectors of each input loaded per thread before use
constexpr int64_t kScaleBlocks = 2048;  // 16 blocks per SM of a 128-SM GPU

struct Layout {
  int64_t rec_cpr, kl_cpr, rec_units, kl_units;  // chunks per row and units of each part
};

// The piece of a row that unit k covers, for rows of `width` elements cut in `cpr` chunks.
struct Segment {
  int64_t base, len;  // first element (flat index) and element count
};
__device__ __forceinline__ Segment segment(int64_t k, int64_t cpr, int64_t width) {
  const int64_t row = k / cpr, begin = (k % cpr) * kChunk;
  return {row * width + begin, (width - begin) < kChunk ? (width - begin) : kChunk};
}

inline Layout layout(int64_t n, int64_t d, int64_t l) {
  Layout u;
  u.rec_cpr = d > 0 ? (d + kChunk - 1) / kChunk : 1;
  u.kl_cpr = l > 0 ? (l + kChunk - 1) / kChunk : 1;
  u.rec_units = n * u.rec_cpr;
  u.kl_units = n * u.kl_cpr;
  return u;
}

template <typename T, int VEC, Recon mode, bool CHECK>
__global__ void __launch_bounds__(kThreads) elbo_partials(ElboLaunch a, Layout u, double* part_rec, double* part_kl) {
  using A = typename Acc<T>::type;
  using M = typename LossMath<A>::type;
  const A scale = static_cast<A>(a.grad_scale);
  const int64_t total = u.rec_units + u.kl_units;
  for (int64_t unit = blockIdx.x; unit < total; unit += gridDim.x) {
    A acc = A(0);
    bool bad = false, bad_x = false;
    if (unit < u.rec_units) {
      const auto [base, len] = segment(unit, u.rec_cpr, a.d);
      const T* r = static_cast<const T*>(a.recon) + base;
      const T* x = static_cast<const T*>(a.x) + base;
      T* g = a.grad_recon ? static_cast<T*>(a.grad_recon) + base : nullptr;
      auto one = [&](A rv, A xv) -> A {  // loss of one element; the gradient goes to *gv
        A gv;
        const A lv = recon_elem<mode, M>(rv, xv, &gv);
        if (CHECK) {
          bad |= static_cast<bool>(prob_out_of_range<M>(rv));
          bad_x |= static_cast<bool>(prob_out_of_range<M>(xv));
        }
        acc += lv;
        return gv * scale;
      };
      int64_t head = 0;
      if (VEC > 1) {  // scalar elements up to the first 16-byte boundary (x and g share r's alignment)
        const uintptr_t addr = reinterpret_cast<uintptr_t>(r);
        head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(T));
        if (head > len) head = len;
      }
      for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
        const A gv = one(to_acc(r[i]), to_acc(x[i]));
        if (g) g[i] = from_acc<T>(gv);
      }
      const int64_t nvec = (len - head) / VEC;
      const auto* rv = reinterpret_cast<const Vec<T, VEC>*>(r + head);
      const auto* xv = reinterpret_cast<const Vec<T, VEC>*>(x + head);
      auto* gvec = g ? reinterpret_cast<Vec<T, VEC>*>(g + head) : nullptr;
      // kUnroll vectors of r and of x per thread are loaded before the first is used, so that
      // enough bytes are in flight to keep HBM busy; the elements are still summed in the order of
      // the plain loop (v, v + blockDim.x, ...).
      auto body = [&](const Vec<T, VEC>& rr, const Vec<T, VEC>& xx, int64_t v) {
        Vec<T, VEC> gg;
#pragma unroll
        for (int j = 0; j < VEC; ++j) gg.v[j] = from_acc<T>(one(to_acc(rr.v[j]), to_acc(xx.v[j])));
        if (gvec) gvec[v] = gg;
      };
      const int64_t stride = blockDim.x;
      int64_t v = threadIdx.x;
      for (; v + (kUnroll - 1) * stride < nvec; v += kUnroll * stride) {
        Vec<T, VEC> rr[kUnroll], xx[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          rr[u] = rv[v + u * stride];
          xx[u] = xv[v + u * stride];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) body(rr[u], xx[u], v + u * stride);
      }
      for (; v < nvec; v += stride) body(rv[v], xv[v], v);
      for (int64_t i = head + nvec * VEC + threadIdx.x; i < len; i += blockDim.x) {
        const A gv = one(to_acc(r[i]), to_acc(x[i]));
        if (g) g[i] = from_acc<T>(gv);
      }
    } else {
      const auto [base, len] = segment(unit - u.rec_units, u.kl_cpr, a.l);
      const T* mu = static_cast<const T*>(a.mu) + base;
      const T* lv = static_cast<const T*>(a.logvar) + base;
      // the latent gradients in the accumulation type (float for half types; launchers.h)
      A* gmu = a.grad_mu ? static_cast<A*>(a.grad_mu) + base : nullptr;
      A* glv = a.grad_logvar ? static_cast<A*>(a.grad_logvar) + base : nullptr;
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        A gm, gl;
        acc += kl_elem<M>(to_acc(mu[i]), to_acc(lv[i]), &gm, &gl);
        if (gmu) {
          gmu[i] = gm * scale;
          glv[i] = gl * scale;
        }
      }
    }
    const A sum = block_sum(acc);
    if (CHECK) {
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

// kl_out == nullptr: the caller wants the total, rec_out gets rec + kl (ElboLaunch::kl_out).
template <typename OutT>
__global__ void __launch_bounds__(kFinalizeThreads)
    elbo_finalize(const double* part_rec, const double* part_kl, int64_t n, Layout u, Reduction red, OutT* rec_out,
                  OutT* kl_out) {
  double sr = 0.0, sk = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    double r = 0.0, k = 0.0;
    for (int64_t c = 0; c < u.rec_cpr; ++c) r += part_rec[i * u.rec_cpr + c];
    for (int64_t c = 0; c < u.kl_cpr; ++c) k += part_kl[i * u.kl_cpr + c];
    if (red == Reduction::None) {
      if (kl_out) {
        rec_out[i] = static_cast<OutT>(r);
        kl_out[i] = static_cast<OutT>(k);
      } else {
        rec_out[i] = static_cast<OutT>(r + k);
      }
    }
    sr += r;
    sk += k;
  }
  if (red == Reduction::None) return;
  sr = block_sum(sr);
  __syncthreads();
  sk = block_sum(sk);
  if (threadIdx.x == 0) {
    if (red == Reduction::Mean) {  // 0 / 0 = NaN for an empty batch, as Tensor.mean()
      sr /= static_cast<double>(n);
      sk /= static_cast<double>(n);
    }
    if (kl_out) {
      rec_out[0] = static_cast<OutT>(sr);
      kl_out[0] = static_cast<OutT>(sk);
    } else {
      rec_out[0] = static_cast<OutT>(sr + sk);
    }
  }
}

template <typename T, int VEC, Recon mode>
void launch_partials(const ElboLaunch& a, const Layout& u, double* part_rec, double* part_kl, cudaStream_t s) {
  const int64_t total = u.rec_units + u.kl_units;
  const unsigned grid = static_cast<unsigned>(total < (1LL << 31) - 1 ? total : (1LL << 31) - 1);
  if (mode == Recon::BCE && a.bad_flag != nullptr)
    elbo_partials<T, VEC, mode, true><<<grid, kThreads, 0, s>>>(a, u, part_rec, part_kl);
  else
    elbo_partials<T, VEC, mode, false><<<grid, kThreads, 0, s>>>(a, u, part_rec, part_kl);
}

template <typename T, Recon mode>
void launch_partials_aligned(const ElboLaunch& a, const Layout& u, double* pr, double* pk, cudaStream_t s) {
  constexpr int kVec = 16 / sizeof(T);
  const auto mis = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
  const bool same = mis(a.recon) == mis(a.x) && (a.grad_recon == nullptr || mis(a.grad_recon) == mis(a.recon));
  if (same && mis(a.recon) % sizeof(T) == 0)
    launch_partials<T, kVec, mode>(a, u, pr, pk, s);
  else
    launch_partials<T, 1, mode>(a, u, pr, pk, s);
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
  if (u.rec_units + u.kl_units > 0) {
    dispatch_dtype<__half, __nv_bfloat16>(a.dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      switch (a.mode) {
        case Recon::BCE: launch_partials_aligned<T, Recon::BCE>(a, u, part_rec, part_kl, s); break;
        case Recon::BCELogits: launch_partials_aligned<T, Recon::BCELogits>(a, u, part_rec, part_kl, s); break;
        case Recon::MSE: launch_partials_aligned<T, Recon::MSE>(a, u, part_rec, part_kl, s); break;
      }
    });
  }
  if (a.dtype == DType::Float64)
    elbo_finalize<double><<<1, kFinalizeThreads, 0, s>>>(
        part_rec, part_kl, a.n, u, a.reduction, static_cast<double*>(a.rec_out), static_cast<double*>(a.kl_out));
  else
    elbo_finalize<float><<<1, kFinalizeThreads, 0, s>>>(part_rec, part_kl, a.n, u, a.reduction,
                                                        static_cast<float*>(a.rec_out), static_cast<float*>(a.kl_out));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vae_ext
