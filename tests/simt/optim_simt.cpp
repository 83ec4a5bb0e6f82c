// The CUDA fused optimizers (csrc/cuda/optim_kernels.cuh, unchanged) on the CPU SIMT runtime,
// launched by the real host launch code (csrc/cuda/optim_launch.h) on the described H100 of
// simt_cudart.h. C interface: simt_harness.h. Every tensor and scalar is staged into a guarded
// allocation for the call.
#include "optim_declare.h"
#include "simt_harness.h"
#include "staged.h"

#include "cuda/optim_launch.h"

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace fastreg::optim_cuda;

struct Run {
  const SimtOptimCall& c;
  simt::Schedule sched;
  std::vector<int> batch_sizes;
};

template <int kLists, typename Hyper, typename Main, typename Epilogue>
void run_batches(Run& run, const std::vector<void*>& ptrs, const std::vector<void*>* counters, const Hyper& h,
                 const DeviceScalars& sc, Main main, Epilogue epilogue) {
  const SimtOptimCall& c = run.c;
  simt_harness::declare_optim_kernels(main, epilogue);
  simt_cudart::set_execution(run.sched, c.seed);
  const int dev = simt_cudart::device_index("h100");
  launch_group<kLists>(
      "simt fused optimizer", dev, simt_cudart::stream(dev), c.n,
      [&](int l, int64_t i) { return ptrs[static_cast<size_t>(l) * c.n + i]; }, [&](int64_t i) { return c.numel[i]; },
      counters, h, sc, main, epilogue, 0, [&](int32_t count) { run.batch_sizes.push_back(count); });
}

DeviceScalar scalar(const void* p, int f64) {
  DeviceScalar s;
  s.ptr = p;
  s.f64 = f64 != 0;
  return s;
}

template <typename S>
void run_typed(Run& run, const std::vector<void*>& ptrs, const std::vector<void*>& counters, const DeviceScalars& sc) {
  using M = typename fastreg::AccOf<S>::type;
  const SimtOptimCall& c = run.c;
  if (c.adam) {
    const auto h = fastreg::optim::make_adam_hyper<M>(c.lr, c.beta1, c.beta2, c.weight_decay, c.eps, 1.0, c.maximize != 0,
                                                      c.decoupled != 0);
    if (c.amsgrad) {
      run_batches<5>(run, ptrs, &counters, h, sc, adam_kernel<S, true>,
                     counter_epilogue<Counter::kAdamStep, 5, AdamHyper<M>>);
    } else {
      run_batches<4>(run, ptrs, &counters, h, sc, adam_kernel<S, false>,
                     counter_epilogue<Counter::kAdamStep, 4, AdamHyper<M>>);
    }
  } else {
    const auto h = fastreg::optim::make_sgd_hyper<M>(c.lr, c.momentum, c.dampening, c.weight_decay, 1.0, c.nesterov != 0,
                                                     c.maximize != 0);
    if (c.momentum != 0.0) {
      run_batches<3>(run, ptrs, &counters, h, sc, sgd_kernel<S, true>,
                     counter_epilogue<Counter::kSgdStarted, 3, SgdHyper<M>>);
    } else {
      run_batches<2>(run, ptrs, nullptr, h, sc, sgd_kernel<S, false>,
                     counter_epilogue<Counter::kSgdStarted, 2, SgdHyper<M>>);
    }
  }
}

}  // namespace

extern "C" int simt_fused_optim(const SimtOptimCall* call, char* msg, int msg_len) {
  try {
    const SimtOptimCall& c = *call;
    const size_t elem = c.dtype == kSimtF64 ? 8 : (c.dtype == kSimtF32 ? 4 : 2);
    const int want_lists = c.adam ? (c.amsgrad ? 5 : 4) : (c.momentum != 0.0 ? 3 : 2);
    if (c.lists != want_lists) throw simt::Error("wrong number of tensor lists");
    std::vector<std::unique_ptr<simt_harness::Staged>> staged;
    std::vector<void*> ptrs(static_cast<size_t>(c.lists) * c.n);
    static const char* const kAdamNames[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};
    static const char* const kSgdNames[] = {"params", "grads", "momentum_buffers"};
    for (int l = 0; l < c.lists; ++l) {
      for (int i = 0; i < c.n; ++i) {
        const size_t k = static_cast<size_t>(l) * c.n + i;
        staged.push_back(std::make_unique<simt_harness::Staged>(c.ptrs[k], static_cast<size_t>(c.numel[i]) * elem,
                                                                l != 1, c.adam ? kAdamNames[l] : kSgdNames[l]));
        ptrs[k] = staged.back()->device();
      }
    }
    const bool has_counters = c.adam || c.momentum != 0.0;
    std::vector<void*> counters(has_counters ? c.n : 0);
    for (int i = 0; has_counters && i < c.n; ++i) {
      staged.push_back(std::make_unique<simt_harness::Staged>(c.counters[i], c.adam ? 4 : 1, true,
                                                              c.adam ? "state_steps" : "momentum_started"));
      counters[i] = staged.back()->device();
    }
    auto stage_scalar = [&](const void* p, int f64, const char* name) -> const void* {
      if (p == nullptr) return nullptr;
      staged.push_back(std::make_unique<simt_harness::Staged>(p, f64 ? 8 : 4, false, name));
      return staged.back()->device();
    };
    const DeviceScalars sc{scalar(stage_scalar(c.lr_tensor, c.lr_f64, "lr_tensor"), c.lr_f64),
                           scalar(stage_scalar(c.grad_scale, c.grad_scale_f64, "grad_scale"), c.grad_scale_f64),
                           scalar(stage_scalar(c.found_inf, c.found_inf_f64, "found_inf"), c.found_inf_f64)};
    Run run{c, simt::parse_schedule(c.schedule), {}};
    switch (c.dtype) {
      case kSimtF32:
        run_typed<float>(run, ptrs, counters, sc);
        break;
      case kSimtF64:
        run_typed<double>(run, ptrs, counters, sc);
        break;
#ifndef SIMT_FLOAT_ONLY
      case kSimtBF16:
        run_typed<__nv_bfloat16>(run, ptrs, counters, sc);
        break;
      case kSimtF16:
        run_typed<__half>(run, ptrs, counters, sc);
        break;
#endif
      default:
        throw simt::Error("unsupported dtype");
    }
    for (auto& s : staged) s->finish();
    std::string sizes;
    for (int b : run.batch_sizes) sizes += (sizes.empty() ? "" : ",") + std::to_string(b);
    snprintf(msg, static_cast<size_t>(msg_len), "launches=%zu batches=%s", run.batch_sizes.size(), sizes.c_str());
    return 0;
  } catch (const std::exception& e) {
    snprintf(msg, static_cast<size_t>(msg_len), "%s", e.what());
    return 1;
  }
}

extern "C" int simt_optim_batch_cap(int32_t lists) {
  switch (lists) {
    case 2:
      return Batch<2>::kCap;
    case 3:
      return Batch<3>::kCap;
    case 4:
      return Batch<4>::kCap;
    case 5:
      return Batch<5>::kCap;
    default:
      return 0;
  }
}
