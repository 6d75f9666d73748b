// Gradient buffers that the caller frees together (the latent gradients of one call: mu's,
// logvar's and a per-sample prior's; recon_x's and a per-element recon_logvar's), allocated as one
// block on the CPU. Why (docs/design.md, "Page faults under glibc's defaults"): glibc's mmap
// threshold rises to the size of the largest mmapped block freed so far, and the heap's free top
// is given back to the kernel once it reaches twice that. Four blocks of B bytes freed together
// leave 4B at the top of the heap, over the trim threshold of 2B, so the next call faults all
// their pages in again; one block of 4B raises the threshold to 4B and, freed, leaves 4B under
// the trim threshold of 8B: reused, no new pages.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace vae_ext {

using at::Tensor;

// Uninitialized tensors of `sizes`, the i-th with opts[i] (its dtype, and its memory format where
// one is given: contiguous otherwise). On the CPU, when their bytes together lie between glibc's
// initial mmap threshold and its largest (128 KiB and 32 MiB), one allocation from the CPU
// allocator holds them all: each tensor has a storage of its own (no two alias, as the op schemas
// require) over its slice (64-byte aligned), and the block is freed when the last of them dies.
// Otherwise (CUDA, or outside those bounds) one at::empty each.
std::vector<Tensor> empty_together(at::IntArrayRef sizes, at::ArrayRef<at::TensorOptions> opts);

// `count` contiguous tensors of `sizes` and `opts`, as above.
std::vector<Tensor> empty_together(at::IntArrayRef sizes, const at::TensorOptions& opts, size_t count);

// An op's output t, about to be written in full, returned as it is. On Linux, when t is a CPU
// tensor of 32 MiB or more, the whole 2 MiB pages of its storage are first advised to the kernel as
// transparent huge pages (madvise MADV_HUGEPAGE; VAE_EXT_HUGE_PAGES=0 turns it off). Why: glibc
// mmaps a block that size afresh on every call and unmaps it when freed (above its largest mmap
// threshold), so each 4 KiB page of it faults in again: 16,384 faults for 64 MiB, more time than
// the kernel writing it; with huge pages (where the system grants them, as under the default
// "madvise" setting) one fault maps 2 MiB. The advice goes with the mapping when glibc unmaps it.
Tensor advise_huge_pages(Tensor t);

}  // namespace vae_ext
