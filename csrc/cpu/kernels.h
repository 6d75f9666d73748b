// The CPU kernels' interface: raw pointers and sizes, no tensors. ops_cpu.cpp fills these structs;
// kernels_impl.h is compiled once per CPU capability (DEFAULT, AVX2, AVX512) and the table for the
// CPU's best capability is chosen at run time (kernels(), in ops_cpu.cpp).
#pragma once

#include <atomic>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/elbo_math.h"

namespace vae_ext {
namespace cpu {

// Elements per partial sum. The summation order of every reduction is fixed by this constant
// and the shapes alone, so results are bitwise the same for any number of threads. Chunks are
// also the unit the threads share out: 2048 splits a 128x784 batch (49 chunks) 51/49 over two
// threads, where 4096 split it 53/47.
constexpr int64_t kChunk = 2048;

constexpr int64_t kGrainElems = 32768;  // elements per task below which parallel_for stays serial

struct ElboArgs {
  DType dtype;
  Recon mode;
  const void* recon;  // (n, d) contiguous
  const void* x;      // (n, d) contiguous
  void* grad_recon;   // (n, d) in grad_t, or nullptr: d(recon term)/d(recon) * grad_scale
  // Recon::Gaussian: the log-variance, (n, d) like recon, or one value when rlv_scalar.
  const void* recon_logvar;
  bool rlv_scalar;
  void* grad_recon_logvar;  // per element: (n, d) like grad_recon, * grad_scale; nullptr when grad_recon is
  const void* mu;           // (n, l) contiguous
  const void* logvar;
  void* grad_mu;      // (n, l) in grad_t (elbo_kernel.h: the half types' own or the accumulation type), or
  void* grad_logvar;  // nullptr (then grad_logvar is nullptr too)
  // The prior: nullptr (both) for N(0, I); else (n, l), or (l) shared by every sample (prior_shared).
  const void* prior_mu;
  const void* prior_logvar;
  bool prior_shared;
  void* grad_prior_mu;      // (n, l) in grad_t, or the accumulation type when prior_grads_wide, per
  void* grad_prior_logvar;  // element (a shared prior's too: the op sums them over the batch), *
                            // grad_scale; or nullptr (both)
  bool prior_grads_wide;    // the prior's gradients in the accumulation type (a broadcast prior's)
  void* kl_elems;           // (n, l) in the accumulation type: each element's KL (free bits), or nullptr
  int64_t n, d, l;
  double grad_scale;  // 1 for sum/none, 1/n for mean
  double* row_rec;    // out: [n] per-sample reconstruction sums, or nullptr: then
  double* row_kl;     //      [n] per-sample KL sums              (both nullptr)
  double* total_rec;  // out when row_rec is nullptr: the sums over the whole batch
  double* total_kl;
  // A scalar Gaussian log-variance with grad_recon: d(recon term)/d(rlv) * grad_scale, per sample
  // (row_grad_rlv, [n], when row_rec is given) or over the batch (*total_grad_rlv).
  double* row_grad_rlv;
  double* total_grad_rlv;
  std::atomic<bool>* bad_prob;    // out: set when "bce" sees a probability outside [0, 1]
  std::atomic<bool>* bad_target;  // out: set when "bce" sees a target x outside [0, 1]
};

struct ReparamArgs {
  DType dtype;
  const void* mu;      // [numel] contiguous
  const void* logvar;  // [numel] contiguous
  void* z;             // [k * numel]
  void* eps;           // [k * numel] or nullptr
  int64_t numel, k;
  int64_t channels, spatial;  // 0: contiguous; else each sample block channels_last (reparam_kernel.h)
  uint64_t seed, offset;
};

struct ReparamBackwardArgs {
  DType dtype;
  const void* grad_z;  // [k * numel] contiguous
  const void* logvar;  // [numel]
  void* grad_mu;       // [numel], or nullptr: not wanted
  void* grad_logvar;   // [numel]
  int64_t numel, k;
  int64_t channels, spatial;  // as ReparamArgs: the layout of logvar, grad_z and the gradients
  uint64_t seed, offset;
};

// The discretized mixture of logistics (dmol_kernel.h). params (and grad, in the same layout) and x
// are read with element strides: sample, parameter (channel for x) and pixel, the spatial
// dimensions flattened into one pixel index (contiguous: parameter stride S, pixel stride 1;
// channels_last: 1 and P).
struct DmolArgs {
  DType dtype;
  const void* params;
  void* grad;  // d NLL / d params * grad_scale in the accumulation type (float for f16/bf16), params'
              // strides; nullptr: no gradient
  const void* x;
  int64_t n, s, nmix, channels;
  int64_t p_sample, p_param, p_pixel;
  int64_t x_sample, x_channel, x_pixel;
  int64_t num_bits;
  double log_scale_min;
  double grad_scale;
  double* row_nll;             // out: [n] each sample's NLL, summed in a fixed order
  std::atomic<bool>* bad_x;    // out: set when an x lies outside [-1, 1] (NaN is not flagged)
};

struct DmolSampleArgs {
  DType dtype;
  const void* params;  // strides as DmolArgs
  void* out;           // (n, channels, s) contiguous
  int64_t n, s, nmix, channels;
  int64_t p_sample, p_param, p_pixel;
  double log_scale_min;
  uint64_t seed, offset;
};

struct KernelTable {
  const char* name;
  void (*elbo)(const ElboArgs&);
  void (*reparam)(const ReparamArgs&);
  void (*reparam_backward)(const ReparamBackwardArgs&);
  void (*normal)(float* out, int64_t n, uint64_t seed, uint64_t offset);
  void (*dmol)(const DmolArgs&);
  void (*dmol_sample)(const DmolSampleArgs&);
};

namespace DEFAULT {
const KernelTable& kernel_table();
}
namespace AVX2 {
const KernelTable& kernel_table();
}
namespace AVX512 {
const KernelTable& kernel_table();
}

// The table for this CPU (honours ATEN_CPU_CAPABILITY, as ATen does).
const KernelTable& kernels();

}  // namespace cpu
}  // namespace vae_ext
