#include "dmol.h"

#include <cmath>
#include <vector>

#include "grad_block.h"

namespace vae_ext {

PixelLayout pixel_layout(const Tensor& t) {
  const int64_t k = t.size(1);
  int64_t s = 1;
  for (int64_t i = 2; i < t.dim(); ++i) s *= t.size(i);
  PixelLayout l;
  if (!t.is_contiguous()) {
    std::vector<int64_t> perm{0};  // (N, *S, K): the channels_last order
    for (int64_t i = 2; i < t.dim(); ++i) perm.push_back(i);
    perm.push_back(1);
    if (t.permute(perm).is_contiguous()) {
      l.t = t;
      l.channels_last = true;
      l.sample = s * k;
      l.k = 1;
      l.pixel = k;
      return l;
    }
  }
  l.t = t.contiguous();
  l.sample = s * k;
  l.k = s;
  l.pixel = 1;
  return l;
}

Tensor empty_in_layout(const PixelLayout& l, std::optional<at::ScalarType> dtype) {
  const Tensor& t = l.t;
  const auto opts = t.options().dtype(dtype.value_or(t.scalar_type()));
  if (!l.channels_last) return advise_huge_pages(at::empty(t.sizes(), opts));
  std::vector<int64_t> shape{t.size(0)}, perm(static_cast<size_t>(t.dim()));
  for (int64_t i = 2; i < t.dim(); ++i) shape.push_back(t.size(i));
  shape.push_back(t.size(1));
  // (N, *S, K) back to (N, K, *S)
  perm[0] = 0;
  perm[1] = t.dim() - 1;
  for (int64_t i = 2; i < t.dim(); ++i) perm[i] = i - 1;
  return advise_huge_pages(at::empty(shape, opts)).permute(perm);
}

static void check_float(const char* name, const Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
                   ": expected a float32, float64, float16 or bfloat16 tensor, got ", st);
}

// params (N, P, *S) for `channels`: returns M.
static int64_t check_params(const Tensor& params, int64_t channels, const char* whose) {
  check_float("params", params);
  TORCH_CHECK_VALUE(params.dim() >= 2, "params: expected a tensor of shape (N, P, *S), got shape ", params.sizes());
  const int64_t p = params.size(1), per = channels == 3 ? 10 : 3;
  TORCH_CHECK_VALUE(p > 0 && p % per == 0, "params: expected P = params.shape[1] = ", per, " M for ", channels,
                    " channel", channels == 3 ? "s" : "", " (", whose, ") with M >= 1 mixture components (",
                    channels == 3 ? "M logits, then per channel R, G, B: M means, M log-scales, M coefficients"
                                  : "M logits, M means, M log-scales",
                    "), got P = ", p);
  return p / per;
}

static void check_options(int64_t num_bits, double log_scale_min) {
  TORCH_CHECK_VALUE(num_bits >= 1 && num_bits <= 16, "num_bits: expected an int in 1..16, got ", num_bits);
  TORCH_CHECK_VALUE(std::isfinite(log_scale_min), "log_scale_min: expected a finite float, got ", log_scale_min);
}

DmolInputs prepare_dmol(const Tensor& params, const Tensor& x, int64_t num_bits, double log_scale_min) {
  check_float("params", params);
  TORCH_CHECK_TYPE(x.scalar_type() == params.scalar_type(), "x: expected the same dtype as params (",
                   params.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == params.device(), "x: expected the same device as params (", params.device(),
                    "), got ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 2, "x: expected a tensor of shape (N, C, *S), C = 1 or 3, got shape ", x.sizes());
  const int64_t c = x.size(1);
  TORCH_CHECK_VALUE(c == 1 || c == 3, "x: expected 1 or 3 channels (x.shape[1]), got ", c);
  const int64_t nmix = check_params(params, c, "x.shape[1]");
  TORCH_CHECK_VALUE(x.size(0) == params.size(0), "x: expected batch size ", params.size(0), " (params.shape[0]), got ",
                    x.size(0));
  TORCH_CHECK_VALUE(x.sizes().slice(2) == params.sizes().slice(2), "x: expected the spatial shape of params ",
                    params.sizes().slice(2), " (params.shape[2:]), got ", x.sizes().slice(2));
  check_options(num_bits, log_scale_min);
  DmolInputs in;
  in.params = pixel_layout(params);
  in.x = pixel_layout(x);
  in.n = params.size(0);
  in.s = 1;
  for (int64_t i = 2; i < params.dim(); ++i) in.s *= params.size(i);
  in.nmix = nmix;
  in.channels = c;
  return in;
}

DmolInputs prepare_dmol_sample(const Tensor& params, int64_t num_channels, double log_scale_min) {
  TORCH_CHECK_VALUE(num_channels == 1 || num_channels == 3, "num_channels: expected 1 or 3, got ", num_channels);
  const int64_t nmix = check_params(params, num_channels, "num_channels");
  check_options(8, log_scale_min);
  DmolInputs in;
  in.params = pixel_layout(params);
  in.n = params.size(0);
  in.s = 1;
  for (int64_t i = 2; i < params.dim(); ++i) in.s *= params.size(i);
  in.nmix = nmix;
  in.channels = num_channels;
  return in;
}

void throw_dmol_x_out_of_range() {
  TORCH_CHECK_VALUE(false,
                    "x: expected values in [-1, 1] (data on the grid of num_bits-bit values scaled to "
                    "[-1, 1], as (x / (2^num_bits - 1)) * 2 - 1), got a value outside it");
}

}  // namespace vae_ext
