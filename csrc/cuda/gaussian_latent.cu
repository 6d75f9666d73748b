// gaussian_latent on CUDA (a hierarchical VAE's latent layer): the forward draws eps from the
// Philox stream of csrc/common/philox.h (the numbers the CPU kernels draw), writes z and each row's
// KL as per-block partial sums added in a fixed order (no atomics); the backward draws eps again.
// Every tensor is read through its strides (common/latent_math.h), so channel slices stay in place.
#include "../common/latent_math.h"
#include "../common/philox.h"
#include "device_utils.cuh"
#include "launchers.h"

#include <type_traits>

namespace vae_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1024;  // elements of one row per forward block

// As reparameterize.cu: the (seed, offset) of a launch, read on the device under graph capture.
__device__ __forceinline__ void unpack_rng(const PhiloxArgs& r, uint64_t* seed, uint64_t* offset) {
  if (r.captured) {
    *seed = static_cast<uint64_t>(*r.seed_ptr);
    *offset = static_cast<uint64_t>(*r.offset_ptr) + r.offset_intragraph;
  } else {
    *seed = r.seed;
    *offset = r.offset;
  }
}

// The four normals of Philox group g (elements 4g .. 4g+3), as philox_normal_at gives them one by one.
__device__ __forceinline__ void group_normals4(uint64_t seed, uint64_t offset, uint64_t g, float n[4]) {
  const U32x4 w = philox_group(seed, offset, g);
  box_muller<ScalarMath<float>>(u32_to_open_unit(w.v[0]), u32_to_unit(w.v[1]), &n[0], &n[1]);
  box_muller<ScalarMath<float>>(u32_to_open_unit(w.v[2]), u32_to_unit(w.v[3]), &n[2], &n[3]);
}

__device__ __forceinline__ int64_t at(const LatentStrides& st, int64_t k, int64_t n, int64_t c, int64_t s) {
  return k * st.k + n * st.n + c * st.c + s * st.s;
}

// One block per (row, chunk of kChunk elements): threads take the Philox groups that cover the
// chunk (each group's four normals drawn once), write z, and sum the KL; one partial per block.
// As elbo_loss.cu's kMinBlocks: with no minimum, ptxas caps float64 kernels at 255 registers and
// the analytic one spills a few bytes; asking for 2 blocks per SM (128 registers) it does not.
template <typename T>
constexpr int kMinBlocks = std::is_same_v<T, double> ? 2 : 0;

template <typename T, LatentKL KL>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) latent_forward_kernel(LatentLaunch l) {
  using A = typename Acc<T>::type;
  using M = ScalarMath<A>;
  const LatentArgs& a = l.a;
  uint64_t seed, offset;
  unpack_rng(l.rng, &seed, &offset);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    l.state_out[0] = static_cast<int64_t>(seed);
    l.state_out[1] = static_cast<int64_t>(offset);
  }
  const T* mu = static_cast<const T*>(a.mu);
  const T* ls = static_cast<const T*>(a.ls);
  const T* pmu = static_cast<const T*>(a.pmu);
  const T* pls = static_cast<const T*>(a.pls);
  T* z = static_cast<T*>(a.z);
  A* kl_el = static_cast<A*>(a.kl_elems);
  const A c = static_cast<A>(latent_c(a.scale));
  const int64_t len = a.c * a.s, chunks = (len + kChunk - 1) / kChunk, units = a.k * a.n * chunks;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t r = u / chunks, lo = (u - r * chunks) * kChunk;
    const int64_t kk = r / a.n, n = r - kk * a.n;
    const int64_t e0 = r * len + lo, e1 = e0 + (len - lo < kChunk ? len - lo : kChunk);  // Philox indices
    A acc = A(0);
    for (int64_t g = e0 / 4 + threadIdx.x; g < (e1 + 3) / 4; g += blockDim.x) {
      float nrm[4];
      group_normals4(seed, offset, static_cast<uint64_t>(g), nrm);
      // not unrolled: four copies of the float64 formulas would spill; the normal by selects, not an
      // indexed (local memory) array
#pragma unroll 1
      for (int j = 0; j < 4; ++j) {
        const float nj = j == 0 ? nrm[0] : j == 1 ? nrm[1] : j == 2 ? nrm[2] : nrm[3];
        const int64_t e = 4 * g + j;
        if (e < e0 || e >= e1) continue;
        const int64_t le = e - r * len, ch = le / a.s, sp = le - ch * a.s;
        const A m = to_acc(mu[at(a.mu_st, 0, n, ch, sp)]), lv = to_acc(ls[at(a.ls_st, 0, n, ch, sp)]);
        const A pm = to_acc(pmu[at(a.pmu_st, 0, n, ch, sp)]), pl = to_acc(pls[at(a.pls_st, 0, n, ch, sp)]);
        const A ev = to_acc(from_acc<T>(static_cast<A>(nj)));  // the eps reparameterize uses
        const A zv = latent_z<M>(m, lv, c, ev);
        z[at(a.z_st, kk, n, ch, sp)] = from_acc<T>(zv);
        A kl;
        if constexpr (KL == LatentKL::Analytic) {
          A g0, g1, g2, g3;
          kl = latent_kl_analytic<M>(m, lv, M::exp(c * lv), pm, pl, c, &g0, &g1, &g2, &g3);
        } else {
          kl = latent_kl_sample<M>(zv, ev, c * lv, pm, c * pl);
        }
        if (kl_el) kl_el[e] = kl;  // e = r len + le: (K N, C S) contiguous
        acc += kl;
      }
    }
    const double sum = block_sum(static_cast<double>(acc));
    if (threadIdx.x == 0) l.partials[u] = sum;
    __syncthreads();  // block_sum's shared memory is reused by the next unit
  }
}

// Each row's partials added in order.
__global__ void __launch_bounds__(kThreads) latent_rows_kernel(const double* partials, double* row_kl, int64_t rows,
                                                               int64_t chunks) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partials[r * chunks + c];
    row_kl[r] = s;
  }
}

// One thread per element of mu: its gradients summed over the draws in order (deterministic).
template <typename T, LatentKL KL>
__global__ void __launch_bounds__(kThreads) latent_backward_kernel(LatentLaunch l) {
  using A = typename Acc<T>::type;
  using M = ScalarMath<A>;
  const LatentArgs& a = l.a;
  const uint64_t seed = static_cast<uint64_t>(l.state[0]), offset = static_cast<uint64_t>(l.state[1]);
  const T* mu = static_cast<const T*>(a.mu);
  const T* ls = static_cast<const T*>(a.ls);
  const T* pmu = static_cast<const T*>(a.pmu);
  const T* pls = static_cast<const T*>(a.pls);
  const T* gz = static_cast<const T*>(a.grad_z);
  const A* row_w = static_cast<const A*>(a.row_w);
  const A* unit_w = static_cast<const A*>(a.unit_w);
  T* gmu = static_cast<T*>(a.g_mu);
  T* gls = static_cast<T*>(a.g_ls);
  A* gpmu = static_cast<A*>(a.g_pmu);
  A* gpls = static_cast<A*>(a.g_pls);
  const A c = static_cast<A>(latent_c(a.scale));
  const int64_t len = a.c * a.s, numel = a.n * len;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / len, le = i - n * len, ch = le / a.s, sp = le - ch * a.s;
    const A m = to_acc(mu[at(a.mu_st, 0, n, ch, sp)]), lv = to_acc(ls[at(a.ls_st, 0, n, ch, sp)]);
    const A pm = to_acc(pmu[at(a.pmu_st, 0, n, ch, sp)]), pl = to_acc(pls[at(a.pls_st, 0, n, ch, sp)]);
    const A uw = unit_w ? unit_w[le] : A(1);
    A s0 = A(0), s1 = A(0), s2 = A(0), s3 = A(0), b_sum = A(0);
    for (int64_t kk = 0; kk < a.k; ++kk) {
      const int64_t r = kk * a.n + n;
      const A b_row = row_w ? row_w[r] : A(0);
      b_sum += b_row;
      if (!gz && (KL == LatentKL::Analytic || !row_w)) continue;
      const A ev = to_acc(from_acc<T>(
          static_cast<A>(philox_normal_at<ScalarMath<float>>(seed, offset, static_cast<uint64_t>(r * len + le)))));
      const A g = gz ? to_acc(gz[at(a.gz_st, kk, n, ch, sp)]) : A(0);
      if constexpr (KL == LatentKL::Analytic) {
        s0 += g;
        s1 += g * ev;
      } else {
        A dm, dh, dpm, dph;
        const A zv = latent_z<M>(m, lv, c, ev);
        latent_sample_grads<M>(g, b_row * uw, zv, M::exp(c * lv) * ev, pm, c * pl, &dm, &dh, &dpm, &dph);
        s0 += dm;
        s1 += dh;
        s2 += dpm;
        s3 += dph;
      }
    }
    A d_mu, d_ls, d_pmu, d_pls;
    if constexpr (KL == LatentKL::Analytic) {
      const A sigma = M::exp(c * lv);
      d_mu = s0;
      d_ls = latent_grad_ls_z<M>(sigma, c, s1);
      d_pmu = d_pls = A(0);
      if (row_w) {
        A km, kl, kpm, kpl;
        latent_kl_analytic<M>(m, lv, sigma, pm, pl, c, &km, &kl, &kpm, &kpl);
        const A b = b_sum * uw;
        d_mu += b * km;
        d_ls += b * kl;
        d_pmu = b * kpm;
        d_pls = b * kpl;
      }
    } else {
      d_mu = s0;
      d_ls = c * s1;
      d_pmu = s2;
      d_pls = c * s3;
    }
    gmu[at(a.g_st, 0, n, ch, sp)] = from_acc<T>(d_mu);
    gls[at(a.g_st, 0, n, ch, sp)] = from_acc<T>(d_ls);
    if (gpmu) {
      gpmu[i] = d_pmu;
      gpls[i] = d_pls;
    }
  }
}

}  // namespace

int64_t latent_chunks(int64_t len) { return (len + kChunk - 1) / kChunk; }

cudaError_t launch_latent_forward(const LatentLaunch& l, cudaStream_t s) {
  const int64_t rows = l.a.k * l.a.n, len = l.a.c * l.a.s, chunks = latent_chunks(len);
  if (rows == 0) return cudaSuccess;
  if (len > 0) {
    const unsigned blocks = blocks_for(rows * chunks, 1);
    dispatch_dtype<__half, __nv_bfloat16>(l.a.dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      if (l.a.kl == LatentKL::Analytic)
        latent_forward_kernel<T, LatentKL::Analytic><<<blocks, kThreads, 0, s>>>(l);
      else
        latent_forward_kernel<T, LatentKL::Sample><<<blocks, kThreads, 0, s>>>(l);
    });
  }
  latent_rows_kernel<<<blocks_for(rows, kThreads), kThreads, 0, s>>>(l.partials, l.row_kl, rows,
                                                                     len > 0 ? chunks : 0);
  return cudaGetLastError();
}

cudaError_t launch_latent_backward(const LatentLaunch& l, cudaStream_t s) {
  const int64_t numel = l.a.n * l.a.c * l.a.s;
  if (numel == 0) return cudaSuccess;
  dispatch_dtype<__half, __nv_bfloat16>(l.a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (l.a.kl == LatentKL::Analytic)
      latent_backward_kernel<T, LatentKL::Analytic><<<blocks_for(numel, kThreads), kThreads, 0, s>>>(l);
    else
      latent_backward_kernel<T, LatentKL::Sample><<<blocks_for(numel, kThreads), kThreads, 0, s>>>(l);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vae_ext
