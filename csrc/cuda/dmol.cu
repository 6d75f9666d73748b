// The discretized mixture of logistics on CUDA: one thread per pixel, the formulas of
// csrc/common/dmol_math.h with the scalar policy. No per-component arrays (they would live in local
// memory): pass 1 sums each component's log-likelihood into running logsumexps (of the mixture and
// of the logits); with a gradient, pass 2 recomputes each component with its derivatives and
// writes the gradient from the responsibility exp(v_m - logsumexp). Each pixel's NLL goes to a
// workspace; each sample's sum and the reduction are block sums in a fixed order (deterministic).
#include <type_traits>

#include "../common/dmol_math.h"
#include "device_utils.cuh"
#include "launchers.h"

namespace vae_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSumThreads = 256;

__device__ __forceinline__ void unpack_rng(const PhiloxArgs& r, uint64_t* seed, uint64_t* offset) {
  if (r.captured) {  // CUDA graph: read when the graph replays, as reparameterize.cu
    *seed = static_cast<uint64_t>(*r.seed_ptr);
    *offset = static_cast<uint64_t>(*r.offset_ptr) + r.offset_intragraph;
  } else {
    *seed = r.seed;
    *offset = r.offset;
  }
}

// logsumexp running over a stream of values: max and the sum of exp(v - max)
template <typename A>
struct RunningLse {
  A mx = A(-INFINITY), sum = A(0);
  __device__ __forceinline__ void add(A v) {
    if (v > mx) {
      sum = sum * ::exp(mx - v) + A(1);
      mx = v;
    } else if (v != A(-INFINITY)) {
      sum += ::exp(v - mx);  // a NaN v makes the sum NaN
    }
  }
  __device__ __forceinline__ A value() const { return mx + ::log(sum); }
};

// Narrow: dmol_narrow_bins(num_bits, log_scale_min), a constant here so that each kernel holds one
// of dmol_channel's two forms (both in one would spill registers). float64 takes the wide form
// always: the narrow one spills there (both are exact; the CPU's float64 takes the narrow one).
template <typename T, int C, bool Grad, bool Narrow>
__global__ void __launch_bounds__(kThreads) dmol_kernel(DmolLaunch a, double* pixel_nll) {
  using A = typename Acc<T>::type;
  using M = DmolScalarMath<A>;
  const T* params = static_cast<const T*>(a.params);
  const T* xs = static_cast<const T*>(a.x);
  A* grad = static_cast<A*>(a.grad);  // the accumulation type: float for half params
  const int64_t nmix = a.nmix, total = a.n * a.s;
  const DmolConsts<A> k{static_cast<A>(dmol_half_bin(a.num_bits)), static_cast<A>(dmol_log_half_bins(a.num_bits)),
                        static_cast<A>(a.log_scale_min), Narrow};
  const A scale = static_cast<A>(a.grad_scale), edge = static_cast<A>(kDmolEdge);
  // (sample, pixel) of q kept by additions: a 64-bit division is a subroutine call in SASS, whose
  // saved registers would spill inside the loop
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t step_r = stride / a.s, step_sp = stride - step_r * a.s;
  int64_t r = first / a.s, sp = first - r * a.s;
#pragma unroll 1
  for (int64_t q = first; q < total; q += stride, r += step_r, sp += step_sp) {
    if (sp >= a.s) {
      sp -= a.s;
      ++r;
    }
    const int64_t base = r * a.p_sample + sp * a.p_pixel;
    const T* pp = params + base;
    A x[C];
    bool left[C], right[C];
    bool bad = false;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      x[c] = to_acc(xs[r * a.x_sample + c * a.x_channel + sp * a.x_pixel]);
      left[c] = x[c] < -edge;
      right[c] = x[c] > edge;
      bad = bad || x[c] < A(-1) || x[c] > A(1);
    }
    if (bad && a.bad_x != nullptr) atomicOr(a.bad_x, 1);
    const auto load = [&](int64_t p, A* mean, A* sraw, A* coef) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int64_t pm = nmix * (1 + 3 * c) + p;
        mean[c] = to_acc(pp[pm * a.p_param]);
        sraw[c] = to_acc(pp[(pm + nmix) * a.p_param]);
        if constexpr (C == 3) coef[c] = to_acc(pp[(pm + 2 * nmix) * a.p_param]);
      }
    };
    RunningLse<A> mix, logits;
#pragma unroll 1
    for (int64_t m = 0; m < nmix; ++m) {
      A mean[C], sraw[C], coef[C];
      load(m, mean, sraw, coef);
      const A logit = to_acc(pp[m * a.p_param]);
      mix.add(logit + dmol_component<M, C, false>(mean, sraw, coef, x, left, right, k, nullptr, nullptr, nullptr));
      logits.add(logit);
    }
    const A lse = mix.value(), lse_logits = logits.value();
    pixel_nll[q] = static_cast<double>(lse_logits - lse);
    if constexpr (Grad) {
      A* gp = grad + base;
#pragma unroll 1
      for (int64_t m = 0; m < nmix; ++m) {
        A mean[C], sraw[C], coef[C], gmu[C], gs[C], alpha[C], g_mean[C], g_scale[C], g_coef[C];
        load(m, mean, sraw, coef);
        const A logit = to_acc(pp[m * a.p_param]);
        const A v = logit + dmol_component<M, C, true>(mean, sraw, coef, x, left, right, k, gmu, gs, alpha);
        // the CPU kernel's weights: 0 below exp(dmol_exp_floor), never subnormal
        const A resp = dmol_exp_normal<M>(v - lse);
        gp[m * a.p_param] = (dmol_exp_normal<M>(logit - lse_logits) - resp) * scale;
        dmol_component_grads<M, C>(resp, gmu, gs, alpha, x, g_mean, g_scale, g_coef);
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int64_t pm = nmix * (1 + 3 * c) + m;
          gp[pm * a.p_param] = g_mean[c] * scale;
          gp[(pm + nmix) * a.p_param] = g_scale[c] * scale;
          if constexpr (C == 3) gp[(pm + 2 * nmix) * a.p_param] = g_coef[c] * scale;
        }
      }
    }
  }
}

// rows[r] = the sum of sample r's pixel NLLs, in a fixed order.
__global__ void __launch_bounds__(kSumThreads) dmol_rows_kernel(const double* pixel_nll, int64_t n, int64_t s,
                                                                double* rows) {
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < s; i += blockDim.x) acc += pixel_nll[r * s + i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) rows[r] = acc;
    __syncthreads();
  }
}

// The loss from the rows: each row (none), or their sum (and its mean), in one block.
template <typename O>
__global__ void __launch_bounds__(kSumThreads) dmol_finalize_kernel(const double* rows, int64_t n, Reduction red,
                                                                    O* out) {
  if (red == Reduction::None) {
    for (int64_t r = threadIdx.x; r < n; r += blockDim.x) out[r] = static_cast<O>(rows[r]);
    return;
  }
  double acc = 0.0;
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) acc += rows[r];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = static_cast<O>(red == Reduction::Mean ? acc / static_cast<double>(n) : acc);
}

template <typename T, int C>
__global__ void __launch_bounds__(kThreads) dmol_sample_kernel(DmolSampleLaunch a) {
  using A = typename Acc<T>::type;
  using M = DmolScalarMath<A>;
  uint64_t seed, offset;
  unpack_rng(a.rng, &seed, &offset);
  const T* params = static_cast<const T*>(a.params);
  T* out = static_cast<T*>(a.out);
  const int64_t total = a.n * a.s;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < total;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = q / a.s, sp = q - r * a.s;
    const T* pp = params + r * a.p_sample + sp * a.p_pixel;
    const auto param = [&](int64_t p) { return to_acc(pp[p * a.p_param]); };
    A v[C];
    dmol_sample_pixel<M, C>(param, a.nmix, seed, offset, static_cast<uint64_t>(q), static_cast<A>(a.log_scale_min),
                            v);
#pragma unroll
    for (int c = 0; c < C; ++c) out[(r * C + c) * a.s + sp] = from_acc<T>(v[c]);
  }
}

template <typename T, int C, bool Grad>
void launch_nll(const DmolLaunch& a, double* pixel_nll, unsigned blocks, cudaStream_t stream) {
  if (!std::is_same_v<T, double> && dmol_narrow_bins(a.num_bits, a.log_scale_min))
    dmol_kernel<T, C, Grad, !std::is_same_v<T, double>><<<blocks, kThreads, 0, stream>>>(a, pixel_nll);
  else
    dmol_kernel<T, C, Grad, false><<<blocks, kThreads, 0, stream>>>(a, pixel_nll);
}

}  // namespace

size_t dmol_workspace_bytes(int64_t n, int64_t s) { return static_cast<size_t>(n * s + n) * sizeof(double); }

cudaError_t launch_dmol(const DmolLaunch& a, cudaStream_t stream) {
  double* pixel_nll = static_cast<double*>(a.workspace);
  double* rows = pixel_nll + a.n * a.s;
  dispatch_dtype<__half, __nv_bfloat16>(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const unsigned blocks = blocks_for(a.n * a.s, kThreads);
    if (a.n * a.s > 0) {
      const bool g = a.grad != nullptr;
      if (a.channels == 3)
        g ? launch_nll<T, 3, true>(a, pixel_nll, blocks, stream) : launch_nll<T, 3, false>(a, pixel_nll, blocks, stream);
      else
        g ? launch_nll<T, 1, true>(a, pixel_nll, blocks, stream) : launch_nll<T, 1, false>(a, pixel_nll, blocks, stream);
    }
    if (a.n > 0) {
      const unsigned row_blocks = static_cast<unsigned>(a.n < 65535 * 8 ? a.n : 65535 * 8);
      dmol_rows_kernel<<<row_blocks, kSumThreads, 0, stream>>>(pixel_nll, a.n, a.s, rows);
    }
    if (a.n > 0 || a.reduction != Reduction::None) {
      if constexpr (std::is_same_v<T, double>)
        dmol_finalize_kernel<double><<<1, kSumThreads, 0, stream>>>(rows, a.n, a.reduction, static_cast<double*>(a.out));
      else
        dmol_finalize_kernel<float><<<1, kSumThreads, 0, stream>>>(rows, a.n, a.reduction, static_cast<float*>(a.out));
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_dmol_sample(const DmolSampleLaunch& a, cudaStream_t stream) {
  if (a.n * a.s == 0) return cudaSuccess;
  dispatch_dtype<__half, __nv_bfloat16>(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const unsigned blocks = blocks_for(a.n * a.s, kThreads);
    if (a.channels == 3)
      dmol_sample_kernel<T, 3><<<blocks, kThreads, 0, stream>>>(a);
    else
      dmol_sample_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vae_ext
