// What nvcc knows about the fused-optimizer kernels (csrc/cuda/optim_kernels.cuh) and the SIMT
// CUDA runtime (simt_cudart.h) needs before they can be launched: no static shared memory, the
// main kernels' __launch_bounds__(kThreads), none on the epilogue. tag 0: main, 1: epilogue.
#pragma once
#include <string>

#include "simt_cudart.h"

#include "cuda/optim_kernels.cuh"

namespace simt_harness {

template <typename Main, typename Epilogue>
void declare_optim_kernels(Main main, Epilogue epilogue) {
  simt_cudart::register_kernel(main, {"fused optimizer kernel", 0, fastreg::optim_cuda::kThreads, 0});
  simt_cudart::register_kernel(epilogue, {"fused optimizer counter epilogue", 0, 1024, 1});
}

}  // namespace simt_harness
