// The CUDA row pass (csrc/cuda/lce_rows_kernels.cuh, unchanged) on the CPU SIMT runtime, launched
// by the real host launch code (csrc/cuda/lce_rows_launch.h: plan, function attributes, the
// cluster-occupancy query and its cache, cudaLaunchKernelEx) over the described devices of
// simt_cudart.h, which applies the hardware's launch rules.
//
// C interface (used by the torch op in ops.cpp and, through ctypes, by the teeth test, which
// builds this file against a mutated copy of the kernel source): every buffer is copied into a
// guarded allocation (same address mod 16, so the kernel takes the same aligned/misaligned path)
// for the launch, and the written ones are copied back.
#include "simt_harness.h"
#include "staged.h"

#include "cuda/lce_rows_launch.h"

#include <cstdio>
#include <string>

namespace {

using fastreg::lce_cuda::DeviceDesc;
using fastreg::lce_cuda::RowArgs;
using fastreg::lce_cuda::RowPlan;
using fastreg::lce_cuda::RowPolicy;
using fastreg::lce_cuda::lce_rows_kernel;

// What nvcc knows about the kernel and the runtime needs: its static shared memory (the
// __shared__ declarations of lce_rows_kernel: scratch[33], cluster_part, cluster_total) and its
// __launch_bounds__ maximum. tag: 1 for the cached variants.
template <typename T>
void declare_row_kernels(const char* dtype) {
  using A = typename fastreg::AccOf<T>::type;
  const size_t smem = 35 * sizeof(fastreg::lce_cuda::Stats<A>);
  const int bounds = fastreg::lce_cuda::kMaxThreads;
  const std::string n = std::string("lce_rows_kernel<") + dtype;
  simt_cudart::register_kernel(lce_rows_kernel<T, true, true>, {n + ", cached, cluster>", smem, bounds, 1});
  simt_cudart::register_kernel(lce_rows_kernel<T, false, true>, {n + ", streaming, cluster>", smem, bounds, 0});
  simt_cudart::register_kernel(lce_rows_kernel<T, true, false>, {n + ", cached>", smem, bounds, 1});
  simt_cudart::register_kernel(lce_rows_kernel<T, false, false>, {n + ", streaming>", smem, bounds, 0});
}

void declare_kernels() {
  static std::once_flag once;
  std::call_once(once, [] {
    declare_row_kernels<float>("float");
    declare_row_kernels<double>("double");
#ifndef SIMT_FLOAT_ONLY
    declare_row_kernels<__nv_bfloat16>("bfloat16");
    declare_row_kernels<__half>("half");
#endif
  });
}

// "auto" (the planner's choice), "single-cached", "single-streaming", "cluster{2,4,8}-{cached,streaming}".
RowPolicy policy_by_name(const std::string& s) {
  RowPolicy p;
  if (s == "auto") return p;
  const size_t dash = s.find('-');
  if (dash == std::string::npos) throw simt::Error("unknown strategy '" + s + "'");
  const std::string shape = s.substr(0, dash), mode = s.substr(dash + 1);
  if (shape == "single") {
    p.force_k = 1;
  } else if (shape == "cluster2" || shape == "cluster4" || shape == "cluster8") {
    p.force_k = shape[7] - '0';
  } else {
    throw simt::Error("unknown strategy '" + s + "'");
  }
  if (mode != "cached" && mode != "streaming") throw simt::Error("unknown strategy '" + s + "'");
  p.force_cached = mode == "cached" ? 1 : 0;
  return p;
}

// The strategy the launch log shows: "single-cached", "cluster4-streaming", ...
std::string executed_strategy() {
  const std::vector<simt_cudart::LaunchRecord> log = simt_cudart::launch_log();
  if (log.size() != 1) throw simt::Error("the launcher made " + std::to_string(log.size()) + " launches, not 1");
  RowPlan p;
  p.K = static_cast<int>(log[0].cluster);
  p.cached = log[0].tag == 1;
  return fastreg::lce_cuda::strategy_name(p);
}

template <typename T>
std::string run_typed(const RowArgs& a, int dev, const RowPolicy& pol, simt::Schedule sched, uint64_t seed) {
  simt_cudart::set_execution(sched, seed);
  fastreg::lce_cuda::launch_rows<T>(a, dev, simt_cudart::stream(dev), pol);
  return executed_strategy();
}

}  // namespace

extern "C" int simt_lce_rows(const SimtLceCall* c, char* msg, int msg_len) {
  try {
    const size_t elem = c->dtype == kSimtF64 ? 8 : (c->dtype == kSimtF32 ? 4 : 2);
    const size_t tgt = c->target_i32 ? 4 : 8;
    const int64_t rows = c->rows, V = c->V;
    simt_harness::Staged logits(c->logits, static_cast<size_t>(rows * V) * elem, true, "logits");
    simt_harness::Staged target(c->target, static_cast<size_t>(rows) * tgt, false, "target");
    simt_harness::Staged weight(c->weight, c->weight ? static_cast<size_t>(V) * (c->weight_f64 ? 8 : 4) : 0, false,
                                "class_weight");
    simt_harness::Staged scale(c->scale, static_cast<size_t>(c->scale_per_row ? rows : 1) * (c->scale_f64 ? 8 : 4),
                               false, "row_scale");
    simt_harness::Staged loss(c->loss, static_cast<size_t>(rows) * (c->loss_f64 ? 8 : 4), true, "loss_rows");
    simt_harness::Staged probs(c->probs, c->probs ? static_cast<size_t>(rows * V) * elem : 0, false, "target_probs");
    simt_harness::Staged zscale(c->zloss_scale, c->zscale_f64 ? 8 : 4, false, "zloss_scale");
    simt_harness::Staged lse(c->lse, static_cast<size_t>(rows) * (c->lse_f64 ? 8 : 4), true, "lse_rows");
    simt_harness::Staged argmax(c->argmax, static_cast<size_t>(rows) * 8, true, "argmax_rows");
    simt_harness::Staged keep(c->keep, c->keep ? static_cast<size_t>(c->row_tiles * c->num_blocks) : 0, true,
                              "block_keep");
    RowArgs a{};
    a.logits = logits.device();
    a.target = c->probs ? nullptr : target.device();
    a.probs = probs.device();
    a.zloss_scale = zscale.device();
    a.zscale_f64 = c->zscale_f64 != 0;
    a.lse = lse.device();
    a.lse_f64 = c->lse_f64 != 0;
    a.argmax = static_cast<int64_t*>(argmax.device());
    a.keep = static_cast<uint8_t*>(keep.device());
    a.keep_eps = c->keep_eps;
    const int64_t tiles = c->keep ? c->row_tiles : 1, blocks = c->keep ? c->num_blocks : 1;
    a.tile_h = (rows + tiles - 1) / tiles;
    a.block_w = V > 0 ? (V + blocks - 1) / blocks : 1;
    a.num_blocks = blocks;
    a.weight = weight.device();
    a.scale = scale.device();
    a.loss = loss.device();
    a.rows = rows;
    a.V = V;
    a.ignore_index = c->ignore_index;
    a.scale_stride = c->scale_per_row ? 1 : 0;
    a.eps = c->label_smoothing;
    a.softcap = c->softcap;
    a.zloss = c->z_loss;
    a.K = 1;
    a.target_i32 = !c->probs && c->target_i32 != 0;
    a.weight_f64 = c->weight_f64 != 0;
    a.scale_f64 = c->scale_f64 != 0;
    a.loss_f64 = c->loss_f64 != 0;
    a.write_grad = c->write_grad != 0;
    std::string name = "none";
    declare_kernels();
    if (rows > 0) {
      const int dev = simt_cudart::device_index(c->device);
      const RowPolicy pol = policy_by_name(c->strategy);
      const simt::Schedule sched = simt::parse_schedule(c->schedule);
      switch (c->dtype) {
        case kSimtF32:
          name = run_typed<float>(a, dev, pol, sched, c->seed);
          break;
        case kSimtF64:
          name = run_typed<double>(a, dev, pol, sched, c->seed);
          break;
#ifndef SIMT_FLOAT_ONLY
        case kSimtBF16:
          name = run_typed<__nv_bfloat16>(a, dev, pol, sched, c->seed);
          break;
        case kSimtF16:
          name = run_typed<__half>(a, dev, pol, sched, c->seed);
          break;
#endif
        default:
          throw simt::Error("unsupported logits dtype");
      }
    }
    logits.finish();
    target.finish();
    weight.finish();
    scale.finish();
    loss.finish();
    probs.finish();
    zscale.finish();
    lse.finish();
    argmax.finish();
    keep.finish();
    for (const std::string& w : simt_cudart::take_warnings()) name += "\nwarning: " + w;
    snprintf(msg, static_cast<size_t>(msg_len), "%s", name.c_str());
    return 0;
  } catch (const std::exception& e) {
    snprintf(msg, static_cast<size_t>(msg_len), "%s", e.what());
    return 1;
  }
}

extern "C" int simt_lce_plan(const char* device, int64_t rows, int64_t V, int32_t dtype, int32_t write_grad,
                             const char* strategy, char* msg, int msg_len) {
  try {
    const int64_t vec = dtype == kSimtF64 ? 2 : (dtype == kSimtF32 ? 4 : 8);
    const int64_t static_smem = dtype == kSimtF64 ? fastreg::lce_cuda::row_static_smem<double>()
                                                  : fastreg::lce_cuda::row_static_smem<float>();
    const DeviceDesc d = fastreg::lce_cuda::device_desc(simt_cudart::device_index(device));
    const RowPlan p = fastreg::lce_cuda::plan_rows(d, rows, V / vec, write_grad != 0, static_smem, policy_by_name(strategy));
    snprintf(msg, static_cast<size_t>(msg_len), "%s threads=%d smem=%lld", fastreg::lce_cuda::strategy_name(p).c_str(),
             p.threads, static_cast<long long>(p.smem));
    return 0;
  } catch (const std::exception& e) {
    snprintf(msg, static_cast<size_t>(msg_len), "%s", e.what());
    return 1;
  }
}
