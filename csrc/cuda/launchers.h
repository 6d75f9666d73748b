// The CUDA kernels' interface: raw pointers, sizes and a stream. No torch header here or in the
// .cu files, so `nvcc -c csrc/cuda/*.cu` checks them on a machine without a CUDA build of PyTorch;
// ops_cuda.cpp (compiled only in CUDA builds) unpacks tensors and calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/elbo_math.h"
#include "../common/latent_math.h"

namespace vae_ext {
namespace cuda {

struct ElboLaunch {
  DType dtype;
  Recon mode;
  Reduction reduction;
  const void* recon;  // (n, d) contiguous
  const void* x;
  void* grad_recon;  // (n, d) or nullptr
  // Recon::Gaussian: the log-variance on the device, (n, d) like recon, or one element (rlv_scalar,
  // read by the kernels: no host sync).
  const void* recon_logvar;
  bool rlv_scalar;
  void* grad_recon_logvar;  // per element: (n, d) like grad_recon (* grad_scale), nullptr when it is;
                            // scalar: double, shape (n,) for reduction none, () otherwise
  const void* mu;           // (n, l) contiguous
  const void* logvar;
  void* grad_mu;      // (n, l) in the accumulation type (float for f16/bf16), or nullptr (then
  void* grad_logvar;  // grad_logvar too)
  // The prior: nullptr (both) for N(0, I); else (n, l), or (l) shared by every sample (prior_shared).
  const void* prior_mu;
  const void* prior_logvar;
  bool prior_shared;
  void* grad_prior_mu;      // (n, l) in the accumulation type, per element (a shared prior's too),
  void* grad_prior_logvar;  // * grad_scale; or nullptr (both)
  void* kl_elems;           // (n, l) in the accumulation type: each element's KL, or nullptr
  int64_t n, d, l;
  double grad_scale;  // 1, or 1/n for mean
  void* rec_out;      // float (f32/f16/bf16 inputs) or double (f64): shape () or (n,)
  void* kl_out;       // or nullptr: rec_out gets the total rec + kl
  void* workspace;    // elbo_workspace_bytes() bytes
  int* bad_flag;      // zeroed int: "bce" sets bit 0 for a p, bit 1 for an x outside [0, 1]; nullptr: no check
};

size_t elbo_workspace_bytes(int64_t n, int64_t d, int64_t l);
cudaError_t launch_elbo(const ElboLaunch& a, cudaStream_t stream);

// g *= *s in place over the n elements of a buffer of `dtype`, s one element on the device in the
// accumulation type (float for f16/bf16: computed in float, rounded once); when
// *s == 1 the buffer is left alone (the backward of loss.backward(): no pass, no host sync,
// graph-safe). Up to kMaxScaleJobs buffers of one dtype in one launch: the gradients of recon,
// recon_logvar, mu, logvar, prior_mu and prior_logvar.
struct ScaleJob {
  void* g;
  const void* s;
  int64_t n;
};
constexpr int kMaxScaleJobs = 6;
cudaError_t launch_scale_unless_one(DType dtype, const ScaleJob* jobs, int count, cudaStream_t stream);

// Mirrors at::PhiloxCudaState: under CUDA graph capture, seed and offset are read on the device
// (from seed_ptr, and offset_ptr + offset_intragraph) when the graph replays.
struct PhiloxArgs {
  uint64_t seed;
  uint64_t offset;
  const int64_t* seed_ptr;
  const int64_t* offset_ptr;
  uint64_t offset_intragraph;
  bool captured;
};

// The memory layout of the reparameterize tensors: channels == 0, contiguous; otherwise
// channels_last(_3d) with C = channels and S = spatial (the product of the spatial sizes): logical
// element (n C + c) S + s, whose eps is drawn for that logical index, sits at (n S + s) C + c.
struct ClLayout {
  int64_t channels, spatial;
};

struct ReparamLaunch {
  DType dtype;
  const void* mu;  // [numel] contiguous
  const void* logvar;
  void* z;    // [k * numel]
  void* eps;  // [k * numel] or nullptr
  int64_t numel, k;
  ClLayout layout;  // contiguous, or each sample of mu, z and eps channels_last
  PhiloxArgs rng;
  int64_t* state_out;  // [2] on the device: the (seed, offset) used
};
cudaError_t launch_reparam(const ReparamLaunch& a, cudaStream_t stream);

struct ReparamBackwardLaunch {
  DType dtype;
  const void* grad_z;  // [k * numel] contiguous
  const void* logvar;  // [numel]
  void* grad_mu;       // or nullptr: not wanted
  void* grad_logvar;
  int64_t numel, k;
  ClLayout layout;       // of logvar, grad_z (each sample) and the gradients
  const int64_t* state;  // [2] on the device, from the forward
};
cudaError_t launch_reparam_backward(const ReparamBackwardLaunch& a, cudaStream_t stream);

cudaError_t launch_philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset, cudaStream_t stream);

// The discretized mixture of logistics (dmol.cu). params (and grad, in the same strides) and x are
// read with element strides per sample, per parameter (channel) and per pixel, as cpu::DmolArgs.
struct DmolLaunch {
  DType dtype;
  Reduction reduction;
  const void* params;
  void* grad;  // d NLL / d params * grad_scale in the accumulation type (float for f16/bf16), or nullptr
  const void* x;
  int64_t n, s, nmix, channels;
  int64_t p_sample, p_param, p_pixel;
  int64_t x_sample, x_channel, x_pixel;
  int64_t num_bits;
  double log_scale_min, grad_scale;
  void* out;        // the loss: float (f32/f16/bf16 inputs) or double (f64), shape () or (n,)
  void* workspace;  // dmol_workspace_bytes(n, s) bytes
  int* bad_x;       // zeroed int, set to 1 for an x outside [-1, 1]; nullptr: no check
};
size_t dmol_workspace_bytes(int64_t n, int64_t s);
cudaError_t launch_dmol(const DmolLaunch& a, cudaStream_t stream);

struct DmolSampleLaunch {
  DType dtype;
  const void* params;  // strides as DmolLaunch
  void* out;           // (n, channels, s) contiguous
  int64_t n, s, nmix, channels;
  int64_t p_sample, p_param, p_pixel;
  double log_scale_min;
  PhiloxArgs rng;
};
cudaError_t launch_dmol_sample(const DmolSampleLaunch& a, cudaStream_t stream);

// gaussian_latent (gaussian_latent.cu): the kernels' arguments (common/latent_math.h LatentArgs; its
// seed and offset unused) and the launch's own.
struct LatentLaunch {
  LatentArgs a;
  PhiloxArgs rng;        // forward: the generator's state (read on the device under graph capture)
  int64_t* state_out;    // forward: [2] on the device, the (seed, offset) used
  const int64_t* state;  // backward: [2] on the device, from the forward
  double* partials;      // forward: [K N * latent_chunks(C S)] workspace
  double* row_kl;        // forward: [K N], each row's KL sum
};
int64_t latent_chunks(int64_t len);  // the forward's blocks per row of len elements
cudaError_t launch_latent_forward(const LatentLaunch& l, cudaStream_t stream);
cudaError_t launch_latent_backward(const LatentLaunch& l, cudaStream_t stream);

}  // namespace cuda
}  // namespace vae_ext
