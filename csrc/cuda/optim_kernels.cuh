// Device code of fastreg's fused optimizers (the kernels of csrc/cuda/optim.cu) and the host-side
// plan of how a tensor group is cut into launches, in one header that compiles unchanged under
// nvcc and, with FASTREG_SIMT, under the host C++ compiler against the CPU SIMT runtime of
// tests/simt (which executes these kernels in CI: tests/test_simt.py). Design: csrc/cuda/optim.cu.
#pragma once
#include <climits>
#include <cstdint>
#include <vector>

#include "cuda/device_compat.cuh"
#include "cuda/dtype_convert.cuh"
#include "optim/optim_math.h"

namespace fastreg {
namespace optim_cuda {

using optim::AdamHyper;
using optim::AdamStepScalars;
using optim::SgdHyper;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per CTA (a multiple of every vector width)

// Kernel parameter space: 32764 bytes from CUDA 12.1 on (sm_70+), 4 KiB before.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr size_t kParamBytes = 32764;
#else
constexpr size_t kParamBytes = 4096;
#endif
constexpr size_t kReservedBytes = 256;  // the hyper-parameters and scalar pointers next to the batch

// ---------------------------------------------------------------------------------------------
// Element types: storage S, math M (float, or double for double storage)

// (conversions: csrc/cuda/dtype_convert.cuh)

// A one-element float32/float64 tensor read on the device.
struct DeviceScalar {
  const void* ptr = nullptr;
  bool f64 = false;
  __device__ __forceinline__ bool present() const { return ptr != nullptr; }
};

template <typename M>
__device__ __forceinline__ M load(const DeviceScalar& s) {
  return s.f64 ? static_cast<M>(*static_cast<const double*>(s.ptr)) : static_cast<M>(*static_cast<const float*>(s.ptr));
}

// found_inf set and nonzero: the step is skipped.
__device__ __forceinline__ bool skipped(const DeviceScalar& found_inf) {
  return found_inf.present() && load<double>(found_inf) != 0.0;  // as the CPU kernel: no rounding to 0
}

// ---------------------------------------------------------------------------------------------
// The kernel-argument table of one launch

template <int kLists>
struct Batch {
  // per tensor: kLists data pointers, numel, counter pointer, running chunk count
  static constexpr int kCap =
      static_cast<int>((kParamBytes - kReservedBytes) / (kLists * sizeof(void*) + 2 * sizeof(int64_t) + 4));
  void* data[kLists][kCap];
  int64_t numel[kCap];
  void* counter[kCap];      // Adam: float step; SGD: uint8 momentum-started flag
  int32_t chunk_end[kCap];  // chunks of tensors 0..i
  int32_t count;
};

// The tensor arguments every call reads on the device.
struct DeviceScalars {
  DeviceScalar lr;          // replaces the lr of the hyper-parameters when present
  DeviceScalar grad_scale;  // gradients are divided by it when present
  DeviceScalar found_inf;   // nonzero: the kernels write nothing
};

template <int kLists, typename Hyper>
struct Args {
  Batch<kLists> batch;
  Hyper h;
  DeviceScalars sc;
};
static_assert(sizeof(Args<5, AdamHyper<double>>) <= kParamBytes, "kernel arguments exceed the parameter space");
static_assert(sizeof(Args<3, SgdHyper<double>>) <= kParamBytes, "kernel arguments exceed the parameter space");
static_assert(sizeof(Args<2, SgdHyper<double>>) <= kParamBytes, "kernel arguments exceed the parameter space");

// The tensor and the element range [begin, begin + len) of this CTA's chunk.
template <int kLists>
__device__ __forceinline__ int locate(const Batch<kLists>& b, int64_t& begin, int64_t& len) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = b.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (b.chunk_end[mid] > block) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int32_t first_chunk = lo == 0 ? 0 : b.chunk_end[lo - 1];
  begin = static_cast<int64_t>(block - first_chunk) * kChunk;
  len = b.numel[lo] - begin < kChunk ? b.numel[lo] - begin : kChunk;
  return lo;
}

// Applies op(M (&x)[kLists]) to every element of the chunk: x[l] is element i of list l, stored
// back for the lists in kWritten (bit l). 128-bit accesses when every list is 16-byte aligned.
template <typename S, int kLists, unsigned kWritten, typename Op>
__device__ __forceinline__ void apply_chunk(S* const (&ptr)[kLists], int64_t len, Op op) {
  using M = typename AccOf<S>::type;
  constexpr int kVec = 16 / sizeof(S);
  uintptr_t bits = 0;
#pragma unroll
  for (int l = 0; l < kLists; ++l) bits |= reinterpret_cast<uintptr_t>(ptr[l]);
  int64_t done = 0;
  if (bits % 16 == 0) {
    const int64_t nvec = len / kVec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      uint4 raw[kLists];
#pragma unroll
      for (int l = 0; l < kLists; ++l) raw[l] = reinterpret_cast<const uint4*>(ptr[l])[v];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        M x[kLists];
#pragma unroll
        for (int l = 0; l < kLists; ++l) x[l] = to_acc(reinterpret_cast<const S*>(&raw[l])[e]);
        op(x);
#pragma unroll
        for (int l = 0; l < kLists; ++l) {
          if (kWritten & (1u << l)) reinterpret_cast<S*>(&raw[l])[e] = from_acc<S>(x[l]);
        }
      }
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        if (kWritten & (1u << l)) reinterpret_cast<uint4*>(ptr[l])[v] = raw[l];
      }
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
    M x[kLists];
#pragma unroll
    for (int l = 0; l < kLists; ++l) x[l] = to_acc(ptr[l][i]);
    op(x);
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (kWritten & (1u << l)) ptr[l][i] = from_acc<S>(x[l]);
    }
  }
}

template <typename S, int kLists>
__device__ __forceinline__ void chunk_pointers(const Batch<kLists>& b, int t, int64_t begin, S* (&ptr)[kLists]) {
#pragma unroll
  for (int l = 0; l < kLists; ++l) ptr[l] = static_cast<S*>(b.data[l][t]) + begin;
}

// ---------------------------------------------------------------------------------------------
// Kernels. Lists: Adam p, g, m, v[, vmax]; SGD p, g[, buf]. The gradient (list 1) is never written.

template <typename S, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ Args<AMSGRAD ? 5 : 4, AdamHyper<typename AccOf<S>::type>> a) {
  using M = typename AccOf<S>::type;
  constexpr int kLists = AMSGRAD ? 5 : 4;
  if (skipped(a.sc.found_inf)) return;
  int64_t begin, len;
  const int t = locate(a.batch, begin, len);
  AdamHyper<M> h = a.h;
  if (a.sc.grad_scale.present()) h.inv_grad_scale = M(1) / load<M>(a.sc.grad_scale);
  const M lr = a.sc.lr.present() ? load<M>(a.sc.lr) : h.lr;
  const M step = static_cast<M>(*static_cast<const float*>(a.batch.counter[t]) + 1.0f);  // epilogue stores it
  const AdamStepScalars<M> s = optim::adam_step_scalars(h, lr, step);
  S* ptr[kLists];
  chunk_pointers(a.batch, t, begin, ptr);
  apply_chunk<S, kLists, ~2u>(ptr, len, [&](M(&x)[kLists]) {
    M unused = M(0);
    optim::adam_update<AMSGRAD>(x[0], x[1], x[2], x[3], AMSGRAD ? x[kLists - 1] : unused, h, s);
  });
}

template <typename S, bool MOMENTUM>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const __grid_constant__ Args<MOMENTUM ? 3 : 2, SgdHyper<typename AccOf<S>::type>> a) {
  using M = typename AccOf<S>::type;
  constexpr int kLists = MOMENTUM ? 3 : 2;
  if (skipped(a.sc.found_inf)) return;
  int64_t begin, len;
  const int t = locate(a.batch, begin, len);
  SgdHyper<M> h = a.h;
  if (a.sc.grad_scale.present()) h.inv_grad_scale = M(1) / load<M>(a.sc.grad_scale);
  if (a.sc.lr.present()) h.neg_lr = -load<M>(a.sc.lr);
  const bool first = MOMENTUM && *static_cast<const uint8_t*>(a.batch.counter[t]) == 0;  // epilogue sets it
  S* ptr[kLists];
  chunk_pointers(a.batch, t, begin, ptr);
  apply_chunk<S, kLists, ~2u>(ptr, len, [&](M(&x)[kLists]) {
    M unused = M(0);
    optim::sgd_update<MOMENTUM>(x[0], x[1], MOMENTUM ? x[kLists - 1] : unused, first, h);
  });
}

// After the update: every tensor's counter advances (Adam: step += 1; SGD: started = 1), unless
// found_inf says the step was skipped.
enum class Counter { kAdamStep, kSgdStarted };

template <Counter kKind, int kLists, typename Hyper>
__global__ void counter_epilogue(const __grid_constant__ Args<kLists, Hyper> a) {
  if (skipped(a.sc.found_inf)) return;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < a.batch.count; t += gridDim.x * blockDim.x) {
    if (kKind == Counter::kAdamStep) {
      *static_cast<float*>(a.batch.counter[t]) += 1.0f;
    } else {
      *static_cast<uint8_t*>(a.batch.counter[t]) = 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side plan: the launches of one group (shared by the launcher in optim.cu and the SIMT
// harness). Tensor i has kLists data pointers ptr(l, i), numel(i) elements and a counter pointer
// (or none). Batches of at most Batch::kCap tensors (and < 2^30 chunks): for each,
// launch(args, chunks) runs the main kernel over `chunks` CTAs of kThreads, then (with counters)
// the epilogue over ceil(args.batch.count / kThreads) CTAs. Every tensor must have fewer than
// 2^30 chunks (checked by the caller).
constexpr int64_t kMaxChunksPerLaunch = INT32_MAX / 2;

template <int kLists, typename Hyper, typename PtrAt, typename NumelAt, typename Launch>
void for_each_launch(int64_t n, PtrAt ptr, NumelAt numel, const std::vector<void*>* counters, const Hyper& h,
                     const DeviceScalars& sc, Launch launch) {
  std::vector<Args<kLists, Hyper>> holder(1);  // ~32 KiB: on the heap, not the host stack
  Args<kLists, Hyper>& args = holder[0];
  args.h = h;
  args.sc = sc;
  Batch<kLists>& b = args.batch;
  b.count = 0;
  auto flush = [&]() {
    if (b.count == 0) return;
    launch(static_cast<const Args<kLists, Hyper>&>(args), b.chunk_end[b.count - 1]);
    b.count = 0;
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t elems = numel(i);
    const int64_t chunks = (elems + kChunk - 1) / kChunk;
    const int32_t before = b.count == 0 ? 0 : b.chunk_end[b.count - 1];
    if (b.count == Batch<kLists>::kCap || static_cast<int64_t>(before) + chunks > kMaxChunksPerLaunch) flush();
    const int32_t start = b.count == 0 ? 0 : b.chunk_end[b.count - 1];
    for (int l = 0; l < kLists; ++l) b.data[l][b.count] = ptr(l, i);
    b.numel[b.count] = elems;
    b.counter[b.count] = counters == nullptr ? nullptr : (*counters)[i];
    b.chunk_end[b.count] = start + static_cast<int32_t>(chunks);
    ++b.count;
  }
  flush();
}

inline int epilogue_blocks(int32_t count) { return (count + kThreads - 1) / kThreads; }

}  // namespace optim_cuda
}  // namespace fastreg
