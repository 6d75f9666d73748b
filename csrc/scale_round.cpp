// The backward's scaling of a half input's gradient (csrc/autograd.cpp scale_grad): the float32
// buffer the forward wrote, times the incoming gradient in float32, rounded once to the half type
// in one pass on CPU (cpu/scale_kernel.h); elsewhere (CUDA, tracing) by mul_out.
#include "scale_round.h"

#include <ATen/Context.h>

#include <string>

#include "cpu/scale_kernels.h"
#include "cpu/table_choice.h"
#include "grad_block.h"

namespace vae_ext {

namespace cpu {
const ScaleKernelTable& scale_kernels() {
  static const ScaleKernelTable& table = VAE_EXT_CPU_TABLE(scale_kernel_table);
  return table;
}
}  // namespace cpu

namespace {

// A plain CPU tensor (not one a tracer wraps: torch.compile, opcheck), dense, each sample (the
// first dimension) one block of memory, so that memory order is (sample, rest).
bool kernel_ready(const Tensor& t) {
  if (!t.is_cpu() || t.key_set().has(c10::DispatchKey::Python) || t.key_set().has(c10::DispatchKey::Functionalize))
    return false;
  if (!t.is_non_overlapping_and_dense()) return false;
  return t.dim() == 0 || t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel();
}

}  // namespace

Tensor scale_round(const Tensor& g, const Tensor& s, bool per_sample, at::ScalarType out) {
  const bool half_out = out == at::kHalf || out == at::kBFloat16;
  if (half_out && g.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat && kernel_ready(g) &&
      kernel_ready(s) && (per_sample ? s.numel() == (g.dim() > 0 ? g.size(0) : 1) : s.numel() == 1)) {
    Tensor r = advise_huge_pages(at::empty_like(g, g.options().dtype(out)));  // g's layout
    cpu::ScaleRoundArgs a{};
    a.dtype = out == at::kHalf ? DType::Float16 : DType::BFloat16;
    a.g = g.const_data_ptr<float>();
    a.out = r.data_ptr();
    a.rows = per_sample ? s.numel() : 1;
    a.row_len = a.rows > 0 ? g.numel() / a.rows : 0;
    a.scale = s.const_data_ptr<float>();
    a.per_row = per_sample;
    cpu::scale_kernels().scale_round(a);
    return r;
  }
  Tensor r = advise_huge_pages(at::empty_like(g, g.options().dtype(out)));
  at::mul_out(r, g, s);
  return r;
}

}  // namespace vae_ext
