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

// The bf16 training modes (optim_math.h): a kernel is instantiated for one of them.
//   kStochastic: bf16 params stored with stochastic rounding, Philox bits keyed by
//                (sr_seed, step, first_tensor + t, element index) exactly as the CPU kernel does
//   kMaster:     the last list is the fp32 master copy; the params receive its nearest rounding
enum class Bf16Mode { kPlain, kStochastic, kMaster };

struct ModeArgs {
  uint64_t sr_seed = 0;
  int32_t first_tensor = 0;  // the group index of the batch's tensor 0 (the Philox tensor key)
};

template <int kLists, typename Hyper>
struct Args {
  Batch<kLists> batch;
  Hyper h;
  DeviceScalars sc;
  ModeArgs mode;
};
static_assert(sizeof(Args<5, AdamHyper<double>>) <= kParamBytes, "kernel arguments exceed the parameter space");
static_assert(sizeof(Args<3, SgdHyper<double>>) <= kParamBytes, "kernel arguments exceed the parameter space");
static_assert(sizeof(Args<2, SgdHyper<double>>) <= kParamBytes, "kernel arguments exceed the parameter space");
static_assert(sizeof(Args<6, AdamHyper<float>>) <= kParamBytes, "kernel arguments exceed the parameter space");
static_assert(sizeof(Args<4, SgdHyper<float>>) <= kParamBytes, "kernel arguments exceed the parameter space");

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
      for (int l = 0; l < kLists; ++l) raw[l] = vector_load<uint4>(reinterpret_cast<const uint4*>(ptr[l]) + v);
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
        if (kWritten & (1u << l)) vector_store(reinterpret_cast<uint4*>(ptr[l]) + v, raw[l]);
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

// apply_chunk for the bf16 modes (S = bf16, or fp16 with kMaster). Lists 0..kElem-1 are element
// arrays of S (0 params, 1 grads); op sees x[0] = the value the update starts from:
//   kMaster:     x[0] = master[i]; afterwards master[i] = x[0], params[i] = its nearest rounding
//   kStochastic: params[i] = optim::bf16_bits_stochastic(x[0], the element's 16 Philox bits)
// `first` is the chunk's first element in its tensor (a multiple of kChunk, so each 8-element
// vector is exactly one Philox block: one generator call per thread and vector).
struct SrKey {
  uint64_t seed;
  uint32_t step;
  uint32_t tensor;
};

template <Bf16Mode MODE, typename S, int kElem, unsigned kWritten, typename Op>
__device__ __forceinline__ void apply_chunk_mode(S* const (&ptr)[kElem], float* master, int64_t len, int64_t first,
                                                 const SrKey& key, Op op) {
  static_assert(sizeof(S) == 2 && MODE != Bf16Mode::kPlain, "the modes round float to a 16-bit type");
  constexpr int kVec = 8;
  static_assert(kVec == optim::kSrElementsPerBlock, "one Philox block per 128-bit vector");
  constexpr bool kMaster = MODE == Bf16Mode::kMaster;
  uintptr_t bits = reinterpret_cast<uintptr_t>(master);
#pragma unroll
  for (int l = 0; l < kElem; ++l) bits |= reinterpret_cast<uintptr_t>(ptr[l]);
  int64_t done = 0;
  if (bits % 16 == 0) {
    const int64_t nvec = len / kVec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      uint4 raw[kElem];
#pragma unroll
      for (int l = kMaster ? 1 : 0; l < kElem; ++l) raw[l] = vector_load<uint4>(reinterpret_cast<const uint4*>(ptr[l]) + v);
      uint4 master_raw[2];
      optim::Philox4 r{};
      if (kMaster) {
        master_raw[0] = vector_load<uint4>(reinterpret_cast<const uint4*>(master) + 2 * v);
        master_raw[1] = vector_load<uint4>(reinterpret_cast<const uint4*>(master) + 2 * v + 1);
      } else {
        r = optim::sr_block(key.seed, key.step, key.tensor, static_cast<uint64_t>(first + v * kVec) / kVec);
      }
      float* mv = reinterpret_cast<float*>(master_raw);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        float x[kElem];
#pragma unroll
        for (int l = 0; l < kElem; ++l) x[l] = (kMaster && l == 0) ? mv[e] : to_acc(reinterpret_cast<const S*>(&raw[l])[e]);
        op(x);
#pragma unroll
        for (int l = 1; l < kElem; ++l) {
          if (kWritten & (1u << l)) reinterpret_cast<S*>(&raw[l])[e] = from_acc<S>(x[l]);
        }
        if (kMaster) {
          mv[e] = x[0];
          reinterpret_cast<S*>(&raw[0])[e] = from_acc<S>(x[0]);
        } else {
          reinterpret_cast<uint16_t*>(&raw[0])[e] = optim::bf16_bits_stochastic(x[0], r.v[e / 2] >> (16 * (e % 2)));
        }
      }
#pragma unroll
      for (int l = 0; l < kElem; ++l) {
        if (l == 0 || (kWritten & (1u << l))) vector_store(reinterpret_cast<uint4*>(ptr[l]) + v, raw[l]);
      }
      if (kMaster) {
        vector_store(reinterpret_cast<uint4*>(master) + 2 * v, master_raw[0]);
        vector_store(reinterpret_cast<uint4*>(master) + 2 * v + 1, master_raw[1]);
      }
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
    float x[kElem];
#pragma unroll
    for (int l = 0; l < kElem; ++l) x[l] = (kMaster && l == 0) ? master[i] : to_acc(ptr[l][i]);
    op(x);
#pragma unroll
    for (int l = 1; l < kElem; ++l) {
      if (kWritten & (1u << l)) ptr[l][i] = from_acc<S>(x[l]);
    }
    if (kMaster) {
      master[i] = x[0];
      ptr[0][i] = from_acc<S>(x[0]);
    } else {
      reinterpret_cast<uint16_t*>(ptr[0])[i] = optim::bf16_bits_stochastic(
          x[0], optim::sr_random16(key.seed, key.step, key.tensor, static_cast<uint64_t>(first + i)));
    }
  }
}

// The first kN lists of tensor t from element `begin` on (a mode kernel's last list is not of S).
template <typename S, int kLists, int kN>
__device__ __forceinline__ void chunk_pointers(const Batch<kLists>& b, int t, int64_t begin, S* (&ptr)[kN]) {
  static_assert(kN <= kLists, "more pointers than lists");
#pragma unroll
  for (int l = 0; l < kN; ++l) ptr[l] = static_cast<S*>(b.data[l][t]) + begin;
}

// ---------------------------------------------------------------------------------------------
// Kernels. Lists: Adam p, g, m, v[, vmax]; SGD p, g[, buf]. The gradient (list 1) is never written.

// The lists of a kernel: its element lists plus, in a mode, one more (kMaster: the fp32 master
// copy; SGD kStochastic: a pointer to the tensor's float step counter).
template <Bf16Mode MODE, bool kSgd>
constexpr int kModeLists = MODE == Bf16Mode::kMaster || (kSgd && MODE == Bf16Mode::kStochastic) ? 1 : 0;

template <typename S, bool AMSGRAD, Bf16Mode MODE = Bf16Mode::kPlain>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ Args<(AMSGRAD ? 5 : 4) + kModeLists<MODE, false>,
                                             AdamHyper<typename AccOf<S>::type>> a) {
  using M = typename AccOf<S>::type;
  constexpr int kElem = AMSGRAD ? 5 : 4;
  constexpr int kLists = kElem + kModeLists<MODE, false>;
  if (skipped(a.sc.found_inf)) return;
  int64_t begin, len;
  const int t = locate(a.batch, begin, len);
  AdamHyper<M> h = a.h;
  if (a.sc.grad_scale.present()) h.inv_grad_scale = M(1) / load<M>(a.sc.grad_scale);
  const double lr = a.sc.lr.present() ? load<double>(a.sc.lr) : h.lr_exact;
  const float new_step = *static_cast<const float*>(a.batch.counter[t]) + 1.0f;  // epilogue stores it
  const AdamStepScalars<M> s = optim::adam_step_scalars(h, lr, static_cast<M>(new_step));
  S* ptr[kElem];
  chunk_pointers(a.batch, t, begin, ptr);
  auto update = [&](M(&x)[kElem]) {
    M unused = M(0);
    optim::adam_update<AMSGRAD>(x[0], x[1], x[2], x[3], AMSGRAD ? x[kElem - 1] : unused, h, s);
  };
  if constexpr (MODE == Bf16Mode::kPlain) {
    apply_chunk<S, kElem, ~2u>(ptr, len, update);
  } else {
    float* master = MODE == Bf16Mode::kMaster ? static_cast<float*>(a.batch.data[kLists - 1][t]) + begin : nullptr;
    const SrKey key{a.mode.sr_seed, optim::sr_step_key(new_step), static_cast<uint32_t>(a.mode.first_tensor + t)};
    apply_chunk_mode<MODE, S, kElem, ~2u>(ptr, master, len, begin, key, update);
  }
}

template <typename S, bool MOMENTUM, Bf16Mode MODE = Bf16Mode::kPlain>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const __grid_constant__ Args<(MOMENTUM ? 3 : 2) + kModeLists<MODE, true>,
                                            SgdHyper<typename AccOf<S>::type>> a) {
  using M = typename AccOf<S>::type;
  constexpr int kElem = MOMENTUM ? 3 : 2;
  constexpr int kLists = kElem + kModeLists<MODE, true>;
  if (skipped(a.sc.found_inf)) return;
  int64_t begin, len;
  const int t = locate(a.batch, begin, len);
  SgdHyper<M> h = a.h;
  if (a.sc.grad_scale.present()) h.inv_grad_scale = M(1) / load<M>(a.sc.grad_scale);
  if (a.sc.lr.present()) h.neg_lr = -load<M>(a.sc.lr);
  const bool first = MOMENTUM && *static_cast<const uint8_t*>(a.batch.counter[t]) == 0;  // epilogue sets it
  S* ptr[kElem];
  chunk_pointers(a.batch, t, begin, ptr);
  auto update = [&](M(&x)[kElem]) {
    M unused = M(0);
    optim::sgd_update<MOMENTUM>(x[0], x[1], MOMENTUM ? x[kElem - 1] : unused, first, h);
  };
  if constexpr (MODE == Bf16Mode::kPlain) {
    apply_chunk<S, kElem, ~2u>(ptr, len, update);
  } else {
    void* extra = a.batch.data[kLists - 1][t];
    float* master = MODE == Bf16Mode::kMaster ? static_cast<float*>(extra) + begin : nullptr;
    const uint32_t step = MODE == Bf16Mode::kStochastic ? optim::sr_step_key(*static_cast<const float*>(extra) + 1.0f) : 0;
    const SrKey key{a.mode.sr_seed, step, static_cast<uint32_t>(a.mode.first_tensor + t)};
    apply_chunk_mode<MODE, S, kElem, ~2u>(ptr, master, len, begin, key, update);
  }
}

// After the update: every tensor's counter advances (Adam: step += 1; SGD: started = 1 where it
// has a flag, and with stochastic rounding its step counter, the last list, += 1), unless
// found_inf says the step was skipped.
enum class Counter { kAdamStep, kSgdStarted };

template <Counter kKind, int kLists, typename Hyper, Bf16Mode MODE = Bf16Mode::kPlain>
__global__ void counter_epilogue(const __grid_constant__ Args<kLists, Hyper> a) {
  if (skipped(a.sc.found_inf)) return;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < a.batch.count; t += gridDim.x * blockDim.x) {
    if (kKind == Counter::kAdamStep) {
      *static_cast<float*>(a.batch.counter[t]) += 1.0f;
    } else {
      if (a.batch.counter[t] != nullptr) *static_cast<uint8_t*>(a.batch.counter[t]) = 1;
      if (MODE == Bf16Mode::kStochastic) *static_cast<float*>(a.batch.data[kLists - 1][t]) += 1.0f;
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

// sr_seed: the stochastic-rounding seed the mode kernels read (each batch also learns the group
// index of its first tensor).
template <int kLists, typename Hyper, typename PtrAt, typename NumelAt, typename Launch>
void for_each_launch(int64_t n, PtrAt ptr, NumelAt numel, const std::vector<void*>* counters, const Hyper& h,
                     const DeviceScalars& sc, Launch launch, uint64_t sr_seed = 0) {
  std::vector<Args<kLists, Hyper>> holder(1);  // ~32 KiB: on the heap, not the host stack
  Args<kLists, Hyper>& args = holder[0];
  args.h = h;
  args.sc = sc;
  args.mode.sr_seed = sr_seed;
  args.mode.first_tensor = 0;
  Batch<kLists>& b = args.batch;
  b.count = 0;
  auto flush = [&]() {
    if (b.count == 0) return;
    launch(static_cast<const Args<kLists, Hyper>&>(args), b.chunk_end[b.count - 1]);
    args.mode.first_tensor += b.count;
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
