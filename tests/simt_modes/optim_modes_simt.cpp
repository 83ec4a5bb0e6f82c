// The CUDA fused optimizers' bf16 training modes (csrc/cuda/optim_kernels.cuh, unchanged) on the
// CPU SIMT runtime of tests/simt, launched by the real host launch code (csrc/cuda/optim_launch.h)
// on the described H100 of tests/simt/simt_cudart.h.
// A plain C function for ctypes (tests/test_optim_bf16.py builds this file with tests/simt/simt.cpp
// into a small shared library, no torch headers): the test compares the bits these kernels write
// with the CPU kernel's. Every buffer is staged into a guarded allocation for the call.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "optim_declare.h"
#include "staged.h"

#include "cuda/optim_launch.h"

using namespace fastreg::optim_cuda;

extern "C" {

// One step over n tensors. ptrs[l * n + i]: element list l of tensor i (Adam p, g, m, v[, vmax];
// SGD p, g[, buf]); counters[i]: Adam float32 step / SGD uint8 momentum flag (null without
// momentum); extra[i]: the fp32 master copy (mode 2) or SGD's float32 step counter (mode 1).
struct SimtModesCall {
  int32_t adam, amsgrad, mode;  // mode: 1 stochastic rounding, 2 master weights
  int32_t f16;                  // params float16 (else bfloat16)
  int32_t n;
  void** ptrs;
  void** counters;
  void** extra;
  const int64_t* numel;
  double lr, momentum, dampening, weight_decay, beta1, beta2, eps;
  int32_t nesterov, maximize, decoupled;
  uint64_t sr_seed;
  const char* schedule;
  uint64_t seed;
};

int simt_optim_modes(const SimtModesCall* call, char* msg, int msg_len);
}

namespace {

struct Runner {
  const SimtModesCall& c;
  std::vector<std::unique_ptr<simt_harness::Staged>> staged;
  int launches = 0;

  void* stage(void* host, size_t bytes, bool written, const char* name) {
    if (host == nullptr) return nullptr;
    staged.push_back(std::make_unique<simt_harness::Staged>(host, bytes, written, name));
    return staged.back()->device();
  }

  // kElem element lists of S, plus (kLists == kElem + 1) the extra list: fp32 master arrays
  // (kMaster) or one float step counter per tensor (SGD kStochastic).
  template <typename S, Bf16Mode MODE, int kElem, int kLists, typename Hyper, typename Main, typename Epilogue>
  void run(const Hyper& h, Main main, Epilogue epilogue, bool has_counters) {
    std::vector<void*> ptrs(static_cast<size_t>(kLists) * c.n);
    std::vector<void*> counters(c.n);
    for (int i = 0; i < c.n; ++i) {
      for (int l = 0; l < kElem; ++l) {
        const size_t k = static_cast<size_t>(l) * c.n + i;
        ptrs[k] = stage(c.ptrs[k], c.numel[i] * sizeof(S), l != 1, "list");
      }
      if (kLists > kElem) {
        const size_t bytes = MODE == Bf16Mode::kMaster ? c.numel[i] * sizeof(float) : sizeof(float);
        ptrs[static_cast<size_t>(kElem) * c.n + i] = stage(c.extra[i], bytes, true, "extra");
      }
      counters[i] = stage(c.counters[i], c.adam ? 4 : 1, true, "counter");
    }
    simt_harness::declare_optim_kernels(main, epilogue);
    simt_cudart::set_execution(simt::parse_schedule(c.schedule), c.seed);
    const int dev = simt_cudart::device_index("h100");
    launch_group<kLists>(
        "simt fused optimizer (bf16 modes)", dev, simt_cudart::stream(dev), c.n,
        [&](int l, int64_t i) { return ptrs[static_cast<size_t>(l) * c.n + i]; },
        [&](int64_t i) { return c.numel[i]; }, has_counters ? &counters : nullptr, h, DeviceScalars{}, main, epilogue,
        c.sr_seed, [&](int32_t) { ++launches; });
    for (auto& s : staged) s->finish();
  }
};

template <typename S, Bf16Mode MODE, bool AMSGRAD>
void run_adam(Runner& r) {
  const SimtModesCall& c = r.c;
  const auto h = fastreg::optim::make_adam_hyper<float>(c.lr, c.beta1, c.beta2, c.weight_decay, c.eps, 1.0,
                                                        c.maximize != 0, c.decoupled != 0);
  constexpr int kElem = AMSGRAD ? 5 : 4;
  constexpr int kLists = kElem + kModeLists<MODE, false>;
  r.run<S, MODE, kElem, kLists>(h, adam_kernel<S, AMSGRAD, MODE>,
                                counter_epilogue<Counter::kAdamStep, kLists, AdamHyper<float>>, true);
}

template <typename S, Bf16Mode MODE, bool MOMENTUM>
void run_sgd(Runner& r) {
  const SimtModesCall& c = r.c;
  const auto h = fastreg::optim::make_sgd_hyper<float>(c.lr, c.momentum, c.dampening, c.weight_decay, 1.0,
                                                       c.nesterov != 0, c.maximize != 0);
  constexpr int kElem = MOMENTUM ? 3 : 2;
  constexpr int kLists = kElem + kModeLists<MODE, true>;
  // with stochastic rounding the epilogue always runs (it counts the steps; null flags without momentum)
  r.run<S, MODE, kElem, kLists>(h, sgd_kernel<S, MOMENTUM, MODE>,
                                counter_epilogue<Counter::kSgdStarted, kLists, SgdHyper<float>, MODE>,
                                MOMENTUM || MODE == Bf16Mode::kStochastic);
}

template <typename S, Bf16Mode MODE>
void run_typed(Runner& r) {
  const SimtModesCall& c = r.c;
  if (c.adam) {
    c.amsgrad ? run_adam<S, MODE, true>(r) : run_adam<S, MODE, false>(r);
  } else {
    c.momentum != 0.0 ? run_sgd<S, MODE, true>(r) : run_sgd<S, MODE, false>(r);
  }
}

}  // namespace

int simt_optim_modes(const SimtModesCall* call, char* msg, int msg_len) {
  try {
    Runner r{*call, {}, 0};
    const SimtModesCall& c = *call;
    if (c.mode == 1) {
      if (c.f16) throw simt::Error("stochastic rounding needs bfloat16");
      run_typed<__nv_bfloat16, Bf16Mode::kStochastic>(r);
    } else if (c.mode == 2) {
      c.f16 ? run_typed<__half, Bf16Mode::kMaster>(r) : run_typed<__nv_bfloat16, Bf16Mode::kMaster>(r);
    } else {
      throw simt::Error("mode must be 1 (stochastic rounding) or 2 (master weights)");
    }
    snprintf(msg, static_cast<size_t>(msg_len), "launches=%d", r.launches);
    return 0;
  } catch (const std::exception& e) {
    snprintf(msg, static_cast<size_t>(msg_len), "%s", e.what());
    return 1;
  }
}
