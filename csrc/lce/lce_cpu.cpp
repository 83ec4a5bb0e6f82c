// CPU kernel of fastreg::_lce_rows: the fused per-row pass of the linear cross-entropy.
//
// One pass structure per row of a logits chunk (the row, V floats, stays in L2 between passes):
//   1. softcap (optional, in place): z = cap * tanh(a / cap); max; sum_c w_c z_c (label smoothing)
//   2. sum_c exp(z_c - max)                        -> lse, the row loss (lce_math.h)
//   3. gradient written in place: (A p_c - B w_c) * softcap'(z_c), then the target entry -= C.
// float rows run on explicit 16-lane vectors (GCC/clang vector extensions), on x86-64 compiled
// three times via target_clones (AVX-512, AVX2, baseline) and picked at load time, on aarch64
// compiled to NEON (common.h); bf16/fp16 rows are converted to a float scratch row; double rows
// (gradcheck) use scalar libm maths.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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
constexpr int64_t kW = 16;

#define FR_INLINE __attribute__((always_inline)) inline

FR_INLINE vf splat(float a) { return vf{} + a; }
FR_INLINE vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FR_INLINE void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
// Lanes [0, n) from p, the rest `fill` (n <= kW; a full vector is a plain load).
FR_INLINE vf load_part(const float* p, int64_t n, float fill) {
  if (n == kW) return loadu(p);
  alignas(64) float tmp[kW];
  for (int64_t i = 0; i < kW; ++i) tmp[i] = i < n ? p[i] : fill;
  return loadu(tmp);
}
FR_INLINE void store_part(float* p, vf v, int64_t n) {
  if (n == kW) return storeu(p, v);
  alignas(64) float tmp[kW];
  storeu(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}
// nan_max on whole vectors, as a bitwise blend: GCC lowers the `mask ? x : acc` of the generic
// nan_max to a branch per lane (measured: most of the row pass's time at V = 32).
FR_INLINE vf vmax(vf a, vf b) {
  const vi take_b = (b > a) | (b != b);
  return (vf)(((vi)b & take_b) | ((vi)a & ~take_b));
}
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
// tanh(x) = 1 - 2 / (exp(2x) + 1), odd-symmetrised so small |x| keeps its sign.
FR_INLINE vf vtanh(vf x) {
  vf ax = x < splat(0.0f) ? -x : x;
  vf e = vexp(splat(2.0f) * ax);
  vf t = splat(1.0f) - splat(2.0f) / (e + splat(1.0f));
  return x < splat(0.0f) ? -t : t;
}

struct RowArgs {
  int64_t V;
  int64_t target;     // a class in [0, V) (inactive rows never reach the kernels)
  float scale;        // upstream gradient of this row's loss
  float eps, softcap, zloss, w_sum;
  const float* cw;    // class weights or nullptr
  bool write_grad;
};

// The float row pass. Returns the row loss. `z` holds the raw logits and, if write_grad, gets the gradient.
template <bool kCap, bool kW8>
FR_INLINE float row_pass_f32(float* z, const RowArgs& a) {
  const int64_t V = a.V;
  const bool want_wz = lce_smoothing_used(a.eps);  // else no w_c with c != t is read (lce_math.h)
  const vf cap = splat(a.softcap), inv_cap = splat(1.0f / a.softcap);
  const vf ninf = splat(-std::numeric_limits<float>::infinity());
  const vi lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  // pass 1: softcap in place, max, sum_c w_c z_c
  vf vm = ninf, vwz = splat(0.0f);
  for (int64_t c = 0; c < V; c += kW) {
    const int64_t n = std::min(kW, V - c);
    vf x = load_part(z + c, n, 0.0f);
    if (kCap) {
      x = cap * vtanh(x * inv_cap);
      store_part(z + c, x, n);
    }
    vm = vmax(vm, n == kW ? x : (lanes < (vi{} + int32_t(n)) ? x : ninf));
    if (want_wz) vwz += kW8 ? x * load_part(a.cw + c, n, 0.0f) : x;
  }
  const float m = hmax(vm);
  const float sum_wz = hsum(vwz);
  // pass 2: sum_c exp(z_c - m)   (tail lanes hold -inf, whose exp is exactly 0)
  const vf vmx = splat(m);
  vf vs = splat(0.0f);
  for (int64_t c = 0; c < V; c += kW) {
    const int64_t n = std::min(kW, V - c);
    vs += vexp(load_part(z + c, n, -std::numeric_limits<float>::infinity()) - vmx);
  }
  const float se = hsum(vs);
  const float lse = m + std::log(se);
  const float z_t = z[a.target];  // softcapped already, if on
  const float w_t = kW8 ? a.cw[a.target] : 1.0f;
  const float loss = lce_row_loss<float>(lse, z_t, w_t, sum_wz, a.w_sum, a.eps, V, a.zloss);
  if (!a.write_grad) return loss;
  // pass 3: the gradient, in place
  const LceGradCoefs<float> k = lce_grad_coefs<float>(a.scale, lse, w_t, a.w_sum, a.eps, V, a.zloss);
  const vf A = splat(k.A / se), B = splat(k.B);  // A p_c = (A / se) exp(z_c - m)
  for (int64_t c = 0; c < V; c += kW) {
    const int64_t n = std::min(kW, V - c);
    vf x = load_part(z + c, n, 0.0f);
    vf g = A * vexp(x - vmx);
    if (want_wz) g -= kW8 ? B * load_part(a.cw + c, n, 0.0f) : B;
    if (kCap) {
      vf r = x * inv_cap;
      g *= splat(1.0f) - r * r;
    }
    store_part(z + c, g, n);
  }
  z[a.target] -= k.C * (kCap ? softcap_grad_from_value(z_t, a.softcap) : 1.0f);
  return loss;
}

FASTREG_CPU_CLONES float row_pass_f32_dispatch(float* z, const RowArgs& a) {
  const bool cap = a.softcap > 0.0f, w8 = a.cw != nullptr;
  if (cap) return w8 ? row_pass_f32<true, true>(z, a) : row_pass_f32<true, false>(z, a);
  return w8 ? row_pass_f32<false, true>(z, a) : row_pass_f32<false, false>(z, a);
}

// The double row pass (gradcheck, float64 users): plain scalar maths.
double row_pass_f64(double* z, int64_t V, int64_t t, double scale, double eps, double softcap, double zloss,
                    double w_sum, const double* cw, bool write_grad) {
  const bool cap = softcap > 0.0, smoothing = lce_smoothing_used(eps);
  double m = -std::numeric_limits<double>::infinity(), sum_wz = 0.0;
  for (int64_t c = 0; c < V; ++c) {
    if (cap) z[c] = softcap * std::tanh(z[c] / softcap);
    m = nan_max(m, z[c]);
    // only with label smoothing: a -inf logit (a masked class) must not turn 0 * inf into nan
    if (smoothing) sum_wz += (cw ? cw[c] : 1.0) * z[c];
  }
  double se = 0.0;
  for (int64_t c = 0; c < V; ++c) se += std::exp(z[c] - m);
  const double lse = m + std::log(se);
  const double w_t = cw ? cw[t] : 1.0;
  const double loss = lce_row_loss<double>(lse, z[t], w_t, sum_wz, w_sum, eps, V, zloss);
  if (!write_grad) return loss;
  const LceGradCoefs<double> k = lce_grad_coefs<double>(scale, lse, w_t, w_sum, eps, V, zloss);
  for (int64_t c = 0; c < V; ++c) {
    const double d = cap ? softcap_grad_from_value(z[c], softcap) : 1.0;
    const double smooth = smoothing ? k.B * (cw ? cw[c] : 1.0) : 0.0;
    z[c] = (k.A * std::exp(z[c] - lse) - smooth - (c == t ? k.C : 0.0)) * d;
  }
  return loss;
}

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Flush denormals to zero while a row pass runs on this thread, then restore the caller's mode:
// MXCSR FTZ|DAZ on x86-64, FPCR.FZ on aarch64 (which flushes denormal inputs and results alike).
// Wide logit ranges make many p_c and gradient entries tiny; as denormals they would slow this
// pass and the gradient GEMMs that read them many-fold, and at ~1e-38 they carry no information
// at fp32 precision. Elsewhere denormals are kept (same results, possibly slower).
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

struct RowsF64 {
  double eps, softcap, zloss, w_sum;
  const double* cw;
};

// All rows of one chunk, in parallel. Inactive rows (ignore_index) get loss 0 and a zero gradient.
template <typename scalar_t>
void rows_impl(at::Tensor& logits, const int64_t* tgt, const at::Tensor& row_scale, int64_t scale_stride,
               int64_t ignore_index, bool write_grad, int64_t grain, const RowArgs& base, const RowsF64& f64,
               at::Tensor& loss_rows) {
  constexpr bool kF64 = std::is_same_v<scalar_t, double>, kF32 = std::is_same_v<scalar_t, float>;
  using acc_t = std::conditional_t<kF64, double, float>;
  const int64_t rows = logits.size(0), V = logits.size(1);
  scalar_t* z = logits.data_ptr<scalar_t>();
  acc_t* out = loss_rows.data_ptr<acc_t>();
  const acc_t* sc = row_scale.data_ptr<acc_t>();
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    FlushDenormals ftz;
    std::vector<float> scratch(kF32 || kF64 ? 0 : V);
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* zr = z + r * V;
      if (!lce_target_active(tgt[r], ignore_index, V)) {
        out[r] = acc_t(0);
        if (write_grad) std::fill(zr, zr + V, scalar_t(0));
        continue;
      }
      if constexpr (kF64) {
        out[r] = row_pass_f64(zr, V, tgt[r], sc[r * scale_stride], f64.eps, f64.softcap, f64.zloss, f64.w_sum, f64.cw,
                              write_grad);
      } else {
        RowArgs a = base;
        a.target = tgt[r];
        a.scale = sc[r * scale_stride];
        if constexpr (kF32) {
          out[r] = row_pass_f32_dispatch(zr, a);
        } else {
          to_float(zr, scratch.data(), V);
          out[r] = row_pass_f32_dispatch(scratch.data(), a);
          if (write_grad) from_float(scratch.data(), zr, V);
        }
      }
    }
  });
}

void lce_rows_cpu(at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                  const at::Tensor& row_scale, int64_t ignore_index, double label_smoothing, double softcap,
                  double z_loss, bool write_grad, at::Tensor& loss_rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "_lce_rows: logits must be a contiguous 2-D tensor");
  const int64_t rows = logits.size(0), V = logits.size(1);
  const bool is_f64 = logits.scalar_type() == at::kDouble;
  const auto acc = is_f64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong && target.is_contiguous(),
              "_lce_rows: target must be a contiguous int64 tensor of shape (rows,)");
  TORCH_CHECK(loss_rows.dim() == 1 && loss_rows.size(0) == rows && loss_rows.scalar_type() == acc &&
                  loss_rows.is_contiguous(),
              "_lce_rows: loss_rows must be a contiguous (rows,) tensor of the accumulate dtype");
  TORCH_CHECK(row_scale.scalar_type() == acc && (row_scale.numel() == 1 || row_scale.numel() == rows) &&
                  row_scale.is_contiguous(),
              "_lce_rows: row_scale must hold 1 or rows values of the accumulate dtype");
  at::Tensor cw;
  if (class_weight.has_value()) {
    cw = *class_weight;
    TORCH_CHECK(cw.dim() == 1 && cw.size(0) == V && cw.scalar_type() == acc && cw.is_contiguous(),
                "_lce_rows: class_weight must be a contiguous (V,) tensor of the accumulate dtype");
  }
  if (rows == 0) return;
  const double w_sum = cw.defined() ? cw.sum().item<double>() : static_cast<double>(V);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t scale_stride = row_scale.numel() == 1 ? 0 : 1;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));

  const RowArgs base{V, 0, 1.0f, static_cast<float>(label_smoothing), static_cast<float>(softcap),
                     static_cast<float>(z_loss), static_cast<float>(w_sum),
                     cw.defined() && !is_f64 ? cw.data_ptr<float>() : nullptr, write_grad};
  const RowsF64 f64{label_smoothing, softcap, z_loss, w_sum, cw.defined() && is_f64 ? cw.data_ptr<double>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fastreg_lce_rows", [&] {
    rows_impl<scalar_t>(logits, tgt, row_scale, scale_stride, ignore_index, write_grad, grain, base, f64, loss_rows);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) { m.impl("_lce_rows", &lce_rows_cpu); }

}  // namespace fastreg
