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

// 16 bytes of T, moved as one 128-bit access.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  const uint4 raw = vector_load<uint4>(p);
  Pack<T> out;
  memcpy(&out, &raw, 16);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pk) {
  uint4 raw;
  memcpy(&raw, &pk, 16);
  vector_store(p, raw);
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
  // optional inputs/outputs of the schema (nullptr: absent)
  const void* probs;        // (rows, V) class-probability targets, dtype T; then `target` is not read
  const void* zloss_scale;  // one element, float32/float64 (zscale_f64): multiplies the z-loss term
  void* lse;                // (rows,) float32/float64 (lse_f64): each row's log-sum-exp, 0 if ignored
  int64_t* argmax;          // (rows,): first maximum of each row, -1 if ignored
  uint8_t* keep;            // (row_tiles, num_blocks) max lce_block_code of the tile's entries
  double keep_eps;
  int64_t tile_h, block_w, num_blocks;
  bool zscale_f64;
  bool lse_f64;
  bool target_i32;
  bool weight_f64;
  bool scale_f64;
  bool loss_f64;
  bool write_grad;
};

template <typename A>
__device__ __forceinline__ void store_real(void* p, bool f64, int64_t r, A v) {
  if (f64) {
    static_cast<double*>(p)[r] = static_cast<double>(v);
  } else {
    static_cast<float*>(p)[r] = static_cast<float>(v);
  }
}
// The per-row outputs, written by one thread of the row group.
template <typename A>
__device__ __forceinline__ void store_row_outputs(const RowArgs& a, int64_t r, A loss, A lse, int64_t idx) {
  store_real(a.loss, a.loss_f64, r, loss);
  if (a.lse) store_real(a.lse, a.lse_f64, r, lse);
  if (a.argmax) a.argmax[r] = idx;
}

template <typename A>
__device__ __forceinline__ A load_real(const void* p, bool f64, int64_t i) {
  return f64 ? static_cast<A>(static_cast<const double*>(p)[i]) : static_cast<A>(static_cast<const float*>(p)[i]);
}

// Per-thread / per-CTA partial statistics of one row.
template <typename A>
struct Stats {
  A m;          // running max of z
  A s;          // sum exp(z - m)
  A swz;        // sum w_c z_c   (label smoothing only)
  A wsum;       // sum w_c       (label smoothing with class weights only)
  A q;          // Q = sum w_c q'_c            (probability targets only)
  A qz;         // S = sum w_c q'_c (z_c - ref(m))   (probability targets only; lce_math.h)
  int64_t idx;  // index of the first maximum (-1: no element seen yet)
};

template <typename A>
__device__ __forceinline__ Stats<A> empty_stats() {
  return Stats<A>{-std::numeric_limits<A>::infinity(), A(0), A(0), A(0), A(0), A(0), int64_t(-1)};
}

// The reference point of S: the max, or 0 while every value seen is -inf (keeps S finite).
template <typename A>
__device__ __forceinline__ A qz_ref(A m) {
  return m == -std::numeric_limits<A>::infinity() ? A(0) : m;
}

// Whether the first maximum moves from (m, idx) to a later candidate value x: larger, or the first
// NaN (NaN counts as the maximum, like torch.argmax), or nothing seen yet.
template <typename A>
__device__ __forceinline__ bool takes_max(A m, int64_t idx, A x) {
  return idx < 0 || x > m || (x != x && m == m);
}
template <typename A>
__device__ __forceinline__ bool at_max(A x, A m) {
  return m != m ? x != x : x == m;
}

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
  r.q = a.q + b.q;
  const A ref = qz_ref(r.m);
  r.qz = (a.qz + a.q * (qz_ref(a.m) - ref)) + (b.qz + b.q * (qz_ref(b.m) - ref));
  // the smallest first-maximum index among the parts holding the max (parts are disjoint)
  const bool ta = a.idx >= 0 && at_max(a.m, r.m), tb = b.idx >= 0 && at_max(b.m, r.m);
  r.idx = ta && tb ? (a.idx < b.idx ? a.idx : b.idx) : (ta ? a.idx : (tb ? b.idx : int64_t(-1)));
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
    o.q = __shfl_xor_sync(0xffffffffu, v.q, off);
    o.qz = __shfl_xor_sync(0xffffffffu, v.qz, off);
    o.idx = __shfl_xor_sync(0xffffffffu, v.idx, off);
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
    Stats<A> w = lane < nwarps ? scratch[lane] : empty_stats<A>();
    w = warp_reduce(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

// Online update with n consecutive elements z[0..n) of columns c0.. (weights w, weighted smoothed
// target probabilities wq when soft): the max and its first index, sum exp, and the sums.
template <typename A, int N>
__device__ __forceinline__ void accumulate(Stats<A>& st, const A (&z)[N], const A (&w)[N], const A (&wq)[N], int n,
                                           int64_t c0, bool need_sum, bool soft) {
  A lm = z[0];
  int li = 0;
#pragma unroll
  for (int i = 1; i < N; ++i)
    if (i < n && takes_max(lm, 0, z[i])) {
      lm = z[i];
      li = i;
    }
  const bool take = takes_max(st.m, st.idx, lm);
  const A mn = take ? lm : st.m;  // == nan_max(st.m, lm)
  if (take) st.idx = c0 + li;
  if (soft) {
    const A ref = qz_ref(mn);
    A q = A(0), qz = st.qz + st.q * (qz_ref(st.m) - ref);
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < n) {
        q += wq[i];
        qz += wq[i] * (z[i] - ref);
      }
    st.q += q;
    st.qz = qz;
  }
  if (mn != -std::numeric_limits<A>::infinity()) {
    A acc = rescale(st.s, st.m, mn);
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < n) acc += dexp(z[i] - mn);
    st.s = acc;
  }
  st.m = mn;
  if (need_sum) {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < n) {
        st.swz += w[i] * z[i];
        st.wsum += w[i];
      }
  }
}

// The softcap: cap * tanh(a / cap) by lce_math.h's softcap_tanh (fp32: ~1 ulp also for small |a / cap|).
template <typename A>
__device__ __forceinline__ A apply_softcap(A a, A cap, bool capped) {
  return capped ? cap * fastreg::softcap_tanh(a / cap) : a;
}

// block_keep: raise the entry of `block` in this row's tile to at least `code` (lce_block_code). No
// 8-bit atomics: a compare-and-swap of the aligned 32-bit word holding the byte (its other bytes
// written back unchanged; the allocator's granularity keeps the word inside the allocation).
__device__ __forceinline__ void raise_block_code(uint8_t* keep_row, int64_t block, unsigned code) {
  uint8_t* p = keep_row + block;
  if (code == 0u || *static_cast<volatile uint8_t*>(p) >= code) return;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  unsigned int* word = reinterpret_cast<unsigned int*>(addr & ~uintptr_t(3));
  const unsigned shift = static_cast<unsigned>(addr & 3) * 8u;
  unsigned int old = *static_cast<volatile unsigned int*>(word);
  while (((old >> shift) & 0xffu) < code) {
    const unsigned int seen = atomicCAS(word, old, (old & ~(0xffu << shift)) | (code << shift));
    if (seen == old) break;
    old = seen;
  }
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

    const bool soft = args.probs != nullptr;  // probability targets: every row active, no class index
    const int64_t t = soft ? int64_t(-1)
                           : (args.target_i32 ? static_cast<int64_t>(static_cast<const int32_t*>(args.target)[r])
                                              : static_cast<const int64_t*>(args.target)[r]);
    const bool active = soft || fastreg::lce_target_active(t, args.ignore_index, V);

    if (!active) {  // uniform over the whole row group: no barrier is skipped by part of it
      if (first && tid == 0) store_row_outputs(args, r, A(0), A(0), int64_t(-1));
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
    const bool need_sum = !soft && fastreg::lce_smoothing_used(args.eps);  // else no w_c, c != t, is read
    const void* wptr = args.weight;
    const bool wf64 = args.weight_f64;
    auto weight_at = [&](int64_t c) -> A { return wptr ? load_real<A>(wptr, wf64, c) : A(1); };
    const T* qrow = soft ? static_cast<const T*>(args.probs) + r * V : nullptr;
    // The vector body is aligned for the logits row; the probabilities share that alignment only
    // when both rows start at the same address mod 16 (not so for a chunk of probs at an odd
    // element offset, or a user's probs[1:] view): otherwise their columns are read one by one.
    const bool q_vectors = soft && (reinterpret_cast<uintptr_t>(qrow) & 15) == (reinterpret_cast<uintptr_t>(row) & 15);
    const A inv_v = A(1) / static_cast<A>(V);
    // w_c q'_c of a probability target (lce_math.h)
    auto wq_of = [&](A q, int64_t c) -> A { return weight_at(c) * fastreg::lce_smoothed_prob(q, eps, inv_v); };

    // Target logit: read before any barrier, hence before any write to this row.
    const A z_t = soft ? A(0) : apply_softcap(to_acc(row[t]), cap, capped);

    Pack<T>* cache = dynamic_smem<Pack<T>>();  // CACHED: this CTA's slice of the row
    Stats<A> st = empty_stats<A>();

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
          const int64_t c0 = sp.head + v * VEC;
          A z[VEC], w[VEC], wq[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            z[i] = apply_softcap(to_acc(pk[u].v[i]), cap, capped);
            w[i] = need_sum ? weight_at(c0 + i) : A(1);
            wq[i] = A(0);
          }
          if (soft) {
            Pack<T> qp;
            if (q_vectors) {
              qp = load_pack(qrow + c0);
            } else {
#pragma unroll
              for (int i = 0; i < VEC; ++i) qp.v[i] = qrow[c0 + i];
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) wq[i] = wq_of(to_acc(qp.v[i]), c0 + i);
          }
          accumulate(st, z, w, wq, VEC, c0, need_sum, soft);
        }
      }
    }
    auto scalar_element = [&](int64_t c) {
      const A z1[1] = {apply_softcap(to_acc(row[c]), cap, capped)};
      const A w1[1] = {need_sum ? weight_at(c) : A(1)};
      const A wq1[1] = {soft ? wq_of(to_acc(qrow[c]), c) : A(0)};
      accumulate(st, z1, w1, wq1, 1, c, need_sum, soft);
    };
    // the head precedes and the tail follows this thread's vectors: column order is kept for the argmax
    Stats<A> head = empty_stats<A>();
    if (first && tid < sp.head) {
      const Stats<A> body = st;
      st = empty_stats<A>();
      scalar_element(tid);
      head = st;
      st = combine(head, body);
    }
    if (last && tid < V - sp.tail_start) scalar_element(sp.tail_start + tid);

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

    const A lse = qz_ref(tot.m) + dlog(tot.s);
    const A w_t = soft ? A(1) : weight_at(t);
    const A w_sum = wptr ? tot.wsum : static_cast<A>(V);
    const A zl = static_cast<A>(args.zloss) *
                 (args.zloss_scale ? load_real<A>(args.zloss_scale, args.zscale_f64, 0) : A(1));
    if (first && tid == 0) {
      A loss;
      if (soft) {
        loss = fastreg::lce_soft_row_loss<A>(lse, qz_ref(tot.m), tot.q, tot.qz, zl);
      } else {
        loss = need_sum ? fastreg::lce_row_loss<A>(lse, z_t, w_t, tot.swz, w_sum, eps, V, zl)
                        : fastreg::lce_row_loss<A>(lse, z_t, w_t, A(0), A(0), A(0), V, zl);
      }
      store_row_outputs(args, r, loss, lse, tot.idx);
    }
    if (!args.write_grad) return;

    // ---- pass 2: gradient in place ----
    const A s_r = load_real<A>(args.scale, args.scale_f64, args.scale_stride * r);
    const fastreg::LceGradCoefs<A> coef =
        fastreg::lce_grad_coefs<A>(s_r, lse, w_t, need_sum ? w_sum : A(0), need_sum ? eps : A(0), V, zl);
    const A coef_a = soft ? s_r * (tot.q + A(2) * zl * lse) : coef.A;
    // raw logit a of column c (and its probability target) -> the gradient entry
    auto grad_of = [&](A a, int64_t c) -> A {
      const A z = apply_softcap(a, cap, capped);
      A g = coef_a * dexp(z - lse);
      if (soft) {
        g -= s_r * wq_of(to_acc(qrow[c]), c);
      } else {
        if (need_sum) g -= coef.B * weight_at(c);
        if (c == t) g -= coef.C;
      }
      if (capped) g *= fastreg::softcap_grad_from_input(a, cap);
      return g;
    };
    uint8_t* keep_row = args.keep ? args.keep + (r / args.tile_h) * args.num_blocks : nullptr;
    const A keep_eps = static_cast<A>(args.keep_eps);
    // block_keep codes the value as stored (after rounding to T)
    auto store_grad = [&](T* dst, int64_t c, A g) {
      const T out = from_acc<T>(g);
      *dst = out;
      if (keep_row) raise_block_code(keep_row, c / args.block_w, fastreg::lce_block_code<A>(to_acc(out), keep_eps));
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
          if (keep_row) {  // one raise per run of the pack's columns in the same block
            int64_t block = c0 / args.block_w;
            unsigned top = 0;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const int64_t b = (c0 + i) / args.block_w;
              if (b != block) {
                raise_block_code(keep_row, block, top);
                block = b;
                top = 0;
              }
              const unsigned code = fastreg::lce_block_code<A>(to_acc(out.v[i]), keep_eps);
              top = code > top ? code : top;
            }
            raise_block_code(keep_row, block, top);
          }
        }
      }
    }
    // Scalars: each is read and then written by the same thread.
    if (first && tid < sp.head) store_grad(row + tid, tid, grad_of(to_acc(row[tid]), tid));
    if (last && tid < V - sp.tail_start) {
      const int64_t c = sp.tail_start + tid;
      store_grad(row + c, c, grad_of(to_acc(row[c]), c));
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
