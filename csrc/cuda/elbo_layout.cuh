// What the two stages of the CUDA ELBO loss share (elbo_loss.cu's partial sums per (row, chunk),
// elbo_finalize.cu's fixed-order sum of them): how the rows are cut into chunks.
#pragma once

#include "launchers.h"

#include <cstdint>

namespace vae_ext {
namespace cuda {

constexpr int64_t kChunk = 16384;  // elements of one row per block

struct Layout {
  int64_t rec_cpr, kl_cpr, rec_units, kl_units;  // chunks per row and units of each part
};

inline Layout layout(int64_t n, int64_t d, int64_t l) {
  Layout u;
  u.rec_cpr = d > 0 ? (d + kChunk - 1) / kChunk : 1;
  u.kl_cpr = l > 0 ? (l + kChunk - 1) / kChunk : 1;
  u.rec_units = n * u.rec_cpr;
  u.kl_units = n * u.kl_cpr;
  return u;
}

// The second stage: one block adds the partials (part_rec: u.rec_units, part_kl: u.kl_units) and
// writes the outputs (elbo_finalize.cu).
cudaError_t launch_elbo_finalize(const ElboLaunch& a, const Layout& u, const double* part_rec, const double* part_kl,
                                 cudaStream_t s);

}  // namespace cuda
}  // namespace vae_ext
