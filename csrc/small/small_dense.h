// Small-problem CPU kernels: one whole fused linear layer + loss (softmax cross-entropy or mean
// squared error) over a batch of rows, forward and backward in ONE pass over the rows, for few
// outputs V (V <= kSmallMaxV). Raw pointers, no ATen, no threads, no allocation after a thread's
// first call (a per-thread scratch holds W^T): a caller that runs thousands of tiny mini-batches
// (fastreg's C++ fit loop, the ops' small path) pays only for the arithmetic. A caller with much work may split the rows over threads itself, giving each
// thread its own grad_w / grad_b to sum afterwards (csrc/lce/lce.cpp does).
//
// Data flow, per row i of the batch (r = rows ? rows[i] : i, so a shuffled mini-batch can be read
// in place without a gather), rows taken kTileRows at a time so each weight load serves a tile:
//   z      = W x_r + b                       V logits / predictions, on the stack (from W^T)
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
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "lce/lce_math.h"

namespace fastreg {
namespace small {

constexpr int64_t kSmallMaxV = 64;  // logits of a row live on the stack

// Whether a float/double problem on CPU with V <= kSmallMaxV takes the one pass below rather than
// the chunked GEMM path (both losses route alike). Measured against eager torch, fastreg/eager
// with the one pass forced, one thread, fp32:
// - AMD EPYC (MKL runs its generic kernels there): 64x64x10 0.55, 1024x64x10 0.37, 4096x256x32
//   0.60, 512x2048x16 0.64, 16384x128x64 0.62, 2048x512x64 0.66, 4096x1024x64 0.82, 8192x4096x16
//   0.87 -- the one pass wins while W (V x D) stays within L2 -- then 1024x8192x32 1.02,
//   4096x2048x64 1.12, where the blocked GEMMs win;
// - Intel Xeon with AVX-512/AMX (MKL's tuned GEMMs; 2 threads, torch 2.13, one pass / chunked):
//   4096x64x10 0.36 / 0.79, 512x2048x16 0.98 / 1.02 (rerun 0.94 / 0.96), 2048x256x32 1.00 / 1.01
//   (rerun 1.11 / 1.01), 4096x256x32 1.15 / 1.05, 2048x512x64 1.19 / 1.01, 16384x128x64
//   1.11 / 0.96, 4096x1024x64 1.13 / 0.91, 8192x4096x16 0.98 / 0.46 -- a tie at 2^24 multiply-adds,
//   the GEMMs win beyond, whatever the size of W.
constexpr int64_t kOnePassMaxWork = int64_t(1) << 21;     // N x D x V: always the one pass
constexpr int64_t kOnePassMaxRowWork = int64_t(1) << 16;  // D x V: the one pass up to L2 ...
constexpr int64_t kOnePassMaxWorkFastBlas = int64_t(1) << 23;  // ... and this much work with MKL on Intel
inline bool prefer_one_pass(int64_t N, int64_t D, int64_t V) {
  if (V > kSmallMaxV) return false;
  const int64_t work = N * D * V;
  if (work <= kOnePassMaxWork) return true;
#if defined(__x86_64__) || defined(__i386__)
  static const bool fast_blas = __builtin_cpu_is("intel");
#else
  constexpr bool fast_blas = false;
#endif
  return D * V <= kOnePassMaxRowWork && (!fast_blas || work <= kOnePassMaxWorkFastBlas);
}

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
// A lambda is a function of its own: without this it is compiled for the baseline target, not
// for the clone that calls it (measured: scalar SSE softmax, 2x slower rows).
#define FASTREG_SMALL_INLINE_LAMBDA __attribute__((always_inline))

// Rows go through the layer in tiles of kTileRows, so every weight / gradient element loaded from
// L1 serves kTileRows rows (a row at a time, grad_W's read-modify-write and the per-row dot
// products' horizontal sums dominated: measured 2-3x slower at 64..4096 x 64..256 x 10..32). Logits
// are vectors over the classes: V padded to VB vectors of kLanes (VB <= 4 as V <= 64), from a
// transposed copy of W (D, VB * kLanes) made once per call; the backward runs over features.
constexpr int kLanes = 16;
constexpr int kTileRows = 4;
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
FASTREG_SMALL_INLINE Vec<T> loadu(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
FASTREG_SMALL_INLINE void storeu(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
FASTREG_SMALL_INLINE void zero_row(T* p, int64_t n) {
  for (int64_t k = 0; k < n; ++k) p[k] = T(0);
}

// Logits come from a transposed copy of W while it is small enough to stay in L2 next to the rows;
// a wider layer takes dot products over the features (its horizontal sums are then few). Measured
// (kernel alone, fp32, fwd+grads, transposed / dot products): 64x64x10 0.83, 1024x64x10 0.68,
// 4096x256x32 0.62, 2048x512x64 0.82, 512x2048x16 0.93, 1024x1024x64 0.95; 64x1000x10 1.12.
constexpr int64_t kMaxTransposed = int64_t(1) << 16;  // elements of the padded W^T

// Per-thread scratch of one call: W^T padded to (D, VB * kLanes) with zeros, then the bias padded
// to VB * kLanes. Allocated once per thread and size (at most kMaxTransposed + 64 elements): a
// caller's steady state allocates nothing.
template <typename T, int VB>
FASTREG_SMALL_INLINE T* transposed_layer(const SmallLinear<T>& a) {
  constexpr int64_t P = VB * kLanes;
  const int64_t D = a.D, V = a.V;
  thread_local std::vector<T> buf;
  const size_t need = size_t(D * P + P);
  if (buf.size() < need) buf.resize(need);
  T* wt = buf.data();
  for (int64_t d = 0; d < D; ++d) {
    T* row = wt + d * P;
    for (int64_t c = 0; c < V; ++c) row[c] = a.w[c * D + d];
    for (int64_t c = V; c < P; ++c) row[c] = T(0);
  }
  T* bias = wt + D * P;
  for (int64_t c = 0; c < P; ++c) bias[c] = a.b && c < V ? a.b[c] : T(0);
  return wt;
}

template <typename T, int VB>
struct Tile {
  static constexpr int64_t P = VB * kLanes;
  // feature rows; rows [n, kTileRows) repeat row 0 with a zero gradient (0 * x: as a GEMM would)
  const T* x[kTileRows];
  int64_t i[kTileRows];   // batch index of each row
  int n = 0;
  // the rows' logits, then d loss / d logits (zero in padded classes and padding rows)
  alignas(64) T z[kTileRows][P] = {};
};

// z = W x + b for the tile's rows: per feature, one load of W^T's row serves every row of the tile.
template <typename T, int VB>
FASTREG_SMALL_INLINE void tile_logits(Tile<T, VB>& t, const T* wt, int64_t D) {
  constexpr int64_t P = VB * kLanes;
  const T* bias = wt + D * P;
  Vec<T> acc[kTileRows][VB];
  for (int k = 0; k < VB; ++k) {
    const Vec<T> b = loadu(bias + k * kLanes);
    for (int r = 0; r < kTileRows; ++r) acc[r][k] = b;
  }
  for (int64_t d = 0; d < D; ++d) {
    Vec<T> w[VB];
    for (int k = 0; k < VB; ++k) w[k] = loadu(wt + d * P + k * kLanes);
    for (int r = 0; r < kTileRows; ++r) {
      const T xd = t.x[r][d];
      for (int k = 0; k < VB; ++k) acc[r][k] += xd * w[k];
    }
  }
  for (int r = 0; r < kTileRows; ++r)
    for (int k = 0; k < VB; ++k) storeu(t.z[r] + k * kLanes, acc[r][k]);
}

// The same for a wide layer, from W itself: per class, one load of W's row block serves every row.
template <typename T, int VB>
FASTREG_SMALL_INLINE void tile_logits_dot(Tile<T, VB>& t, const SmallLinear<T>& a) {
  const int64_t D = a.D, D_vec = D - D % kLanes;
  for (int64_t c = 0; c < a.V; ++c) {
    const T* w = a.w + c * D;
    Vec<T> acc[kTileRows] = {};
    for (int64_t d = 0; d < D_vec; d += kLanes) {
      const Vec<T> wv = loadu(w + d);
      for (int r = 0; r < kTileRows; ++r) acc[r] += loadu(t.x[r] + d) * wv;
    }
    for (int r = 0; r < kTileRows; ++r) {
      T s = a.b ? a.b[c] : T(0);
      for (int l = 0; l < kLanes; ++l) s += acc[r][l];
      for (int64_t d = D_vec; d < D; ++d) s += t.x[r][d] * w[d];
      t.z[r][c] = s;
    }
  }
}

// The backward of the layer for the tile, given g = d loss / d z in t.z: grad_b and grad_W
// accumulated, grad_x rows written. Padding rows have g = 0 and a zero feature row.
template <typename T, int VB>
FASTREG_SMALL_INLINE void tile_backward(const SmallLinear<T>& a, const Tile<T, VB>& t) {
  const int64_t D = a.D, V = a.V;
  const int64_t D_vec = D - D % kLanes;
  if (a.grad_b)
    for (int64_t c = 0; c < V; ++c) {
      T s = 0;
      for (int r = 0; r < kTileRows; ++r) s += t.z[r][c];
      a.grad_b[c] += s;
    }
  if (a.grad_w) {
    for (int64_t c = 0; c < V; ++c) {
      T g[kTileRows];
      for (int r = 0; r < kTileRows; ++r) g[r] = t.z[r][c];
      T* gw = a.grad_w + c * D;
      for (int64_t d = 0; d < D_vec; d += kLanes) {
        Vec<T> acc = loadu(gw + d);
        for (int r = 0; r < kTileRows; ++r) acc += g[r] * loadu(t.x[r] + d);
        storeu(gw + d, acc);
      }
      for (int64_t d = D_vec; d < D; ++d) {
        T acc = gw[d];
        for (int r = 0; r < kTileRows; ++r) acc += g[r] * t.x[r][d];
        gw[d] = acc;
      }
    }
  }
  if (a.grad_x) {
    T* gx[kTileRows];
    for (int r = 0; r < kTileRows; ++r) gx[r] = a.grad_x + t.i[r] * a.grad_x_stride;
    for (int64_t d = 0; d < D_vec; d += kLanes) {
      Vec<T> acc[kTileRows] = {};
      for (int64_t c = 0; c < V; ++c) {
        const Vec<T> w = loadu(a.w + c * D + d);
        for (int r = 0; r < kTileRows; ++r) acc[r] += t.z[r][c] * w;
      }
      for (int r = 0; r < t.n; ++r) storeu(gx[r] + d, acc[r]);
    }
    for (int64_t d = D_vec; d < D; ++d) {
      T acc[kTileRows] = {};
      for (int64_t c = 0; c < V; ++c) {
        const T w = a.w[c * D + d];
        for (int r = 0; r < kTileRows; ++r) acc[r] += t.z[r][c] * w;
      }
      for (int r = 0; r < t.n; ++r) gx[r][d] = acc[r];
    }
  }
}

// Runs the rows in tiles: `active(i, r)` says whether batch row i (data row r) takes part (an
// inactive row is the caller's to finish), `rows_done(tile)` turns the tile's logits into each
// row's loss and d loss / d logits; the layer's backward follows when gradients are wanted.
template <typename T, int VB, typename Active, typename RowsDone>
FASTREG_SMALL_INLINE void tiled_rows(const SmallLinear<T>& a, Active active, RowsDone rows_done) {
  if (a.n == 0) return;
  const bool want_grad = a.grad_x || a.grad_w || a.grad_b;
  const bool transposed = a.D * VB * kLanes <= kMaxTransposed;
  const T* wt = transposed ? transposed_layer<T, VB>(a) : nullptr;
  Tile<T, VB> t;
  for (int64_t i = 0; i < a.n;) {
    t.n = 0;
    for (; i < a.n && t.n < kTileRows; ++i) {
      const int64_t r = a.rows ? a.rows[i] : i;
      if (!active(i, r)) continue;
      t.x[t.n] = a.x + r * a.x_stride;
      t.i[t.n] = i;
      ++t.n;
    }
    if (t.n == 0) break;
    for (int r = t.n; r < kTileRows; ++r) t.x[r] = t.x[0], t.i[r] = t.i[0];
    if (transposed) tile_logits<T, VB>(t, wt, a.D);
    else tile_logits_dot<T, VB>(t, a);
    rows_done(t);
    for (int r = t.n; r < kTileRows; ++r) zero_row(t.z[r], VB * kLanes);  // padding rows: no gradient
    if (want_grad) tile_backward<T, VB>(a, t);
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

template <typename T, int VB>
FASTREG_SMALL_INLINE double ce_rows_tiled(const SmallCe<T>& a) {
  constexpr int64_t P = VB * kLanes;
  // float: the softmax runs over all P lanes (a compile-time count vectorises whole); double
  // calls std::exp, so only over the V classes
  constexpr bool all_lanes = sizeof(T) == 4;
  const int64_t D = a.D, V = a.V;
  const bool want_grad = a.grad_x || a.grad_w || a.grad_b;
  const T eps = a.label_smoothing, cap = a.softcap, zl = a.z_loss;
  const T w_sum = a.class_weight ? a.class_weight_sum : T(V);
  const T minus_inf = -std::numeric_limits<T>::infinity();
  double total = 0;
  auto active = [&](int64_t i, int64_t r) FASTREG_SMALL_INLINE_LAMBDA {
    if (lce_target_active(a.target[r], a.ignore_index, V)) return true;
    if (a.loss_rows) a.loss_rows[i] = T(0);
    if (a.grad_x) zero_row(a.grad_x + i * a.grad_x_stride, D);
    return false;
  };
  auto rows_done = [&](Tile<T, VB>& tile) FASTREG_SMALL_INLINE_LAMBDA {
    for (int q = 0; q < tile.n; ++q) {
      T* z = tile.z[q];
      const int64_t i = tile.i[q];
      const int64_t t = a.target[a.rows ? a.rows[i] : i];
      if (cap > T(0))
        for (int64_t c = 0; c < V; ++c) z[c] = cap * std::tanh(z[c] / cap);
      T m = z[0];
      for (int64_t c = 1; c < V; ++c) m = z[c] > m ? z[c] : m;
      alignas(64) T p[P];
      T sum_exp = 0;
      if constexpr (all_lanes) {
#pragma omp simd reduction(+ : sum_exp)
        for (int64_t c = 0; c < P; ++c) {
          p[c] = exp_vectorisable((c < V ? z[c] : minus_inf) - m);
          sum_exp += p[c];
        }
      } else {
        for (int64_t c = 0; c < V; ++c) sum_exp += p[c] = exp_vectorisable(z[c] - m);
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
      const T a_over_sum = k.A / sum_exp;
      // The gradient goes straight into z, in one vector loop with the target's term (a scalar
      // store into a vector just written stalls its reload); smoothing and softcap need z intact,
      // so they work in p and copy. Lanes >= V are never read by the backward.
      const bool in_place = !lce_smoothing_used(eps) && !(cap > T(0));
      T* g = in_place ? z : p;
      if constexpr (all_lanes) {
#pragma omp simd
        for (int64_t c = 0; c < P; ++c) g[c] = a_over_sum * p[c] - (c == t ? k.C : T(0));
      } else {
        for (int64_t c = 0; c < V; ++c) g[c] = a_over_sum * p[c] - (c == t ? k.C : T(0));
      }
      if (in_place) continue;
      if (lce_smoothing_used(eps))
        for (int64_t c = 0; c < V; ++c) p[c] -= k.B * (a.class_weight ? a.class_weight[c] : T(1));
      if (cap > T(0))
        for (int64_t c = 0; c < V; ++c) p[c] *= softcap_grad_from_value(z[c], cap);
      for (int64_t c = 0; c < V; ++c) z[c] = p[c];
    }
  };
  tiled_rows<T, VB>(a, active, rows_done);
  return total;
}

template <typename T, int VB>
FASTREG_SMALL_INLINE double mse_rows_tiled(const SmallMse<T>& a) {
  const int64_t V = a.V;
  const bool want_grad = a.grad_x || a.grad_w || a.grad_b;
  double total = 0;
  auto rows_done = [&](Tile<T, VB>& tile) FASTREG_SMALL_INLINE_LAMBDA {
    for (int q = 0; q < tile.n; ++q) {
      T* z = tile.z[q];
      const int64_t i = tile.i[q];
      const T* y = a.y + (a.rows ? a.rows[i] : i) * a.y_stride;
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
    }
  };
  tiled_rows<T, VB>(a, [](int64_t, int64_t) FASTREG_SMALL_INLINE_LAMBDA { return true; }, rows_done);
  return total;
}

// The entry points' bodies: V picks the number of class vectors, f(std::integral_constant<int, VB>).
template <typename F>
FASTREG_SMALL_INLINE double with_class_vectors(int64_t V, F f) {
  switch ((V + kLanes - 1) / kLanes) {
    case 0:
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}
template <typename T>
FASTREG_SMALL_INLINE double ce_rows(const SmallCe<T>& a) {
  return with_class_vectors(a.V, [&](auto vb) FASTREG_SMALL_INLINE_LAMBDA { return ce_rows_tiled<T, vb()>(a); });
}
template <typename T>
FASTREG_SMALL_INLINE double mse_rows(const SmallMse<T>& a) {
  return with_class_vectors(a.V, [&](auto vb) FASTREG_SMALL_INLINE_LAMBDA { return mse_rows_tiled<T, vb()>(a); });
}

}  // namespace detail
}  // namespace small
}  // namespace fastreg
