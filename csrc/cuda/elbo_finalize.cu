// The second stage of the CUDA ELBO loss (elbo_loss.cu writes the partials): one block adds each
// row's partial sums in a fixed order (no floating-point atomics: run-to-run deterministic).
#include "../common/elbo_math.h"
#include "device_utils.cuh"
#include "elbo_layout.cuh"
#include "launchers.h"

#include <type_traits>

namespace vae_ext {
namespace cuda {
namespace {

constexpr int kFinalizeThreads = 1024;

// Adds each row's partials in a fixed order and reduces over the rows; writes the outputs in the
// loss dtype (float for f32/f16/bf16, double for f64). kl_out == nullptr: the caller wants the
// total, rec_out gets rec + kl (ElboLaunch::kl_out). A scalar Gaussian log-variance: the rec
// partials are sums of q / 2, turned into the loss and rlv's gradient here (gaussian_scalar_terms).
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    elbo_finalize(ElboLaunch a, Layout u, const double* part_rec, const double* part_kl) {
  using OutT = typename Acc<T>::type;
  const int64_t n = a.n;
  const Reduction red = a.reduction;
  OutT* rec_out = static_cast<OutT*>(a.rec_out);
  OutT* kl_out = static_cast<OutT*>(a.kl_out);
  const bool scalar_rlv = a.mode == Recon::Gaussian && a.rlv_scalar;
  // rlv's gradient in double whatever T: scaled by grad_output in the backward, it may be finite
  // where this unscaled sum is past float's range
  double* g_rlv_out = scalar_rlv ? static_cast<double*>(a.grad_recon_logvar) : nullptr;
  const double rlv = scalar_rlv ? static_cast<double>(to_acc(*static_cast<const T*>(a.recon_logvar))) : 0.0;
  // The loss of `count` elements whose q / 2 sum to h, and (to *g) its gradient to rlv.
  auto gaussian = [&](double h, double count, double* g) { return gaussian_scalar_terms(h, count, rlv, g); };
  double sr = 0.0, sk = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    double r = 0.0, k = 0.0;
    for (int64_t c = 0; c < u.rec_cpr; ++c) r += part_rec[i * u.rec_cpr + c];
    for (int64_t c = 0; c < u.kl_cpr; ++c) k += part_kl[i * u.kl_cpr + c];
    sr += r;  // scalar_rlv: the sum of q / 2 over the batch, turned into the loss below
    sk += k;
    if (red == Reduction::None) {
      if (scalar_rlv) {
        double g;
        r = gaussian(r, static_cast<double>(a.d), &g);
        if (g_rlv_out) g_rlv_out[i] = g * a.grad_scale;
      }
      if (kl_out) {
        rec_out[i] = static_cast<OutT>(r);
        kl_out[i] = static_cast<OutT>(k);
      } else {
        rec_out[i] = static_cast<OutT>(r + k);
      }
    }
  }
  if (red == Reduction::None) return;
  sr = block_sum(sr);
  __syncthreads();
  sk = block_sum(sk);
  if (threadIdx.x == 0) {
    if (scalar_rlv) {
      double g;
      sr = gaussian(sr, static_cast<double>(n) * static_cast<double>(a.d), &g);
      if (g_rlv_out) g_rlv_out[0] = g * a.grad_scale;  // grad_scale: 1/n for mean
    }
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

}  // namespace

cudaError_t launch_elbo_finalize(const ElboLaunch& a, const Layout& u, const double* part_rec, const double* part_kl,
                                 cudaStream_t s) {
  dispatch_dtype<__half, __nv_bfloat16>(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    elbo_finalize<T><<<1, kFinalizeThreads, 0, s>>>(a, u, part_rec, part_kl);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vae_ext
