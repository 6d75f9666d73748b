#include "grad_block.h"

#include <c10/core/CPUAllocator.h>

#include <memory>

namespace vae_ext {

namespace {
// glibc's: the mmap threshold it starts with and the most its dynamic threshold rises to on 64-bit
// (DEFAULT_MMAP_THRESHOLD_MAX). Below the first, blocks come from the heap whatever their number;
// a block above the second is mmapped on every call, so four separate ones do better there.
constexpr size_t kJoinMin = size_t{128} << 10;
constexpr size_t kJoinMax = (size_t{32} << 20) - (size_t{64} << 10);  // room for malloc's padding
constexpr size_t kAlign = 64;  // c10's CPU alignment: each slice starts as a block of its own would
}  // namespace

std::vector<Tensor> empty_together(at::IntArrayRef sizes, const at::TensorOptions& opts, size_t count) {
  std::vector<Tensor> out;
  out.reserve(count);
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * opts.dtype().itemsize();
  const size_t each = (bytes + kAlign - 1) / kAlign * kAlign;
  const size_t total = each * count;
  if (count < 2 || opts.device().type() != c10::DeviceType::CPU || total < kJoinMin || total > kJoinMax) {
    for (size_t i = 0; i < count; ++i) out.push_back(at::empty(sizes, opts));
    return out;
  }
  // the block, shared by the slices' storages (each holds a reference as its context): freed
  // through the CPU allocator with the last of them
  using Block = std::shared_ptr<c10::DataPtr>;
  const Block block = std::make_shared<c10::DataPtr>(c10::GetCPUAllocator()->allocate(total));
  auto* base = static_cast<char*>(block->get());
  for (size_t i = 0; i < count; ++i)
    out.push_back(at::for_blob(base + i * each, sizes)
                      .context(new Block(block), [](void* ref) { delete static_cast<Block*>(ref); })
                      .options(opts)
                      .make_tensor());
  return out;
}

}  // namespace vae_ext
