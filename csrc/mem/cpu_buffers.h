// Large CPU buffers of the fused ops: transparent huge pages and a small cache of freed blocks.
//
// A step of the fused loss at LM-head sizes allocates a few hundred MB that it touches once (the
// (chunk, V) logits buffer, grad_weight, grad_input). Fresh from the system allocator every page
// of them is a page fault that the kernel must zero and charge to the cgroup: measured (torch
// 2.13, 2-core VM, bf16 2048x1024x32000) ~50 ms of a 600 ms step, outside the three GEMMs. So
// buffers of 2 MiB and more come from here: 2 MiB-aligned and madvise(MADV_HUGEPAGE)d (one fault
// per 2 MiB), and when such a tensor is freed its block is kept (up to a limit) for the next
// request of about its size -- a training loop's next step reuses the pages of the last one.
//
// The blocks back ordinary resizable CPU tensors (an at::Allocator, as pinned memory is). Limit:
// FASTREG_CPU_CACHE_MB (default 1024; 0 turns the cache off, huge pages stay), or
// set_limit(); release() returns every cached block to the system (fastreg.empty_cpu_cache()).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastreg::cpu_buffers {

// at::empty on CPU through this allocator for >= 2 MiB (elsewhere, and on other devices, at::empty).
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options);

struct Info {
  int64_t cached_bytes, limit_bytes, live_bytes, hits, misses;
};
Info info();
void release();
void set_limit(int64_t bytes);

}  // namespace fastreg::cpu_buffers
