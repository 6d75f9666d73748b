// The gaussian_latent op's argument checks and layouts, shared by the CPU (cpu/latent_ops_cpu.cpp)
// and CUDA (cuda/latent_ops_cuda.cpp) ops: a bad argument raises ValueError or TypeError naming
// it; the tensors are described by their strides (common/latent_math.h LatentStrides), so a channel
// slice or a broadcast prior is read where it lies, without a copy.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>

#include "common/elbo_math.h"
#include "common/latent_math.h"

namespace vae_ext {

using at::Tensor;

LatentScale parse_latent_scale(c10::string_view s);
LatentKL parse_latent_kl(c10::string_view s);

// The layout of z and of the gradients of mu and logscale: mu's when it is contiguous, else the one
// its strides suggest (channels_last for a channel slice of a channels_last tensor), else contiguous.
at::MemoryFormat latent_format(const Tensor& mu);

// The inputs as the kernels read them: the tensors kept alive (each mu, logscale and the prior
// broadcast to mu's shape is the input itself where its strides allow, else a copy; no prior: a
// zero read with stride 0) and LatentArgs with their pointers, strides and sizes filled in.
struct LatentInputs {
  Tensor mu, ls, pmu, pls;
  bool prior;
  LatentArgs a;
};
LatentInputs prepare_latent(const Tensor& mu, const Tensor& logscale, const c10::optional<Tensor>& prior_mu,
                            const c10::optional<Tensor>& prior_logscale, c10::string_view scale, c10::string_view kl,
                            int64_t num_samples);

// The strides of t over (k, n, c, s) (`samples`: t has a leading draws dimension), or false when its
// spatial dimensions do not merge into one stride.
bool latent_strides(const Tensor& t, bool samples, LatentStrides* st);
// t, or a contiguous copy where its strides do not merge; its strides in *st.
Tensor latent_readable(const Tensor& t, bool samples, LatentStrides* st);

// Views (c, s) as one run (c = 1, s = c s) when every listed tensor allows it (its c stride is s
// times its s stride): a dense NCHW latent then runs in rows of C H W elements, not H W.
void merge_latent_channels(LatentArgs& a, std::initializer_list<LatentStrides*> strides);

// The reduction, and free_bits checked against it (ValueError naming the argument).
Reduction check_latent_reduction(c10::string_view reduction, double free_bits);

// The op's kl output and the free-bits unit weights from each row's KL sum (row_kl, [K N] double)
// and, with free bits, each element's KL (kl_elems, (K N, C S)).
std::tuple<Tensor, Tensor> latent_kl_outputs(const Tensor& row_kl, const Tensor& kl_elems, const Tensor& mu,
                                             int64_t num_samples, c10::string_view reduction, double free_bits);

// The forward's outputs that the kernels write, on mu's device: z and, with free bits, each
// element's KL ((K N, C S), the loss dtype); their pointers and z's strides go into `a`, whose
// channels are then merged where every tensor allows (merge_latent_channels). Both backends'.
struct LatentForwardBuffers {
  Tensor z, kl_elems;
};
LatentForwardBuffers fill_latent_forward_args(LatentArgs& a, const Tensor& mu, int64_t num_samples,
                                              double free_bits);

// The backward's: the gradients of mu and logscale (in latent_format(mu)) and, where grad_prior and
// a prior and row_w are given, the prior's (mu's shape; the loss dtype, or on the CPU mu's dtype
// where the prior is mu's shape (`whole_prior`): handed on as they are; else empty), with grad_z,
// row_w and unit_w as the kernels read them (kept alive here); the pointers and strides into `a`.
struct LatentBackwardBuffers {
  Tensor g_mu, g_ls, g_pmu, g_pls, gz, rw, uw;
};
LatentBackwardBuffers fill_latent_backward_args(LatentArgs& a, bool prior, bool whole_prior,
                                                const c10::optional<Tensor>& grad_z,
                                                const c10::optional<Tensor>& row_w, const Tensor& mu,
                                                const Tensor& unit_w, int64_t num_samples, bool grad_prior);
// Whether both prior tensors are given and have mu's shape.
bool whole_prior(const Tensor& mu, const c10::optional<Tensor>& prior_mu, const c10::optional<Tensor>& prior_logscale);

// The backward's argument checks (shapes of grad_z, row_w, rng_state and unit_w).
void check_latent_backward(const c10::optional<Tensor>& grad_z, const c10::optional<Tensor>& row_w, const Tensor& mu,
                           const Tensor& rng_state, const Tensor& unit_w, int64_t num_samples);

}  // namespace vae_ext
