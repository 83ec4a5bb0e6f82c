// CUDA kernel of the internal operator fastreg::_lce_rows (schema and semantics: csrc/fastreg.cpp;
// per-row formulas: csrc/lce/lce_math.h, shared with the CPU pass csrc/lce/lce_cpu.cpp).
//
// Files: the kernel (device code) is csrc/cuda/lce_rows_kernels.cuh and the launch plan
// csrc/cuda/lce_rows_plan.h, both shared with the CPU SIMT harness of tests/simt that executes
// them in CI; this file queries the device, checks the tensors and launches.
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
// (cudaOccupancyMaxActiveClusters == 0, asked once per configuration) falls back to one CTA per
// row. FASTREG_LCE_ROWS_MODE (stream | nocluster | single, read once per process) forces a
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
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

#include "cuda/lce_rows_kernels.cuh"
#include "cuda/lce_rows_plan.h"

namespace fastreg {
namespace lce_cuda {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ---------------------------------------------------------------------------------------------
// Host side

inline void cuda_check(cudaError_t e) { STD_CUDA_CHECK(e); }

// The device description of the planner (lce_rows_plan.h), queried once per device.
const DeviceDesc& device_desc(int dev) {
  static std::mutex mu;
  static DeviceDesc cache[64];
  static bool filled[64] = {};
  STD_TORCH_CHECK(dev >= 0 && dev < 64, "fastreg::_lce_rows: unsupported CUDA device index ", dev);
  std::lock_guard<std::mutex> lock(mu);
  if (!filled[dev]) {
    DeviceDesc d;
    int cl = 0, major = 0, minor = 0, optin = 0;
    cuda_check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
    cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    cuda_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    cuda_check(cudaDeviceGetAttribute(&cl, cudaDevAttrClusterLaunch, dev));
    d.smem_optin = optin;
    d.cc = major * 10 + minor;
    d.clusters = cl != 0 && major >= 9;
    cache[dev] = d;
    filled[dev] = true;
  }
  return cache[dev];
}

// FASTREG_LCE_ROWS_MODE (stream | nocluster | single) forces a strategy for tests and benchmarks.
// Read once per process: no getenv on the per-chunk path.
const RowPolicy& env_policy() {
  static const RowPolicy p = policy_from_mode(std::getenv("FASTREG_LCE_ROWS_MODE"));
  return p;
}

// Per-launch-configuration facts, computed once and cached: whether the dynamic shared-memory
// limit has been raised far enough, and whether a cluster configuration can be resident at all
// (cudaOccupancyMaxActiveClusters). Both are host queries/attributes, fine during graph capture,
// but not free: cached per (kernel, device, K, threads, shared memory).
struct LaunchKey {
  const void* kernel;
  int dev, K, threads;
  size_t smem;
  bool operator<(const LaunchKey& o) const {
    return std::tie(kernel, dev, K, threads, smem) < std::tie(o.kernel, o.dev, o.K, o.threads, o.smem);
  }
};

template <typename T, bool CACHED, bool CLUSTER>
bool launch_variant(const RowArgs& a, int dev, cudaStream_t stream, int threads, size_t smem) {
  auto kernel = lce_rows_kernel<T, CACHED, CLUSTER>;
  static std::mutex mu;
  static std::map<LaunchKey, bool> placeable;  // per configuration: can it be launched?
  static int granted[64] = {};                 // per device: the dynamic smem limit set so far
  const unsigned int grid = static_cast<unsigned int>(a.rows * (CLUSTER ? a.K : 1));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(threads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned int>(a.K);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = CLUSTER ? 1 : 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (smem > 48 * 1024 && static_cast<int>(smem) > granted[dev]) {
      // a function attribute, not stream work: fine during CUDA-graph capture
      cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      granted[dev] = static_cast<int>(smem);
    }
    if constexpr (CLUSTER) {
      const LaunchKey key{reinterpret_cast<const void*>(kernel), dev, a.K, threads, smem};
      auto it = placeable.find(key);
      if (it == placeable.end()) {
        // Ask once whether such clusters can be resident at all (no stream work, no sync), so
        // that an impossible configuration falls back instead of failing the launch.
        int max_clusters = 0;
        const bool ok = cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg) == cudaSuccess && max_clusters > 0;
        if (!ok) (void)cudaGetLastError();  // clear the query's error, if any
        it = placeable.emplace(key, ok).first;
      }
      if (!it->second) return false;
    }
  }
  if constexpr (CLUSTER) {
    cuda_check(cudaLaunchKernelEx(&cfg, kernel, a));
  } else {
    kernel<<<grid, threads, smem, stream>>>(a);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Whether the cluster variants of the kernel hold real sm_90+ code on this device. A build without
// sm_90 SASS runs JIT-compiled compute_8x PTX on an H100, where those variants are only __trap().
template <typename T>
bool cluster_code_present(int dev) {
  static std::mutex mu;
  static int8_t cache[64] = {};  // 0 unknown, 1 yes, -1 no
  std::lock_guard<std::mutex> lock(mu);
  if (cache[dev] == 0) {
    bool ok = true;
    for (const void* k : {reinterpret_cast<const void*>(lce_rows_kernel<T, true, true>),
                          reinterpret_cast<const void*>(lce_rows_kernel<T, false, true>)}) {
      cudaFuncAttributes fa{};
      if (cudaFuncGetAttributes(&fa, k) != cudaSuccess) {
        (void)cudaGetLastError();
        ok = false;
      } else {
        ok = ok && fa.ptxVersion >= 90;
      }
    }
    cache[dev] = ok ? 1 : -1;
  }
  return cache[dev] > 0;
}

template <typename T>
void launch_rows(RowArgs a, int dev, cudaStream_t stream) {
  constexpr int VEC = Pack<T>::N;
  DeviceDesc d = device_desc(dev);
  if (d.clusters && !cluster_code_present<T>(dev)) d.clusters = false;
  const int64_t nvec = a.V / VEC;  // upper bound on any row's vector count
  const RowPlan p = plan_rows(d, a.rows, nvec, a.write_grad, row_static_smem<T>(), env_policy());
  a.K = p.K;
  bool done = false;
  if (p.K > 1) {
    done = p.cached ? launch_variant<T, true, true>(a, dev, stream, p.threads, static_cast<size_t>(p.smem))
                    : launch_variant<T, false, true>(a, dev, stream, p.threads, 0);
  }
  if (!done) {  // single CTA per row (also the fallback when clusters cannot be placed)
    const RowPlan f = p.K > 1 ? single_cta_fallback(d, p, nvec, row_static_smem<T>()) : p;
    a.K = 1;
    f.cached ? launch_variant<T, true, false>(a, dev, stream, f.threads, static_cast<size_t>(f.smem))
             : launch_variant<T, false, false>(a, dev, stream, f.threads, 0);
  }
}

inline bool is_real(ScalarType s) { return s == ScalarType::Float || s == ScalarType::Double; }

void lce_rows_cuda(Tensor logits, Tensor target, std::optional<Tensor> class_weight, Tensor row_scale,
                   int64_t ignore_index, double label_smoothing, double softcap, double z_loss, bool write_grad,
                   Tensor loss_rows, std::optional<Tensor> target_probs, std::optional<Tensor> zloss_scale,
                   std::optional<Tensor> lse_rows, std::optional<Tensor> argmax_rows, double grad_filter_eps,
                   std::optional<Tensor> block_keep) {
  auto given = [](const std::optional<Tensor>& t) { return t.has_value() && t->defined(); };
  STD_TORCH_CHECK(!given(target_probs) && !given(zloss_scale) && !given(lse_rows) && !given(argmax_rows) &&
                      !given(block_keep),
                  "fastreg::_lce_rows (CUDA): target_probs, zloss_scale, lse_rows, argmax_rows and block_keep are "
                  "not implemented yet in the CUDA row pass");
  (void)grad_filter_eps;
  STD_TORCH_CHECK(logits.is_cuda(), "fastreg::_lce_rows (CUDA): logits must be a CUDA tensor");
  STD_TORCH_CHECK(logits.dim() == 2, "fastreg::_lce_rows: logits must be 2-D (rows, V)");
  STD_TORCH_CHECK(logits.is_contiguous(), "fastreg::_lce_rows: logits must be contiguous");
  const int64_t rows = logits.size(0);
  const int64_t V = logits.size(1);
  const int32_t dev = logits.get_device_index();
  auto same_device = [&](const Tensor& x) { return x.is_cuda() && x.get_device_index() == dev; };

  STD_TORCH_CHECK(same_device(target) && target.numel() == rows && target.is_contiguous(),
                  "fastreg::_lce_rows: target must be a contiguous (rows,) tensor on the logits' device");
  const ScalarType tt = target.scalar_type();
  STD_TORCH_CHECK(tt == ScalarType::Long || tt == ScalarType::Int, "fastreg::_lce_rows: target must be int64 or int32");
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
  a.target = target.const_data_ptr();
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
  a.target_i32 = tt == ScalarType::Int;
  a.weight_f64 = w64;
  a.scale_f64 = row_scale.scalar_type() == ScalarType::Double;
  a.loss_f64 = loss_rows.scalar_type() == ScalarType::Double;
  a.write_grad = write_grad;

  torch::stable::accelerator::DeviceGuard guard(dev);
  void* stream_ptr = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(dev, &stream_ptr));
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);

  switch (logits.scalar_type()) {
    case ScalarType::Float:
      launch_rows<float>(a, dev, stream);
      break;
    case ScalarType::BFloat16:
      launch_rows<__nv_bfloat16>(a, dev, stream);
      break;
    case ScalarType::Half:
      launch_rows<__half>(a, dev, stream);
      break;
    case ScalarType::Double:
      launch_rows<double>(a, dev, stream);
      break;
    default:
      STD_TORCH_CHECK(false, "fastreg::_lce_rows: logits must be float32, bfloat16, float16 or float64");
  }
}

}  // namespace lce_cuda
}  // namespace fastreg

STABLE_TORCH_LIBRARY_IMPL(fastreg, CUDA, m) { m.impl("_lce_rows", TORCH_BOX(&fastreg::lce_cuda::lce_rows_cuda)); }
