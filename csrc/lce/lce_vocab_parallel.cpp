// CPU kernels of the two row passes of the vocab-parallel linear cross-entropy
// (fastreg/distributed/vocab_parallel.py drives them; the maths is csrc/lce/lce_math.h).
//
// Rank r holds classes [vocab_start, vocab_start + V_r) of the LM head. Per chunk of rows:
//   logits = x_c W_r^T (+ b_r)                                  local GEMM (rows, V_r)
//   _lce_vp_stats(logits)  softcap in place; per row the local log-sum-exp into this rank's slot,
//                          the target logit and class weight where this rank owns the target, the
//                          local sum_c w_c z_c (label smoothing); one extra row counts targets that
//                          are neither a class nor ignore_index
//   all-reduce(stats)      torch.distributed, O(rows) numbers, the only collective of the chunk
//   _lce_vp_rows(logits)   global lse = log-sum-exp of the slots; the row loss (identical on every
//                          rank) and, in place, d loss / d logits of this rank's slice
//   dX partial = dlogits W_r,  dW_r += dlogits^T x_c,  db_r += sum_rows dlogits
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "lce/lce_math.h"

namespace fastreg {
namespace {

using at::Tensor;

// Column layout of a stats row: [0, num_slots) local lse per rank, then z_t, then w_t (with class
// weights), then sum_c w_c z_c (with label smoothing).
struct StatsLayout {
  int64_t num_slots, z_col, w_col, wz_col, width;
  StatsLayout(int64_t slots, bool has_cw, bool want_wz) : num_slots(slots) {
    z_col = slots;
    w_col = has_cw ? slots + 1 : -1;
    wz_col = want_wz ? slots + 1 + (has_cw ? 1 : 0) : -1;
    width = slots + 1 + (has_cw ? 1 : 0) + (want_wz ? 1 : 0);
  }
};

void check_common(const char* fn, const Tensor& logits, const Tensor& target, const std::optional<Tensor>& cw,
                  const Tensor& stats, at::ScalarType acc, int64_t min_stat_rows, const StatsLayout& lay) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.is_cpu(), fn,
              ": logits must be a contiguous 2-D CPU tensor");
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong &&
                  target.is_contiguous(),
              fn, ": target must be a contiguous int64 tensor of shape (rows,)");
  if (cw.has_value())
    TORCH_CHECK(cw->dim() == 1 && cw->size(0) == V && cw->scalar_type() == acc && cw->is_contiguous(), fn,
                ": class_weight must be a contiguous (V_local,) tensor of the accumulate dtype");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) >= min_stat_rows && stats.size(1) == lay.width &&
                  stats.scalar_type() == acc && stats.is_contiguous(),
              fn, ": stats must be a contiguous (", min_stat_rows, ", ", lay.width,
              ") tensor of the accumulate dtype, got ", stats.sizes(), " ", stats.scalar_type());
}

template <typename T>
T row_max(const T* z, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < n; ++c) m = std::max(m, z[c]);
  return m;
}

// Pass 1 over one chunk (see the file comment). stats: (rows + 1, width), fully overwritten.
template <typename scalar_t, typename acc_t>
void stats_impl(Tensor& logits, const int64_t* tgt, const acc_t* cw, int64_t vocab_start, int64_t num_classes,
                int64_t ignore_index, acc_t cap, int64_t slot, const StatsLayout& lay, acc_t* st) {
  const int64_t rows = logits.size(0), V = logits.size(1);
  scalar_t* z = logits.data_ptr<scalar_t>();
  std::atomic<int64_t> bad{0};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> row(V);
    int64_t my_bad = 0;
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* s = st + r * lay.width;
      std::fill(s, s + lay.width, acc_t(0));
      const int64_t t = tgt[r];
      if (t == ignore_index) continue;
      if (!lce_target_active(t, ignore_index, num_classes)) {
        ++my_bad;
        continue;
      }
      scalar_t* zr = z + r * V;
      for (int64_t c = 0; c < V; ++c) {
        acc_t v = static_cast<acc_t>(zr[c]);
        if (cap > 0) v = cap * std::tanh(v / cap);
        row[c] = v;
      }
      if (cap > 0)
        for (int64_t c = 0; c < V; ++c) zr[c] = static_cast<scalar_t>(row[c]);
      const acc_t m = row_max(row.data(), V);
      acc_t lse = m;  // -inf for an empty slice or an all -inf row
      if (m > -std::numeric_limits<acc_t>::infinity()) {
        acc_t se = 0;
        for (int64_t c = 0; c < V; ++c) se += std::exp(row[c] - m);
        lse = m + std::log(se);
      }
      s[slot] = lse;
      const int64_t lt = vp_local_class(t, vocab_start, V);
      if (lt >= 0) {
        s[lay.z_col] = row[lt];
        if (lay.w_col >= 0) s[lay.w_col] = cw[lt];
      }
      if (lay.wz_col >= 0) {
        acc_t wz = 0;
        for (int64_t c = 0; c < V; ++c) wz += (cw ? cw[c] : acc_t(1)) * row[c];
        s[lay.wz_col] = wz;
      }
    }
    bad += my_bad;
  });
  acc_t* tail = st + rows * lay.width;
  std::fill(tail, tail + lay.width, acc_t(0));
  tail[0] = static_cast<acc_t>(bad.load());
}

void vp_stats_cpu(Tensor& logits, const Tensor& target, const std::optional<Tensor>& class_weight,
                  int64_t vocab_start, int64_t num_classes, int64_t ignore_index, double softcap, bool want_wz,
                  int64_t slot, int64_t num_slots, Tensor& stats) {
  static const char* fn = "_lce_vp_stats";
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const StatsLayout lay(num_slots, class_weight.has_value(), want_wz);
  check_common(fn, logits, target, class_weight, stats, acc, logits.size(0) + 1, lay);
  TORCH_CHECK(slot >= 0 && slot < num_slots, fn, ": slot ", slot, " outside [0, ", num_slots, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fastreg_lce_vp_stats", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    stats_impl<scalar_t, acc_t>(logits, target.data_ptr<int64_t>(),
                                class_weight.has_value() ? class_weight->data_ptr<acc_t>() : nullptr, vocab_start,
                                num_classes, ignore_index, static_cast<acc_t>(softcap), slot, lay,
                                stats.data_ptr<acc_t>());
  });
}

struct RowsArgs {
  int64_t vocab_start, num_classes, ignore_index;
  double eps, cap, zloss, w_sum;
  bool logits_capped, write_grad;
};

// Pass 2 over one chunk: stats are the group's sums (all-reduced), so every rank computes the same
// row losses and the gradient of its own slice.
template <typename scalar_t, typename acc_t>
void rows_impl(Tensor& logits, const int64_t* tgt, const acc_t* cw, const acc_t* st, const acc_t* sc,
               int64_t sc_stride, const StatsLayout& lay, const RowsArgs& a, acc_t* out) {
  const int64_t rows = logits.size(0), V = logits.size(1);
  scalar_t* z = logits.data_ptr<scalar_t>();
  const acc_t eps = a.eps, cap = a.cap, zl = a.zloss, w_sum = a.w_sum;
  const bool smoothing = lce_smoothing_used(eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* zr = z + r * V;
      const int64_t t = tgt[r];
      if (!lce_target_active(t, a.ignore_index, a.num_classes)) {
        out[r] = acc_t(0);
        if (a.write_grad) std::fill(zr, zr + V, scalar_t(0));
        continue;
      }
      const acc_t* s = st + r * lay.width;
      acc_t lse = s[0];
      for (int64_t k = 1; k < lay.num_slots; ++k) lse = lse_merge(lse, s[k]);
      const acc_t z_t = s[lay.z_col];
      const acc_t w_t = lay.w_col >= 0 ? s[lay.w_col] : acc_t(1);
      const acc_t sum_wz = lay.wz_col >= 0 ? s[lay.wz_col] : acc_t(0);
      out[r] = lce_row_loss<acc_t>(lse, z_t, w_t, sum_wz, w_sum, eps, a.num_classes, zl);
      if (!a.write_grad) continue;
      const LceGradCoefs<acc_t> k = lce_grad_coefs<acc_t>(sc[r * sc_stride], lse, w_t, w_sum, eps, a.num_classes, zl);
      const int64_t lt = vp_local_class(t, a.vocab_start, V);
      for (int64_t c = 0; c < V; ++c) {
        acc_t v = static_cast<acc_t>(zr[c]);
        if (cap > 0 && !a.logits_capped) v = cap * std::tanh(v / cap);
        const acc_t smooth = smoothing ? k.B * (cw ? cw[c] : acc_t(1)) : acc_t(0);  // no w_c read when eps == 0
        acc_t g = k.A * std::exp(v - lse) - smooth - (c == lt ? k.C : acc_t(0));
        if (cap > 0) g *= softcap_grad_from_value(v, cap);
        zr[c] = static_cast<scalar_t>(g);
      }
    }
  });
}

void vp_rows_cpu(Tensor& logits, const Tensor& target, const std::optional<Tensor>& class_weight, const Tensor& stats,
                 const Tensor& row_scale, const std::optional<Tensor>& class_weight_sum, int64_t vocab_start,
                 int64_t num_classes, int64_t ignore_index, double label_smoothing, double softcap, double z_loss,
                 bool logits_capped, bool write_grad, int64_t num_slots, Tensor& loss_rows) {
  static const char* fn = "_lce_vp_rows";
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const StatsLayout lay(num_slots, class_weight.has_value(), label_smoothing != 0.0);
  const int64_t rows = logits.size(0);
  check_common(fn, logits, target, class_weight, stats, acc, rows, lay);
  TORCH_CHECK(row_scale.scalar_type() == acc && (row_scale.numel() == 1 || row_scale.numel() == rows) &&
                  row_scale.is_contiguous(),
              fn, ": row_scale must hold 1 or rows values of the accumulate dtype");
  TORCH_CHECK(loss_rows.dim() == 1 && loss_rows.size(0) == rows && loss_rows.scalar_type() == acc &&
                  loss_rows.is_contiguous(),
              fn, ": loss_rows must be a contiguous (rows,) tensor of the accumulate dtype");
  TORCH_CHECK(class_weight.has_value() == class_weight_sum.has_value(), fn,
              ": class_weight_sum (the group's sum of class weights) comes with class_weight");
  if (rows == 0) return;
  const RowsArgs a{vocab_start,
                   num_classes,
                   ignore_index,
                   label_smoothing,
                   softcap,
                   z_loss,
                   class_weight_sum.has_value() ? class_weight_sum->item<double>() : static_cast<double>(num_classes),
                   logits_capped,
                   write_grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fastreg_lce_vp_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rows_impl<scalar_t, acc_t>(logits, target.data_ptr<int64_t>(),
                               class_weight.has_value() ? class_weight->data_ptr<acc_t>() : nullptr,
                               stats.data_ptr<acc_t>(), row_scale.data_ptr<acc_t>(), row_scale.numel() == 1 ? 0 : 1,
                               lay, a, loss_rows.data_ptr<acc_t>());
  });
}

// ---- device-generic passes (ATen tensor ops) ------------------------------------------------------
// The same two passes written with ATen ops over the whole chunk, so they run on any device: they
// are the CUDA kernels of these ops for now (a fused kernel on lce_math.h is the next step; these
// hold a few chunk-sized temporaries) and, with FASTREG_VP_GENERIC=1 at load time, the CPU ones,
// which is how the tests check them against the CPU kernels above. The algebra is lce_math.h's
// (lce_row_loss, lce_grad_coefs, softcap_grad_from_value), applied to columns of rows.

Tensor active_rows(const Tensor& t, int64_t ignore_index, int64_t num_classes) {
  return (t != ignore_index) & (t >= 0) & (t < num_classes);
}

void vp_stats_generic(Tensor& logits, const Tensor& target, const std::optional<Tensor>& class_weight,
                      int64_t vocab_start, int64_t num_classes, int64_t ignore_index, double softcap, bool want_wz,
                      int64_t slot, int64_t num_slots, Tensor& stats) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const StatsLayout lay(num_slots, class_weight.has_value(), want_wz);
  TORCH_CHECK(logits.dim() == 2 && target.dim() == 1 && target.size(0) == logits.size(0) && stats.dim() == 2 &&
                  stats.size(0) == logits.size(0) + 1 && stats.size(1) == lay.width && stats.scalar_type() == acc &&
                  slot >= 0 && slot < num_slots,
              "_lce_vp_stats: bad arguments (see the schema in csrc/fastreg.cpp)");
  const int64_t rows = logits.size(0), V = logits.size(1);
  Tensor z = logits.to(acc);
  if (softcap > 0) {
    z = at::tanh(z / softcap) * softcap;
    logits.copy_(z);
  }
  const Tensor active = active_rows(target, ignore_index, num_classes);
  const Tensor zero = at::zeros({}, z.options());
  stats.zero_();
  stats.select(0, rows).select(0, 0).copy_(((target != ignore_index) & active.logical_not()).sum());
  if (rows == 0) return;
  Tensor body = stats.narrow(0, 0, rows);
  if (V == 0) {  // an empty slice: lse = -inf, it owns no target
    body.select(1, slot).copy_(at::where(active, -std::numeric_limits<double>::infinity(), zero));
    return;
  }
  const Tensor m = std::get<0>(z.max(1, true));
  const Tensor shift = at::where(at::isfinite(m), m, zero);  // an all -inf row: log(0) = -inf
  const Tensor lse = at::log((z - shift).exp().sum(1)) + shift.squeeze(1);
  body.select(1, slot).copy_(at::where(active, lse, zero));
  const Tensor local = target - vocab_start;
  const Tensor owned = active & (local >= 0) & (local < V);
  const Tensor idx = local.clamp(0, V - 1);
  body.select(1, lay.z_col).copy_(at::where(owned, z.gather(1, idx.unsqueeze(1)).squeeze(1), zero));
  if (lay.w_col >= 0) body.select(1, lay.w_col).copy_(at::where(owned, class_weight->index_select(0, idx), zero));
  if (lay.wz_col >= 0) {
    const Tensor wz = class_weight.has_value() ? (z * *class_weight).sum(1) : z.sum(1);
    body.select(1, lay.wz_col).copy_(at::where(active, wz, zero));
  }
}

void vp_rows_generic(Tensor& logits, const Tensor& target, const std::optional<Tensor>& class_weight,
                     const Tensor& stats, const Tensor& row_scale, const std::optional<Tensor>& class_weight_sum,
                     int64_t vocab_start, int64_t num_classes, int64_t ignore_index, double label_smoothing,
                     double softcap, double z_loss, bool logits_capped, bool write_grad, int64_t num_slots,
                     Tensor& loss_rows) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const StatsLayout lay(num_slots, class_weight.has_value(), label_smoothing != 0.0);
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(logits.dim() == 2 && target.dim() == 1 && target.size(0) == rows && stats.dim() == 2 &&
                  stats.size(0) >= rows && stats.size(1) == lay.width && stats.scalar_type() == acc &&
                  loss_rows.numel() == rows && class_weight.has_value() == class_weight_sum.has_value(),
              "_lce_vp_rows: bad arguments (see the schema in csrc/fastreg.cpp)");
  if (rows == 0) return;
  const auto opts = stats.options();
  const Tensor body = stats.narrow(0, 0, rows);
  const Tensor lse = body.narrow(1, 0, num_slots).logsumexp(1);
  const Tensor z_t = body.select(1, lay.z_col);
  const Tensor w_t = lay.w_col >= 0 ? body.select(1, lay.w_col) : at::ones({rows}, opts);
  const Tensor sum_wz = lay.wz_col >= 0 ? body.select(1, lay.wz_col) : at::zeros({rows}, opts);
  const Tensor w_sum = class_weight_sum.has_value() ? class_weight_sum->to(acc)
                                                    : at::scalar_tensor(static_cast<double>(num_classes), opts);
  const double eps = label_smoothing, inv_v = 1.0 / static_cast<double>(num_classes);
  const Tensor active = active_rows(target, ignore_index, num_classes);
  const Tensor zero = at::zeros({}, opts);
  // lce_row_loss; without label smoothing W and sum_c w_c z_c are not read (lce_math.h)
  const bool smoothing = lce_smoothing_used(eps);
  Tensor loss = (1.0 - eps) * w_t * (lse - z_t) + z_loss * lse * lse;
  if (smoothing) loss = loss + eps * inv_v * (w_sum * lse - sum_wz);
  loss_rows.copy_(at::where(active, loss, zero));
  if (!write_grad) return;
  Tensor z = logits.to(acc);
  if (softcap > 0 && !logits_capped) z = at::tanh(z / softcap) * softcap;
  // lce_grad_coefs
  const Tensor s = row_scale.to(acc).expand({rows});
  Tensor A = s * ((1.0 - eps) * w_t + 2.0 * z_loss * lse);
  if (smoothing) A = A + s * (eps * inv_v) * w_sum;
  const Tensor C = s * (1.0 - eps) * w_t;
  Tensor g = A.unsqueeze(1) * (z - lse.unsqueeze(1)).exp();
  if (smoothing) {
    const Tensor B = (s * (eps * inv_v)).unsqueeze(1);
    g = class_weight.has_value() ? g - B * class_weight->unsqueeze(0) : g - B;
  }
  if (V > 0) {
    const Tensor local = target - vocab_start;
    const Tensor owned = active & (local >= 0) & (local < V);
    g.scatter_add_(1, local.clamp(0, V - 1).unsqueeze(1), at::where(owned, -C, zero).unsqueeze(1));
  }
  if (softcap > 0) g = g * (1.0 - (z / softcap).square());  // softcap_grad_from_value
  logits.copy_(at::where(active.unsqueeze(1), g, zero));
}

bool use_generic_on_cpu() {
  const char* v = std::getenv("FASTREG_VP_GENERIC");
  return v != nullptr && v[0] == '1';
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  if (use_generic_on_cpu()) {
    m.impl("_lce_vp_stats", &vp_stats_generic);
    m.impl("_lce_vp_rows", &vp_rows_generic);
  } else {
    m.impl("_lce_vp_stats", &vp_stats_cpu);
    m.impl("_lce_vp_rows", &vp_rows_cpu);
  }
}
TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("_lce_vp_stats", &vp_stats_generic);
  m.impl("_lce_vp_rows", &vp_rows_generic);
}

}  // namespace fastreg
