// Fused reparameterization on CUDA: z = mu + exp(0.5 logvar) * eps, with eps drawn in the kernel
// from the Philox stream of csrc/common/philox.h (the same numbers as the CPU kernels), and the
// backward, which recomputes eps from (seed, offset) instead of reading a stored copy.
#include "../common/philox.h"
#include "device_utils.cuh"
#include "launchers.h"

namespace vae_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void unpack(const PhiloxArgs& r, uint64_t* seed, uint64_t* offset) {
  if (r.captured) {  // CUDA graph: read when the graph replays, as at::cuda::philox::unpack does
    *seed = static_cast<uint64_t>(*r.seed_ptr);
    *offset = static_cast<uint64_t>(*r.offset_ptr) + r.offset_intragraph;
  } else {
    *seed = r.seed;
    *offset = r.offset;
  }
}

// Memory index of logical index i (within the k * numel elements: the samples are whole blocks of
// numel, each laid out as mu) and the reverse, for a channels_last layout (launchers.h ClLayout).
__device__ __forceinline__ int64_t cl_memory(int64_t i, const ClLayout& l) {
  const int64_t p = l.channels * l.spatial, blk = i / p, r = i - blk * p, c = r / l.spatial;
  return blk * p + (r - c * l.spatial) * l.channels + c;
}
__device__ __forceinline__ int64_t cl_logical(int64_t m, const ClLayout& l) {
  const int64_t p = l.channels * l.spatial, blk = m / p, r = m - blk * p, s = r / l.channels;
  return blk * p + (r - s * l.channels) * l.spatial + s;
}

// The four normals of Philox group g: elements 4g .. 4g+3, as philox_normal_at gives them one by one.
__device__ __forceinline__ void group_normals(uint64_t seed, uint64_t offset, uint64_t g, float n[4]) {
  const U32x4 w = philox_group(seed, offset, g);
  box_muller<ScalarMath<float>>(u32_to_open_unit(w.v[0]), u32_to_unit(w.v[1]), &n[0], &n[1]);
  box_muller<ScalarMath<float>>(u32_to_open_unit(w.v[2]), u32_to_unit(w.v[3]), &n[2], &n[3]);
}

// One thread per Philox group: logical elements 4g .. 4g+3 of z (flattened over the samples),
// stored at their memory index when CL.
template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads) reparam_kernel(ReparamLaunch a) {
  using A = typename Acc<T>::type;
  uint64_t seed, offset;
  unpack(a.rng, &seed, &offset);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    a.state_out[0] = static_cast<int64_t>(seed);
    a.state_out[1] = static_cast<int64_t>(offset);
  }
  const T* mu = static_cast<const T*>(a.mu);
  const T* lv = static_cast<const T*>(a.logvar);
  T* z = static_cast<T*>(a.z);
  T* eps = static_cast<T*>(a.eps);
  const int64_t total = a.k * a.numel, groups = (total + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float n[4];
    group_normals(seed, offset, static_cast<uint64_t>(g), n);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t le = 4 * g + j;
      if (le < total) {
        const int64_t e = CL ? cl_memory(le, a.layout) : le;
        const int64_t i = a.k == 1 ? e : e % a.numel;    // a 64-bit modulo costs dozens of instructions
        const T ev = from_acc<T>(static_cast<A>(n[j]));  // z uses exactly the eps returned
        z[e] = from_acc<T>(reparam_z<ScalarMath<A>>(to_acc(mu[i]), to_acc(lv[i]), to_acc(ev)));
        if (eps) eps[e] = ev;
      }
    }
  }
}

// What the two backward kernels share: the (seed, offset) the forward drew from, the tensors in
// their storage type, and the last step, element i of the gradients from the sums over the samples
// of g (sum_g) and of g eps (sum_ge).
template <typename T>
struct BackwardIO {
  using A = typename Acc<T>::type;
  uint64_t seed, offset;
  const T* gz;
  const T* lv;
  T* gmu;
  T* glv;
  __device__ __forceinline__ explicit BackwardIO(const ReparamBackwardLaunch& a)
      : seed(static_cast<uint64_t>(a.state[0])),
        offset(static_cast<uint64_t>(a.state[1])),
        gz(static_cast<const T*>(a.grad_z)),
        lv(static_cast<const T*>(a.logvar)),
        gmu(static_cast<T*>(a.grad_mu)),
        glv(static_cast<T*>(a.grad_logvar)) {}
  __device__ __forceinline__ void write(int64_t i, A sum_g, A sum_ge) const {
    if (gmu) gmu[i] = from_acc<T>(sum_g);
    glv[i] = from_acc<T>(reparam_grad_logvar<ScalarMath<A>>(to_acc(lv[i]), sum_ge));
  }
};

// One thread per element of mu (in memory order): sums over the samples in order (deterministic).
template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads) reparam_backward_kernel(ReparamBackwardLaunch a) {
  using A = typename Acc<T>::type;
  const BackwardIO<T> io(a);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A sg = A(0), sge = A(0);
    const int64_t li = CL ? cl_logical(i, a.layout) : i;  // the logical index, which keys eps
    for (int64_t s = 0; s < a.k; ++s) {
      const A g = to_acc(io.gz[s * a.numel + i]);
      sg += g;
      const uint64_t e = static_cast<uint64_t>(s * a.numel + li);
      const T ev = from_acc<T>(static_cast<A>(philox_normal_at<ScalarMath<float>>(io.seed, io.offset, e)));
      sge += g * to_acc(ev);
    }
    io.write(i, sg, sge);
  }
}

// One sample (k == 1): one thread per Philox group, as in the forward, so each group's four normals
// are drawn once instead of once per element. The same values as reparam_backward_kernel gives.
template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads) reparam_backward_one_sample_kernel(ReparamBackwardLaunch a) {
  using A = typename Acc<T>::type;
  const BackwardIO<T> io(a);
  const int64_t groups = (a.numel + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float n[4];
    group_normals(io.seed, io.offset, static_cast<uint64_t>(g), n);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t li = 4 * g + j;
      if (li < a.numel) {
        const int64_t i = CL ? cl_memory(li, a.layout) : li;
        const A gv = to_acc(io.gz[i]);
        const T ev = from_acc<T>(static_cast<A>(n[j]));  // the eps the forward used
        io.write(i, gv, gv * to_acc(ev));
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    philox_normal_kernel(float* out, int64_t n, uint64_t seed, uint64_t offset) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[e] = philox_normal_at<ScalarMath<float>>(seed, offset, static_cast<uint64_t>(e));
}

}  // namespace

cudaError_t launch_reparam(const ReparamLaunch& a, cudaStream_t s) {
  const int64_t groups = (a.k * a.numel + 3) / 4;
  dispatch_dtype<__half, __nv_bfloat16>(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (a.layout.channels > 0)
      reparam_kernel<T, true><<<blocks_for(groups, kThreads), kThreads, 0, s>>>(a);
    else
      reparam_kernel<T, false><<<blocks_for(groups, kThreads), kThreads, 0, s>>>(a);
  });
  return cudaGetLastError();
}

cudaError_t launch_reparam_backward(const ReparamBackwardLaunch& a, cudaStream_t s) {
  if (a.numel == 0) return cudaSuccess;
  dispatch_dtype<__half, __nv_bfloat16>(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const unsigned groups = blocks_for((a.numel + 3) / 4, kThreads), elems = blocks_for(a.numel, kThreads);
    const bool cl = a.layout.channels > 0;
    if (a.k == 1 && cl)
      reparam_backward_one_sample_kernel<T, true><<<groups, kThreads, 0, s>>>(a);
    else if (a.k == 1)
      reparam_backward_one_sample_kernel<T, false><<<groups, kThreads, 0, s>>>(a);
    else if (cl)
      reparam_backward_kernel<T, true><<<elems, kThreads, 0, s>>>(a);
    else
      reparam_backward_kernel<T, false><<<elems, kThreads, 0, s>>>(a);
  });
  return cudaGetLastError();
}

cudaError_t launch_philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  philox_normal_kernel<<<blocks_for(n, kThreads), kThreads, 0, s>>>(out, n, seed, offset);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vae_ext
