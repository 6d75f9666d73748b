// The CPU implementations of the DMoL ops: check and lay out the arguments (csrc/dmol.h), call this
// CPU's kernels (cpu/dmol_kernel.h through kernels.h), reduce the per-sample sums.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>

#include "../dmol.h"
#include "kernels.h"

namespace vae_ext {
namespace {

// The loss of each sample (row_nll, double) reduced: (N,) for none, the sum or its mean, in `out`.
Tensor reduce_nll(const Tensor& rows, Reduction red, at::ScalarType out) {
  if (red == Reduction::None) return rows.to(out);
  const double* r = rows.const_data_ptr<double>();
  double s = 0.0;
  for (int64_t i = 0; i < rows.numel(); ++i) s += r[i];  // in order: the same for any thread count
  if (red == Reduction::Mean) s /= static_cast<double>(rows.numel());  // 0 / 0: NaN, as Tensor.mean()
  // float32 beyond its range is inf (at::scalar_tensor would raise on the conversion)
  return at::scalar_tensor(out == at::kFloat ? static_cast<double>(static_cast<float>(s)) : s, at::dtype(out));
}

std::tuple<Tensor, Tensor> dmol_nll_cpu(const Tensor& params, const Tensor& x, int64_t num_bits,
                                        c10::string_view reduction, double log_scale_min, bool grad, bool validate) {
  (void)validate;  // the CPU kernel checks x's range in its pass, always
  const Reduction red = parse_reduction(reduction);
  const DmolInputs in = prepare_dmol(params, x, num_bits, log_scale_min);
  Tensor rows = at::empty({in.n}, at::kDouble);
  // the gradient in the loss dtype (float32 for half params) until the backward scales it: one rounding
  Tensor g = grad ? empty_in_layout(in.params, loss_dtype(params.scalar_type())) : at::empty({0}, params.options());
  std::atomic<bool> bad{false};
  if (in.n > 0) {
    cpu::DmolArgs a{};
    fill_dmol_args(a, in, g, grad, num_bits, log_scale_min, red);
    a.row_nll = rows.data_ptr<double>();
    a.bad_x = &bad;
    cpu::kernels().dmol(a);
  }
  if (bad.load()) throw_dmol_x_out_of_range();
  return {reduce_nll(rows, red, loss_dtype(params.scalar_type())), g};
}

Tensor dmol_sample_cpu(const Tensor& params, int64_t num_channels, double log_scale_min,
                       std::optional<at::Generator> generator) {
  const DmolInputs in = prepare_dmol_sample(params, num_channels, log_scale_min);
  std::vector<int64_t> shape(params.sizes().begin(), params.sizes().end());
  shape[1] = num_channels;
  Tensor out = at::empty(shape, params.options());
  // a fresh 64-bit key from the CPU generator per call, offset 0 (as reparameterize)
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  if (out.numel() > 0) {
    cpu::DmolSampleArgs a{};
    fill_dmol_sample_args(a, in, out, log_scale_min);
    a.seed = seed;
    a.offset = 0;
    cpu::kernels().dmol_sample(a);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_ext, CPU, m) {
  m.impl("dmol_nll", &dmol_nll_cpu);
  m.impl("dmol_sample", &dmol_sample_cpu);
}

}  // namespace vae_ext
