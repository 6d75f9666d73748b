// The CUDA implementations of the DMoL ops (compiled only in CUDA builds): the checks and layouts of
// csrc/dmol.h, the device guard, the stream, the generator's graph-safe Philox state, then the
// launchers of dmol.cu. The twin of cpu/ops_dmol.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../dmol.h"
#include "launchers.h"
#include "philox_state.h"

namespace vae_ext {
namespace {

std::tuple<Tensor, Tensor> dmol_nll_cuda(const Tensor& params, const Tensor& x, int64_t num_bits,
                                         c10::string_view reduction, double log_scale_min, bool grad, bool validate) {
  const Reduction red = parse_reduction(reduction);
  const DmolInputs in = prepare_dmol(params, x, num_bits, log_scale_min);  // before the guard: names a CPU x
  const c10::cuda::CUDAGuard guard(params.device());
  const auto out_opts = params.options().dtype(loss_dtype(params.scalar_type()));
  Tensor loss = red == Reduction::None ? at::empty({in.n}, out_opts) : at::empty({}, out_opts);
  // the gradient in the loss dtype (float32 for half params) until the backward scales it: one rounding
  Tensor g = grad ? empty_in_layout(in.params, loss_dtype(params.scalar_type())) : at::empty({0}, params.options());
  const size_t ws_bytes = cuda::dmol_workspace_bytes(in.n, in.s);
  Tensor ws = at::empty({static_cast<int64_t>(ws_bytes > 0 ? ws_bytes : 1)}, params.options().dtype(at::kByte));
  Tensor bad = validate ? at::zeros({1}, params.options().dtype(at::kInt)) : Tensor();
  cuda::DmolLaunch a{};
  fill_dmol_args(a, in, g, grad, num_bits, log_scale_min, red);
  a.reduction = red;
  a.out = loss.data_ptr();
  a.workspace = ws.data_ptr();
  a.bad_x = bad.defined() ? bad.data_ptr<int>() : nullptr;
  C10_CUDA_CHECK(cuda::launch_dmol(a, c10::cuda::getCurrentCUDAStream()));
  if (bad.defined() && bad.item<int>() != 0) throw_dmol_x_out_of_range();  // validate=True: one sync
  return {loss, g};
}

Tensor dmol_sample_cuda(const Tensor& params, int64_t num_channels, double log_scale_min,
                        std::optional<at::Generator> generator) {
  const DmolInputs in = prepare_dmol_sample(params, num_channels, log_scale_min);
  const c10::cuda::CUDAGuard guard(params.device());
  const cuda::PhiloxArgs rng = reserve_philox(generator, params.device().index());
  std::vector<int64_t> shape(params.sizes().begin(), params.sizes().end());
  shape[1] = num_channels;
  Tensor out = at::empty(shape, params.options());
  cuda::DmolSampleLaunch a{};
  fill_dmol_sample_args(a, in, out, log_scale_min);
  a.rng = rng;
  C10_CUDA_CHECK(cuda::launch_dmol_sample(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CUDA, m) {
  m.impl("dmol_nll", &dmol_nll_cuda);
  m.impl("dmol_sample", &dmol_sample_cuda);
}

}  // namespace vae_ext
