// Host launch code of fastreg's CUDA fused optimizers: one group's batches (for_each_launch,
// optim_kernels.cuh), each a main-kernel launch over its chunks and, with counters, the epilogue
// launch, through cudaLaunchKernelEx on the group's device (made current) and the given stream.
// Torch-free, over the runtime interface of cuda_api.h: compiled by nvcc into the extension
// (optim.cu checks and groups the tensors, then calls launch_group) and executed by the CPU SIMT
// harness of tests/simt against a described GPU (tests/simt/optim_simt.cpp,
// tests/simt_modes/optim_modes_simt.cpp).
#pragma once
#include <cstdint>
#include <vector>

#include "cuda/cuda_api.h"
#include "cuda/optim_kernels.cuh"

namespace fastreg {
namespace optim_cuda {

struct NoBatchObserver {
  void operator()(int32_t) const {}
};

// Tensor i of the group: ptr(l, i) for its kLists lists, numel(i) elements, (*counters)[i] (or no
// counters: no epilogue). on_batch(tensors in the batch) is called per batch before its launches.
template <int kLists, typename Hyper, typename PtrAt, typename NumelAt, typename MainKernel, typename EpilogueKernel,
          typename OnBatch = NoBatchObserver>
void launch_group(const char* op, int dev, cudaStream_t stream, int64_t n, PtrAt ptr, NumelAt numel,
                  const std::vector<void*>* counters, const Hyper& h, const DeviceScalars& sc, MainKernel main,
                  EpilogueKernel epilogue, uint64_t sr_seed = 0, OnBatch on_batch = OnBatch()) {
  cuda_api::DeviceScope scope(dev);
  for_each_launch<kLists>(
      n, ptr, numel, counters, h, sc,
      [&](const Args<kLists, Hyper>& args, int32_t chunks) {
        on_batch(args.batch.count);
        if (chunks > 0) {
          const cudaLaunchConfig_t cfg =
              cuda_api::launch_config(dim3(static_cast<unsigned>(chunks)), dim3(kThreads), 0, stream);
          cuda_api::check(cudaLaunchKernelEx(&cfg, main, args), op);
          cuda_api::check(cudaGetLastError(), op);
        }
        if (counters != nullptr) {
          const cudaLaunchConfig_t cfg = cuda_api::launch_config(
              dim3(static_cast<unsigned>(epilogue_blocks(args.batch.count))), dim3(kThreads), 0, stream);
          cuda_api::check(cudaLaunchKernelEx(&cfg, epilogue, args), op);
          cuda_api::check(cudaGetLastError(), op);
        }
      },
      sr_seed);
}

}  // namespace optim_cuda
}  // namespace fastreg
