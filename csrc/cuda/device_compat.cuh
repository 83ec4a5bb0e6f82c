// What fastreg's kernel headers (csrc/cuda/*_kernels.cuh) need from CUDA, in one place, so that the
// same kernel source compiles two ways:
//   nvcc                      the CUDA headers (the real build, scripts/cuda_check.py)
//   host C++ with FASTREG_SIMT tests/simt/simt.h, the CPU SIMT runtime that executes the kernels
//                             thread by thread in CI (tests/test_simt.py)
// Portable spellings used by the kernels:
//   FASTREG_DYNAMIC_SMEM(T)   the block's dynamic shared memory as a T*
//   FASTREG_CLUSTER_CODE      1 where thread-block cluster code is compiled (sm_90+, or the runtime)
//   vector_load<V>(p), vector_store(p, v)
//                             every vector access of global memory (V = uint4, ...): a plain
//                             sizeof(V)-byte access under nvcc, which faults
//                             (cudaErrorMisalignedAddress) unless p is sizeof(V)-aligned; the
//                             runtime checks that alignment on every access and traps naming the
//                             buffer and offset, so a misaligned access fails on the CPU too.
#pragma once

#if defined(FASTREG_SIMT)
#include "simt.h"
namespace fastreg {
template <typename T>
inline T* dynamic_smem() {
  return static_cast<T*>(simt::dynamic_shared_memory());
}
template <typename V>
inline V vector_load(const void* p) {
  simt::check_vector_access(p, sizeof(V), "load");
  return *static_cast<const V*>(p);
}
template <typename V>
inline void vector_store(void* p, const V& v) {
  simt::check_vector_access(p, sizeof(V), "store");
  *static_cast<V*>(p) = v;
}
}  // namespace fastreg
#define FASTREG_CLUSTER_CODE 1
#else
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
namespace fastreg {
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ uint4 fastreg_dynamic_smem[];
  return reinterpret_cast<T*>(fastreg_dynamic_smem);
}
template <typename V>
__device__ __forceinline__ V vector_load(const void* p) {
  return *static_cast<const V*>(p);
}
template <typename V>
__device__ __forceinline__ void vector_store(void* p, const V& v) {
  *static_cast<V*>(p) = v;
}
}  // namespace fastreg
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FASTREG_CLUSTER_CODE 1
#else
#define FASTREG_CLUSTER_CODE 0
#endif
#endif
