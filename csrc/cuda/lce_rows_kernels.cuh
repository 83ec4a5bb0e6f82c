// Device code of fastreg's CUDA row pass (the kernel of csrc/cuda/lce_rows.cu; design notes there),
// in a header that compiles unchanged under nvcc and, with FASTREG_SIMT, under the host C++
// compiler against the CPU SIMT runtime of tests/simt, which executes it in CI
// (tests/test_simt.py). The launch plan is csrc/cuda/lce_rows_plan.h.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "cuda/device_compat.cuh"
#include "cuda/dtype_convert.cuh"
#include "cuda/lce_rows_plan.h"
#include "lce/lce_math.h"

namespace fastreg {
namespace lce_cuda {

constexpr int kUnroll = kPlanUnroll;  // 16-byte loads in flight per thread
constexpr int kMaxThreads = 512;      // CTA size upper bound (launch bounds)
// Launch bounds (kMaxThreads, kMinBlocks), chosen by `nvcc -Xptxas -v` (CUDA 13.0, -O3):
//   kMinBlocks = 2 caps the kernel at 64 registers and every variant spills on sm_90 (fp32 8-16 B
//   stores / 8-64 B loads per thread, bf16 12-24 / 36-72, fp64 44-80 / 48-152) and most on sm_80;
//   kMinBlocks = 1 spills nowhere: sm_90 fp32 82-88, bf16/fp16 80-96, fp64 114-116 registers;
//   sm_80 fp32 82-83, bf16/fp16 80, fp64 98-100.
// The CTAs that need 512 threads hold >= 64 KiB row slices, so shared memory already limits them
// to 1-3 per SM; 128/256-thread CTAs still fit 2-4 per SM at <= 128 registers.
constexpr int kMinBlocks = 1;

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
  r.m = fastreg::nan_max(a.m, b.m);
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
  const A mn = fastreg::nan_max(st.m, z);
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
  __shared__ Stats<A> scratch[33];
  __shared__ Stats<A> cluster_part;   // this CTA's partial, read by rank 0's thread 0 over DSMEM
  __shared__ Stats<A> cluster_total;  // the combined row statistics, broadcast to the CTA

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
    const bool need_sum = fastreg::lce_smoothing_used(args.eps);  // else no w_c with c != t is read
    const void* wptr = args.weight;
    const bool wf64 = args.weight_f64;
    auto weight_at = [&](int64_t c) -> A { return wptr ? load_real<A>(wptr, wf64, c) : A(1); };

    // Target logit: read before any barrier, hence before any write to this row.
    const A z_t = apply_softcap(to_acc(row[t]), cap, capped);

    Pack<T>* cache = dynamic_smem<Pack<T>>();  // CACHED: this CTA's slice of the row
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
            lm = fastreg::nan_max(lm, z[i]);
          }
          const A mn = fastreg::nan_max(st.m, lm);
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
#if FASTREG_CLUSTER_CODE
      // One reader per CTA (its thread 0) combines the K partials over DSMEM in rank order, so
      // all K CTAs hold bit-identical statistics, and broadcasts them through shared memory.
      namespace cg = cooperative_groups;
      cg::cluster_group cluster = cg::this_cluster();
      if (tid == 0) cluster_part = tot;
      cluster.sync();  // partials visible cluster-wide; all reads of the row (z_t too) are done
      if (tid == 0) {
        Stats<A> acc = *cluster.map_shared_rank(&cluster_part, 0);
        for (int j = 1; j < K; ++j) acc = combine(acc, *cluster.map_shared_rank(&cluster_part, j));
        cluster_total = acc;
      }
      cluster.sync();  // cluster_total visible to the CTA; nobody leaves while others still read
      tot = cluster_total;
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

// Static shared memory of lce_rows_kernel<T, ...> (the planner keeps it out of the row cache).
template <typename T>
constexpr int64_t row_static_smem() {
  return 35 * static_cast<int64_t>(sizeof(Stats<typename AccOf<T>::type>)) + 64;
}

}  // namespace lce_cuda
}  // namespace fastreg
