// The CUDA runtime as fastreg's host launch code sees it (csrc/cuda/*_launch.h), so that the same
// launcher source compiles two ways:
//   nvcc                      <cuda_runtime.h>: the real runtime (the extension's .cu files)
//   host C++ with FASTREG_SIMT tests/simt/simt_cudart.h: a small runtime over the CPU SIMT harness
//                             with H100 and A100 descriptions, which applies the launch rules of
//                             the hardware (shared memory, block, grid and cluster limits) and
//                             executes the kernels (tests/test_simt.py)
// Only the runtime calls the launchers use are spelled here; launches go through cudaLaunchKernelEx
// (no <<<>>>, which only nvcc parses). Errors are reported by fastreg::cuda_api::check (a C++
// exception naming the call) and one-time notices by fastreg::cuda_api::warn (stderr; the harness
// records them).
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>

#if defined(FASTREG_SIMT)
#include "simt_cudart.h"
#else
#include <cuda_runtime.h>
#endif

namespace fastreg {
namespace cuda_api {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("fastreg: ") + what + " failed: " + cudaGetErrorString(e));
  }
}

inline void warn(const std::string& msg) {
#if defined(FASTREG_SIMT)
  simt_cudart::record_warning(msg);
#else
  std::fprintf(stderr, "fastreg warning: %s\n", msg.c_str());
#endif
}

// A launch configuration without attributes (add them through .attrs / .numAttrs).
inline cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
#if defined(FASTREG_SIMT)
  cfg.grid = grid;
  cfg.block = block;
#else
  cfg.gridDim = grid;
  cfg.blockDim = block;
#endif
  cfg.dynamicSmemBytes = dynamic_smem;
  cfg.stream = stream;
  return cfg;
}

// Makes `dev` the current device for the scope (function attributes, occupancy queries and launches
// apply to the current device), restoring the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int dev) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != dev) check(cudaSetDevice(dev), "cudaSetDevice");
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  ~DeviceScope() {
    int now = prev_;
    if (cudaGetDevice(&now) == cudaSuccess && now != prev_) (void)cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0;
};

}  // namespace cuda_api
}  // namespace fastreg
