// The fp32 row pass of csrc/lce/lce_cpu.cpp on 16-lane vectors (GCC/clang vector extensions).
// Included once per instruction set by lce_cpu.cpp, inside a `#pragma GCC target` region and its own
// namespace, so that every helper here is compiled for that ISA. (target_clones on the outer
// function is not enough: GCC 12 lowers the 512-bit compares of an always_inline helper for the
// baseline ISA -- lane by lane, scalar -- before inlining it into the clone; measured 3x slower.)
// No includes here: lce_cpu.cpp includes what this needs first.

#define FR_INLINE __attribute__((always_inline)) inline

// ------------------------------------------------------------------ 16-lane float vectors
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
constexpr int64_t kW = 16;


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
#if defined(FR_ISA_AVX512)
// AVX-512F's own conversions (vcvtph2ps / vcvtps2ph, round to nearest even; fp16 subnormals in and
// out are exact, MXCSR's flush-to-zero does not apply to the fp16 side).
FR_INLINE vf widen(const c10::Half* p) {
  __m256i h;
  std::memcpy(&h, p, sizeof(h));
  return (vf)_mm512_cvtph_ps(h);
}
FR_INLINE void narrow(c10::Half* p, vf v) {
  const __m256i h = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  std::memcpy(p, &h, sizeof(h));
}
#else
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
#endif

// Lanes [0, n) from p, the rest `fill` (n <= kW; a full vector is a plain load).
template <typename S>
FR_INLINE vf load_part(const S* p, int64_t n, float fill) {
  if (n == kW) return widen(p);
#if defined(FR_ISA_AVX512)  // masked loads: the tail of a row costs what a full vector does
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  if constexpr (std::is_same_v<S, float>) {
    return (vf)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    S tmp[kW];
    std::memcpy(tmp, &h, sizeof(h));
    return select(kLanes < splati(int32_t(n)), widen(tmp), splat(fill));
  }
#endif
  S tmp[kW] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  return select(kLanes < splati(int32_t(n)), widen(tmp), splat(fill));
}
template <typename S>
FR_INLINE void store_part(S* p, vf v, int64_t n) {
  if (n == kW) return narrow(p, v);
#if defined(FR_ISA_AVX512)
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_mask_storeu_ps(p, mask, (__m512)v);
  } else {
    S tmp[kW];
    narrow(tmp, v);
    __m256i h;
    std::memcpy(&h, tmp, sizeof(h));
    return _mm256_mask_storeu_epi16(p, mask, h);
  }
#endif
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
// measured: most of the row pass's time at V = 32). NaN-propagating like nan_max; the lane's
// first-maximum index (argmax) follows the same blend. (A NaN-first form `... & (acc == acc)` gets
// scalarised lane by lane by GCC 12 inside the target_clones function: 1.5x the whole pass.)
FR_INLINE vi take_new_max(vf acc, vf x) { return (x > acc) | (x != x); }
// NaN-propagating max of all lanes, as a shuffle tree (the per-row cost matters at small V).
template <typename F, typename I>
FR_INLINE F blend_max(F a, F b) {
  const I t = (I)((b > a) | (b != b));
  return (F)(((I)b & t) | ((I)a & ~t));
}
FR_INLINE float hmax(vf v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef int32_t i8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  typedef int32_t i4 __attribute__((vector_size(16)));
  const v8 h8 = blend_max<v8, i8>(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  const v4 h4 = blend_max<v4, i4>(__builtin_shufflevector(h8, h8, 0, 1, 2, 3), __builtin_shufflevector(h8, h8, 4, 5, 6, 7));
  return nan_max(nan_max(float(h4[0]), float(h4[2])), nan_max(float(h4[1]), float(h4[3])));
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
  vf p = splat(kSoftcapTanhP4);
  p = p * u + splat(kSoftcapTanhP3);
  p = p * u + splat(kSoftcapTanhP2);
  p = p * u + splat(kSoftcapTanhP1);
  p = p * u + splat(kSoftcapTanhP0);
  const vf small = x + x * u * p;
  const vf e = vexp(splat(2.0f) * ax);
  const vf big = splat(1.0f) - splat(2.0f) / (e + splat(1.0f));
  const vf big_signed = (vf)((vi)big | ((vi)x & splati(int32_t(0x80000000u))));
  return select(ax < splat(kSoftcapTanhPolyBound), small, big_signed);
}

// block_keep for the gradient lanes g of columns [c, c + n) of one row (keep_row: the row's tile):
// each block's entry raised to the largest lce_block_code of its lanes, computed lane-wise (the
// biased exponent field of |g|, at least 1; 0 where |g| <= eps; 255 for NaN).
template <typename A>
FR_INLINE void mark_lanes(const Chunk<A>& k, uint8_t* keep_row, int64_t c, vf g, int64_t n) {
  const int64_t b0 = c / k.block_w, b1 = (c + n - 1) / k.block_w;
  const vf a = vabs(g);
  const vi hit = (a > splat(float(k.keep_eps))) | (g != g);
  const vi exponent = (vi)a >> 23;
  vi code = hit & (exponent < 1 ? splati(1) : exponent);
  if (n < kW) code &= kLanes < splati(int32_t(n));
  if (b0 == b1) {
    const int32_t cur = std::atomic_ref<uint8_t>(keep_row[b0]).load(std::memory_order_relaxed);
    if (!any_lane(code > splati(cur))) return;
    int32_t top = 0;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, int32_t(code[i]));
    return raise_block_code(keep_row + b0, uint8_t(top));
  }
  for (int64_t i = 0; i < n; ++i)
    if (code[i]) raise_block_code(keep_row + (c + i) / k.block_w, uint8_t(code[i]));
}

// The fp32 row pass over storage S (float, BFloat16, Half). kSoft: probability targets;
// kW8: class weights are read per class (smoothing or probability targets; otherwise only w_t is).
// scratch: V floats of per-thread scratch: the softcapped values (softcap), then exp(z_c - m).
template <typename S, bool kCap, bool kW8, bool kSoft>
FR_INLINE void row_f32(const Chunk<float>& k, int64_t r, int64_t t, float* scratch) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int64_t V = k.V;
  S* row = static_cast<S*>(k.logits) + r * V;
  const S* q = kSoft ? static_cast<const S*>(k.probs) + r * V : nullptr;
  const bool smoothing = lce_smoothing_used(k.eps);
  const bool want_wz = !kSoft && smoothing;  // else no w_c with c != t is read (lce_math.h)
  const vf cap = splat(k.softcap);
  // softcapped values go to the per-thread scratch row; the raw logits stay for the derivative
  float* work = scratch;
  auto load_z = [&](int64_t c, int64_t n, float fill) {
    if constexpr (kCap) return load_part(work + c, n, fill);
    else return load_part(row + c, n, fill);
  };

  // pass 1: softcap, max (+ first index per lane), sum_c w_c z_c. kU independent accumulators
  // (vector blocks c / kW taken round-robin, the tail by the first): one running max is a serial
  // compare+blend chain whose latency, not the loads, bounded this pass (measured).
  constexpr int kU = 4;
  vf vm[kU], vwz[kU];
  vi vidx[kU];
  for (int u = 0; u < kU; ++u) {
    vm[u] = splat(-kInf);
    vwz[u] = splat(0.0f);
    vidx[u] = kLanes;  // an all -inf row has its first maximum at 0
  }
  const bool want_arg = k.argmax != nullptr;
  auto max_step = [&](vf& am, vi& aidx, vf& awz, int64_t c, int64_t n) {
    vf x = load_part(row + c, n, -kInf);
    if constexpr (kCap) {
      x = cap * vtanh(x / cap);  // (a / cap, not a * (1 / cap): one rounding); tail lanes become -cap
      if (n < kW) x = select(kLanes < splati(int32_t(n)), x, splat(-kInf));
      store_part(work + c, x, n);
    }
    const vi take = take_new_max(am, x);
    am = select(take, x, am);
    if (want_arg) aidx = take ? kLanes + int32_t(c) : aidx;
    if (want_wz) {
      const vf xz = n == kW ? x : select(kLanes < splati(int32_t(n)), x, splat(0.0f));
      awz += kW8 ? xz * load_part(k.cw + c, n, 0.0f) : xz;
    }
  };
  int64_t c1 = 0;
  for (; c1 + kU * kW <= V; c1 += kU * kW) {
#pragma GCC unroll 4
    for (int u = 0; u < kU; ++u) max_step(vm[u], vidx[u], vwz[u], c1 + u * kW, kW);
  }
  for (; c1 < V; c1 += kW) max_step(vm[0], vidx[0], vwz[0], c1, std::min(kW, V - c1));
  float m = hmax(vm[0]);
  for (int u = 1; u < kU; ++u) m = nan_max(m, hmax(vm[u]));
  // an all -inf row (every class masked): lse = -inf like torch.logsumexp, loss and gradient NaN like torch
  const float m_shift = m == -kInf ? 0.0f : m;
  if (want_arg) {
    int64_t best = std::numeric_limits<int32_t>::max();
    if (m == m) {  // the smallest first-maximum index of the lanes holding the max
      for (int u = 0; u < kU; ++u)
        for (int i = 0; i < kW; ++i)
          if (vm[u][i] == m) best = std::min<int64_t>(best, vidx[u][i]);
    } else {  // a NaN row (rare): the first NaN, like torch.argmax
      for (best = 0; best < V; ++best) {
        const float z = kCap ? work[best] : static_cast<float>(row[best]);
        if (z != z) break;
      }
    }
    k.argmax[r] = best;
  }
  // z_t now: with softcap, pass 2 overwrites the softcapped values in the scratch row
  const float z_t = kSoft ? 0.0f : kCap ? work[t] : static_cast<float>(row[t]);
  // pass 2: sum_c exp(z_c - m) (tail lanes hold -inf, whose exp is exactly 0); Q and S.
  // With a gradient to write, exp(z_c - m) is kept in the fp32 scratch row (L2-resident), so the
  // gradient pass reads it instead of evaluating exp again: one exp per element, not two.
  float* ebuf = scratch;
  const bool keep_e = k.write_grad;
  const vf vmx = splat(m_shift);
  const float inv_v = 1.0f / float(V);
  const vf one_minus_e = splat(1.0f - k.eps), e_over_v = splat(k.eps * inv_v);
  vf vs[kU], vQ = splat(0.0f), vS = splat(0.0f);
  for (int u = 0; u < kU; ++u) vs[u] = splat(0.0f);
  auto sum_step = [&](vf& as, int64_t c, int64_t n) {
    const vf x = load_z(c, n, -kInf);
    const vf e = vexp(x - vmx);
    as += e;
    if (keep_e) store_part(ebuf + c, e, n);
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
  };
  int64_t c2 = 0;
  for (; c2 + kU * kW <= V; c2 += kU * kW) {
#pragma GCC unroll 4
    for (int u = 0; u < kU; ++u) sum_step(vs[u], c2 + u * kW, kW);
  }
  for (; c2 < V; c2 += kW) sum_step(vs[0], c2, std::min(kW, V - c2));
  const float se = hsum((vs[0] + vs[1]) + (vs[2] + vs[3]));
  const float lse = m_shift + std::log(se);
  if (k.lse) k.lse[r] = lse;
  float w_t = 1.0f, Q = 0.0f;
  if constexpr (kSoft) {
    Q = hsum(vQ);
    k.loss[r] = lce_soft_row_loss<float>(lse, m_shift, Q, hsum(vS), k.zloss);
  } else {
    w_t = k.cw ? k.cw[t] : 1.0f;
    k.loss[r] = lce_row_loss<float>(lse, z_t, w_t, hsum((vwz[0] + vwz[1]) + (vwz[2] + vwz[3])), k.w_sum, k.eps, V, k.zloss);
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
    vf g = A * load_part(ebuf + c, n, 0.0f);
    vf dcap;
    if constexpr (kCap) {  // softcap_grad_from_input, lane-wise: precise also where tanh saturates
      const vf u = splat(2.0f) / (vexp(splat(2.0f) * vabs(load_part(row + c, n, 0.0f) / cap)) + splat(1.0f));
      dcap = u * (splat(2.0f) - u);
    }
    if constexpr (kSoft) {
      vf wq = load_part(q + c, n, 0.0f);
      if (smoothing) wq = one_minus_e * wq + e_over_v;
      if (kW8) wq *= load_part(k.cw + c, n, 0.0f);
      g -= B * wq;
    } else {
      if (want_wz) g -= kW8 ? B * load_part(k.cw + c, n, 0.0f) : B;
      g = select(kLanes + int32_t(c) == vt, g - splat(C), g);
    }
    if constexpr (kCap) g *= dcap;
    store_part(row + c, g, n);
    if (keep_row) mark_lanes(k, keep_row, c, as_stored<S>(g), n);
  }
}

// All rows [r0, r1) of a chunk with one set of compile-time flags.
template <typename S, bool kCap, bool kW8, bool kSoft>
FR_INLINE void rows_loop(const Chunk<float>& k, int64_t r0, int64_t r1, float* scratch) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t t = 0;
    if constexpr (!kSoft) {
      t = k.target[r];
      if (!lce_target_active(t, k.ignore_index, k.V)) {
        ignored_row<S>(k, r);
        continue;
      }
    }
    row_f32<S, kCap, kW8, kSoft>(k, r, t, scratch);
  }
}

template <typename S>
FR_INLINE void rows_dispatch(const Chunk<float>& k, int64_t r0, int64_t r1, float* scratch) {
  const bool cap = k.softcap > 0.0f, soft = k.probs != nullptr;
  const bool w8 = k.cw != nullptr && (soft || lce_smoothing_used(k.eps));
#define FR_ROWS(C, W, P) return rows_loop<S, C, W, P>(k, r0, r1, scratch)
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

// One entry per storage type: the ISA is picked once per chunk slice (lce_cpu.cpp), not per row.
void rows_float(const Chunk<float>& k, int64_t r0, int64_t r1, float* scratch) { rows_dispatch<float>(k, r0, r1, scratch); }
void rows_bf16(const Chunk<float>& k, int64_t r0, int64_t r1, float* scratch) {
  rows_dispatch<c10::BFloat16>(k, r0, r1, scratch);
}
void rows_half(const Chunk<float>& k, int64_t r0, int64_t r1, float* scratch) {
  rows_dispatch<c10::Half>(k, r0, r1, scratch);
}

#undef FR_INLINE
