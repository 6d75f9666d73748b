#include "grad_block.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/strides.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vae_ext {

namespace {
// glibc's: the mmap threshold it starts with and the most its dynamic threshold rises to on 64-bit
// (DEFAULT_MMAP_THRESHOLD_MAX). Below the first, blocks come from the heap whatever their number;
// a block above the second is mmapped on every call, so four separate ones do better there.
constexpr size_t kJoinMin = size_t{128} << 10;
constexpr size_t kJoinMax = (size_t{32} << 20) - (size_t{64} << 10);  // room for malloc's padding
constexpr size_t kAlign = 64;                  // c10's CPU alignment: each slice starts as a block of its own would
constexpr size_t kHugeMin = size_t{32} << 20;  // glibc's largest mmap threshold (advise_huge_pages)
constexpr uintptr_t kHugePage = uintptr_t{2} << 20;  // x86-64's and arm64's (4 KiB pages) PMD size

bool huge_pages_wanted() {
  static const bool on = [] {
    const char* v = std::getenv("VAE_EXT_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

std::vector<int64_t> dense_strides(at::IntArrayRef sizes, at::MemoryFormat fmt) {
  if (fmt == at::MemoryFormat::ChannelsLast) return c10::get_channels_last_strides_2d(sizes);
  if (fmt == at::MemoryFormat::ChannelsLast3d) return c10::get_channels_last_strides_3d(sizes);
  const auto st = c10::contiguous_strides(sizes);
  return {st.begin(), st.end()};
}
}  // namespace

std::vector<Tensor> empty_together(at::IntArrayRef sizes, at::ArrayRef<at::TensorOptions> opts) {
  std::vector<Tensor> out;
  out.reserve(opts.size());
  const size_t numel = static_cast<size_t>(c10::multiply_integers(sizes));
  std::vector<size_t> start;  // each tensor's byte offset in the block
  size_t total = 0;
  for (const auto& o : opts) {
    start.push_back(total);
    total += (numel * o.dtype().itemsize() + kAlign - 1) / kAlign * kAlign;
  }
  const bool cpu = std::all_of(opts.begin(), opts.end(), [](const auto& o) { return o.device().is_cpu(); });
  if (opts.size() < 2 || !cpu || total < kJoinMin || total > kJoinMax) {
    for (const auto& o : opts) out.push_back(advise_huge_pages(at::empty(sizes, o)));
    return out;
  }
  // the block, shared by the slices' storages (each holds a reference as its context): freed
  // through the CPU allocator with the last of them
  using Block = std::shared_ptr<c10::DataPtr>;
  const Block block = std::make_shared<c10::DataPtr>(c10::GetCPUAllocator()->allocate(total));
  auto* base = static_cast<char*>(block->get());
  for (size_t i = 0; i < opts.size(); ++i) {
    out.push_back(at::for_blob(base + start[i], sizes)
                      .strides(dense_strides(sizes, opts[i].memory_format_opt().value_or(at::MemoryFormat::Contiguous)))
                      .context(new Block(block), [](void* ref) { delete static_cast<Block*>(ref); })
                      .options(opts[i].memory_format(std::nullopt))
                      .make_tensor());
  }
  return out;
}

std::vector<Tensor> empty_together(at::IntArrayRef sizes, const at::TensorOptions& opts, size_t count) {
  return empty_together(sizes, std::vector<at::TensorOptions>(count, opts));
}

Tensor advise_huge_pages(Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!t.defined() || !t.device().is_cpu() || !huge_pages_wanted()) return t;
  const auto& storage = t.storage();
  // a traced (fake) tensor has no memory, and may have no size yet
  if (storage.sym_nbytes().is_symbolic() || storage.data() == nullptr) return t;
  const size_t bytes = storage.nbytes();
  if (bytes < kHugeMin) return t;
  // only the pages wholly inside the storage: its neighbours' are not this op's to advise
  const auto start = reinterpret_cast<uintptr_t>(storage.data());
  const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1), last = (start + bytes) & ~(kHugePage - 1);
  // advice only: where it fails (no THP in the kernel) the pages are the usual ones
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

}  // namespace vae_ext
