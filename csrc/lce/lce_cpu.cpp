// CPU kernel of fastreg::_lce_rows: the fused per-row pass of the linear cross-entropy.
//
// Three sweeps per row of a logits chunk (the row, V values, stays in L1/L2 between them):
//   1. softcap (optional), max and, per lane, the index of the first maximum (argmax_rows);
//      sum_c w_c z_c (label smoothing, class-index targets)
//   2. sum_c exp(z_c - max)  -> lse, the row loss (lce_math.h); with probability targets also
//      Q = sum_c w_c q'_c and S = sum_c w_c q'_c (z_c - max). With a gradient to write, each
//      exp(z_c - max) is kept in a per-thread fp32 scratch row (L2-resident) for sweep 3.
//   3. gradient written in place over the logits: (A p_c - B w_c - [c == t] C) * softcap'(a_c), or
//      s ((Q + 2 l lse) p_c - w_c q'_c) * softcap'(a_c); block_keep gets, per vocabulary block, the
//      largest lce_block_code of its entries (0: all |g| <= grad_filter_eps; else |g|'s fp32 exponent).
// float, bfloat16 and float16 rows run on explicit 16-lane fp32 vectors (csrc/lce/lce_cpu_simd.h,
// GCC/clang vector extensions): 16-bit values are widened/narrowed 16 lanes at a time in registers
// (round to nearest even, as torch's casts); sweeps 1 and 2 run 4 independent accumulators (a
// single running max / sum is a latency-bound chain). With softcap the softcapped fp32 values go
// to the same per-thread scratch row (before sweep 2 replaces them) and the raw logits stay: the
// softcap derivative is taken from the raw logit (lce_math.h softcap_grad_from_input), accurate also
// where tanh saturates. The vector code is compiled once per ISA (x86-64: AVX-512 F/BW/VL, AVX2, baseline;
// elsewhere, e.g. aarch64 NEON, once) and the ISA is picked once per process; the row loop of a
// chunk slice is one call, with the option flags dispatched once per slice, not per row.
// double rows (gradcheck, float64 users) use scalar libm maths.
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
#include <immintrin.h>
#endif

namespace fastreg {
namespace {

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

// block_keep: raise a (row tile, block) entry to at least `code` (lce_block_code). Atomic: the
// rows of a tile may run on different threads.
inline void raise_block_code(uint8_t* p, uint8_t code) {
  std::atomic_ref<uint8_t> slot(*p);
  uint8_t cur = slot.load(std::memory_order_relaxed);
  while (cur < code && !slot.compare_exchange_weak(cur, code, std::memory_order_relaxed)) {
  }
}

// An ignored row: loss 0, lse 0, argmax -1, zero gradient.
template <typename S, typename A>
inline void ignored_row(const Chunk<A>& k, int64_t r) {
  k.loss[r] = A(0);
  if (k.lse) k.lse[r] = A(0);
  if (k.argmax) k.argmax[r] = -1;
  if (k.write_grad) {
    S* row = static_cast<S*>(k.logits) + r * k.V;
    std::fill(row, row + k.V, S(0));
  }
}


// ------------------------------------------------------------------ the vector row pass, per ISA
// (lce_cpu_simd.h; x86-64: AVX-512, AVX2 and baseline, picked once at load; elsewhere one build)
#if defined(FASTREG_X86_ISAS)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own _mm512_cvtph_ps (undefined pass-through)
#endif
#define FR_ISA_AVX512 1
namespace isa_avx512 {
#include "lce/lce_cpu_simd.h"
}  // namespace isa_avx512
#undef FR_ISA_AVX512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace isa_avx2 {
#include "lce/lce_cpu_simd.h"
}  // namespace isa_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // FASTREG_X86_ISAS
namespace isa_base {
#include "lce/lce_cpu_simd.h"
}  // namespace isa_base

using RowsFn = void (*)(const Chunk<float>&, int64_t, int64_t, float*);
struct RowsFns {
  RowsFn f32, bf16, f16;
};
// Picked once per process (the ISA of this CPU).
const RowsFns& rows_fns() {
  static const RowsFns fns = [] {
#if defined(FASTREG_X86_ISAS)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return RowsFns{isa_avx512::rows_float, isa_avx512::rows_bf16, isa_avx512::rows_half};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return RowsFns{isa_avx2::rows_float, isa_avx2::rows_bf16, isa_avx2::rows_half};
#endif
    return RowsFns{isa_base::rows_float, isa_base::rows_bf16, isa_base::rows_half};
  }();
  return fns;
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
    if (keep_row) raise_block_code(keep_row + c / k.block_w, lce_block_code(v, k.keep_eps));
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
  // the vector pass's per-thread fp32 scratch row: softcapped values, then exp(z_c - m)
  const bool scratch_needed = dtype != at::kDouble && (k.softcap > 0 || k.write_grad);
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
      std::vector<float> scratch(scratch_needed ? V : 0);
      const RowsFns& fns = rows_fns();
      (dtype == at::kFloat ? fns.f32 : dtype == at::kBFloat16 ? fns.bf16 : fns.f16)(k, r0, r1, scratch.data());
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
  TORCH_CHECK(V < (int64_t(1) << 31) - 16, "_lce_rows: V must be below 2^31");
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
