// Small-problem CPU kernels: one whole fused linear layer + loss (softmax cross-entropy or mean
// squared error) over a batch of rows, forward and backward in ONE pass over the rows, for few
// outputs V (V <= kSmallMaxV). Raw pointers, no allocation, no ATen, no threads: a caller that
// runs thousands of tiny mini-batches (fastreg's C++ fit loop, the ops' small path) pays only for
// the arithmetic. A caller with much work may split the rows over threads itself, giving each
// thread its own grad_w / grad_b to sum afterwards (csrc/lce/lce.cpp does).
//
// Data flow, per row i of the batch (r = rows ? rows[i] : i, so a shuffled mini-batch can be read
// in place without a gather):
//   z      = W x_r + b                       V logits / predictions, on the stack
//   loss_i = CE(z, target[r]) or sum_v (z_v - y_rv)^2   (CE formulas: csrc/lce/lce_math.h)
//   g      = d (s_i loss_i) / d z            s_i: scale, or row_scale[i] (CE), elem_scale (MSE)
//   grad_x[i]  = g W        (written)        grad_w += g x_r^T, grad_b += g   (accumulated)
// The entry points return sum_i loss_i (unscaled, accumulated in double) and optionally store
// each row's loss (CE) or each element's squared error (MSE). A 'mean' caller passes scale =
// 1 / denominator, with ce_small_denominator() giving torch's cross-entropy denominator.
//
// Layouts: x rows at x + r * x_stride with contiguous features; w (V, D) and grad_w contiguous;
// MSE target rows at y + r * y_stride, contiguous outputs. CE targets are int64 class indices; an
// ignore_index row (or any target outside [0, V): callers validate first, see
// ce_small_first_bad_target) has loss 0 and zero gradient.
//
// The entry points for float and double are compiled as AVX-512 / AVX2 / baseline clones
// (csrc/small/small_dense.cpp); the templates below are the implementation.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#include "lce/lce_math.h"

namespace fastreg {
namespace small {

constexpr int64_t kSmallMaxV = 64;  // logits of a row live on the stack

// The linear layer and its gradients, common to both losses.
template <typename T>
struct SmallLinear {
  int64_t n = 0, D = 0, V = 0;           // rows of the batch, features, outputs
  const T* x = nullptr;                  // row r at x + r * x_stride
  int64_t x_stride = 0;
  const int64_t* rows = nullptr;         // optional batch -> data row indices (gather in place)
  const T* w = nullptr;                  // (V, D) contiguous
  const T* b = nullptr;                  // (V,) or nullptr
  T* grad_x = nullptr;                   // optional (n, D), row i at grad_x + i * grad_x_stride, written
  int64_t grad_x_stride = 0;
  T* grad_w = nullptr;                   // optional (V, D) contiguous, accumulated (+=)
  T* grad_b = nullptr;                   // optional (V,), accumulated (+=)
};

template <typename T>
struct SmallCe : SmallLinear<T> {
  const int64_t* target = nullptr;       // indexed like x rows (target[r])
  const T* class_weight = nullptr;       // (V,) or nullptr
  T class_weight_sum = T(0);             // sum of class_weight (ignored without class weights)
  int64_t ignore_index = -100;
  T label_smoothing = T(0), softcap = T(0) /* <= 0: off */, z_loss = T(0);
  T scale = T(1);                        // upstream scale of every row's loss ...
  const T* row_scale = nullptr;          // ... or per batch row (n,) ('none' backward)
  T* loss_rows = nullptr;                // optional (n,) per-row loss out
};

template <typename T>
struct SmallMse : SmallLinear<T> {
  const T* y = nullptr;                  // target row r at y + r * y_stride, V contiguous values
  int64_t y_stride = 0;
  T scale = T(1);                        // upstream scale of every squared error ...
  const T* elem_scale = nullptr;         // ... or per element (n, V), row i at + i * elem_scale_stride
  int64_t elem_scale_stride = 0;
  T* loss_elems = nullptr;               // optional (n, V) squared errors out, row i at + i * loss_stride
  int64_t loss_stride = 0;
};

// Entry points (float and double; defined in small_dense.cpp). Return sum_i loss_i.
double ce_small(const SmallCe<float>& a);
double ce_small(const SmallCe<double>& a);
double mse_small(const SmallMse<float>& a);
double mse_small(const SmallMse<double>& a);

// torch's 'mean' denominator of the cross-entropy: the number of non-ignored rows, or the sum of
// their class weights.
template <typename T>
double ce_small_denominator(const SmallCe<T>& a) {
  double s = 0;
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t t = a.target[a.rows ? a.rows[i] : i];
    if (!lce_target_active(t, a.ignore_index, a.V)) continue;
    s += a.class_weight ? double(a.class_weight[t]) : 1.0;
  }
  return s;
}

// Index of the first target that is neither a class in [0, V) nor ignore_index, or -1.
inline int64_t ce_small_first_bad_target(const int64_t* target, int64_t n, int64_t V, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i)
    if (target[i] != ignore_index && (target[i] < 0 || target[i] >= V)) return i;
  return -1;
}

namespace detail {

// Everything below is inlined into each target clone of the entry points, so it is compiled for
// AVX-512 / AVX2 / baseline along with them.
#define FASTREG_SMALL_INLINE __attribute__((always_inline)) inline

// z = W x (+ b), four outputs at a time so each x element is loaded once per four rows of W.
template <typename T>
FASTREG_SMALL_INLINE void linear_row(const T* __restrict x, const T* __restrict w, const T* __restrict b, int64_t D, int64_t V,
                       T* __restrict z) {
  int64_t v = 0;
  for (; v + 4 <= V; v += 4) {
    const T *w0 = w + v * D, *w1 = w0 + D, *w2 = w1 + D, *w3 = w2 + D;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      const T xd = x[d];
      s0 += xd * w0[d];
      s1 += xd * w1[d];
      s2 += xd * w2[d];
      s3 += xd * w3[d];
    }
    z[v] = s0, z[v + 1] = s1, z[v + 2] = s2, z[v + 3] = s3;
  }
  for (; v < V; ++v) {
    const T* wv = w + v * D;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += x[d] * wv[d];
    z[v] = s;
  }
  if (b)
    for (int64_t c = 0; c < V; ++c) z[c] += b[c];
}

// The backward of the linear layer for one row, given g = d loss / d z.
template <typename T>
FASTREG_SMALL_INLINE void linear_row_backward(const SmallLinear<T>& a, const T* __restrict x, const T* __restrict g, int64_t i) {
  const int64_t D = a.D, V = a.V;
  if (a.grad_b)
    for (int64_t c = 0; c < V; ++c) a.grad_b[c] += g[c];
  if (a.grad_w) {
    for (int64_t c = 0; c < V; ++c) {
      T* __restrict gw = a.grad_w + c * D;
      const T gc = g[c];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gw[d] += gc * x[d];
    }
  }
  if (a.grad_x) {
    T* __restrict gx = a.grad_x + i * a.grad_x_stride;
    int64_t c = 0;
    if (V >= 2) {
      const T *w0 = a.w, *w1 = a.w + D;
      const T g0 = g[0], g1 = g[1];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gx[d] = g0 * w0[d] + g1 * w1[d];
      c = 2;
    } else {
      const T g0 = g[0];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gx[d] = g0 * a.w[d];
      c = 1;
    }
    for (; c + 2 <= V; c += 2) {
      const T *w0 = a.w + c * D, *w1 = w0 + D;
      const T g0 = g[c], g1 = g[c + 1];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gx[d] += g0 * w0[d] + g1 * w1[d];
    }
    for (; c < V; ++c) {
      const T* w0 = a.w + c * D;
      const T g0 = g[c];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gx[d] += g0 * w0[d];
    }
  }
}

// exp for float rows, written so a `omp simd` loop vectorises it (libm's expf is a call per
// element): ~1 ulp on [-87, 88], exactly 0 below -87, like the row pass of csrc/lce/lce_cpu.cpp.
// Double rows keep std::exp (gradcheck-grade accuracy).
FASTREG_SMALL_INLINE float exp_vectorisable(float x) {
  const bool underflow = x < -87.0f;
  x = x > 88.0f ? 88.0f : (underflow ? -87.0f : x);
  // round to nearest even by the 1.5 * 2^23 trick (|x log2 e| < 2^22): vectorises on every target
  // and compiler, unlike __builtin_roundevenf (GCC only)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float q = 1.0f / 5040.0f;
  q = q * r + 1.0f / 720.0f;
  q = q * r + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  q = q * r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return underflow ? 0.0f : q * two_n;
}
FASTREG_SMALL_INLINE double exp_vectorisable(double x) { return std::exp(x); }

template <typename T>
FASTREG_SMALL_INLINE void zero_row(T* p, int64_t n) {
  for (int64_t k = 0; k < n; ++k) p[k] = T(0);
}

template <typename T>
FASTREG_SMALL_INLINE double ce_rows(const SmallCe<T>& a) {
  const int64_t D = a.D, V = a.V;
  const bool want_grad = a.grad_x || a.grad_w || a.grad_b;
  const T eps = a.label_smoothing, cap = a.softcap, zl = a.z_loss;
  const T w_sum = a.class_weight ? a.class_weight_sum : T(V);
  double total = 0;
  T z[kSmallMaxV], p[kSmallMaxV];
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t r = a.rows ? a.rows[i] : i;
    const T* x = a.x + r * a.x_stride;
    const int64_t t = a.target[r];
    if (!lce_target_active(t, a.ignore_index, V)) {
      if (a.loss_rows) a.loss_rows[i] = T(0);
      if (a.grad_x) zero_row(a.grad_x + i * a.grad_x_stride, D);
      continue;
    }
    linear_row(x, a.w, a.b, D, V, z);
    if (cap > T(0))
      for (int64_t c = 0; c < V; ++c) z[c] = cap * std::tanh(z[c] / cap);
    T m = z[0];
    for (int64_t c = 1; c < V; ++c) m = z[c] > m ? z[c] : m;
    T sum_exp = 0;
#pragma omp simd reduction(+ : sum_exp)
    for (int64_t c = 0; c < V; ++c) {
      p[c] = exp_vectorisable(z[c] - m);
      sum_exp += p[c];
    }
    const T lse = m + std::log(sum_exp);
    T sum_wz = 0;
    if (lce_smoothing_used(eps))
      for (int64_t c = 0; c < V; ++c) sum_wz += (a.class_weight ? a.class_weight[c] : T(1)) * z[c];
    const T w_t = a.class_weight ? a.class_weight[t] : T(1);
    const T loss = lce_row_loss(lse, z[t], w_t, sum_wz, w_sum, eps, V, zl);
    if (a.loss_rows) a.loss_rows[i] = loss;
    total += double(loss);
    if (!want_grad) continue;
    const T s = a.row_scale ? a.row_scale[i] : a.scale;
    const LceGradCoefs<T> k = lce_grad_coefs(s, lse, w_t, w_sum, eps, V, zl);
    const T inv_sum = T(1) / sum_exp;
    for (int64_t c = 0; c < V; ++c) {
      T g = k.A * p[c] * inv_sum;
      if (lce_smoothing_used(eps)) g -= k.B * (a.class_weight ? a.class_weight[c] : T(1));
      if (c == t) g -= k.C;
      if (cap > T(0)) g *= softcap_grad_from_value(z[c], cap);
      p[c] = g;
    }
    linear_row_backward<T>(a, x, p, i);
  }
  return total;
}

template <typename T>
FASTREG_SMALL_INLINE double mse_rows(const SmallMse<T>& a) {
  const int64_t D = a.D, V = a.V;
  const bool want_grad = a.grad_x || a.grad_w || a.grad_b;
  double total = 0;
  T z[kSmallMaxV];
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t r = a.rows ? a.rows[i] : i;
    const T* x = a.x + r * a.x_stride;
    const T* y = a.y + r * a.y_stride;
    linear_row(x, a.w, a.b, D, V, z);
    T row_sum = 0;
    for (int64_t c = 0; c < V; ++c) {
      const T e = z[c] - y[c];
      z[c] = e;
      row_sum += e * e;
    }
    if (a.loss_elems) {
      T* out = a.loss_elems + i * a.loss_stride;
      for (int64_t c = 0; c < V; ++c) out[c] = z[c] * z[c];
    }
    total += double(row_sum);
    if (!want_grad) continue;
    if (a.elem_scale) {
      const T* s = a.elem_scale + i * a.elem_scale_stride;
      for (int64_t c = 0; c < V; ++c) z[c] *= T(2) * s[c];
    } else {
      const T s2 = T(2) * a.scale;
      for (int64_t c = 0; c < V; ++c) z[c] *= s2;
    }
    linear_row_backward<T>(a, x, z, i);
  }
  return total;
}

}  // namespace detail
}  // namespace small
}  // namespace fastreg
