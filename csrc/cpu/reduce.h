// Sums over rows or over everything, as fixed kChunk-element partials added in a fixed order: the
// result depends only on the inputs, never on the thread count.
#pragma once
#include "capability.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace vae_ext::cpu::CPU_CAPABILITY {

// row_out[r] = sum over the row's elements, as seg(r, begin, end) partial sums over kChunk-sized
// pieces added in order. seg must be a pure function of its arguments (plus the data).
template <class Seg>
void reduce_rows(int64_t n, int64_t d, double* row_out, const Seg& seg) {
  if (n == 0) return;
  if (d == 0) {
    std::fill(row_out, row_out + n, 0.0);
    return;
  }
  const int64_t cpr = (d + kChunk - 1) / kChunk;  // chunks per row
  if (cpr == 1) {
    at::parallel_for(0, n, std::max<int64_t>(1, kGrainElems / d), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) row_out[r] = seg(r, 0, d);
    });
    return;
  }
  std::vector<double> part(static_cast<size_t>(n * cpr));
  at::parallel_for(0, n * cpr, std::max<int64_t>(1, kGrainElems / kChunk), [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const int64_t r = u / cpr, c = u % cpr;
      part[u] = seg(r, c * kChunk, std::min(d, (c + 1) * kChunk));
    }
  });
  for (int64_t r = 0; r < n; ++r) {
    double s = 0.0;
    for (int64_t c = 0; c < cpr; ++c) s += part[r * cpr + c];
    row_out[r] = s;
  }
}

// The sum over [0, total) as seg(begin, end) partial sums over kChunk-sized pieces added in order
// (a reduction over everything, where the rows need no sums of their own). Scratch: one double
// per kChunk elements.
template <class Seg>
double reduce_flat(int64_t total, const Seg& seg) {
  if (total <= kChunk) return total > 0 ? seg(0, total) : 0.0;
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, std::max<int64_t>(1, kGrainElems / kChunk), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) part[c] = seg(c * kChunk, std::min(total, (c + 1) * kChunk));
  });
  double s = 0.0;
  for (double v : part) s += v;
  return s;
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
