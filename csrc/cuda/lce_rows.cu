// CUDA kernel of the internal operator fastreg::_lce_rows (schema and semantics: csrc/fastreg.cpp;
// per-row formulas: csrc/lce/lce_math.h, shared with the CPU pass csrc/lce/lce_cpu.cpp).
//
// Files: the kernel (device code) is csrc/cuda/lce_rows_kernels.cuh, the launch plan
// csrc/cuda/lce_rows_plan.h and the host launch code csrc/cuda/lce_rows_launch.h, all shared with
// the CPU SIMT harness of tests/simt that executes them in CI; this file checks the tensors and
// hands them to the launcher with the current stream.
//
// Built against the LibTorch stable ABI only (no ATen CUDA headers): tensors are
// torch::stable::Tensor, the current stream comes from aoti_torch_get_current_cuda_stream.
//
// Design
// ------
// A row of V logits is handled by a group of K CTAs (K = 1, or a thread-block cluster of 2/4/8
// CTAs on sm_90), each owning a contiguous slice of the row's 16-byte vectors. Per row:
//   pass 1  every thread streams its vectors with 128-bit loads (kUnroll = 2 in flight), applies
//           the softcap, and keeps an online (max, sum-exp) pair, plus sum_c w_c z_c and
//           W = sum_c w_c when label smoothing is on. In "cached" mode the raw vectors are also
//           kept in dynamic shared memory (the CTA's slice of the row), so the row is read from
//           HBM exactly once.
//   reduce  warp shuffles -> per-warp partials in shared memory -> one warp; with a cluster, the
//           CTAs exchange their partials through distributed shared memory: thread 0 of every CTA
//           reads the K partials and combines them in rank order, then broadcasts the result
//           through shared memory (so all K CTAs hold bit-identical lse / coefficients).
//   loss    lse = m + log(s); loss via fastreg::lce_row_loss (lce_math.h); CTA rank 0 stores it.
//   pass 2  (write_grad) g_c = A p_c - B w_c - [c==t] C (fastreg::lce_grad_coefs), times the
//           softcap derivative, written in place in the logits dtype with 128-bit stores; the raw
//           logits come from shared memory (cached mode) or are re-read from global memory/L2
//           (streaming mode, used when the row slice does not fit in shared memory).
// Launch (launch_rows, plan in lce_rows_plan.h): grid = rows * K CTAs of 128/256/512 threads (by
// slice length). Cached mode picks the smallest K in {1,2,4,8}
// whose slice fits 96 KiB of shared memory (2 CTAs per SM), else the opt-in maximum; rows that do
// not fit even then (or sm_80 rows over ~160 KiB) stream. With few rows (rows * K < 2 * SMs), K
// grows further while each CTA keeps >= 512 vectors. A cluster that cannot be placed
// (cudaOccupancyMaxActiveClusters == 0, asked once per configuration; a failed query is not an
// answer: lce_rows_launch.h) falls back to one CTA per row. FASTREG_LCE_ROWS_MODE (stream | nocluster | single, read once per process) forces a
// strategy, for tests and benchmarks.
// Rows need not be 16-byte aligned (odd V): each row has a scalar head up to the first 16-byte
// boundary and a scalar tail; the vector body in between is split among the K CTAs.
// The target logit z_t is read by every thread before the first barrier, i.e. before any thread
// of the row group writes the row.
//
// W = sum_c w_c is computed inside the row reduction (only when label smoothing is on and class
// weights are given; without weights W = V exactly). It costs no extra HBM traffic: the weights
// must be read per row anyway for sum_c w_c z_c, and the (V,) weight vector stays in L2. This
// keeps the op free of host syncs and of any side buffer.
//
// Ignored rows (target == ignore_index or outside [0, V)) get loss 0 and, with write_grad, an
// all-zero gradient row; their logits are never read and the target is never used as an index.
// A NaN logit makes the row's max, loss and gradient NaN (nan_max, as the CPU kernel).
// The op never synchronises with the host; rows == 0 launches nothing.
//
// Optional arguments (schema: csrc/fastreg.cpp), computed by the same two passes:
//   target_probs  probability targets: every row active; pass 1 also accumulates Q = sum_c w_c q'_c and
//                 S = sum_c w_c q'_c (z_c - m) online (S re-referenced when the running max m moves,
//                 Stats/combine), pass 2 re-reads q_c; formulas lce_math.h (lce_soft_row_loss).
//   zloss_scale   read on the device (one element) and multiplied into the z-loss coefficient.
//   lse_rows, argmax_rows  stored with the loss; the first-maximum index travels in the row
//                 statistics (per thread in column order, then the smallest index among the parts
//                 that hold the max; NaN counts as the maximum like torch.argmax).
//   block_keep    pass 2 marks (volatile, idempotent store of 1) the (tile, block) of every written
//                 entry with |g| > grad_filter_eps or NaN, tested on the value as stored.
// The softcap is lce_math.h's softcap_tanh and its derivative softcap_grad_from_input (from the raw
// logit, precise where tanh saturates), as in the CPU kernel.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <cstdlib>
#include <optional>

#include "cuda/lce_rows_launch.h"

namespace fastreg {
namespace lce_cuda {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ---------------------------------------------------------------------------------------------
// Host side: the launch code is lce_rows_launch.h (shared with the SIMT harness); this file checks
// the tensors and picks the stream.

// FASTREG_LCE_ROWS_MODE (stream | nocluster | single) forces a strategy for tests and benchmarks.
// Read once per process: no getenv on the per-chunk path.
const RowPolicy& env_policy() {
  static const RowPolicy p = policy_from_mode(std::getenv("FASTREG_LCE_ROWS_MODE"));
  return p;
}

inline bool is_real(ScalarType s) { return s == ScalarType::Float || s == ScalarType::Double; }

void lce_rows_cuda(Tensor logits, Tensor target, std::optional<Tensor> class_weight, Tensor row_scale,
                   int64_t ignore_index, double label_smoothing, double softcap, double z_loss, bool write_grad,
                   Tensor loss_rows, std::optional<Tensor> target_probs, std::optional<Tensor> zloss_scale,
                   std::optional<Tensor> lse_rows, std::optional<Tensor> argmax_rows, double grad_filter_eps,
                   std::optional<Tensor> block_keep) {
  auto given = [](const std::optional<Tensor>& t) { return t.has_value() && t->defined(); };
  STD_TORCH_CHECK(logits.is_cuda(), "fastreg::_lce_rows (CUDA): logits must be a CUDA tensor");
  STD_TORCH_CHECK(logits.dim() == 2, "fastreg::_lce_rows: logits must be 2-D (rows, V)");
  STD_TORCH_CHECK(logits.is_contiguous(), "fastreg::_lce_rows: logits must be contiguous");
  const int64_t rows = logits.size(0);
  const int64_t V = logits.size(1);
  const int32_t dev = logits.get_device_index();
  auto same_device = [&](const Tensor& x) { return x.is_cuda() && x.get_device_index() == dev; };

  const bool soft = given(target_probs);
  const ScalarType tt = target.scalar_type();
  if (soft) {  // `target` is not read
    const Tensor& q = *target_probs;
    STD_TORCH_CHECK(same_device(q) && q.dim() == 2 && q.size(0) == rows && q.size(1) == V && q.is_contiguous() &&
                        q.scalar_type() == logits.scalar_type(),
                    "fastreg::_lce_rows: target_probs must be a contiguous (rows, V) tensor of the logits' dtype on "
                    "the logits' device");
    STD_TORCH_CHECK(V > 0 || rows == 0, "fastreg::_lce_rows: probability targets need at least one class");
  } else {
    STD_TORCH_CHECK(same_device(target) && target.numel() == rows && target.is_contiguous(),
                    "fastreg::_lce_rows: target must be a contiguous (rows,) tensor on the logits' device");
    STD_TORCH_CHECK(tt == ScalarType::Long || tt == ScalarType::Int,
                    "fastreg::_lce_rows: target must be int64 or int32");
  }
  const void* zs_ptr = nullptr;
  bool zs64 = false;
  if (given(zloss_scale)) {
    STD_TORCH_CHECK(same_device(*zloss_scale) && zloss_scale->numel() == 1 && is_real(zloss_scale->scalar_type()),
                    "fastreg::_lce_rows: zloss_scale must be a one-element float32/float64 tensor on the logits' "
                    "device");
    zs_ptr = zloss_scale->const_data_ptr();
    zs64 = zloss_scale->scalar_type() == ScalarType::Double;
  }
  void* lse_ptr = nullptr;
  bool lse64 = false;
  if (given(lse_rows)) {
    STD_TORCH_CHECK(same_device(*lse_rows) && lse_rows->numel() == rows && lse_rows->is_contiguous() &&
                        is_real(lse_rows->scalar_type()),
                    "fastreg::_lce_rows: lse_rows must be a contiguous float32/float64 (rows,) tensor on the logits' "
                    "device");
    lse_ptr = lse_rows->mutable_data_ptr();
    lse64 = lse_rows->scalar_type() == ScalarType::Double;
  }
  int64_t* argmax_ptr = nullptr;
  if (given(argmax_rows)) {
    STD_TORCH_CHECK(same_device(*argmax_rows) && argmax_rows->numel() == rows && argmax_rows->is_contiguous() &&
                        argmax_rows->scalar_type() == ScalarType::Long,
                    "fastreg::_lce_rows: argmax_rows must be a contiguous int64 (rows,) tensor on the logits' device");
    argmax_ptr = static_cast<int64_t*>(argmax_rows->mutable_data_ptr());
  }
  uint8_t* keep_ptr = nullptr;
  int64_t row_tiles = 1, num_blocks = 1;
  if (given(block_keep)) {
    const Tensor& bk = *block_keep;
    STD_TORCH_CHECK(write_grad, "fastreg::_lce_rows: block_keep needs write_grad (it describes the written gradient)");
    STD_TORCH_CHECK(grad_filter_eps >= 0, "fastreg::_lce_rows: grad_filter_eps must be >= 0");
    STD_TORCH_CHECK(same_device(bk) && bk.dim() == 2 && bk.scalar_type() == ScalarType::Byte && bk.is_contiguous() &&
                        bk.size(0) >= 1 && bk.size(1) >= 1,
                    "fastreg::_lce_rows: block_keep must be a contiguous uint8 (row_tiles, num_blocks) tensor on the "
                    "logits' device, both >= 1");
    keep_ptr = static_cast<uint8_t*>(bk.mutable_data_ptr());
    row_tiles = bk.size(0);
    num_blocks = bk.size(1);
  }
  STD_TORCH_CHECK(same_device(loss_rows) && loss_rows.numel() == rows && loss_rows.is_contiguous() &&
                      is_real(loss_rows.scalar_type()),
                  "fastreg::_lce_rows: loss_rows must be a contiguous float32/float64 (rows,) tensor on the logits' "
                  "device");
  STD_TORCH_CHECK(same_device(row_scale) && is_real(row_scale.scalar_type()) &&
                      (row_scale.numel() == 1 || (row_scale.numel() == rows && row_scale.is_contiguous())),
                  "fastreg::_lce_rows: row_scale must be a float32/float64 tensor with 1 or rows elements on the "
                  "logits' device");
  const void* wptr = nullptr;
  bool w64 = false;
  if (class_weight.has_value() && class_weight->defined()) {
    const Tensor& w = *class_weight;
    STD_TORCH_CHECK(same_device(w) && w.numel() == V && w.is_contiguous() && is_real(w.scalar_type()),
                    "fastreg::_lce_rows: class_weight must be a contiguous float32/float64 (V,) tensor on the "
                    "logits' device");
    wptr = w.const_data_ptr();
    w64 = w.scalar_type() == ScalarType::Double;
  }
  if (rows == 0) return;
  // grid = rows * K CTAs with K <= 8 must stay below 2^31 - 1 (the driver's chunks are far smaller)
  STD_TORCH_CHECK(rows < (int64_t{1} << 28), "fastreg::_lce_rows: too many rows in one chunk (", rows, ")");

  RowArgs a{};
  a.logits = logits.mutable_data_ptr();
  a.target = soft ? nullptr : target.const_data_ptr();
  a.probs = soft ? target_probs->const_data_ptr() : nullptr;
  a.zloss_scale = zs_ptr;
  a.zscale_f64 = zs64;
  a.lse = lse_ptr;
  a.lse_f64 = lse64;
  a.argmax = argmax_ptr;
  a.keep = keep_ptr;
  a.keep_eps = grad_filter_eps;
  a.tile_h = (rows + row_tiles - 1) / row_tiles;
  a.block_w = V > 0 ? (V + num_blocks - 1) / num_blocks : 1;
  a.num_blocks = num_blocks;
  a.weight = wptr;
  a.scale = row_scale.const_data_ptr();
  a.loss = loss_rows.mutable_data_ptr();
  a.rows = rows;
  a.V = V;
  a.ignore_index = ignore_index;
  a.scale_stride = row_scale.numel() == 1 ? 0 : 1;
  a.eps = label_smoothing;
  a.softcap = softcap;
  a.zloss = z_loss;
  a.K = 1;
  a.target_i32 = !soft && tt == ScalarType::Int;
  a.weight_f64 = w64;
  a.scale_f64 = row_scale.scalar_type() == ScalarType::Double;
  a.loss_f64 = loss_rows.scalar_type() == ScalarType::Double;
  a.write_grad = write_grad;

  void* stream_ptr = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(dev, &stream_ptr));
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);

  switch (logits.scalar_type()) {
    case ScalarType::Float:
      launch_rows<float>(a, dev, stream, env_policy());
      break;
    case ScalarType::BFloat16:
      launch_rows<__nv_bfloat16>(a, dev, stream, env_policy());
      break;
    case ScalarType::Half:
      launch_rows<__half>(a, dev, stream, env_policy());
      break;
    case ScalarType::Double:
      launch_rows<double>(a, dev, stream, env_policy());
      break;
    default:
      STD_TORCH_CHECK(false, "fastreg::_lce_rows: logits must be float32, bfloat16, float16 or float64");
  }
}

}  // namespace lce_cuda
}  // namespace fastreg

STABLE_TORCH_LIBRARY_IMPL(fastreg, CUDA, m) { m.impl("_lce_rows", TORCH_BOX(&fastreg::lce_cuda::lce_rows_cuda)); }
