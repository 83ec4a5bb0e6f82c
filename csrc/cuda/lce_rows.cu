// CUDA kernel of the internal operator fastreg::_lce_rows (schema and semantics: csrc/fastreg.cpp;
// per-row formulas: csrc/lce/lce_math.h, shared with the CPU pass csrc/lce/lce_cpu.cpp).
//
// Built against the LibTorch stable ABI only (no ATen CUDA headers): tensors are
// torch::stable::Tensor, the current stream comes from aoti_torch_get_current_cuda_stream.
//
// Design
// ------
// A row of V logits is handled by a group of K CTAs (K = 1, or a thread-block cluster of 2/4/8
// CTAs on sm_90), each owning a contiguous slice of the row's 16-byte vectors. Per row:
//   pass 1  every thread streams its vectors with 128-bit loads (kUnroll = 2 in flight), applies
//           the softcap, and keeps an online (max, sum-exp) pair, plus sum_c w_c z_c and
//           W = sum_c w_c when label smoothing is on. In "cached" mode the raw vectors are also
//           kept in dynamic shared memory (the CTA's slice of the row), so the row is read from
//           HBM exactly once.
//   reduce  warp shuffles -> per-warp partials in shared memory -> one warp; with a cluster, the
//           CTAs exchange their partials through distributed shared memory and every CTA combines
//           them in rank order (so all K CTAs hold bit-identical lse / coefficients).
//   loss    lse = m + log(s); loss via fastreg::lce_row_loss (lce_math.h); CTA rank 0 stores it.
//   pass 2  (write_grad) g_c = A p_c - B w_c - [c==t] C (fastreg::lce_grad_coefs), times the
//           softcap derivative, written in place in the logits dtype with 128-bit stores; the raw
//           logits come from shared memory (cached mode) or are re-read from global memory/L2
//           (streaming mode, used when the row slice does not fit in shared memory).
// Launch (launch_rows): grid = rows * K CTAs of 128/256/512 threads (by slice length), at most 64
// registers per thread (2 x 512 threads per SM). Cached mode picks the smallest K in {1,2,4,8}
// whose slice fits 96 KiB of shared memory (2 CTAs per SM), else the opt-in maximum; rows that do
// not fit even then (or sm_80 rows over ~160 KiB) stream. With few rows (rows * K < 2 * SMs), K
// grows further while each CTA keeps >= 512 vectors. A cluster that cannot be placed
// (cudaOccupancyMaxActiveClusters == 0) falls back to one CTA per row. FASTREG_LCE_ROWS_MODE
// (stream | nocluster | single) forces a strategy, for tests and benchmarks.
// Rows need not be 16-byte aligned (odd V): each row has a scalar head up to the first 16-byte
// boundary and a scalar tail; the vector body in between is split among the K CTAs.
// The target logit z_t is read by every thread before the first barrier, i.e. before any thread
// of the row group writes the row.
//
// W = sum_c w_c is computed inside the row reduction (only when label smoothing is on and class
// weights are given; without weights W = V exactly). It costs no extra HBM traffic: the weights
// must be read per row anyway for sum_c w_c z_c, and the (V,) weight vector stays in L2. This
// keeps the op free of host syncs and of any side buffer.
//
// Ignored rows (target == ignore_index or outside [0, V)) get loss 0 and, with write_grad, an
// all-zero gradient row; their logits are never read and the target is never used as an index.
// The op never synchronises with the host; rows == 0 launches nothing.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cooperative_groups.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <initializer_list>
#include <mutex>
#include <cstdlib>
#include <optional>
#include <string>

#include "cuda/dtype_convert.cuh"
#include "lce/lce_math.h"

namespace fastreg {
namespace lce_cuda {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int kUnroll = 2;        // 16-byte loads in flight per thread
constexpr int kMaxThreads = 512;  // CTA size upper bound (launch bounds)
constexpr int kMaxCluster = 8;    // portable cluster size limit
constexpr int kMinBlocks = 2;     // 2 x 512 threads per SM: at most 64 registers per thread

// ---------------------------------------------------------------------------------------------
// dtype helpers: csrc/cuda/dtype_convert.cuh

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dtanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dtanh(double x) { return tanh(x); }

// 16 bytes of T, moved as one 128-bit access.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  Pack<T> out;
  memcpy(&out, &raw, 16);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pk) {
  uint4 raw;
  memcpy(&raw, &pk, 16);
  *reinterpret_cast<uint4*>(p) = raw;
}

// ---------------------------------------------------------------------------------------------
// kernel arguments (by value)
struct RowArgs {
  void* logits;         // (rows, V) contiguous, dtype T
  const void* target;   // (rows,) int64 or int32
  const void* weight;   // (V,) float32/float64 or nullptr
  const void* scale;    // numel 1 or rows, float32/float64
  void* loss;           // (rows,) float32, or float64 (the accumulate dtype of float64 logits)
  int64_t rows;
  int64_t V;
  int64_t ignore_index;
  int64_t scale_stride;  // 0 (scalar) or 1 (per row)
  double eps;
  double softcap;  // <= 0: off
  double zloss;
  int K;  // CTAs per row (cluster size, 1 without a cluster)
  bool target_i32;
  bool weight_f64;
  bool scale_f64;
  bool loss_f64;
  bool write_grad;
};

template <typename A>
__device__ __forceinline__ void store_loss(const RowArgs& a, int64_t r, A v) {
  if (a.loss_f64) {
    static_cast<double*>(a.loss)[r] = static_cast<double>(v);
  } else {
    static_cast<float*>(a.loss)[r] = static_cast<float>(v);
  }
}

template <typename A>
__device__ __forceinline__ A load_real(const void* p, bool f64, int64_t i) {
  return f64 ? static_cast<A>(static_cast<const double*>(p)[i]) : static_cast<A>(static_cast<const float*>(p)[i]);
}

// Per-thread / per-CTA partial statistics of one row.
template <typename A>
struct Stats {
  A m;     // running max of z
  A s;     // sum exp(z - m)
  A swz;   // sum w_c z_c   (label smoothing only)
  A wsum;  // sum w_c       (label smoothing with class weights only)
};

template <typename A>
__device__ __forceinline__ A rescale(A s, A m_old, A m_new) {
  // s * exp(m_old - m_new), with the all -inf case (s == 0) kept finite.
  return (m_old == -std::numeric_limits<A>::infinity()) ? A(0) : s * dexp(m_old - m_new);
}

template <typename A>
__device__ __forceinline__ Stats<A> combine(const Stats<A>& a, const Stats<A>& b) {
  Stats<A> r;
  r.m = a.m > b.m ? a.m : b.m;
  r.s = rescale(a.s, a.m, r.m) + rescale(b.s, b.m, r.m);
  r.swz = a.swz + b.swz;
  r.wsum = a.wsum + b.wsum;
  return r;
}

template <typename A>
__device__ __forceinline__ Stats<A> warp_reduce(Stats<A> v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats<A> o;
    o.m = __shfl_xor_sync(0xffffffffu, v.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, v.s, off);
    o.swz = __shfl_xor_sync(0xffffffffu, v.swz, off);
    o.wsum = __shfl_xor_sync(0xffffffffu, v.wsum, off);
    v = combine(v, o);
  }
  return v;
}

// Block-wide reduction; every thread gets the (identical) result. Contains __syncthreads.
template <typename A>
__device__ __forceinline__ Stats<A> block_reduce(Stats<A> v, Stats<A>* scratch /* [33] */) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const A ninf = -std::numeric_limits<A>::infinity();
    Stats<A> w = lane < nwarps ? scratch[lane] : Stats<A>{ninf, A(0), A(0), A(0)};
    w = warp_reduce(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

// Online update with one element (head/tail scalars).
template <typename A>
__device__ __forceinline__ void accumulate1(Stats<A>& st, A z, A w, bool need_sum) {
  const A mn = z > st.m ? z : st.m;
  if (mn != -std::numeric_limits<A>::infinity()) {
    st.s = rescale(st.s, st.m, mn) + dexp(z - mn);
    st.m = mn;
  }
  if (need_sum) {
    st.swz += w * z;
    st.wsum += w;
  }
}

template <typename A>
__device__ __forceinline__ A apply_softcap(A a, A cap, bool capped) {
  return capped ? cap * dtanh(a / cap) : a;
}

// Row geometry: scalar head [0, head), vectors [head, head + nvec*VEC), scalar tail up to V.
struct RowSplit {
  int64_t head, nvec, tail_start;
  int64_t v0, v1;  // this CTA's vector range
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int64_t V, int K, int rank) {
  constexpr int VEC = Pack<T>::N;
  RowSplit sp;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int64_t head = static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T));
  if (head > V) head = V;
  sp.head = head;
  sp.nvec = (V - head) / VEC;
  sp.tail_start = head + sp.nvec * VEC;
  sp.v0 = sp.nvec * rank / K;
  sp.v1 = sp.nvec * (rank + 1) / K;
  return sp;
}

// ---------------------------------------------------------------------------------------------
// The row kernel. CACHED: keep this CTA's slice of the row in dynamic shared memory between the
// passes. CLUSTER: the K CTAs of a thread-block cluster (sm_90+) share one row.
template <typename T, bool CACHED, bool CLUSTER>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks) lce_rows_kernel(const RowArgs args) {
  using A = typename AccOf<T>::type;
  constexpr int VEC = Pack<T>::N;
  extern __shared__ uint4 smem_cache_raw[];  // CACHED: this CTA's slice, as Pack<T>
  __shared__ Stats<A> scratch[33];
  __shared__ Stats<A> cluster_part;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  constexpr bool kClusterCompiled = true;
#else
  constexpr bool kClusterCompiled = false;
#endif
  if constexpr (CLUSTER && !kClusterCompiled) {
    __trap();  // never launched below sm_90 (the host only picks clusters on sm_90+)
  } else {
    const int K = CLUSTER ? args.K : 1;
    const int64_t r = static_cast<int64_t>(blockIdx.x) / K;
    const int rank = static_cast<int>(static_cast<int64_t>(blockIdx.x) - r * K);
    if (r >= args.rows) return;  // cannot happen (grid == rows * K); whole cluster agrees anyway

    const int64_t V = args.V;
    T* row = static_cast<T*>(args.logits) + r * V;
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    const RowSplit sp = split_row(row, V, K, rank);
    const bool first = rank == 0;
    const bool last = rank == K - 1;

    const int64_t t = args.target_i32 ? static_cast<int64_t>(static_cast<const int32_t*>(args.target)[r])
                                      : static_cast<const int64_t*>(args.target)[r];
    const bool active = fastreg::lce_target_active(t, args.ignore_index, V);

    if (!active) {  // uniform over the whole row group: no barrier is skipped by part of it
      if (first && tid == 0) store_loss(args, r, A(0));
      if (args.write_grad) {
        Pack<T> zero;
#pragma unroll
        for (int i = 0; i < VEC; ++i) zero.v[i] = from_acc<T>(A(0));
        for (int64_t v = sp.v0 + tid; v < sp.v1; v += nthreads) store_pack(row + sp.head + v * VEC, zero);
        if (first && tid < sp.head) row[tid] = from_acc<T>(A(0));
        if (last && tid < V - sp.tail_start) row[sp.tail_start + tid] = from_acc<T>(A(0));
      }
      return;
    }

    const bool capped = args.softcap > 0.0;
    const A cap = static_cast<A>(capped ? args.softcap : 1.0);
    const A eps = static_cast<A>(args.eps);
    const bool need_sum = args.eps > 0.0;  // sum w z and W only matter with label smoothing
    const void* wptr = args.weight;
    const bool wf64 = args.weight_f64;
    auto weight_at = [&](int64_t c) -> A { return wptr ? load_real<A>(wptr, wf64, c) : A(1); };

    // Target logit: read before any barrier, hence before any write to this row.
    const A z_t = apply_softcap(to_acc(row[t]), cap, capped);

    Pack<T>* cache = reinterpret_cast<Pack<T>*>(smem_cache_raw);
    const A ninf = -std::numeric_limits<A>::infinity();
    Stats<A> st{ninf, A(0), A(0), A(0)};

    // ---- pass 1: stream the slice once ----
    const int64_t stride = static_cast<int64_t>(nthreads) * kUnroll;
    for (int64_t base = sp.v0 + tid; base < sp.v1; base += stride) {
      Pack<T> pk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + static_cast<int64_t>(u) * nthreads;
        if (v < sp.v1) pk[u] = load_pack(row + sp.head + v * VEC);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + static_cast<int64_t>(u) * nthreads;
        if (v < sp.v1) {
          if constexpr (CACHED) cache[v - sp.v0] = pk[u];
          A z[VEC];
          A lm = ninf;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            z[i] = apply_softcap(to_acc(pk[u].v[i]), cap, capped);
            lm = z[i] > lm ? z[i] : lm;
          }
          const A mn = lm > st.m ? lm : st.m;
          if (mn != ninf) {
            A acc = rescale(st.s, st.m, mn);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc += dexp(z[i] - mn);
            st.s = acc;
            st.m = mn;
          }
          if (need_sum) {
            const int64_t c0 = sp.head + v * VEC;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const A w = weight_at(c0 + i);
              st.swz += w * z[i];
              st.wsum += w;
            }
          }
        }
      }
    }
    if (first && tid < sp.head) {
      accumulate1(st, apply_softcap(to_acc(row[tid]), cap, capped), weight_at(tid), need_sum);
    }
    if (last && tid < V - sp.tail_start) {
      const int64_t c = sp.tail_start + tid;
      accumulate1(st, apply_softcap(to_acc(row[c]), cap, capped), weight_at(c), need_sum);
    }

    // ---- reduce: block, then (cluster) across the row group ----
    Stats<A> tot = block_reduce(st, scratch);
    if constexpr (CLUSTER) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      namespace cg = cooperative_groups;
      cg::cluster_group cluster = cg::this_cluster();
      if (tid == 0) cluster_part = tot;
      cluster.sync();  // partials visible cluster-wide; all reads of the row (z_t too) are done
      Stats<A> acc = *cluster.map_shared_rank(&cluster_part, 0);
      for (int j = 1; j < K; ++j) acc = combine(acc, *cluster.map_shared_rank(&cluster_part, j));
      tot = acc;
      cluster.sync();  // nobody leaves (or reuses cluster_part) while others still read it
#endif
    }

    const A lse = tot.m + dlog(tot.s);
    const A w_t = weight_at(t);
    const A w_sum = wptr ? tot.wsum : static_cast<A>(V);
    const A zl = static_cast<A>(args.zloss);
    if (first && tid == 0) {
      const A loss = need_sum ? fastreg::lce_row_loss<A>(lse, z_t, w_t, tot.swz, w_sum, eps, V, zl)
                              : fastreg::lce_row_loss<A>(lse, z_t, w_t, A(0), A(0), A(0), V, zl);
      store_loss(args, r, loss);
    }
    if (!args.write_grad) return;

    // ---- pass 2: gradient in place ----
    const A s_r = load_real<A>(args.scale, args.scale_f64, args.scale_stride * r);
    const fastreg::LceGradCoefs<A> coef =
        fastreg::lce_grad_coefs<A>(s_r, lse, w_t, need_sum ? w_sum : A(0), need_sum ? eps : A(0), V, zl);
    auto grad_of = [&](A a, int64_t c) -> A {
      const A z = apply_softcap(a, cap, capped);
      A g = coef.A * dexp(z - lse);
      if (need_sum) g -= coef.B * weight_at(c);
      if (c == t) g -= coef.C;
      if (capped) g *= fastreg::softcap_grad_from_value(z, cap);
      return g;
    };

    for (int64_t base = sp.v0 + tid; base < sp.v1; base += stride) {
      Pack<T> pk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + static_cast<int64_t>(u) * nthreads;
        if (v < sp.v1) {
          if constexpr (CACHED) {
            pk[u] = cache[v - sp.v0];
          } else {
            pk[u] = load_pack(row + sp.head + v * VEC);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + static_cast<int64_t>(u) * nthreads;
        if (v < sp.v1) {
          const int64_t c0 = sp.head + v * VEC;
          Pack<T> out;
#pragma unroll
          for (int i = 0; i < VEC; ++i) out.v[i] = from_acc<T>(grad_of(to_acc(pk[u].v[i]), c0 + i));
          store_pack(row + c0, out);
        }
      }
    }
    // Scalars: each is read and then written by the same thread.
    if (first && tid < sp.head) row[tid] = from_acc<T>(grad_of(to_acc(row[tid]), tid));
    if (last && tid < V - sp.tail_start) {
      const int64_t c = sp.tail_start + tid;
      row[c] = from_acc<T>(grad_of(to_acc(row[c]), c));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;  // max dynamic + static shared memory per block (opt-in)
  bool clusters = false;
};

inline void cuda_check(cudaError_t e) { STD_CUDA_CHECK(e); }

const DeviceInfo& device_info(int dev) {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool filled[64] = {};
  STD_TORCH_CHECK(dev >= 0 && dev < 64, "fastreg::_lce_rows: unsupported CUDA device index ", dev);
  std::lock_guard<std::mutex> lock(mu);
  if (!filled[dev]) {
    DeviceInfo d;
    int cl = 0, major = 0;
    cuda_check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
    cuda_check(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    cuda_check(cudaDeviceGetAttribute(&cl, cudaDevAttrClusterLaunch, dev));
    d.clusters = cl != 0 && major >= 9;
    cache[dev] = d;
    filled[dev] = true;
  }
  return cache[dev];
}

inline int threads_for(int64_t slice_vecs) {
  if (slice_vecs >= 4096) return 512;
  if (slice_vecs >= 1024) return 256;
  return 128;
}

template <typename T, bool CACHED, bool CLUSTER>
bool launch_variant(const RowArgs& a, int dev, cudaStream_t stream, int threads, size_t smem) {
  auto kernel = lce_rows_kernel<T, CACHED, CLUSTER>;
  if (smem > 48 * 1024) {
    // Raise this kernel's dynamic shared-memory limit once per device (a function attribute, not
    // stream work: fine during CUDA-graph capture). One table per template instance.
    static std::mutex mu;
    static int granted[64] = {};
    std::lock_guard<std::mutex> lock(mu);
    if (static_cast<int>(smem) > granted[dev]) {
      cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      granted[dev] = static_cast<int>(smem);
    }
  }
  const unsigned int grid = static_cast<unsigned int>(a.rows * (CLUSTER ? a.K : 1));
  if constexpr (CLUSTER) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid, 1, 1);
    cfg.blockDim = dim3(threads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned int>(a.K);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    // Ask first whether such clusters can be resident at all (a query: no stream work, no sync),
    // so that an impossible configuration falls back instead of failing the launch.
    int max_clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg) != cudaSuccess || max_clusters < 1) {
      (void)cudaGetLastError();  // clear the query's error, if any
      return false;
    }
    cuda_check(cudaLaunchKernelEx(&cfg, kernel, a));
  } else {
    kernel<<<grid, threads, smem, stream>>>(a);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Test/benchmark knob FASTREG_LCE_ROWS_MODE (read per call, host side only):
//   "stream"    never cache the row in shared memory (pass 2 re-reads global memory)
//   "nocluster" never split a row over a cluster (one CTA per row)
//   "single"    both of the above
// Anything else (or unset): automatic choice.
struct ModeOverride {
  bool no_cache = false;
  bool no_cluster = false;
};
inline ModeOverride mode_override() {
  ModeOverride o;
  if (const char* e = std::getenv("FASTREG_LCE_ROWS_MODE")) {
    const std::string m(e);
    o.no_cache = m == "stream" || m == "single";
    o.no_cluster = m == "nocluster" || m == "single";
  }
  return o;
}

// Whether the cluster variants of the kernel hold real sm_90+ code on this device. A build without
// sm_90 SASS runs JIT-compiled compute_8x PTX on an H100, where those variants are only __trap().
template <typename T>
bool cluster_code_present(int dev) {
  static std::mutex mu;
  static int8_t cache[64] = {};  // 0 unknown, 1 yes, -1 no
  std::lock_guard<std::mutex> lock(mu);
  if (cache[dev] == 0) {
    bool ok = true;
    for (const void* k : {reinterpret_cast<const void*>(lce_rows_kernel<T, true, true>),
                          reinterpret_cast<const void*>(lce_rows_kernel<T, false, true>)}) {
      cudaFuncAttributes fa{};
      if (cudaFuncGetAttributes(&fa, k) != cudaSuccess) {
        (void)cudaGetLastError();
        ok = false;
      } else {
        ok = ok && fa.ptxVersion >= 90;
      }
    }
    cache[dev] = ok ? 1 : -1;
  }
  return cache[dev] > 0;
}

template <typename T>
void launch_rows(RowArgs a, int dev, cudaStream_t stream) {
  constexpr int VEC = Pack<T>::N;
  const DeviceInfo& di0 = device_info(dev);
  const ModeOverride mo = mode_override();
  DeviceInfo di = di0;
  if (mo.no_cluster || (di.clusters && !cluster_code_present<T>(dev))) di.clusters = false;
  const int64_t nvec = a.V / VEC;  // upper bound on any row's vector count
  // Shared memory left for the row cache: the opt-in maximum minus the kernel's static scratch.
  const int64_t static_smem = 34 * static_cast<int64_t>(sizeof(Stats<typename AccOf<T>::type>)) + 64;
  const int64_t cache_cap = static_cast<int64_t>(di.smem_optin) - static_smem - 1024;
  constexpr int64_t kPreferredSlice = 96 * 1024;  // keeps 2 CTAs per SM
  auto slice_vecs = [&](int K) { return (nvec + K - 1) / K; };
  auto slice_bytes = [&](int K) { return slice_vecs(K) * 16; };

  int K = 1;
  bool cached = false;
  if (a.write_grad && nvec > 0 && !mo.no_cache) {
    const int kmax = di.clusters ? kMaxCluster : 1;
    int k_fit = 0;
    for (int k = 1; k <= kmax; k *= 2)
      if (slice_bytes(k) <= kPreferredSlice && slice_bytes(k) <= cache_cap) {
        k_fit = k;
        break;
      }
    if (k_fit == 0)
      for (int k = 1; k <= kmax; k *= 2)
        if (slice_bytes(k) <= cache_cap) {
          k_fit = k;
          break;
        }
    if (k_fit > 0) {
      K = k_fit;
      cached = true;
    }
  }
  // Few long rows: split them over a cluster so that the whole GPU takes part.
  if (di.clusters) {
    while (K < kMaxCluster && a.rows * K < 2LL * di.sms && slice_vecs(K * 2) >= 2LL * 128 * kUnroll) K *= 2;
  }
  const int threads = threads_for(slice_vecs(K));
  const size_t smem = cached ? static_cast<size_t>(slice_bytes(K)) : 0;
  a.K = K;

  bool done = false;
  if (K > 1) {
    done = cached ? launch_variant<T, true, true>(a, dev, stream, threads, smem)
                  : launch_variant<T, false, true>(a, dev, stream, threads, 0);
  }
  if (!done) {  // single CTA per row (also the fallback when clusters cannot be placed)
    a.K = 1;
    const bool c1 = cached && slice_bytes(1) <= cache_cap;
    const int th1 = threads_for(slice_vecs(1));
    done = c1 ? launch_variant<T, true, false>(a, dev, stream, th1, static_cast<size_t>(slice_bytes(1)))
              : launch_variant<T, false, false>(a, dev, stream, th1, 0);
  }
}

inline bool is_real(ScalarType s) { return s == ScalarType::Float || s == ScalarType::Double; }

void lce_rows_cuda(Tensor logits, Tensor target, std::optional<Tensor> class_weight, Tensor row_scale,
                   int64_t ignore_index, double label_smoothing, double softcap, double z_loss, bool write_grad,
                   Tensor loss_rows) {
  STD_TORCH_CHECK(logits.is_cuda(), "fastreg::_lce_rows (CUDA): logits must be a CUDA tensor");
  STD_TORCH_CHECK(logits.dim() == 2, "fastreg::_lce_rows: logits must be 2-D (rows, V)");
  STD_TORCH_CHECK(logits.is_contiguous(), "fastreg::_lce_rows: logits must be contiguous");
  const int64_t rows = logits.size(0);
  const int64_t V = logits.size(1);
  const int32_t dev = logits.get_device_index();
  auto same_device = [&](const Tensor& x) { return x.is_cuda() && x.get_device_index() == dev; };

  STD_TORCH_CHECK(same_device(target) && target.numel() == rows && target.is_contiguous(),
                  "fastreg::_lce_rows: target must be a contiguous (rows,) tensor on the logits' device");
  const ScalarType tt = target.scalar_type();
  STD_TORCH_CHECK(tt == ScalarType::Long || tt == ScalarType::Int, "fastreg::_lce_rows: target must be int64 or int32");
  STD_TORCH_CHECK(same_device(loss_rows) && loss_rows.numel() == rows && loss_rows.is_contiguous() &&
                      is_real(loss_rows.scalar_type()),
                  "fastreg::_lce_rows: loss_rows must be a contiguous float32/float64 (rows,) tensor on the logits' "
                  "device");
  STD_TORCH_CHECK(same_device(row_scale) && is_real(row_scale.scalar_type()) &&
                      (row_scale.numel() == 1 || (row_scale.numel() == rows && row_scale.is_contiguous())),
                  "fastreg::_lce_rows: row_scale must be a float32/float64 tensor with 1 or rows elements on the "
                  "logits' device");
  const void* wptr = nullptr;
  bool w64 = false;
  if (class_weight.has_value() && class_weight->defined()) {
    const Tensor& w = *class_weight;
    STD_TORCH_CHECK(same_device(w) && w.numel() == V && w.is_contiguous() && is_real(w.scalar_type()),
                    "fastreg::_lce_rows: class_weight must be a contiguous float32/float64 (V,) tensor on the "
                    "logits' device");
    wptr = w.const_data_ptr();
    w64 = w.scalar_type() == ScalarType::Double;
  }
  if (rows == 0) return;
  // grid = rows * K CTAs with K <= 8 must stay below 2^31 - 1 (the driver's chunks are far smaller)
  STD_TORCH_CHECK(rows < (int64_t{1} << 28), "fastreg::_lce_rows: too many rows in one chunk (", rows, ")");

  RowArgs a{};
  a.logits = logits.mutable_data_ptr();
  a.target = target.const_data_ptr();
  a.weight = wptr;
  a.scale = row_scale.const_data_ptr();
  a.loss = loss_rows.mutable_data_ptr();
  a.rows = rows;
  a.V = V;
  a.ignore_index = ignore_index;
  a.scale_stride = row_scale.numel() == 1 ? 0 : 1;
  a.eps = label_smoothing;
  a.softcap = softcap;
  a.zloss = z_loss;
  a.K = 1;
  a.target_i32 = tt == ScalarType::Int;
  a.weight_f64 = w64;
  a.scale_f64 = row_scale.scalar_type() == ScalarType::Double;
  a.loss_f64 = loss_rows.scalar_type() == ScalarType::Double;
  a.write_grad = write_grad;

  torch::stable::accelerator::DeviceGuard guard(dev);
  void* stream_ptr = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(dev, &stream_ptr));
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);

  switch (logits.scalar_type()) {
    case ScalarType::Float:
      launch_rows<float>(a, dev, stream);
      break;
    case ScalarType::BFloat16:
      launch_rows<__nv_bfloat16>(a, dev, stream);
      break;
    case ScalarType::Half:
      launch_rows<__half>(a, dev, stream);
      break;
    case ScalarType::Double:
      launch_rows<double>(a, dev, stream);
      break;
    default:
      STD_TORCH_CHECK(false, "fastreg::_lce_rows: logits must be float32, bfloat16, float16 or float64");
  }
}

}  // namespace lce_cuda
}  // namespace fastreg

STABLE_TORCH_LIBRARY_IMPL(fastreg, CUDA, m) { m.impl("_lce_rows", TORCH_BOX(&fastreg::lce_cuda::lce_rows_cuda)); }
