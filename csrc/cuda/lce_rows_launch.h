// Host launch code of fastreg's CUDA row pass: device description, launch plan (lce_rows_plan.h),
// function attributes, the cluster-occupancy query and its cache, and cudaLaunchKernelEx with the
// cluster attribute, on the current device and the given stream. Torch-free, over the runtime
// interface of cuda_api.h, so that the same source is compiled by nvcc into the extension
// (lce_rows.cu checks the tensors, then calls launch_rows) and executed by the CPU SIMT harness of
// tests/simt against described H100/A100s (tests/simt/lce_rows_simt.cpp).
//
// Shared memory: a kernel may use 48 KiB of static + dynamic shared memory by default; more needs
// cudaFuncAttributeMaxDynamicSharedMemorySize raised to at least the dynamic size (per kernel and
// device). The attribute is raised for every dynamic size not yet granted, so that the kernel's own
// static shared memory never has to be guessed.
// Clusters: whether a cluster shape can be resident is asked once per (kernel, device, K, threads,
// shared memory) through cudaOccupancyMaxActiveClusters. Only answers are cached (0: the launch
// falls back to one CTA per row, for the process); a query that fails with an error falls back for
// that launch only, warns once per process, and is asked again next time.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "cuda/cuda_api.h"
#include "cuda/lce_rows_kernels.cuh"
#include "cuda/lce_rows_plan.h"

namespace fastreg {
namespace lce_cuda {

constexpr int kMaxDevices = 64;

// The device description of the planner (lce_rows_plan.h), queried once per device.
inline const DeviceDesc& device_desc(int dev) {
  static std::mutex mu;
  static DeviceDesc cache[kMaxDevices];
  static bool filled[kMaxDevices] = {};
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("fastreg::_lce_rows: unsupported CUDA device index");
  std::lock_guard<std::mutex> lock(mu);
  if (!filled[dev]) {
    DeviceDesc d;
    int cl = 0, major = 0, minor = 0, optin = 0;
    cuda_api::check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    cuda_api::check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                    "cudaDeviceGetAttribute");
    cuda_api::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
    cuda_api::check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
    cuda_api::check(cudaDeviceGetAttribute(&cl, cudaDevAttrClusterLaunch, dev), "cudaDeviceGetAttribute");
    d.smem_optin = optin;
    d.cc = major * 10 + minor;
    d.clusters = cl != 0 && major >= 9;
    cache[dev] = d;
    filled[dev] = true;
  }
  return cache[dev];
}

// Per-launch-configuration facts, cached: whether such clusters can be resident at all.
struct LaunchKey {
  const void* kernel;
  int dev, K, threads;
  size_t smem;
  bool operator<(const LaunchKey& o) const {
    return std::tie(kernel, dev, K, threads, smem) < std::tie(o.kernel, o.dev, o.K, o.threads, o.smem);
  }
};

inline void warn_failed_occupancy_query_once(const std::string& why, int K) {
  static std::once_flag once;
  std::call_once(once, [&] {
    cuda_api::warn("fastreg::_lce_rows: cudaOccupancyMaxActiveClusters failed (" + why + "); this launch uses one " +
                   "CTA per row instead of a cluster of " + std::to_string(K) +
                   ", and the query is asked again next time (warned once per process)");
  });
}

// Launches one variant of the kernel on the current device; false when the cluster shape cannot be
// placed (the caller falls back to one CTA per row).
template <typename T, bool CACHED, bool CLUSTER>
bool launch_variant(const RowArgs& a, int dev, cudaStream_t stream, int threads, size_t smem) {
  auto kernel = lce_rows_kernel<T, CACHED, CLUSTER>;
  static std::mutex mu;
  static std::map<LaunchKey, bool> placeable;  // per configuration: the occupancy query's answer
  static size_t granted[kMaxDevices] = {};     // per device: the dynamic shared memory granted so far
  const unsigned int grid = static_cast<unsigned int>(a.rows * (CLUSTER ? a.K : 1));
  cudaLaunchConfig_t cfg = cuda_api::launch_config(dim3(grid, 1, 1), dim3(threads, 1, 1), smem, stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned int>(a.K);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = CLUSTER ? 1 : 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (smem > granted[dev]) {
      // a function attribute, not stream work: fine during CUDA-graph capture
      cuda_api::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                      "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
      granted[dev] = smem;
    }
    if constexpr (CLUSTER) {
      const LaunchKey key{reinterpret_cast<const void*>(kernel), dev, a.K, threads, smem};
      auto it = placeable.find(key);
      if (it == placeable.end()) {
        // Ask once whether such clusters can be resident at all (no stream work, no sync), so
        // that an impossible configuration falls back instead of failing the launch.
        int max_clusters = 0;
        const cudaError_t e = cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg);
        if (e != cudaSuccess) {
          const std::string why = cudaGetErrorString(e);
          (void)cudaGetLastError();  // clear the query's error
          warn_failed_occupancy_query_once(why, a.K);
          return false;
        }
        it = placeable.emplace(key, max_clusters > 0).first;
      }
      if (!it->second) return false;
    }
  }
  cuda_api::check(cudaLaunchKernelEx(&cfg, kernel, a), "fastreg::_lce_rows: kernel launch");
  cuda_api::check(cudaGetLastError(), "fastreg::_lce_rows: kernel launch");
  return true;
}

// Whether the cluster variants of the kernel hold real sm_90+ code on this device. A build without
// sm_90 SASS runs JIT-compiled compute_8x PTX on an H100, where those variants are only __trap().
template <typename T>
bool cluster_code_present(int dev) {
  static std::mutex mu;
  static int8_t cache[kMaxDevices] = {};  // 0 unknown, 1 yes, -1 no
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

// Plans and launches the row pass over a.rows rows on device `dev` (made current for the call) and
// `stream`. policy: FASTREG_LCE_ROWS_MODE's (lce_rows.cu), or a strategy forced by the harness.
template <typename T>
void launch_rows(RowArgs a, int dev, cudaStream_t stream, const RowPolicy& policy) {
  constexpr int VEC = Pack<T>::N;
  cuda_api::DeviceScope scope(dev);
  DeviceDesc d = device_desc(dev);
  if (d.clusters && !cluster_code_present<T>(dev)) d.clusters = false;
  const int64_t nvec = a.V / VEC;  // upper bound on any row's vector count
  const RowPlan p = plan_rows(d, a.rows, nvec, a.write_grad, row_static_smem<T>(), policy);
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

}  // namespace lce_cuda
}  // namespace fastreg
