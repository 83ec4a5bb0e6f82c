// CPU kernel of fastreg::_lce_rows: the fused per-row pass of the linear cross-entropy.
//
// Three sweeps per row of a logits chunk (the row, V values, stays in L1/L2 between them):
//   1. softcap (optional), max and, per lane, the index of the first maximum (argmax_rows);
//      sum_c w_c z_c (label smoothing, class-index targets)
//   2. sum_c exp(z_c - max)  -> lse, the row loss (lce_math.h); with probability targets also
//      Q = sum_c w_c q'_c and S = sum_c w_c q'_c (z_c - max)
//   3. gradient written in place over the logits: (A p_c - B w_c - [c == t] C) * softcap'(z_c), or
//      s ((Q + 2 l lse) p_c - w_c q'_c) * softcap'(z_c); block_keep marks the vocabulary blocks that
//      hold an entry with |g| > grad_filter_eps.
// float, bfloat16 and float16 rows run on explicit 16-lane fp32 vectors (GCC/clang vector extensions):
// 16-bit values are widened/narrowed 16 lanes at a time in registers (round to nearest even, as
// torch's casts), no scalar scratch copy. Softcapped 16-bit rows keep their softcapped fp32 values
// in a per-thread row buffer (rounding them to 16 bits would change the loss); float rows are
// softcapped in place. The row loop of a chunk is one function per dtype, compiled three times
// via target_clones on x86-64 (AVX-512, AVX2, baseline) and picked at load time -- one indirect
// call per chunk slice, not per row; on aarch64 it compiles to NEON (common.h). double rows
// (gradcheck, float64 users) use scalar libm maths.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "lce/lce_math.h"

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace fastreg {
namespace {

// ------------------------------------------------------------------ 16-lane float vectors
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
constexpr int64_t kW = 16;

#define FR_INLINE __attribute__((always_inline)) inline

FR_INLINE vf splat(float a) { return vf{} + a; }
FR_INLINE vi splati(int32_t a) { return vi{} + a; }
constexpr vi kLanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
FR_INLINE vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
FR_INLINE vf vabs(vf x) { return (vf)((vi)x & splati(0x7fffffff)); }

// ---- storage <-> fp32 lanes: float, bfloat16, float16 (bit-exact like c10's scalar casts)
FR_INLINE vf widen(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FR_INLINE void narrow(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
FR_INLINE vh load_h(const void* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return h;
}
FR_INLINE vf widen(const c10::BFloat16* p) { return (vf)(__builtin_convertvector(load_h(p), vu) << 16); }
FR_INLINE void narrow(c10::BFloat16* p, vf v) {
  const vu u = (vu)v;
  vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  r = (vu)(v != v ? splati(0x7fc0) : (vi)r);       // NaN -> the canonical quiet NaN (as c10)
  const vh h = __builtin_convertvector(r, vh);
  std::memcpy(p, &h, sizeof(h));
}
FR_INLINE vf widen(const c10::Half* p) {
  const vi h = __builtin_convertvector(load_h(p), vi);
  const vi sign = (h & 0x8000) << 16, em = h & 0x7fff;
  // normal: rebias the exponent by 127 - 15; inf/NaN: exponent all ones; subnormal: em * 2^-24 (exact)
  vi normal = (em << 13) + splati((127 - 15) << 23);
  normal = em >= 0x7c00 ? normal + splati((128 - 16) << 23) : normal;
  const vf sub = __builtin_convertvector(em, vf) * splat(5.9604644775390625e-08f);
  return (vf)(sign | (em < 0x400 ? (vi)sub : normal));
}
FR_INLINE void narrow(c10::Half* p, vf v) {
  const vi u = (vi)v;
  const vi sign = (u >> 16) & 0x8000, a = u & 0x7fffffff;
  vi normal = ((a - 0x38000000) + 0xfff + ((a >> 13) & 1)) >> 13;  // round to nearest even
  normal = normal > 0x7c00 ? splati(0x7c00) : normal;               // overflow -> inf
  // subnormal results (|v| < 2^-14): |v| + 0.5 rounds |v| to a multiple of 2^-24, nearest even
  const vi sub = (vi)(vabs(v) + splat(0.5f)) - (vi)splat(0.5f);
  vi r = a < 0x38800000 ? sub : normal;
  r = a > 0x7f800000 ? splati(0x7e00) : r;  // NaN
  const vh h = __builtin_convertvector(r | sign, vh);
  std::memcpy(p, &h, sizeof(h));
}

// Lanes [0, n) from p, the rest `fill` (n <= kW; a full vector is a plain load).
template <typename S>
FR_INLINE vf load_part(const S* p, int64_t n, float fill) {
  if (n == kW) return widen(p);
  S tmp[kW] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  return select(kLanes < splati(int32_t(n)), widen(tmp), splat(fill));
}
template <typename S>
FR_INLINE void store_part(S* p, vf v, int64_t n) {
  if (n == kW) return narrow(p, v);
  S tmp[kW];
  narrow(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}
// What a stored lane reads back as (block_keep tests the value written, after rounding).
template <typename S>
FR_INLINE vf as_stored(vf v) {
  if constexpr (std::is_same_v<S, float>) {
    return v;
  } else {
    S tmp[kW];
    narrow(tmp, v);
    return widen(tmp);
  }
}

// The running max as a bitwise blend (GCC lowers a `mask ? x : acc` select to a branch per lane,
// measured: most of the row pass's time at V = 32). NaN-propagating like nan_max, and it keeps the
// FIRST NaN of a lane: the lane's first-maximum index (argmax) follows the same blend.
FR_INLINE vi take_new_max(vf acc, vf x) { return (x > acc) | ((x != x) & (acc == acc)); }
FR_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = nan_max(m, float(v[i]));
  return m;
}
FR_INLINE float hsum(vf v) {
  // pairwise (lane i + lane i + 8, then + 4, ...), so the result does not depend on a long serial
  // chain; on halves of the register, not lanes in memory
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  const float a0 = h4[0] + h4[2], a1 = h4[1] + h4[3];
  return a0 + a1;
}
FR_INLINE bool any_lane(vi m) {
  typedef int32_t v8 __attribute__((vector_size(32)));
  typedef int32_t v4 __attribute__((vector_size(16)));
  const v8 h8 = __builtin_shufflevector(m, m, 0, 1, 2, 3, 4, 5, 6, 7) |
                __builtin_shufflevector(m, m, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) | __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] | h4[1] | h4[2] | h4[3]) != 0;
}

// exp(x) to ~1 ulp for x in [-87, 88]; exactly 0 below -87 (no denormals), NaN propagates.
FR_INLINE vf vexp(vf x) {
  const vf hi = splat(88.0f), lo = splat(-87.0f);
  const vi underflow = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * splat(1.44269504088896341f) + shifter;
  vf n = t - shifter;
  vi ni = (vi)t - (vi)shifter;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  vi bits = (ni + 127) << 23;
  return underflow ? splat(0.0f) : p * (vf)bits;
}
// tanh lane-wise, the two branches of lce_math.h's softcap_tanh: the odd polynomial below
// kSoftcapTanhPolyBound (no cancellation for small |x|), 1 - 2 / (e^{2|x|} + 1) above.
FR_INLINE vf vtanh(vf x) {
  const vf ax = vabs(x);
  const vf u = x * x;
  vf p = splat(kSoftcapTanhPoly[4]);
  p = p * u + splat(kSoftcapTanhPoly[3]);
  p = p * u + splat(kSoftcapTanhPoly[2]);
  p = p * u + splat(kSoftcapTanhPoly[1]);
  p = p * u + splat(kSoftcapTanhPoly[0]);
  const vf small = x + x * u * p;
  const vf e = vexp(splat(2.0f) * ax);
  const vf big = splat(1.0f) - splat(2.0f) / (e + splat(1.0f));
  const vf big_signed = (vf)((vi)big | ((vi)x & splati(int32_t(0x80000000u))));
  return select(ax < splat(kSoftcapTanhPolyBound), small, big_signed);
}

// Everything a chunk's row pass reads and writes; A is the accumulate type (float, double for
// float64 logits).
template <typename A>
struct Chunk {
  int64_t rows = 0, V = 0;
  void* logits = nullptr;
  const int64_t* target = nullptr;  // nullptr with probability targets
  const void* probs = nullptr;      // (rows, V) in the logits' dtype, or nullptr
  const A* cw = nullptr;            // class weights or nullptr
  const A* scale = nullptr;
  int64_t scale_stride = 0;
  A eps = 0, softcap = 0, zloss = 0, w_sum = 0;  // zloss already times zloss_scale
  int64_t ignore_index = 0;
  bool write_grad = false;
  A* loss = nullptr;
  A* lse = nullptr;         // or nullptr
  int64_t* argmax = nullptr;  // or nullptr
  uint8_t* keep = nullptr;  // (row_tiles, num_blocks) or nullptr
  A keep_eps = 0;
  int64_t tile_h = 1, block_w = 1, num_blocks = 1;
};

FR_INLINE void mark_block(uint8_t* p) {
  std::atomic_ref<uint8_t> flag(*p);
  if (flag.load(std::memory_order_relaxed) == 0) flag.store(1, std::memory_order_relaxed);
}

// block_keep for the gradient lanes g of columns [c, c + n) of one row (keep_row: the row's tile).
template <typename A>
FR_INLINE void mark_lanes(const Chunk<A>& k, uint8_t* keep_row, int64_t c, vf g, int64_t n) {
  const int64_t b0 = c / k.block_w, b1 = (c + n - 1) / k.block_w;
  if (b0 == b1 && std::atomic_ref<uint8_t>(keep_row[b0]).load(std::memory_order_relaxed) != 0) return;
  vi hit = (vabs(g) > splat(float(k.keep_eps))) | (g != g);
  if (n < kW) hit &= kLanes < splati(int32_t(n));
  if (!any_lane(hit)) return;
  if (b0 == b1) return mark_block(keep_row + b0);
  for (int64_t i = 0; i < n; ++i)
    if (hit[i]) mark_block(keep_row + (c + i) / k.block_w);
}

// An ignored row: loss 0, lse 0, argmax -1, zero gradient.
template <typename S, typename A>
FR_INLINE void ignored_row(const Chunk<A>& k, int64_t r) {
  k.loss[r] = A(0);
  if (k.lse) k.lse[r] = A(0);
  if (k.argmax) k.argmax[r] = -1;
  if (k.write_grad) {
    S* row = static_cast<S*>(k.logits) + r * k.V;
    std::fill(row, row + k.V, S(0));
  }
}

// The fp32 row pass over storage S (float, BFloat16, Half). kSoft: probability targets;
// kW8: class weights are read per class (smoothing or probability targets; otherwise only w_t is).
// capbuf: V floats of per-thread scratch (softcapped 16-bit rows only).
template <typename S, bool kCap, bool kW8, bool kSoft>
FR_INLINE void row_f32(const Chunk<float>& k, int64_t r, int64_t t, float* capbuf) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int64_t V = k.V;
  S* row = static_cast<S*>(k.logits) + r * V;
  const S* q = kSoft ? static_cast<const S*>(k.probs) + r * V : nullptr;
  const bool smoothing = lce_smoothing_used(k.eps);
  const bool want_wz = !kSoft && smoothing;  // else no w_c with c != t is read (lce_math.h)
  const vf cap = splat(k.softcap), inv_cap = splat(1.0f / k.softcap);
  // softcapped values: in place for float rows, else the scratch row (16-bit storage would round them)
  float* work = nullptr;
  if constexpr (kCap) work = std::is_same_v<S, float> ? reinterpret_cast<float*>(row) : capbuf;
  auto load_z = [&](int64_t c, int64_t n, float fill) {
    if constexpr (kCap) return load_part(work + c, n, fill);
    else return load_part(row + c, n, fill);
  };

  // pass 1: softcap, max (+ first index per lane), sum_c w_c z_c
  vf vm = splat(-kInf), vwz = splat(0.0f);
  vi vidx = kLanes;  // an all -inf row has its first maximum at 0
  const bool want_arg = k.argmax != nullptr;
  for (int64_t c = 0; c < V; c += kW) {
    const int64_t n = std::min(kW, V - c);
    vf x = load_part(row + c, n, -kInf);
    if constexpr (kCap) {
      x = cap * vtanh(x * inv_cap);  // tanh(-inf) = -1: tail lanes become -cap
      if (n < kW) x = select(kLanes < splati(int32_t(n)), x, splat(-kInf));
      store_part(work + c, x, n);
    }
    const vi take = take_new_max(vm, x);
    vm = select(take, x, vm);
    if (want_arg) vidx = take ? kLanes + int32_t(c) : vidx;
    if (want_wz) {
      const vf xz = n == kW ? x : select(kLanes < splati(int32_t(n)), x, splat(0.0f));
      vwz += kW8 ? xz * load_part(k.cw + c, n, 0.0f) : xz;
    }
  }
  const float m = hmax(vm);
  // an all -inf row (every class masked): lse = -inf like torch.logsumexp, loss and gradient NaN like torch
  const float m_shift = m == -kInf ? 0.0f : m;
  if (want_arg) {
    int32_t best = std::numeric_limits<int32_t>::max();
    for (int i = 0; i < kW; ++i) {
      const bool at_max = m != m ? vm[i] != vm[i] : vm[i] == m;
      if (at_max) best = std::min(best, int32_t(vidx[i]));
    }
    k.argmax[r] = best;
  }
  // pass 2: sum_c exp(z_c - m) (tail lanes hold -inf, whose exp is exactly 0); Q and S
  const vf vmx = splat(m_shift);
  const float inv_v = 1.0f / float(V);
  const vf one_minus_e = splat(1.0f - k.eps), e_over_v = splat(k.eps * inv_v);
  vf vs = splat(0.0f), vQ = splat(0.0f), vS = splat(0.0f);
  for (int64_t c = 0; c < V; c += kW) {
    const int64_t n = std::min(kW, V - c);
    const vf x = load_z(c, n, -kInf);
    vs += vexp(x - vmx);
    if constexpr (kSoft) {
      vf wq = load_part(q + c, n, 0.0f);
      if (smoothing) wq = one_minus_e * wq + e_over_v;
      if (kW8) wq *= load_part(k.cw + c, n, 0.0f);
      vf d = x - vmx;
      if (n < kW) {
        const vi valid = kLanes < splati(int32_t(n));
        wq = select(valid, wq, splat(0.0f));
        d = select(valid, d, splat(0.0f));
      }
      vQ += wq;
      vS += wq * d;
    }
  }
  const float se = hsum(vs);
  const float lse = m_shift + std::log(se);
  if (k.lse) k.lse[r] = lse;
  float w_t = 1.0f, Q = 0.0f;
  if constexpr (kSoft) {
    Q = hsum(vQ);
    k.loss[r] = lce_soft_row_loss<float>(lse, m_shift, Q, hsum(vS), k.zloss);
  } else {
    const float z_t = kCap ? work[t] : static_cast<float>(row[t]);
    w_t = k.cw ? k.cw[t] : 1.0f;
    k.loss[r] = lce_row_loss<float>(lse, z_t, w_t, hsum(vwz), k.w_sum, k.eps, V, k.zloss);
  }
  if (!k.write_grad) return;

  // pass 3: the gradient, in place
  const float s = k.scale[r * k.scale_stride];
  vf A, B;
  float C = 0.0f;
  if constexpr (kSoft) {
    A = splat(s * (Q + 2.0f * k.zloss * lse) / se);  // A p_c = (A / se) exp(z_c - m)
    B = splat(s);
  } else {
    const LceGradCoefs<float> g = lce_grad_coefs<float>(s, lse, w_t, k.w_sum, k.eps, V, k.zloss);
    A = splat(g.A / se);
    B = splat(g.B);
    C = g.C;
  }
  uint8_t* keep_row = k.keep ? k.keep + (r / k.tile_h) * k.num_blocks : nullptr;
  const vi vt = splati(int32_t(t));
  for (int64_t c = 0; c < V; c += kW) {
    const int64_t n = std::min(kW, V - c);
    const vf x = load_z(c, n, 0.0f);
    vf g = A * vexp(x - vmx);
    if constexpr (kSoft) {
      vf wq = load_part(q + c, n, 0.0f);
      if (smoothing) wq = one_minus_e * wq + e_over_v;
      if (kW8) wq *= load_part(k.cw + c, n, 0.0f);
      g -= B * wq;
    } else {
      if (want_wz) g -= kW8 ? B * load_part(k.cw + c, n, 0.0f) : B;
      g = select(kLanes + int32_t(c) == vt, g - splat(C), g);
    }
    if constexpr (kCap) {
      const vf rr = x * inv_cap;
      g *= (splat(1.0f) - rr) * (splat(1.0f) + rr);  // softcap_grad_from_value
    }
    store_part(row + c, g, n);
    if (keep_row) mark_lanes(k, keep_row, c, as_stored<S>(g), n);
  }
}

// All rows [r0, r1) of a chunk with one set of compile-time flags.
template <typename S, bool kCap, bool kW8, bool kSoft>
FR_INLINE void rows_loop(const Chunk<float>& k, int64_t r0, int64_t r1, float* capbuf) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t t = 0;
    if constexpr (!kSoft) {
      t = k.target[r];
      if (!lce_target_active(t, k.ignore_index, k.V)) {
        ignored_row<S>(k, r);
        continue;
      }
    }
    row_f32<S, kCap, kW8, kSoft>(k, r, t, capbuf);
  }
}

template <typename S>
FR_INLINE void rows_dispatch(const Chunk<float>& k, int64_t r0, int64_t r1, float* capbuf) {
  const bool cap = k.softcap > 0.0f, soft = k.probs != nullptr;
  const bool w8 = k.cw != nullptr && (soft || lce_smoothing_used(k.eps));
#define FR_ROWS(C, W, P) return rows_loop<S, C, W, P>(k, r0, r1, capbuf)
  if (soft) {
    if (cap) {
      if (w8) FR_ROWS(true, true, true);
      FR_ROWS(true, false, true);
    }
    if (w8) FR_ROWS(false, true, true);
    FR_ROWS(false, false, true);
  }
  if (cap) {
    if (w8) FR_ROWS(true, true, false);
    FR_ROWS(true, false, false);
  }
  if (w8) FR_ROWS(false, true, false);
  FR_ROWS(false, false, false);
#undef FR_ROWS
}

// One function per storage type, cloned per ISA: the ISA is picked once per call, not per row.
FASTREG_CPU_CLONES void rows_float(const Chunk<float>& k, int64_t r0, int64_t r1, float* capbuf) {
  rows_dispatch<float>(k, r0, r1, capbuf);
}
FASTREG_CPU_CLONES void rows_bf16(const Chunk<float>& k, int64_t r0, int64_t r1, float* capbuf) {
  rows_dispatch<c10::BFloat16>(k, r0, r1, capbuf);
}
FASTREG_CPU_CLONES void rows_half(const Chunk<float>& k, int64_t r0, int64_t r1, float* capbuf) {
  rows_dispatch<c10::Half>(k, r0, r1, capbuf);
}

// The double row pass (gradcheck, float64 users): plain scalar maths, the same formulas.
void row_f64(const Chunk<double>& k, int64_t r, int64_t t) {
  const int64_t V = k.V;
  double* z = static_cast<double*>(k.logits) + r * V;
  const double* q = k.probs ? static_cast<const double*>(k.probs) + r * V : nullptr;
  const bool cap = k.softcap > 0.0, smoothing = lce_smoothing_used(k.eps);
  const double inv_v = 1.0 / double(V);
  auto w = [&](int64_t c) { return k.cw ? k.cw[c] : 1.0; };
  double m = -std::numeric_limits<double>::infinity(), sum_wz = 0.0;
  int64_t best = 0;
  for (int64_t c = 0; c < V; ++c) {
    if (cap) z[c] = k.softcap * softcap_tanh(z[c] / k.softcap);
    if ((z[c] > m) | ((z[c] != z[c]) & (m == m))) {
      m = z[c];
      best = c;
    }
    // only with label smoothing: a -inf logit (a masked class) must not turn 0 * inf into nan
    if (!q && smoothing) sum_wz += w(c) * z[c];
  }
  if (k.argmax) k.argmax[r] = best;
  if (m == -std::numeric_limits<double>::infinity()) m = 0.0;  // all -inf: lse = -inf (as the fp32 pass)
  double se = 0.0, Q = 0.0, S = 0.0;
  for (int64_t c = 0; c < V; ++c) {
    se += std::exp(z[c] - m);
    if (q) {
      const double wq = w(c) * lce_smoothed_prob(q[c], k.eps, inv_v);
      Q += wq;
      S += wq * (z[c] - m);
    }
  }
  const double lse = m + std::log(se);
  if (k.lse) k.lse[r] = lse;
  const double w_t = q ? 1.0 : w(t);
  k.loss[r] = q ? lce_soft_row_loss<double>(lse, m, Q, S, k.zloss)
                : lce_row_loss<double>(lse, z[t], w_t, sum_wz, k.w_sum, k.eps, V, k.zloss);
  if (!k.write_grad) return;
  const double s = k.scale[r * k.scale_stride];
  const LceGradCoefs<double> g = lce_grad_coefs<double>(s, lse, w_t, k.w_sum, k.eps, V, k.zloss);
  const double A = q ? s * (Q + 2.0 * k.zloss * lse) : g.A;
  uint8_t* keep_row = k.keep ? k.keep + (r / k.tile_h) * k.num_blocks : nullptr;
  for (int64_t c = 0; c < V; ++c) {
    double v = A * std::exp(z[c] - lse);
    if (q) v -= s * w(c) * lce_smoothed_prob(q[c], k.eps, inv_v);
    else v -= (smoothing ? g.B * w(c) : 0.0) + (c == t ? g.C : 0.0);
    if (cap) v *= softcap_grad_from_value(z[c], k.softcap);
    z[c] = v;
    if (keep_row && !(std::fabs(v) <= k.keep_eps)) mark_block(keep_row + c / k.block_w);
  }
}

// Flush denormals to zero while a row pass runs on this thread, then restore the caller's mode:
// MXCSR FTZ|DAZ on x86-64, FPCR.FZ on aarch64 (which flushes denormal inputs and results alike).
// Wide logit ranges make many p_c and gradient entries tiny; as denormals they would slow this
// pass and the gradient GEMMs that read them many-fold, and at ~1e-38 they carry no information
// at fp32 precision. Elsewhere denormals are kept (same results, possibly slower). (float16
// subnormals are converted with integer arithmetic, unaffected.)
class FlushDenormals {
 public:
#if defined(__x86_64__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#elif defined(__aarch64__)
  FlushDenormals() : saved_(get_fpcr()) { set_fpcr(saved_ | kFpcrFlushToZero); }
  ~FlushDenormals() { set_fpcr(saved_); }

 private:
  static constexpr uint64_t kFpcrFlushToZero = uint64_t(1) << 24;
  static uint64_t get_fpcr() {
    uint64_t v;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(v));
    return v;
  }
  static void set_fpcr(uint64_t v) { __asm__ __volatile__("msr fpcr, %0" : : "r"(v)); }
  uint64_t saved_;
#endif
};

template <typename A>
void run_chunk(const Chunk<A>& k, at::ScalarType dtype) {
  const int64_t V = k.V;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  const bool capbuf_needed = k.softcap > 0 && (dtype == at::kBFloat16 || dtype == at::kHalf);
  at::parallel_for(0, k.rows, grain, [&](int64_t r0, int64_t r1) {
    FlushDenormals ftz;
    if constexpr (std::is_same_v<A, double>) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t t = 0;
        if (!k.probs) {
          t = k.target[r];
          if (!lce_target_active(t, k.ignore_index, V)) {
            ignored_row<double>(k, r);
            continue;
          }
        }
        row_f64(k, r, t);
      }
    } else {
      std::vector<float> capbuf(capbuf_needed ? V : 0);
      if (dtype == at::kFloat) rows_float(k, r0, r1, capbuf.data());
      else if (dtype == at::kBFloat16) rows_bf16(k, r0, r1, capbuf.data());
      else rows_half(k, r0, r1, capbuf.data());
    }
  });
}

using OptT = std::optional<at::Tensor>;

bool given(const OptT& t) { return t.has_value() && t->defined(); }

void lce_rows_cpu(at::Tensor& logits, const at::Tensor& target, const OptT& class_weight, const at::Tensor& row_scale,
                  int64_t ignore_index, double label_smoothing, double softcap, double z_loss, bool write_grad,
                  at::Tensor& loss_rows, const OptT& target_probs, const OptT& zloss_scale, const OptT& lse_rows,
                  const OptT& argmax_rows, double grad_filter_eps, const OptT& block_keep) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "_lce_rows: logits must be a contiguous 2-D tensor");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "_lce_rows: logits must be float32, float64, bfloat16 or float16, got ", dtype);
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V < (int64_t(1) << 31) - kW, "_lce_rows: V must be below 2^31");
  const bool is_f64 = dtype == at::kDouble;
  const auto acc = is_f64 ? at::kDouble : at::kFloat;
  const bool soft = given(target_probs);
  auto vec_of = [&](const OptT& t, at::ScalarType st, const char* what) {
    if (!given(t)) return;
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == rows && t->scalar_type() == st &&
                    t->is_contiguous(),
                "_lce_rows: ", what, " must be a contiguous CPU tensor of shape (rows,) and dtype ", st);
  };
  if (soft) {
    const at::Tensor& q = *target_probs;
    TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && q.size(0) == rows && q.size(1) == V &&
                    q.scalar_type() == dtype && q.is_contiguous(),
                "_lce_rows: target_probs must be a contiguous (rows, V) tensor of the logits' dtype");
    TORCH_CHECK(V > 0 || rows == 0, "_lce_rows: probability targets need at least one class");
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong &&
                    target.is_contiguous(),
                "_lce_rows: target must be a contiguous int64 tensor of shape (rows,)");
  }
  vec_of(loss_rows, acc, "loss_rows");
  vec_of(lse_rows, acc, "lse_rows");
  vec_of(argmax_rows, at::kLong, "argmax_rows");
  TORCH_CHECK(row_scale.scalar_type() == acc && (row_scale.numel() == 1 || row_scale.numel() == rows) &&
                  row_scale.is_contiguous(),
              "_lce_rows: row_scale must hold 1 or rows values of the accumulate dtype");
  at::Tensor cw;
  if (given(class_weight)) {
    cw = *class_weight;
    TORCH_CHECK(cw.dim() == 1 && cw.size(0) == V && cw.scalar_type() == acc && cw.is_contiguous(),
                "_lce_rows: class_weight must be a contiguous (V,) tensor of the accumulate dtype");
  }
  double zl = z_loss;
  if (given(zloss_scale)) {
    TORCH_CHECK(zloss_scale->device().is_cpu() && zloss_scale->numel() == 1 && zloss_scale->scalar_type() == acc,
                "_lce_rows: zloss_scale must be a one-element CPU tensor of the accumulate dtype");
    zl *= is_f64 ? zloss_scale->data_ptr<double>()[0] : double(zloss_scale->data_ptr<float>()[0]);
  }
  int64_t row_tiles = 0, num_blocks = 0;
  if (given(block_keep)) {
    const at::Tensor& bk = *block_keep;
    TORCH_CHECK(write_grad, "_lce_rows: block_keep needs write_grad (it describes the written gradient)");
    TORCH_CHECK(grad_filter_eps >= 0, "_lce_rows: grad_filter_eps must be >= 0, got ", grad_filter_eps);
    TORCH_CHECK(bk.device().is_cpu() && bk.dim() == 2 && bk.scalar_type() == at::kByte && bk.is_contiguous() &&
                    bk.size(0) >= 1 && bk.size(1) >= 1,
                "_lce_rows: block_keep must be a contiguous uint8 (row_tiles, num_blocks) CPU tensor, both >= 1");
    row_tiles = bk.size(0);
    num_blocks = bk.size(1);
  }
  if (rows == 0) return;

  auto fill = [&](auto& k, auto* acc_ptr) {
    using A = std::remove_pointer_t<decltype(acc_ptr)>;
    k.rows = rows;
    k.V = V;
    k.logits = logits.data_ptr();
    k.target = soft ? nullptr : target.data_ptr<int64_t>();
    k.probs = soft ? target_probs->data_ptr() : nullptr;
    k.cw = cw.defined() ? cw.data_ptr<A>() : nullptr;
    k.scale = row_scale.data_ptr<A>();
    k.scale_stride = row_scale.numel() == 1 ? 0 : 1;
    k.eps = A(label_smoothing);
    k.softcap = A(softcap);
    k.zloss = A(zl);
    // W is only read with label smoothing and class-index targets (lce_math.h)
    k.w_sum = cw.defined() && !soft && lce_smoothing_used(label_smoothing) ? A(cw.sum().item<double>()) : A(V);
    k.ignore_index = ignore_index;
    k.write_grad = write_grad;
    k.loss = loss_rows.data_ptr<A>();
    k.lse = given(lse_rows) ? lse_rows->data_ptr<A>() : nullptr;
    k.argmax = given(argmax_rows) ? argmax_rows->data_ptr<int64_t>() : nullptr;
    if (row_tiles > 0) {
      k.keep = block_keep->data_ptr<uint8_t>();
      k.keep_eps = A(grad_filter_eps);
      k.tile_h = (rows + row_tiles - 1) / row_tiles;
      k.block_w = std::max<int64_t>((V + num_blocks - 1) / num_blocks, 1);
      k.num_blocks = num_blocks;
    }
  };
  if (is_f64) {
    Chunk<double> k;
    fill(k, static_cast<double*>(nullptr));
    run_chunk(k, dtype);
  } else {
    Chunk<float> k;
    fill(k, static_cast<float*>(nullptr));
    run_chunk(k, dtype);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) { m.impl("_lce_rows", &lce_rows_cpu); }

}  // namespace fastreg
