// The per-row formulas of the fused linear cross-entropy, shared by the CPU and CUDA row passes.
//
// For one row with (possibly softcapped) logits z (V classes), target t, class weights w (w == 1
// without weights, W = sum_c w_c), label smoothing e and z-loss coefficient l:
//   lse    = log sum_c exp(z_c)
//   loss   = (1-e) w_t (lse - z_t) + (e/V) (W lse - sum_c w_c z_c) + l lse^2
// which is exactly torch's cross_entropy row loss (with and without class weights) plus z-loss.
// Its gradient w.r.t. z, times the row's upstream scale s:
//   g_c    = A p_c - B w_c - [c == t] C,   p_c = exp(z_c - lse)
//   A = s ((1-e) w_t + e W / V + 2 l lse),   B = s e / V,   C = s (1-e) w_t
// and with softcap (z = cap * tanh(a / cap)) the gradient w.r.t. the raw logit a is g_c (1 - (z_c/cap)^2).
// Without label smoothing (e == 0) torch reads only w_t, so the smoothing terms (W, sum_c w_c z_c and
// B w_c) are skipped, not multiplied by 0: a NaN/inf weight of an untargeted class must change nothing.
// Kernels test lce_smoothing_used(e) before reading any w_c with c != t.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

namespace fastreg {

// The running max of a row, NaN-propagating like torch.max: a NaN logit makes the row's max, lse,
// loss and gradient NaN in every kernel (CPU and CUDA alike), whatever order the max is taken in.
// T may be a GCC vector type (the CPU kernel's SIMD lanes).
template <typename T>
FASTREG_HD T nan_max(T acc, T x) {
  return (x > acc) | (x != x) ? x : acc;
}

template <typename T>
FASTREG_HD bool lce_smoothing_used(T eps) {
  return eps != T(0);
}

template <typename T>
FASTREG_HD T lce_row_loss(T lse, T z_t, T w_t, T sum_wz, T w_sum, T eps, int64_t V, T zloss) {
  const T inv_v = T(1) / T(V);
  const T smooth = lce_smoothing_used(eps) ? eps * inv_v * (w_sum * lse - sum_wz) : T(0);
  return (T(1) - eps) * w_t * (lse - z_t) + smooth + zloss * lse * lse;
}

template <typename T>
struct LceGradCoefs {
  T A, B, C;
};

template <typename T>
FASTREG_HD LceGradCoefs<T> lce_grad_coefs(T scale, T lse, T w_t, T w_sum, T eps, int64_t V, T zloss) {
  const T inv_v = T(1) / T(V);
  LceGradCoefs<T> k;
  const T smooth = lce_smoothing_used(eps) ? eps * w_sum * inv_v : T(0);
  k.A = scale * ((T(1) - eps) * w_t + smooth + T(2) * zloss * lse);
  k.B = scale * eps * inv_v;
  k.C = scale * (T(1) - eps) * w_t;
  return k;
}

// Derivative of cap * tanh(a / cap) expressed through its value z: 1 - r^2 = (1 - r)(1 + r), r = z / cap.
// The factored form keeps its relative precision near saturation (|r| -> 1, where 1 - r is exact).
template <typename T>
FASTREG_HD T softcap_grad_from_value(T z, T cap) {
  const T r = z / cap;
  return (T(1) - r) * (T(1) + r);
}

// The same derivative from the raw logit a: 1 - tanh^2(x) = u (2 - u) with u = 2 / (e^{2|x|} + 1) = 1 - |tanh x|,
// x = a / cap. Relative precision everywhere, also where tanh saturates -- unlike any form of the
// rounded value z (fp32: d from z is ~7e-8 / d off in the saturated regime, the error torch eager has).
template <typename T>
FASTREG_HD T softcap_grad_from_input(T a, T cap) {
  const T u = T(2) / (std::exp(T(2) * std::fabs(a / cap)) + T(1));
  return u * (T(2) - u);
}

// tanh for the softcap, in fp32 to ~1 ulp over the whole range (the CPU vector tanh, csrc/lce/lce_cpu.cpp,
// evaluates the same two branches lane-wise). 1 - 2 / (e^{2|x|} + 1) alone cancels for small |x| -- the
// normal softcap regime -- so |x| < kSoftcapTanhPolyBound uses an odd polynomial x + x^3 P(x^2) (fitted
// for relative error on [0, 0.625]; max error 0.9 ulp in fp32 arithmetic). double uses libm.
// (Scalar constants, not an array: usable in CUDA device code.)
constexpr float kSoftcapTanhPolyBound = 0.625f;
constexpr float kSoftcapTanhP0 = -0.3333328068f, kSoftcapTanhP1 = 0.1333144307f, kSoftcapTanhP2 = -0.05373972654f,
                kSoftcapTanhP3 = 0.02063912153f, kSoftcapTanhP4 = -0.005705018528f;
FASTREG_HD float softcap_tanh(float x) {
  const float ax = std::fabs(x);
  if (ax < kSoftcapTanhPolyBound) {
    const float u = x * x;
    float p = kSoftcapTanhP4;
    p = p * u + kSoftcapTanhP3;
    p = p * u + kSoftcapTanhP2;
    p = p * u + kSoftcapTanhP1;
    p = p * u + kSoftcapTanhP0;
    return x + x * u * p;
  }
  const float t = 1.0f - 2.0f / (std::exp(2.0f * ax) + 1.0f);  // exp overflow -> inf -> t = 1
  return x < 0.0f ? -t : t;
}
FASTREG_HD double softcap_tanh(double x) { return std::tanh(x); }

// Row statistics of the probability-target loss (target_probs of _lce_rows): with q' = (1-e) q + e/V,
//   Q = sum_c w_c q'_c,  S = sum_c w_c q'_c (z_c - m)   (m: the row max, so S stays well-conditioned)
//   loss = Q (lse - m) - S + l lse^2,   g_c = s [ (Q + 2 l lse) p_c - w_c q'_c ]   (times softcap')
// exactly torch's cross_entropy with class-probability targets per row, plus the z-loss.
template <typename T>
FASTREG_HD T lce_soft_row_loss(T lse, T m, T Q, T S, T zloss) {
  return Q * (lse - m) - S + zloss * lse * lse;
}
// q'_c from q_c (e: label smoothing, inv_v = 1 / V).
template <typename T>
FASTREG_HD T lce_smoothed_prob(T q, T eps, T inv_v) {
  return lce_smoothing_used(eps) ? (T(1) - eps) * q + eps * inv_v : q;
}

// A target takes part in the loss iff it is not ignore_index and lies in [0, V); anything else is
// treated as ignored by the row passes (the driver reports out-of-range targets as errors first),
// so no pass ever reads or writes out of bounds.
FASTREG_HD bool lce_target_active(int64_t t, int64_t ignore_index, int64_t V) {
  return t != ignore_index && t >= 0 && t < V;
}

// Gradient filtering (docs/gradient-filtering.md). The row pass writes, per (row, vocabulary block),
// the largest code of the block's written gradient entries g: 0 where |g| <= eps, else the biased
// fp32 exponent field of |g| (at least 1; 255 for inf/NaN). A field e means |g| < 2^(e - 126), so
// 2^(code - 126) bounds every entry of the block (and is < 2x its largest), and the max of the codes
// is the code of the max: one byte per (row, block), raised with an integer max whatever the
// order of the threads, no floating-point sums.
template <typename A>
FASTREG_HD uint8_t lce_block_code(A g, A eps) {
  const A a = g < A(0) ? -g : g;
  if (a <= eps) return 0;  // (false for NaN)
  const float f = static_cast<float>(a);
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  const uint32_t e = (bits >> 23) & 0xffu;
  return static_cast<uint8_t>(e < 1u ? 1u : e);
}

}  // namespace fastreg

// ---- vocab-parallel rows (csrc/lce/lce_vocab_parallel.cpp) ----------------------------------------
// Rank r of a group holds classes [start_r, start_r + V_r) of every row. Each rank reduces its slice
// to a local log-sum-exp (and, where it owns the target, z_t and w_t); one all-reduce combines them
// and every rank then has the row's global lse, z_t, w_t, sum_c w_c z_c, which the formulas above
// turn into the loss and, slice by slice, the gradient (V there is the global class count).
namespace fastreg {

// log(exp(a) + exp(b)) without overflow; an empty slice contributes -inf.
template <typename T>
FASTREG_HD T lse_merge(T a, T b) {
  const T m = a > b ? a : b;
  if (!(m > -std::numeric_limits<T>::infinity())) return m;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// The column of a global class id in this rank's slice, or -1 when another rank owns it.
FASTREG_HD int64_t vp_local_class(int64_t t, int64_t vocab_start, int64_t v_local) {
  return t >= vocab_start && t < vocab_start + v_local ? t - vocab_start : -1;
}

}  // namespace fastreg
