// The fused linear -> softmax -> cross-entropy driver, shared by CPU and CUDA.
//
// Rows are processed in chunks so the extra memory is O(chunk x V), never N x V. Per chunk:
//   logits  = x_c W^T (+ b)                 GEMM 1, into a reused (chunk, V) buffer
//   _lce_rows(logits)                       fused row pass: max, log-sum-exp, loss, z-loss and,
//                                           in place, d loss / d logits (csrc/lce/lce_cpu.cpp,
//                                           csrc/cuda/lce_rows.cu)
//   grad_x_c = dlogits W                    GEMM 2
//   grad_W  += dlogits^T x_c                GEMM 3 (accumulated in fp32/fp64)
//   grad_b  += sum_rows dlogits
// For scalar reductions the gradients are produced by the forward (3 GEMMs in total); for
// reduction='none' the backward recomputes the logits with the per-row upstream gradient.
// The GEMMs are ATen ops, so they run on MKL/oneDNN on CPU and cuBLAS (current stream) on CUDA.
//
// Few classes on CPU (V <= 64, float/double) skip the chunks: csrc/small/small_dense.h does
// logits, softmax, loss and all gradients in one pass over the rows, where the fixed cost of
// three GEMM calls and a row-pass dispatch would dominate. The autograd formula is the C++
// kernel at the Autograd key at the bottom of this file: the Python API makes one call.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <iterator>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "lce/lce_math.h"
#include "mem/cpu_buffers.h"
#include "small/small_dense.h"
#include "small/fused_linear_autograd.h"
#include "fixed_order_sum.h"
#include "small/small_parallel.h"

namespace fastreg {
namespace {

using at::Tensor;
constexpr int64_t kNone = 0, kMean = 1, kSum = 2;

struct Problem {
  Tensor x;       // (N, D)
  Tensor w;       // (V, D)
  Tensor target;  // (N,) int64
  Tensor bias;    // (V,) or undefined
  Tensor cw;      // (V,) class weights in the accumulate dtype, or undefined
  Tensor probs;   // (N, V) class-probability targets (then target is empty), or undefined
  Tensor active;  // (A,) int64 indices of the non-ignored rows when only they go through the GEMMs
  int64_t N, D, V;
  at::ScalarType acc;
};

bool blas_friendly(const Tensor& m) {
  return m.dim() == 2 && (m.stride(1) == 1 || m.stride(0) == 1);
}

// Shapes, dtypes and devices of the operands; every message names the Python argument.
void check_operands(const char* fn, const Tensor& input, const Tensor& weight, const Tensor& target,
                    const std::optional<Tensor>& bias, const std::optional<Tensor>& class_weight) {
  TORCH_CHECK_VALUE(input.dim() >= 1, fn, ": input must be a tensor of shape (*, in_features), got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, fn, ": linear_weight must be 2-D (num_classes, in_features), got shape ",
                    weight.sizes());
  const auto lead = input.sizes().slice(0, input.dim() - 1);
  TORCH_CHECK_TYPE(!(at::isFloatingType(target.scalar_type()) && target.sizes() == lead), fn,
                   ": target must hold class indices (int64 or int32), got ", target.scalar_type(), " of shape ",
                   target.sizes(), "; class probabilities have shape ", lead, " + (num_classes,)");
  if (at::isFloatingType(target.scalar_type())) {  // class probabilities (*, V), as F.cross_entropy
    TORCH_CHECK_VALUE(target.dim() == input.dim() && target.sizes().slice(0, target.dim() - 1) == lead &&
                          target.size(-1) == weight.size(0),
                      fn, ": class-probability target has shape ", target.sizes(), " but input has shape ",
                      input.sizes(), " and linear_weight ", weight.sizes(), "; expected target of shape ", lead,
                      " (class indices) or ", lead, " + (", weight.size(0), ",) (class probabilities)");
    TORCH_CHECK_TYPE(target.scalar_type() == input.scalar_type(), fn, ": class-probability target dtype ",
                     target.scalar_type(), " does not match input dtype ", input.scalar_type());
  } else {
    TORCH_CHECK_VALUE(target.sizes() == lead, fn, ": target has shape ", target.sizes(), " but input has shape ",
                      input.sizes(), "; expected target of shape ", lead);
    TORCH_CHECK_TYPE(!at::isComplexType(target.scalar_type()), fn,
                     ": target must hold class indices (int64 or int32) or class probabilities, got ",
                     target.scalar_type());
  }
  const auto dev = input.device();
  auto same_device = [&](const Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device() == dev, fn, ": all tensors must be on one device, got ", name, " on ", t.device(),
                      " and input on ", dev);
  };
  same_device(weight, "linear_weight");
  same_device(target, "target");
  if (bias) same_device(*bias, "linear_bias");
  if (class_weight) same_device(*class_weight, "weight (class weights)");
}

Problem prepare(const char* fn, const Tensor& input_any, const Tensor& weight, const Tensor& target_any,
                const std::optional<Tensor>& bias, const std::optional<Tensor>& class_weight, int64_t ignore_index,
                double label_smoothing, double softcap, double z_loss, int64_t chunk_size) {
  check_operands(fn, input_any, weight, target_any, bias, class_weight);
  const Tensor input = input_any.dim() == 2 ? input_any : input_any.reshape({-1, input_any.size(-1)});
  const bool probs = at::isFloatingType(target_any.scalar_type());
  const Tensor target = probs ? target_any.reshape({-1, weight.size(0)})
                              : target_any.dim() == 1 ? target_any : target_any.reshape({-1});
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), fn, ": input has ", input.size(1),
                    " features but linear_weight has shape ", weight.sizes(), " (expected (num_classes, ",
                    input.size(1), "))");
  TORCH_CHECK_VALUE(weight.size(0) >= 1, fn, ": linear_weight must have at least one class");
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, fn,
                   ": input must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, fn, ": linear_weight dtype ", weight.scalar_type(),
                   " does not match input dtype ", dt);
  TORCH_CHECK_TYPE(probs || target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, fn,
                   ": target must hold class indices as int64 or int32 (or class probabilities of the input's "
                   "dtype), got ", target.scalar_type());
  const int64_t V = weight.size(0);
  Problem p;
  p.N = input.size(0);
  p.D = input.size(1);
  p.V = V;
  p.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  if (bias.has_value()) {
    const Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == V, fn, ": linear_bias has shape ", b.sizes(), " but expected (",
                      V, ",)");
    TORCH_CHECK_TYPE(b.scalar_type() == dt, fn, ": linear_bias dtype ", b.scalar_type(),
                     " does not match input dtype ", dt);
    p.bias = b;
  }
  if (class_weight.has_value()) {
    const Tensor& c = *class_weight;
    TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == V, fn, ": weight (class weights) has shape ", c.sizes(),
                      " but expected (", V, ",)");
    TORCH_CHECK_TYPE(at::isFloatingType(c.scalar_type()), fn, ": weight (class weights) must be floating point, got ",
                     c.scalar_type());
    p.cw = c.to(p.acc).contiguous();
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, fn,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(softcap), fn, ": softcap must be a positive number or None, got ",
                    softcap);
  TORCH_CHECK_VALUE(std::isfinite(z_loss), fn, ": z_loss must be finite, got ", z_loss);
  TORCH_CHECK_VALUE(chunk_size >= 0, fn, ": chunk_size must be a positive number of rows or None, got ", chunk_size);

  p.x = blas_friendly(input) ? input : input.contiguous();
  p.w = blas_friendly(weight) ? weight : weight.contiguous();
  if (probs) {
    // torch's F.cross_entropy / F.linear_cross_entropy refuse it too: no row of a probability
    // target can be ignored, so a non-default ignore_index is a mistake, not a no-op.
    TORCH_CHECK(ignore_index == -100, fn, ": ignore_index cannot be specified when target contains probabilities "
                "(got ignore_index=", ignore_index, ")");
    p.probs = target.contiguous();
    p.target = at::empty({0}, target.options().dtype(at::kLong));
    return p;  // every row is active: no index to check
  }
  p.target = target.to(at::kLong).contiguous();

  // Targets must be a class or ignore_index. The row passes never touch memory for any other
  // value (they treat it as ignored); here it becomes an error.
  if (p.N > 0) {
    if (p.target.is_cpu()) {
      const int64_t* t = p.target.data_ptr<int64_t>();
      for (int64_t i = 0; i < p.N; ++i) {
        TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < V), fn, ": target[", i, "] = ", t[i],
                          " is out of range for ", V, " classes (expected 0 <= target < ", V,
                          " or target == ignore_index = ", ignore_index, ")");
      }
    } else {
      // No host sync on accelerators: an asynchronous device-side assert.
      const Tensor bad = (p.target != ignore_index) & ((p.target < 0) | (p.target >= V));
      at::_assert_async(bad.any().logical_not(),
                        "fastreg.linear_cross_entropy: a target is out of range [0, num_classes) and not ignore_index");
    }
  }
  return p;
}

// Rows per chunk: the user's chunk_size, else as many rows as fit a logits budget. Few large
// chunks beat many small ones (each chunk re-reads and re-writes grad_W). The budget is in bytes,
// so bf16/fp16 get twice fp32's rows: measured bf16 4096x1024x32000 (loaded 2-core VM, s/step):
// 1024 rows 6.79, 2048 (this budget) 6.20, 4096 6.28; one chunk also writes a reduced-precision
// grad_W with one GEMM (no fp32 partial sums, see run_chunks).
int64_t chunk_rows(const Problem& p, int64_t chunk_size) {
  const int64_t n = std::max<int64_t>(p.N, 1);
  if (chunk_size > 0) return std::min(chunk_size, n);
  const int64_t budget = p.x.is_cpu() ? (int64_t(128) << 20) : (int64_t(1) << 30);
  const int64_t row_bytes = p.V * static_cast<int64_t>(p.x.element_size());
  int64_t rows = std::max<int64_t>(budget / std::max<int64_t>(row_bytes, 1), 1);
  if (rows < n) {
    // even chunks, so the last one is not a sliver
    const int64_t chunks = (n + rows - 1) / rows;
    rows = (n + chunks - 1) / chunks;
  }
  return std::min(rows, n);
}

// The options of one row pass (the scalar arguments of _lce_rows and its optional outputs).
struct RowArgs {
  int64_t ignore_index;
  double label_smoothing, softcap, z_loss;
  Tensor zloss_scale;            // (1,) extra factor of the z-loss term, or undefined (1)
  double grad_filter_eps = 0.0;  // > 0: dX/dW skip the (tile, block) products the bounded rule allows
  bool stats = false;            // write each row's log-sum-exp and argmax
};

// Rows of a filtered row tile and columns of a vocabulary block (see run_chunks).
constexpr int64_t kFilterTileRows = 256, kFilterBlockCols = 256;

void lce_rows(Tensor& logits, const Tensor& target, const Tensor& probs, const Tensor& cw, const Tensor& row_scale,
              const RowArgs& a, bool write_grad, Tensor& loss_rows, const Tensor& lse, const Tensor& argmax,
              double filter_eps, const Tensor& block_keep) {
  using opt_t = const std::optional<Tensor>&;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastreg::_lce_rows", "")
                       .typed<void(Tensor&, const Tensor&, opt_t, const Tensor&, int64_t, double, double, double, bool,
                                   Tensor&, opt_t, opt_t, const std::optional<Tensor>&, const std::optional<Tensor>&,
                                   double, const std::optional<Tensor>&)>();
  auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
  op.call(logits, target, opt(cw), row_scale, a.ignore_index, a.label_smoothing, a.softcap, a.z_loss, write_grad,
          loss_rows, opt(probs), opt(a.zloss_scale), opt(lse), opt(argmax), filter_eps, opt(block_keep));
}

struct Grads {
  Tensor input, weight, bias;  // undefined = not requested
};
struct Stats {
  Tensor lse, argmax;  // (N,) accumulate dtype / int64, or undefined
};

// Where each row of a chunk comes from: consecutive rows (views, written in place), or the
// gathered active rows (p.active), copied into reused buffers and scattered back.
struct ChunkRows {
  Tensor index;  // (rows,) int64 into [0, N), or undefined for rows [r0, r0 + rows)
  int64_t r0 = 0, rows = 0;
  Tensor take(const Tensor& t) const { return index.defined() ? t.index_select(0, index) : t.narrow(0, r0, rows); }
};

// grad_W[t_i] += val_i * x_i over the active rows i, on CPU: the rows are grouped by target and
// each target's rows summed in the accumulate dtype, then added to grad_W once (one rounding for a
// reduced-precision grad_W, however often a class is the target). Parallel over the targets.
// acc += a b on CUDA with a float32 accumulator and bfloat16/float16 operands (grad_W over several
// chunks). Not the mixed-dtype addmm (aten::addmm.dtype_out with a float32 self/out and 16-bit
// matrices): torch's CUDA implementation of it has refused that mix ("self and mat2 must have the
// same dtype"). The product goes through aten::mm.dtype_out instead (16-bit operands of one dtype,
// float32 accumulate and output in cuBLAS) into a scratch of at most kProductSliceElems, one slice
// of acc's rows at a time, and is added in float32: no rounding to 16 bits before the sum.
constexpr int64_t kProductSliceElems = int64_t{1} << 23;  // 32 MiB of float32
void add_product_acc_cuda(Tensor acc, const Tensor& a, const Tensor& b) {
  const int64_t rows = acc.size(0), cols = acc.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t slice = std::max<int64_t>(1, std::min(rows, kProductSliceElems / cols));
  Tensor scratch = at::empty({slice, cols}, acc.options());
  for (int64_t r0 = 0; r0 < rows; r0 += slice) {
    const int64_t rn = std::min(slice, rows - r0);
    Tensor part = scratch.narrow(0, 0, rn);
    at::mm_out(part, a.narrow(0, r0, rn), b, acc.scalar_type());
    acc.narrow(0, r0, rn).add_(part);
  }
}

void add_target_rows_cpu(Tensor& gw, const Tensor& x, const Tensor& target, const Tensor& val, const Tensor& active) {
  const int64_t rows = x.size(0), D = x.size(1);
  const Tensor xd = x.stride(1) == 1 ? x : x.contiguous();
  const Tensor t = target.contiguous(), a = active.contiguous(), v = val.contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  const bool* ap = a.const_data_ptr<bool>();
  std::vector<int64_t> order;
  order.reserve(rows);
  for (int64_t i = 0; i < rows; ++i)
    if (ap[i]) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return tp[i] < tp[j]; });
  std::vector<int64_t> starts;
  for (size_t k = 0; k < order.size(); ++k)
    if (k == 0 || tp[order[k]] != tp[order[k - 1]]) starts.push_back(static_cast<int64_t>(k));
  starts.push_back(static_cast<int64_t>(order.size()));
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastreg_lce_target_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xd.const_data_ptr<scalar_t>();
    const acc_t* vp = v.const_data_ptr<acc_t>();
    const int64_t xs = xd.stride(0), gs = gw.stride(0);
    auto add_rows = [&](auto* gp) {
      at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
        std::vector<acc_t> sum(D);
        for (int64_t g = g0; g < g1; ++g) {
          std::fill(sum.begin(), sum.end(), acc_t(0));
          for (int64_t k = starts[g]; k < starts[g + 1]; ++k) {
            const int64_t i = order[k];
            const acc_t s = vp[i];
            const scalar_t* xi = xp + i * xs;
            for (int64_t d = 0; d < D; ++d) sum[d] += s * static_cast<acc_t>(xi[d]);
          }
          auto* out = gp + tp[order[starts[g]]] * gs;
          for (int64_t d = 0; d < D; ++d) out[d] = static_cast<acc_t>(out[d]) + sum[d];
        }
      });
    };
    if (gw.scalar_type() == x.scalar_type()) add_rows(gw.data_ptr<scalar_t>());
    else add_rows(gw.data_ptr<acc_t>());
  });
}

// Per vocabulary block, what the bound on a skipped block's dX contribution needs of the weight
// (docs/gradient-filtering.md): a_b = sum over the block's classes c of |W_c| (entrywise, D values),
// reduced to max_d a_b (the entry bound) and |a_b|_2 (the row-norm bound); (2, blocks) in fp64.
Tensor block_weight_norms(const Tensor& w, int64_t blocks) {
  const int64_t V = w.size(0), bw = (V + blocks - 1) / blocks;
  Tensor out = at::empty({2, blocks}, w.options().dtype(at::kDouble));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * bw, cn = std::min(bw, V - c0);
    if (cn <= 0) {
      out.select(1, b).zero_();
      continue;
    }
    const Tensor a = at::sum(w.narrow(0, c0, cn).abs(), {0}, false, at::kDouble);
    out.select(1, b).copy_(at::stack({a.amax(), a.norm()}));
  }
  return out;
}

// The bounded skip rule (docs/gradient-filtering.md has the derivation). U_ib: the bound on every
// |d loss / d z| of row i in block b (2^(code - 126) of the row pass's lce_block_code; the target entry
// excluded). A (tile T, block b) product skipped leaves out of
//   dW_c (c in b): at most sum_{i in T} U_ib |x_i|_inf per entry, sum_{i in T} U_ib |x_i|_2 in norm;
//   dX_i (i in T): at most U_ib max_d a_bd per entry, U_ib |a_b|_2 in norm (a_b above).
// The skips are chosen greedily, smallest bound first, while what they leave out in total stays
// within eps times the gradient's scale, both per entry and in Frobenius norm: for dW per entry
// sum_T <= eps S_inf and sum_b |b| (sum_T)^2 <= (eps S_2)^2, for dX per row sum_b <= eps S_inf and
// sum_T (sum_b)^2 <= (eps S_2)^2. The scales are the chunk's target part: per row, |g_it| times
// |x_i| (dW) or |W_t| (dX), largest and in norm (with probability targets, the row's largest |g|
// times the RMS weight row for dX). Returns (dX keep, dW keep), each (tiles * blocks) [t * blocks + b].
struct TileKeep {
  std::vector<uint8_t> dx, dw;
};
TileKeep bounded_tile_keep(const double* bw_dw, const double* b2_dw, const double* bi_dx, const double* b2_dx,
                           const double* scales, const double* wnorm, int64_t tiles, int64_t blocks, int64_t V,
                           double eps) {
  const int64_t pairs = tiles * blocks, bw = (V + blocks - 1) / blocks;
  TileKeep k{std::vector<uint8_t>(pairs, 1), std::vector<uint8_t>(pairs, 1)};
  const double sw_inf = eps * scales[0], sw_2 = eps * scales[1], sx_inf = eps * scales[2], sx_2 = eps * scales[3];
  std::vector<int64_t> order(pairs);
  auto ascending = [&](const double* key) {
    for (int64_t j = 0; j < pairs; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [key](int64_t a, int64_t b) { return key[a] < key[b]; });
  };
  {  // dW: budgets per block (entries) and over all classes (norm)
    std::vector<double> cum_inf(blocks, 0.0), cum_2(blocks, 0.0);
    double q = 0.0;
    ascending(b2_dw);
    for (const int64_t j : order) {
      const int64_t b = j % blocks;
      const double width = static_cast<double>(std::min(bw, V - b * bw));
      const double ni = cum_inf[b] + bw_dw[j], n2 = cum_2[b] + b2_dw[j];
      const double nq = q + width * (n2 * n2 - cum_2[b] * cum_2[b]);
      if (ni <= sw_inf && nq <= sw_2 * sw_2) {  // (false for NaN / inf bounds)
        cum_inf[b] = ni, cum_2[b] = n2, q = nq;
        k.dw[j] = 0;
      }
    }
  }
  {  // dX: budgets per tile (entries) and over all rows (norm)
    std::vector<double> key(pairs);
    for (int64_t j = 0; j < pairs; ++j) key[j] = b2_dx[j] * wnorm[blocks + j % blocks];
    std::vector<double> cum_inf(tiles, 0.0), cum_2(tiles, 0.0);
    double q = 0.0;
    ascending(key.data());
    for (const int64_t j : order) {
      const int64_t t = j / blocks, b = j % blocks;
      const double ni = cum_inf[t] + bi_dx[j] * wnorm[b], n2 = cum_2[t] + key[j];
      const double nq = q + (n2 * n2 - cum_2[t] * cum_2[t]);
      if (ni <= sx_inf && nq <= sx_2 * sx_2) {
        cum_inf[t] = ni, cum_2[t] = n2, q = nq;
        k.dx[j] = 0;
      }
    }
  }
  return k;
}

// dX and dW of one chunk from its gradient logits, leaving out the (row tile, vocabulary block)
// products the bounded rule (bounded_tile_keep) allows. The rows come grouped by target and are
// taken in tiles of kFilterTileRows; each tile's dX GEMMs take its kept blocks, runs merged into
// one GEMM each. With class-index targets the one-hot part of each row's gradient (the entry at its
// target, of size ~s) is taken out of the logits and added by a gather (dX) and an index_add (dW,
// db) instead; the target's block is then bounded by its other entries. The per-(tile, block)
// bounds and the scales are reduced on the device and read on the host together: on CUDA one sync
// per chunk. wnorm: block_weight_norms (undefined without dX).
void filtered_backward(const Problem& p, const Tensor& logits, const Tensor& xc, const Tensor& target,
                       const Tensor& keep_dev, double eps, const Tensor& wnorm, Tensor gi, Tensor& gw_acc,
                       Tensor gb_acc, bool want_gi, bool want_gw, bool first_chunk) {
  const int64_t rows = logits.size(0), blocks = keep_dev.size(1);
  const int64_t bw = (p.V + blocks - 1) / blocks;  // the row pass's block width
  const auto dd = xc.options().dtype(at::kDouble);
  // U: the bound of each (row, block) from the row pass's codes (lce_math.h), on the device
  // (code 0: the entries are 0; 255: inf/NaN, no bound)
  const Tensor code = keep_dev.to(at::kDouble);
  Tensor U = at::where(code == 0, 0.0,
                       at::where(code == 255, std::numeric_limits<double>::infinity(), at::pow(2.0, code - 126)));
  const Tensor xd = xc.to(at::kDouble);
  const Tensor x_inf = xd.abs().amax(1), x_2 = xd.square().sum(1).sqrt();
  Tensor idx, val, active, scales;
  if (target.defined()) {
    active = (target >= 0) & (target < p.V);
    idx = target.clamp(0, p.V - 1).unsqueeze(1);
    // (flat indices into the contiguous chunk: scatter_/gather on the (rows, V) view copy it whole)
    const Tensor flat = at::arange(rows, idx.options()) * p.V + idx.squeeze(1);
    Tensor all = logits.view({-1});
    val = at::where(active, all.index_select(0, flat), 0);
    all.index_fill_(0, flat, 0);
    const Tensor first = idx.div(bw, "floor");
    Tensor cols = first * bw + at::arange(bw, idx.options()).unsqueeze(0);  // (rows, bw): the target's block
    const Tensor inside = cols < p.V;
    const Tensor entries = at::where(inside, logits.gather(1, cols.clamp_max_(p.V - 1)), 0).to(at::kDouble);
    // the largest other entry of the target's block, exactly (NaN stays NaN: that block is kept)
    U.scatter_(1, first, entries.abs().amax(1, true));
    const Tensor gt = val.to(at::kDouble).abs();
    const Tensor wt = p.w.index_select(0, idx.squeeze(1)).to(at::kDouble);
    const Tensor w_inf = wt.abs().amax(1), w_2 = wt.square().sum(1).sqrt();
    scales = at::stack({(gt * x_inf).amax(), (gt * x_2).norm(), (gt * w_inf).amax(), (gt * w_2).norm()});
  } else {
    const Tensor top = U.amax(1) / 2;  // <= the row's largest |g| (a code's bound is < 2x its entries)
    const Tensor w_rms = at::linalg_vector_norm(p.w, 2, std::nullopt, false, at::kDouble) / std::sqrt(double(p.V));
    const Tensor w_inf_rms = w_rms / std::sqrt(double(std::max<int64_t>(p.D, 1)));
    scales = at::stack({(top * x_inf).amax(), (top * x_2).norm(), (top * w_inf_rms).amax(), (top * w_rms).norm()});
  }
  // per (tile, block): sum_i U |x_i|_inf, sum_i U |x_i|_2 (dW); max_i U, (sum_i U^2)^1/2 (dX)
  const int64_t tiles = (rows + kFilterTileRows - 1) / kFilterTileRows, padded = tiles * kFilterTileRows;
  auto tiled = [&](const Tensor& t) {  // (rows, blocks) -> (tiles, tile rows, blocks), zero rows added
    return at::constant_pad_nd(t, {0, 0, 0, padded - rows}, 0).view({tiles, kFilterTileRows, blocks});
  };
  const Tensor Ut = tiled(U);
  const Tensor dw_inf = (Ut * tiled(x_inf.unsqueeze(1).expand({rows, blocks}))).sum(1);
  const Tensor dw_2 = (Ut * tiled(x_2.unsqueeze(1).expand({rows, blocks}))).sum(1);
  const Tensor dx_inf = Ut.amax(1), dx_2 = Ut.square().sum(1).sqrt();
  const Tensor wn = wnorm.defined() ? wnorm.to(dd.device()) : at::zeros({2, blocks}, dd);
  const Tensor host = at::cat({dw_inf.flatten(), dw_2.flatten(), dx_inf.flatten(), dx_2.flatten(), scales,
                               wn.flatten()})
                          .cpu();  // one device sync per chunk on CUDA (documented)
  const double* h = host.const_data_ptr<double>();
  const int64_t pairs = tiles * blocks;
  const TileKeep tk = bounded_tile_keep(h, h + pairs, h + 2 * pairs, h + 3 * pairs, h + 4 * pairs,
                                        h + 4 * pairs + 4, tiles, blocks, p.V, eps);
  // Runs [first, last) of set entries of a block mask, as column ranges.
  auto for_runs = [&](const std::vector<uint8_t>& mask, auto&& fn) {
    for (int64_t b = 0; b < blocks;) {
      if (!mask[b]) { ++b; continue; }
      int64_t e = b;
      while (e < blocks && mask[e]) ++e;
      const int64_t c0 = b * bw, cn = std::min(e * bw, p.V) - c0;
      if (cn > 0) fn(c0, cn);
      b = e;
    }
  };
  std::vector<uint8_t> tile_keep(blocks);
  std::vector<uint8_t> tiles_of_block(blocks * tiles, 0);  // [b * tiles + t]: dW of tile t keeps block b
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t t0 = t * kFilterTileRows, tn = std::min(kFilterTileRows, rows - t0);
    for (int64_t b = 0; b < blocks; ++b) {
      tiles_of_block[b * tiles + t] = tk.dw[t * blocks + b];
      tile_keep[b] = tk.dx[t * blocks + b];
    }
    if (!want_gi) continue;
    // dX of the tile's rows from the tile's kept blocks
    const Tensor lt = logits.narrow(0, t0, tn);
    Tensor git = gi.narrow(0, t0, tn);
    bool written = false;
    for_runs(tile_keep, [&](int64_t c0, int64_t cn) {
      if (!written) at::mm_out(git, lt.narrow(1, c0, cn), p.w.narrow(0, c0, cn));
      else git.addmm_(lt.narrow(1, c0, cn), p.w.narrow(0, c0, cn));
      written = true;
    });
    if (!written) git.zero_();
  }
  if (want_gw) {
    // dW per tile too: consecutive blocks kept by the same set of tiles form a run, and each run is
    // one GEMM over the rows of those tiles -- views when the tiles are consecutive, else gathered
    // -- so a grad_W of the input's dtype is still written with one rounding. (Per chunk, the union
    // of the tiles' blocks, measured on the peaked bf16 input: 70% of the tile x block products
    // against 43% per tile.) The first chunk writes the runs and zeroes the blocks no tile kept.
    const bool direct = gw_acc.scalar_type() == logits.scalar_type();
    auto same_tiles = [&](int64_t a, int64_t b) {
      return std::equal(tiles_of_block.begin() + a * tiles, tiles_of_block.begin() + (a + 1) * tiles,
                        tiles_of_block.begin() + b * tiles);
    };
    for (int64_t b = 0; b < blocks;) {
      int64_t e = b + 1;
      while (e < blocks && same_tiles(b, e)) ++e;
      const int64_t c0 = b * bw, cn = std::min(e * bw, p.V) - c0;
      const uint8_t* kept = tiles_of_block.data() + b * tiles;
      b = e;
      if (cn <= 0) continue;
      Tensor gwb = gw_acc.narrow(0, c0, cn);
      const int64_t first = std::find(kept, kept + tiles, 1) - kept;
      if (first == tiles) {
        if (first_chunk && direct) gwb.zero_();
        continue;
      }
      const int64_t last = tiles - (std::find(std::make_reverse_iterator(kept + tiles),
                                              std::make_reverse_iterator(kept), 1) -
                                    std::make_reverse_iterator(kept + tiles));
      const bool consecutive = std::count(kept + first, kept + last, 1) == last - first;
      Tensor lb, xs;
      if (consecutive) {
        const int64_t r0 = first * kFilterTileRows, rn = std::min(last * kFilterTileRows, rows) - r0;
        lb = logits.narrow(0, r0, rn).narrow(1, c0, cn).t();
        xs = xc.narrow(0, r0, rn);
      } else {
        std::vector<int64_t> row_ids;
        for (int64_t t = first; t < last; ++t)
          if (kept[t])
            for (int64_t r = t * kFilterTileRows; r < std::min((t + 1) * kFilterTileRows, rows); ++r)
              row_ids.push_back(r);
        const Tensor ids = at::tensor(row_ids, xc.options().dtype(at::kLong));
        lb = logits.narrow(1, c0, cn).index_select(0, ids).t();
        xs = xc.index_select(0, ids);
      }
      if (first_chunk && direct) {
        at::mm_out(gwb, lb, xs);
      } else if (direct) {
        gwb.addmm_(lb, xs);
      } else if (!p.x.is_cpu()) {
        add_product_acc_cuda(gwb, lb, xs);
      } else {
        gwb.add_(at::mm(lb, xs));  // (no mixed-dtype GEMM on CPU)
      }
    }
  }
  if (!target.defined()) return;
  // the targets' entries, in the accumulate dtype
  const Tensor v = val.to(p.acc).unsqueeze(1);
  if (want_gi) gi.add_(at::where(active.unsqueeze(1), p.w.index_select(0, idx.squeeze(1)) * v, 0));
  if (want_gw && xc.is_cpu()) {
    add_target_rows_cpu(gw_acc, xc, idx.squeeze(1), val.to(p.acc), active);
  } else if (want_gw) {
    const Tensor rows_x = at::where(active.unsqueeze(1), xc * v, 0);
    if (gw_acc.scalar_type() == p.acc) {
      gw_acc.index_add_(0, idx.squeeze(1), rows_x);
    } else {  // sum the rows of each target in fp32 first: a frequent target must not accumulate in bf16
      const auto [classes, inverse, counts] = at::_unique2(idx.squeeze(1), true, true, false);
      Tensor sums = at::zeros({classes.size(0), p.D}, rows_x.options());
      sums.index_add_(0, inverse, rows_x);
      gw_acc.index_add_(0, classes, sums.to(gw_acc.scalar_type()));
    }
  }
  if (gb_acc.defined()) gb_acc.index_add_(0, idx.squeeze(1), v.squeeze(1).to(gb_acc.scalar_type()));
}

// Under gradient filtering the rows go through the GEMMs grouped by target (stable, so equal
// targets keep their order): rows with the same target share their large logit gradients, so a
// tile of them keeps few vocabulary blocks -- measured on the peaked bf16 input (256-row tiles,
// 256-class blocks): 43% of the tile x block products kept in input order, 15% grouped. The rows
// are gathered chunk by chunk and grad_input scattered back, as for skipped ignored rows. From
// `rows` (the active rows, or undefined = all); on the host on CPU, a device sort elsewhere.
Tensor rows_by_target(const Problem& p, const Tensor& rows) {
  if (p.probs.defined() || p.N == 0) return rows;
  if (p.target.is_cpu()) {
    const int64_t* t = p.target.const_data_ptr<int64_t>();
    Tensor order = rows.defined() ? rows.clone() : at::arange(p.N, p.target.options());
    int64_t* o = order.data_ptr<int64_t>();
    std::stable_sort(o, o + order.size(0), [t](int64_t i, int64_t j) { return t[i] < t[j]; });
    return order;
  }
  const Tensor t = rows.defined() ? p.target.index_select(0, rows) : p.target;
  const Tensor order = std::get<1>(at::sort(t, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  return rows.defined() ? rows.index_select(0, order) : order;
}

// The chunk loop. row_scale: (1,) or (N,) upstream scale of each row's loss (used iff write_grad).
// loss_rows (N,) in the accumulate dtype receives every row's loss. With p.active only those rows
// go through the GEMMs (gathered chunk by chunk); the others get loss 0, gradient 0, lse 0 and
// prediction -1. A filtered backward takes them grouped by target (rows_by_target).
void run_chunks(const Problem& p, const RowArgs& a, int64_t chunk_size, const Tensor& row_scale, bool write_grad,
                std::array<bool, 3> mask, Tensor& loss_rows, Grads& g, Stats& st) {
  const bool want_gi = write_grad && mask[0], want_gw = write_grad && mask[1],
             want_gb = write_grad && mask[2] && p.bias.defined();
  const bool filter = write_grad && a.grad_filter_eps > 0 && (want_gi || want_gw);
  const Tensor active = filter ? rows_by_target(p, p.active) : p.active;
  const bool compact = active.defined();
  const int64_t M = compact ? active.size(0) : p.N;  // rows that go through the GEMMs
  const auto dt = p.x.scalar_type();
  const auto acc_opts = p.x.options().dtype(p.acc);
  const int64_t rows_per = chunk_rows(p, chunk_size);
  const bool one_chunk = M <= rows_per;
  // grad_W: straight into an fp32/fp64 grad_W; in reduced precision straight into a grad_W of the
  // input's dtype when one GEMM makes it (the GEMM accumulates in fp32 and rounds once, as eager);
  // else accumulated in fp32 (CUDA: through cuBLAS's fp32 output; CPU: a partial product per chunk).
  const bool gw_direct = dt == p.acc || one_chunk;
  if (want_gi) {  // rows that skip the GEMMs get zeros
    g.input = M < p.N ? cpu_buffers::zeros({p.N, p.D}, p.x.options()) : cpu_buffers::empty({p.N, p.D}, p.x.options());
  }
  if (want_gw) {
    const bool zero = M == 0 || (filter && !gw_direct) || (!gw_direct && !p.x.is_cpu());
    g.weight = zero ? cpu_buffers::zeros({p.V, p.D}, p.w.options().dtype(gw_direct ? dt : p.acc))
                    : cpu_buffers::empty({p.V, p.D}, p.w.options().dtype(gw_direct ? dt : p.acc));
  }
  if (want_gb) g.bias = at::zeros({p.V}, acc_opts);
  if (a.stats) {
    st.lse = at::empty({p.N}, acc_opts);
    st.argmax = at::empty({p.N}, p.x.options().dtype(at::kLong));
  }
  if (compact) {
    loss_rows.zero_();
    if (a.stats) st.lse.zero_(), st.argmax.fill_(-1);
  }
  if (p.N == 0 || M == 0) return;

  const int64_t rows_buf = std::min(rows_per, M);
  Tensor buf = cpu_buffers::empty({rows_buf, p.V}, p.x.options());
  Tensor xbuf, gibuf, lbuf, lsebuf, amaxbuf;  // gather/scatter buffers of a compacted chunk
  if (compact) {
    xbuf = cpu_buffers::empty({rows_buf, p.D}, p.x.options());
    if (want_gi) gibuf = cpu_buffers::empty({rows_buf, p.D}, p.x.options());
    lbuf = at::empty({rows_buf}, acc_opts);
    if (a.stats) lsebuf = at::empty({rows_buf}, acc_opts), amaxbuf = at::empty({rows_buf}, st.argmax.options());
  }
  Tensor keep;  // (rows, vocabulary blocks) block codes of the filtered backward's chunk
  const int64_t blocks = (p.V + kFilterBlockCols - 1) / kFilterBlockCols;
  const Tensor wnorm = filter && want_gi ? block_weight_norms(p.w, blocks) : Tensor();
  Tensor gw_tmp;  // reduced-precision partial grad_W on CPU (no mixed-dtype GEMM there)
  const Tensor wt = p.w.t();
  bool gw_started = false;
  for (int64_t c0 = 0; c0 < M; c0 += rows_per) {
    ChunkRows cr;
    cr.rows = std::min(rows_per, M - c0);
    const int64_t rows = cr.rows;
    if (compact) cr.index = active.narrow(0, c0, rows);
    else cr.r0 = c0;
    Tensor xc = compact ? xbuf.narrow(0, 0, rows) : p.x.narrow(0, c0, rows);
    if (compact) at::index_select_out(xc, p.x, 0, cr.index);
    Tensor logits = buf.narrow(0, 0, rows);
    if (p.bias.defined()) at::addmm_out(logits, p.bias, xc, wt);
    else at::mm_out(logits, xc, wt);
    Tensor lr = compact ? lbuf.narrow(0, 0, rows) : loss_rows.narrow(0, c0, rows);
    Tensor lse, amax;
    if (a.stats) {
      lse = compact ? lsebuf.narrow(0, 0, rows) : st.lse.narrow(0, c0, rows);
      amax = compact ? amaxbuf.narrow(0, 0, rows) : st.argmax.narrow(0, c0, rows);
    }
    const Tensor sc = row_scale.numel() == 1 ? row_scale : cr.take(row_scale);
    const Tensor tc = p.probs.defined() ? p.target : cr.take(p.target);
    const Tensor pc = p.probs.defined() ? cr.take(p.probs) : Tensor();
    if (filter) {
      keep = at::zeros({rows, blocks}, p.x.options().dtype(at::kByte));  // per row: grouped into tiles later
    }
    // (the row pass codes every nonzero entry: threshold 0)
    lce_rows(logits, tc, pc, p.cw, sc, a, write_grad, lr, lse, amax, 0.0, filter ? keep : Tensor());
    if (compact) {
      loss_rows.index_copy_(0, cr.index, lr);
      if (a.stats) st.lse.index_copy_(0, cr.index, lse), st.argmax.index_copy_(0, cr.index, amax);
    }
    if (!write_grad) continue;
    Tensor gi;
    if (want_gi) gi = compact ? gibuf.narrow(0, 0, rows) : g.input.narrow(0, c0, rows);
    if (filter) {
      filtered_backward(p, logits, xc, p.probs.defined() ? Tensor() : tc, keep, a.grad_filter_eps, wnorm, gi, g.weight,
                        want_gb ? g.bias : Tensor(), want_gi, want_gw, !gw_started);
      gw_started = true;
    } else {
      if (want_gi) at::mm_out(gi, logits, p.w);
      if (want_gw) {
        if (gw_direct) {
          // the first chunk writes grad_W (beta = 0: measured ~1.5x faster than accumulating into zeros)
          if (!gw_started) at::mm_out(g.weight, logits.t(), xc);
          else g.weight.addmm_(logits.t(), xc);
        } else if (!p.x.is_cpu()) {
          add_product_acc_cuda(g.weight, logits.t(), xc);  // bf16/fp16 in, fp32 accumulate and sum
        } else {
          if (!gw_tmp.defined()) gw_tmp = cpu_buffers::empty({p.V, p.D}, p.w.options());
          at::mm_out(gw_tmp, logits.t(), xc);
          if (!gw_started) g.weight.copy_(gw_tmp);
          else g.weight.add_(gw_tmp);
        }
        gw_started = true;
      }
    }
    if (want_gi && compact) g.input.index_copy_(0, cr.index, gi);
    if (want_gb) g.bias.add_(at::sum(logits, {0}, false, p.acc));
  }
}

Tensor empty_like_none(const Tensor& ref) { return at::empty({0}, ref.options()); }

void finish_grads(const Problem& p, Grads& g) {
  if (g.weight.defined() && g.weight.scalar_type() != p.w.scalar_type()) g.weight = g.weight.to(p.w.scalar_type());
  if (g.bias.defined() && g.bias.scalar_type() != p.bias.scalar_type()) g.bias = g.bias.to(p.bias.scalar_type());
}

// ---------------------------------------------------------------------------------- small path
// Few classes, float/double on CPU: one pass over the rows (csrc/small/small_dense.h), where the
// fixed cost of three GEMM calls and a row-pass dispatch would dominate (routing measured there,
// small::prefer_one_pass).
bool use_small_path(const Problem& p) {
  const auto dt = p.x.scalar_type();
  return p.x.is_cpu() && (dt == at::kFloat || dt == at::kDouble) && small::prefer_one_pass(p.N, p.D, p.V);
}

// The small-path counterpart of run_chunks (same contract). Returns sum_i loss_i.
template <typename T>
double run_small(const Problem& p, int64_t ignore_index, double label_smoothing, double softcap, double z_loss,
                 double scale, const Tensor& row_scale, bool write_grad, std::array<bool, 3> mask, T* loss_rows,
                 Grads& g) {
  const bool want_gi = write_grad && mask[0], want_gw = write_grad && mask[1],
             want_gb = write_grad && mask[2] && p.bias.defined();
  const Tensor x = p.x.stride(1) == 1 ? p.x : p.x.contiguous();
  const Tensor w = p.w.is_contiguous() ? p.w : p.w.contiguous();
  const Tensor b = p.bias.defined() ? p.bias.contiguous() : Tensor();  // the kernel reads it densely
  if (want_gi) g.input = at::empty({p.N, p.D}, p.x.options());
  if (want_gw) g.weight = at::zeros({p.V, p.D}, p.w.options());
  if (want_gb) g.bias = at::zeros({p.V}, p.w.options());
  small::SmallCe<T> a;
  a.n = p.N, a.D = p.D, a.V = p.V;
  a.x = x.data_ptr<T>(), a.x_stride = x.stride(0);
  a.w = w.data_ptr<T>();
  a.b = b.defined() ? b.data_ptr<T>() : nullptr;
  a.grad_x = want_gi ? g.input.data_ptr<T>() : nullptr, a.grad_x_stride = p.D;
  a.grad_w = want_gw ? g.weight.data_ptr<T>() : nullptr;
  a.grad_b = want_gb ? g.bias.data_ptr<T>() : nullptr;
  a.target = p.target.data_ptr<int64_t>();
  if (p.cw.defined()) {
    a.class_weight = p.cw.data_ptr<T>();
    double sum = 0;
    for (int64_t c = 0; c < p.V; ++c) sum += a.class_weight[c];
    a.class_weight_sum = T(sum);
  }
  a.ignore_index = ignore_index;
  a.label_smoothing = T(label_smoothing), a.softcap = T(softcap), a.z_loss = T(z_loss);
  a.scale = T(scale);
  a.row_scale = row_scale.defined() ? row_scale.data_ptr<T>() : nullptr;
  a.loss_rows = loss_rows;
  if (p.N == 0) return 0.0;
  return small::small_rows_parallel<T>(a, [](small::SmallCe<T> part, int64_t r0, int64_t r1) {
    part.n = r1 - r0;
    part.x += r0 * part.x_stride;
    part.target += r0;
    if (part.grad_x) part.grad_x += r0 * part.grad_x_stride;
    if (part.row_scale) part.row_scale += r0;
    if (part.loss_rows) part.loss_rows += r0;
    return small::ce_small(part);
  });
}

// 'mean' denominator of the small path (torch's: non-ignored rows, or their class weights).
template <typename T>
double small_mean_denominator(const Problem& p, int64_t ignore_index) {
  small::SmallCe<T> a;
  a.n = p.N, a.V = p.V;
  a.target = p.target.data_ptr<int64_t>();
  a.class_weight = p.cw.defined() ? p.cw.data_ptr<T>() : nullptr;
  a.ignore_index = ignore_index;
  return small::ce_small_denominator(a);
}

// Number of non-ignored rows (the z-loss 'mean' denominator), read on the host.
double active_count(const Problem& p, int64_t ignore_index) {
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < p.N; ++i) count += t[i] != ignore_index;
  return static_cast<double>(count);
}

// -------------------------------------------------------------------------------------- ops
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;  // loss, grads, lse, predictions

void check_options(const char* fn, double grad_filter_eps, int64_t skip_ignored) {
  TORCH_CHECK_VALUE(grad_filter_eps >= 0.0 && std::isfinite(grad_filter_eps), fn,
                    ": grad_filter_eps must be a positive number, 'auto' or None, got ", grad_filter_eps);
  TORCH_CHECK_VALUE(skip_ignored >= -1 && skip_ignored <= 1, fn,
                    ": skip_ignored must be -1 (auto), 0 or 1, got ", skip_ignored);
}

// The non-ignored rows, when only they should go through the GEMMs: on CPU always (the targets
// are read on the host), on accelerators only when asked for (nonzero() is one host sync).
// Undefined when every row is active.
Tensor active_rows(const Problem& p, int64_t ignore_index, int64_t skip_ignored) {
  if (p.probs.defined() || p.N == 0 || skip_ignored == 0 || (skip_ignored < 0 && !p.x.is_cpu())) return Tensor();
  if (p.target.is_cpu()) {
    const int64_t* t = p.target.const_data_ptr<int64_t>();
    int64_t count = 0;
    for (int64_t i = 0; i < p.N; ++i) count += t[i] != ignore_index;
    if (count == p.N) return Tensor();
    Tensor index = at::empty({count}, p.target.options());
    int64_t* out = index.data_ptr<int64_t>();
    for (int64_t i = 0; i < p.N; ++i)
      if (t[i] != ignore_index) *out++ = i;
    return index;
  }
  Tensor index = at::nonzero(p.target != ignore_index).view({-1});  // the one host sync of skip_ignored=True
  return index.size(0) == p.N ? Tensor() : index;
}

// grad_filter_eps is the filter's relative tolerance (docs/gradient-filtering.md): what it leaves out
// stays within eps times each gradient's scale. The rule compares bounds with scales taken from the
// same written gradient (which carries the row scale), so the reduction's scale needs no special
// handling and nothing is read on the host here.
double filter_threshold(double grad_filter_eps, const Tensor& /*row_scale*/) {
  return grad_filter_eps > 0 ? grad_filter_eps : 0.0;
}

// fp16 on a CPU without fp16 matrix instructions (AVX512-FP16 / AMX-FP16): torch's fp16 GEMM there
// is a slow fallback (measured, torch 2.13, 2-core AVX-512 VM: 256x1024 @ 1024x32000 0.68 s,
// 256x32000 @ 32000x1024 37 s -- 1 GFLOP/s -- against ~100 GFLOP/s in fp32), so such calls run
// in fp32 on upcast copies (one extra V x D fp32 copy of the weight) and round their results to
// fp16 once: faster by an order of magnitude and no less accurate than fp16 GEMMs.
bool half_via_float(const Tensor& input) {
  if (!input.is_cpu() || input.scalar_type() != at::kHalf) return false;
#if defined(__x86_64__) || defined(_M_X64)
  static const bool slow_half_gemm = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    auto has = [&](const char* key) {
      const auto it = caps.find(key);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return !has("avx512_fp16") && !has("amx_fp16");
  }();
  return slow_half_gemm;
#else
  return false;  // aarch64 and others: native fp16 arithmetic
#endif
}
Tensor to_float(const Tensor& t) { return at::isFloatingType(t.scalar_type()) ? t.to(at::kFloat) : t; }
std::optional<Tensor> to_float(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(to_float(*t)) : std::nullopt;
}
Tensor to_half(const Tensor& t) { return t.to(at::kHalf); }

Outputs lce_forward(const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias,
                    const std::optional<Tensor>& class_weight, int64_t reduction, int64_t ignore_index,
                    double label_smoothing, double softcap, double z_loss, int64_t chunk_size,
                    std::array<bool, 3> output_mask, double grad_filter_eps, int64_t skip_ignored,
                    bool return_stats) {
  static const char* fn = "fastreg.linear_cross_entropy";
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum, fn,
                    ": reduction must be 'none', 'mean' or 'sum' (0, 1, 2), got ", reduction);
  check_options(fn, grad_filter_eps, skip_ignored);
  if (half_via_float(input)) {
    check_operands(fn, input, weight, target, bias, class_weight);
    auto [loss, gi, gw, gb, lse, pred] =
        lce_forward(to_float(input), to_float(weight), to_float(target), to_float(bias), to_float(class_weight),
                    reduction, ignore_index, label_smoothing, softcap, z_loss, chunk_size, output_mask,
                    grad_filter_eps, skip_ignored, return_stats);
    return {to_half(loss), to_half(gi), to_half(gw), to_half(gb), lse, pred};
  }
  Problem p =
      prepare(fn, input, weight, target, bias, class_weight, ignore_index, label_smoothing, softcap, z_loss, chunk_size);
  const bool write_grad = reduction != kNone && (output_mask[0] || output_mask[1] || (output_mask[2] && bias));
  const auto lead = input.sizes().slice(0, input.dim() - 1);
  auto grad_input_shaped = [&](const Tensor& gi) { return gi.dim() == input.dim() ? gi : gi.view(input.sizes()); };
  auto none = [&](at::ScalarType dt) { return at::empty({0}, input.options().dtype(dt)); };

  if (!p.probs.defined() && !return_stats && grad_filter_eps == 0 && use_small_path(p)) {
    Grads g;
    Tensor loss;
    AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "fastreg_lce_small", [&] {
      double scale = 1.0, denom = 1.0, zl = z_loss;
      if (reduction == kMean) {
        denom = small_mean_denominator<scalar_t>(p, ignore_index);
        scale = 1.0 / denom;  // inf when every row is ignored: no row then has a gradient
        // z-loss 'mean' is over the non-ignored rows whatever the class weights: sum_zl / count
        const double count = p.cw.defined() && z_loss != 0 ? active_count(p, ignore_index) : 0.0;
        if (count > 0) zl = z_loss * denom / count;
      }
      if (reduction == kNone) {
        loss = at::empty(lead, p.x.options());
        run_small<scalar_t>(p, ignore_index, label_smoothing, softcap, z_loss, 1.0, Tensor(), false, output_mask,
                            loss.data_ptr<scalar_t>(), g);
      } else {
        const double total = run_small<scalar_t>(p, ignore_index, label_smoothing, softcap, zl, scale, Tensor(),
                                                 write_grad, output_mask, nullptr, g);
        // A zero denominator (every row ignored, or zero class weight on every kept row) gives nan
        // like torch, also when z-loss or label smoothing made the sum nonzero
        const double mean = denom == 0 ? std::numeric_limits<double>::quiet_NaN() : total / denom;
        loss = at::scalar_tensor(reduction == kSum ? total : mean, p.x.options());
      }
    });
    return {loss, g.input.defined() ? grad_input_shaped(g.input) : empty_like_none(input),
            g.weight.defined() ? g.weight : empty_like_none(weight),
            g.bias.defined() ? g.bias : empty_like_none(weight), none(p.acc), none(at::kLong)};
  }

  p.active = active_rows(p, ignore_index, skip_ignored);
  const auto acc_opts = p.x.options().dtype(p.acc);
  RowArgs a{ignore_index, label_smoothing, softcap, z_loss};
  a.stats = return_stats;
  // Scale of each row's loss in the reduced loss: 1 for 'sum', 1/denominator for 'mean', where the
  // denominator is torch's: the number of non-ignored rows, or the sum of their class weights (the
  // number of rows for class probabilities). The z-loss is averaged over the non-ignored rows.
  Tensor denom, row_scale;
  if (reduction == kMean) {
    if (p.probs.defined()) {
      denom = at::scalar_tensor(static_cast<double>(p.N), acc_opts);
    } else {
      const Tensor active = p.target != ignore_index;
      // where, not a product: an ignored row must not read (clamped) weight[0], which may be NaN
      denom = p.cw.defined() ? fixed_order_sum(at::where(active, p.cw.index_select(0, p.target.clamp(0, p.V - 1)), 0))
                             : active.sum().to(p.acc);
      if (p.cw.defined() && z_loss != 0) {
        if (!p.x.is_cpu()) {
          a.zloss_scale = (denom / active.sum()).reshape({1});
        } else if (const double count = active_count(p, ignore_index); count > 0) {
          a.z_loss = z_loss * denom.item<double>() / count;  // host values: no sync
        }
      }
    }
    row_scale = denom.reciprocal().reshape({1});
  } else {
    row_scale = at::ones({1}, acc_opts);
  }
  if (write_grad) a.grad_filter_eps = filter_threshold(grad_filter_eps, row_scale);
  Tensor loss_rows = at::empty({p.N}, acc_opts);
  Grads g;
  Stats st;
  run_chunks(p, a, chunk_size, row_scale, write_grad, output_mask, loss_rows, g, st);
  finish_grads(p, g);

  Tensor loss;
  if (reduction == kNone) loss = loss_rows.view(lead);
  else if (reduction == kSum) loss = fixed_order_sum(loss_rows);
  // A zero denominator (every row ignored, or zero class weight on every kept row) gives nan like
  // torch's mean, also when z-loss or label smoothing made the numerator nonzero (x / 0 = inf).
  else loss = (fixed_order_sum(loss_rows) / denom).masked_fill(denom == 0, std::numeric_limits<double>::quiet_NaN());
  loss = loss.to(input.scalar_type());
  return {loss, g.input.defined() ? grad_input_shaped(g.input) : empty_like_none(input),
          g.weight.defined() ? g.weight : empty_like_none(weight),
          g.bias.defined() ? g.bias : empty_like_none(weight), st.lse.defined() ? st.lse.view(lead) : none(p.acc),
          st.argmax.defined() ? st.argmax.view(lead) : none(at::kLong)};
}

std::tuple<Tensor, Tensor, Tensor> lce_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& weight,
                                                const Tensor& target, const std::optional<Tensor>& bias,
                                                const std::optional<Tensor>& class_weight, int64_t ignore_index,
                                                double label_smoothing, double softcap, double z_loss,
                                                int64_t chunk_size, std::array<bool, 3> output_mask,
                                                double grad_filter_eps, int64_t skip_ignored) {
  static const char* fn = "fastreg.linear_cross_entropy_backward";
  check_options(fn, grad_filter_eps, skip_ignored);
  if (half_via_float(input)) {
    check_operands(fn, input, weight, target, bias, class_weight);
    auto [gi, gw, gb] = lce_backward(to_float(grad_loss), to_float(input), to_float(weight), to_float(target),
                                     to_float(bias), to_float(class_weight), ignore_index, label_smoothing, softcap,
                                     z_loss, chunk_size, output_mask, grad_filter_eps, skip_ignored);
    return {to_half(gi), to_half(gw), to_half(gb)};
  }
  Problem p =
      prepare(fn, input, weight, target, bias, class_weight, ignore_index, label_smoothing, softcap, z_loss, chunk_size);
  TORCH_CHECK_VALUE(grad_loss.numel() == p.N, fn, ": grad_loss has ", grad_loss.numel(), " elements, expected ", p.N);
  const Tensor row_scale = grad_loss.reshape({p.N}).to(p.acc).contiguous();
  Grads g;
  if (!p.probs.defined() && grad_filter_eps == 0 && use_small_path(p)) {
    AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "fastreg_lce_small_backward", [&] {
      run_small<scalar_t>(p, ignore_index, label_smoothing, softcap, z_loss, 1.0, row_scale, true, output_mask,
                          nullptr, g);
    });
  } else {
    p.active = active_rows(p, ignore_index, skip_ignored);
    RowArgs a{ignore_index, label_smoothing, softcap, z_loss};
    a.grad_filter_eps = filter_threshold(grad_filter_eps, row_scale);
      Tensor loss_rows = at::empty({p.N}, p.x.options().dtype(p.acc));
    Stats st;
    run_chunks(p, a, chunk_size, row_scale, true, output_mask, loss_rows, g, st);
    finish_grads(p, g);
  }
  return {g.input.defined() ? g.input.view(input.sizes()) : empty_like_none(input),
          g.weight.defined() ? g.weight : empty_like_none(weight),
          g.bias.defined() ? g.bias : empty_like_none(weight)};
}

// -------------------------------------------------------------------------------- autograd
// The autograd formula, in C++ so a training step crosses from Python into C++ once per
// direction. For scalar reductions the forward already produced the gradients for a unit
// upstream gradient (the backward scales them); for 'none' the backward op recomputes the logits
// with each row's upstream gradient. lse and predictions are not differentiable.

class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& input,
                                                const Tensor& weight, const Tensor& target,
                                                const std::optional<Tensor>& bias,
                                                const std::optional<Tensor>& class_weight, int64_t reduction,
                                                int64_t ignore_index, double label_smoothing, double softcap,
                                                double z_loss, int64_t chunk_size, std::array<bool, 3> output_mask,
                                                double grad_filter_eps, int64_t skip_ignored, bool return_stats) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastreg::linear_cross_entropy", "")
                         .typed<decltype(lce_forward)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, gi, gw, gb, lse, pred] =
        op.call(input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing, softcap, z_loss,
                chunk_size, output_mask, grad_filter_eps, skip_ignored, return_stats);
    ctx->mark_non_differentiable({gi, gw, gb, lse, pred});
    ctx->set_materialize_grads(false);
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["has_bias"] = bias.has_value();
    if (reduction == kNone) {
      ctx->save_for_backward({input, weight, target, bias.value_or(Tensor()), class_weight.value_or(Tensor())});
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["label_smoothing"] = label_smoothing;
      ctx->saved_data["softcap"] = softcap;
      ctx->saved_data["z_loss"] = z_loss;
      ctx->saved_data["chunk_size"] = chunk_size;
      ctx->saved_data["grad_filter_eps"] = grad_filter_eps;
      ctx->saved_data["skip_ignored"] = skip_ignored;
    } else {
      ctx->save_for_backward({gi, gw, gb});
    }
    return {loss, gi, gw, gb, lse, pred};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(15);
    const Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return out;  // only the loss carries a gradient
    check_not_double_backward(grad_loss, "fastreg.linear_cross_entropy", "F.cross_entropy(F.linear(...))");
    const bool need_input = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1),
               need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
    const auto saved = ctx->get_saved_variables();
    if (ctx->saved_data["reduction"].toInt() == kNone) {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("fastreg::linear_cross_entropy_backward", "")
                           .typed<decltype(lce_backward)>();
      auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
      auto [gi, gw, gb] =
          op.call(grad_loss, saved[0], saved[1], saved[2], opt(saved[3]), opt(saved[4]),
                  ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["label_smoothing"].toDouble(),
                  ctx->saved_data["softcap"].toDouble(), ctx->saved_data["z_loss"].toDouble(),
                  ctx->saved_data["chunk_size"].toInt(), {need_input, need_weight, need_bias},
                  ctx->saved_data["grad_filter_eps"].toDouble(), ctx->saved_data["skip_ignored"].toInt());
      if (need_input) out[0] = gi;
      if (need_weight) out[1] = gw;
      if (need_bias) out[3] = gb;
    } else {
      scale_saved_grads(saved, grad_loss, need_input, need_weight, need_bias, out);
    }
    return out;
  }
};

Outputs lce_autograd(const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias,
                     const std::optional<Tensor>& class_weight, int64_t reduction, int64_t ignore_index,
                     double label_smoothing, double softcap, double z_loss, int64_t chunk_size,
                     std::array<bool, 3> output_mask, double grad_filter_eps, int64_t skip_ignored,
                     bool return_stats) {
  static const char* fn = "fastreg.linear_cross_entropy";
  // Checked before any dispatch, so a tensor on another device (or on meta) is reported as such.
  check_operands(fn, input, weight, target, bias, class_weight);
  const bool grad_mode = at::GradMode::is_enabled();
  TORCH_CHECK(!(grad_mode && class_weight && class_weight->requires_grad()), fn,
              " is not differentiable with respect to argument 'weight' (the class weights), like F.cross_entropy: "
              "pass weight.detach()");
  TORCH_CHECK(!(grad_mode && target.requires_grad()), fn,
              " is not differentiable with respect to the class-probability target: pass target.detach()");
  output_mask = mask_for_autograd(output_mask, input, weight, bias);
  auto outs = LinearCrossEntropyFunction::apply(input, weight, target, bias, class_weight, reduction, ignore_index,
                                                label_smoothing, softcap, z_loss, chunk_size, output_mask,
                                                grad_filter_eps, skip_ignored, return_stats);
  return {outs[0], outs[1], outs[2], outs[3], outs[4], outs[5]};
}

Outputs lce_call(const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias,
                 const std::optional<Tensor>& class_weight, int64_t reduction, int64_t ignore_index,
                 double label_smoothing, double softcap, double z_loss, int64_t chunk_size, double grad_filter_eps,
                 int64_t skip_ignored, bool return_stats) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastreg::linear_cross_entropy", "")
                       .typed<decltype(lce_forward)>();
  return op.call(input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing, softcap, z_loss,
                 chunk_size, {false, false, false}, grad_filter_eps, skip_ignored, return_stats);
}

Tensor lce_loss(const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias,
                const std::optional<Tensor>& class_weight, int64_t reduction, int64_t ignore_index,
                double label_smoothing, double softcap, double z_loss, int64_t chunk_size, double grad_filter_eps,
                int64_t skip_ignored) {
  return std::get<0>(lce_call(input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing,
                              softcap, z_loss, chunk_size, grad_filter_eps, skip_ignored, false));
}

std::tuple<Tensor, Tensor, Tensor> lce_loss_stats(const Tensor& input, const Tensor& weight, const Tensor& target,
                                                  const std::optional<Tensor>& bias,
                                                  const std::optional<Tensor>& class_weight, int64_t reduction,
                                                  int64_t ignore_index, double label_smoothing, double softcap,
                                                  double z_loss, int64_t chunk_size, double grad_filter_eps,
                                                  int64_t skip_ignored) {
  auto outs = lce_call(input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing, softcap,
                       z_loss, chunk_size, grad_filter_eps, skip_ignored, true);
  return {std::get<0>(outs), std::get<4>(outs), std::get<5>(outs)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CompositeImplicitAutograd, m) {
  m.impl("_lce_loss", &lce_loss);
  m.impl("_lce_loss_stats", &lce_loss_stats);
}
TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("linear_cross_entropy", &lce_forward);
  m.impl("linear_cross_entropy_backward", &lce_backward);
}
// The same driver serves CUDA tensors: its GEMMs dispatch to cuBLAS and its row pass to the
// CUDA kernel of _lce_rows (present when fastreg is built with CUDA).
TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("linear_cross_entropy", &lce_forward);
  m.impl("linear_cross_entropy_backward", &lce_backward);
}
TORCH_LIBRARY_IMPL(fastreg, Autograd, m) { m.impl("linear_cross_entropy", &lce_autograd); }

}  // namespace fastreg
