// A small CUDA runtime over the CPU SIMT harness (simt.h), header-only, so that fastreg's real host
// launch code (csrc/cuda/*_launch.h, through csrc/cuda/cuda_api.h) runs unchanged in CI:
// device queries, function attributes, the cluster-occupancy query, cudaLaunchKernelEx with its
// cluster attribute, streams and the current device.
//
// Devices (described, not detected; the index is the CUDA device index):
//   0 "h100"                H100 SXM: 132 SMs, 227 KiB opt-in shared memory, sm_90, clusters
//   1 "a100"                A100: 108 SMs, 163 KiB opt-in shared memory, sm_80, no clusters
//   2 "h100-unplaceable"    an H100 on which no cluster can be resident (cudaOccupancyMaxActiveClusters
//                           answers 0, e.g. while other work holds the GPCs)
//   3 "h100-flaky"          an H100 whose first cluster-occupancy query in the process fails with
//                           an error (a transient failure, not an answer), then answers normally
//
// Launch rules applied as the hardware does (a violation returns the error CUDA returns and keeps
// a message saying why, shown by cudaGetErrorString):
//   - static + dynamic shared memory <= 48 KiB unless cudaFuncAttributeMaxDynamicSharedMemorySize
//     was raised (on the current device) to at least the dynamic size; and static + dynamic <=
//     the device's opt-in maximum (the attribute itself cannot exceed opt-in - static);
//   - block: 1..1024 threads, and at most the kernel's __launch_bounds__ maximum;
//   - grid: x < 2^31, y, z < 2^16;
//   - clusters: only on a device with cluster launch; size <= 8 unless
//     cudaFuncAttributeNonPortableClusterSizeAllowed was set (then <= 16); grid.x a multiple;
//   - the stream belongs to the current device.
// What the compiler knows (a kernel's static shared memory and launch bounds) is declared by the
// harness that launches it (register_kernel): a kernel launched without a declaration fails.
// A launch that passes the rules runs on the SIMT runtime with the schedule the harness set
// (set_execution), every launch of a call with its own seed, and is logged (launch_log).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "simt.h"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrClusterLaunch = 120,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12,
};

struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  size_t constSizeBytes = 0;
  size_t localSizeBytes = 0;
  int maxThreadsPerBlock = 0;
  int numRegs = 0;
  int ptxVersion = 0;
  int binaryVersion = 0;
  int cacheModeCA = 0;
  int maxDynamicSharedSizeBytes = 0;
};

namespace simt_cudart {
struct Stream {
  int device;
};
}  // namespace simt_cudart
using cudaStream_t = simt_cudart::Stream*;

enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
// The fields CUDA names gridDim/blockDim are grid/block here (simt.h defines those names as the
// kernels' built-in variables); launchers fill the struct with fastreg::cuda_api::launch_config.
struct cudaLaunchConfig_t {
  dim3 grid;
  dim3 block;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};

namespace simt_cudart {

struct DeviceSpec {
  const char* name;
  int sms;
  int smem_optin;
  int cc;
  bool clusters;
  int occupancy_failures;  // cluster-occupancy queries that fail before the first answer
  bool clusters_placeable;
};

inline const std::vector<DeviceSpec>& devices() {
  static const std::vector<DeviceSpec> d = {
      {"h100", 132, 232448, 90, true, 0, true},
      {"a100", 108, 166912, 80, false, 0, true},
      {"h100-unplaceable", 132, 232448, 90, true, 0, false},
      {"h100-flaky", 132, 232448, 90, true, 1, true},
  };
  return d;
}

inline int device_index(const std::string& name) {
  for (size_t i = 0; i < devices().size(); ++i)
    if (name == devices()[i].name) return static_cast<int>(i);
  throw simt::Error("unknown device description '" + name + "' (h100, a100, h100-unplaceable, h100-flaky)");
}

// What the compiler knows about a kernel.
struct KernelFacts {
  std::string name;
  size_t static_smem = 0;
  int max_threads = 1024;  // __launch_bounds__ maximum (1024 without)
  int tag = 0;             // harness data (e.g. which variant of a kernel template)
};

struct LaunchRecord {
  std::string kernel;
  int tag = 0;
  int device = 0;
  dim3 grid, block;
  size_t dynamic_smem = 0;
  unsigned cluster = 1;
};

struct State {
  std::mutex mu;
  std::map<const void*, KernelFacts> kernels;
  std::map<std::pair<const void*, int>, int> max_dynamic_smem;  // (kernel, device) -> attribute
  std::map<std::pair<const void*, int>, bool> non_portable;     // (kernel, device) -> attribute
  std::vector<int> occupancy_failures_left;
  std::vector<Stream> streams;
  std::vector<std::string> warnings;
  std::vector<LaunchRecord> log;
  simt::Schedule schedule = simt::Schedule::kForward;
  uint64_t seed = 0;
};

inline State& state() {
  static State s;
  static std::once_flag once;
  std::call_once(once, [] {
    for (const DeviceSpec& d : devices()) {
      s.occupancy_failures_left.push_back(d.occupancy_failures);
      s.streams.push_back(Stream{static_cast<int>(s.streams.size())});
    }
  });
  return s;
}

// The running thread's current device and last error (as the CUDA runtime's, per host thread).
inline int& current_device() {
  static thread_local int d = 0;
  return d;
}
struct LastError {
  cudaError_t code = cudaSuccess;
  std::string why;
};
inline LastError& last_error() {
  static thread_local LastError e;
  return e;
}
inline cudaError_t fail(cudaError_t code, const std::string& why) {
  last_error() = LastError{code, why};
  return code;
}

template <typename F>
void register_kernel(F* kernel, KernelFacts facts) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.kernels[reinterpret_cast<const void*>(kernel)] = std::move(facts);
}

// The default stream of a described device.
inline cudaStream_t stream(int dev) { return &state().streams.at(static_cast<size_t>(dev)); }

// How the next launches execute; clears the launch log.
inline void set_execution(simt::Schedule schedule, uint64_t seed) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.schedule = schedule;
  s.seed = seed;
  s.log.clear();
}
inline std::vector<LaunchRecord> launch_log() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.log;
}
inline void record_warning(const std::string& msg) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.warnings.push_back(msg);
}
// The warnings recorded so far (and forgets them).
inline std::vector<std::string> take_warnings() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  std::vector<std::string> w;
  w.swap(s.warnings);
  return w;
}

inline bool valid_device(int dev) { return dev >= 0 && static_cast<size_t>(dev) < devices().size(); }

// The launch rules; cudaSuccess and the kernel's facts, or the error with its reason.
inline cudaError_t check_launch(const void* kernel, const cudaLaunchConfig_t& cfg, KernelFacts* facts,
                                unsigned* cluster_out) {
  State& s = state();
  const int dev = current_device();
  const DeviceSpec& d = devices()[static_cast<size_t>(dev)];
  std::lock_guard<std::mutex> lock(s.mu);
  auto k = s.kernels.find(kernel);
  if (k == s.kernels.end()) return fail(cudaErrorInvalidDeviceFunction, "a kernel the harness has not declared");
  *facts = k->second;
  const std::string who = "kernel " + facts->name + " on device " + std::to_string(dev) + " (" + d.name + ")";
  if (cfg.stream != nullptr && cfg.stream->device != dev) {
    return fail(cudaErrorInvalidResourceHandle, who + ": the stream belongs to device " +
                                                    std::to_string(cfg.stream->device) + ", not the current device");
  }
  const uint64_t threads = static_cast<uint64_t>(cfg.block.x) * cfg.block.y * cfg.block.z;
  if (threads == 0 || threads > 1024 || cfg.block.z > 64) {
    return fail(cudaErrorInvalidConfiguration, who + ": a block of " + std::to_string(threads) + " threads");
  }
  if (threads > static_cast<uint64_t>(facts->max_threads)) {
    return fail(cudaErrorInvalidValue, who + ": a block of " + std::to_string(threads) +
                                           " threads exceeds its __launch_bounds__ of " +
                                           std::to_string(facts->max_threads));
  }
  if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 || cfg.grid.x > 0x7fffffffu ||
      cfg.grid.y > 65535 || cfg.grid.z > 65535) {
    return fail(cudaErrorInvalidConfiguration, who + ": grid (" + std::to_string(cfg.grid.x) + ", " +
                                                   std::to_string(cfg.grid.y) + ", " +
                                                   std::to_string(cfg.grid.z) + ") outside the limits");
  }
  const size_t total = facts->static_smem + cfg.dynamicSmemBytes;
  auto granted = s.max_dynamic_smem.find({kernel, dev});
  const size_t dyn_limit = granted == s.max_dynamic_smem.end() ? 48 * 1024 - facts->static_smem
                                                               : static_cast<size_t>(granted->second);
  if (cfg.dynamicSmemBytes > dyn_limit || (total > 48 * 1024 && granted == s.max_dynamic_smem.end())) {
    return fail(cudaErrorInvalidValue,
                who + ": static " + std::to_string(facts->static_smem) + " + dynamic " +
                    std::to_string(cfg.dynamicSmemBytes) + " bytes of shared memory exceed " +
                    (granted == s.max_dynamic_smem.end()
                         ? std::string("the 48 KiB default (cudaFuncAttributeMaxDynamicSharedMemorySize not raised)")
                         : "the raised cudaFuncAttributeMaxDynamicSharedMemorySize of " +
                               std::to_string(granted->second) + " bytes"));
  }
  if (total > static_cast<size_t>(d.smem_optin)) {
    return fail(cudaErrorInvalidValue, who + ": " + std::to_string(total) +
                                           " bytes of shared memory exceed the opt-in maximum of " +
                                           std::to_string(d.smem_optin));
  }
  unsigned cluster = 1;
  for (unsigned i = 0; i < cfg.numAttrs; ++i) {
    if (cfg.attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& c = cfg.attrs[i].val.clusterDim;
      if (c.y != 1 || c.z != 1) return fail(cudaErrorNotSupported, who + ": clusters along y/z are not emulated");
      cluster = c.x;
    }
  }
  if (cluster == 0) return fail(cudaErrorInvalidValue, who + ": a cluster of 0 blocks");
  if (cluster > 1 || cfg.numAttrs > 0) {
    if (!d.clusters) return fail(cudaErrorNotSupported, who + ": thread-block clusters need sm_90 cluster launch");
    const bool np = s.non_portable.count({kernel, dev}) > 0 && s.non_portable[{kernel, dev}];
    const unsigned max_cluster = np ? 16 : 8;
    if (cluster > max_cluster) {
      return fail(cudaErrorInvalidValue, who + ": a cluster of " + std::to_string(cluster) + " blocks exceeds " +
                                             std::to_string(max_cluster) +
                                             (np ? "" : " (non-portable sizes not allowed)"));
    }
    if (cfg.grid.x % cluster != 0) {
      return fail(cudaErrorInvalidValue, who + ": grid.x " + std::to_string(cfg.grid.x) +
                                             " is not a multiple of the cluster size " + std::to_string(cluster));
    }
  }
  *cluster_out = cluster;
  return cudaSuccess;
}

}  // namespace simt_cudart

// ---- the runtime API ------------------------------------------------------------------------------
inline const char* cudaGetErrorString(cudaError_t e) {
  static thread_local std::string text;
  const simt_cudart::LastError& l = simt_cudart::last_error();
  text = "CUDA error " + std::to_string(static_cast<int>(e)) + (l.code == e && !l.why.empty() ? ": " + l.why : "");
  return text.c_str();
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = simt_cudart::last_error().code;
  simt_cudart::last_error().code = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return simt_cudart::last_error().code; }

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = simt_cudart::current_device();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int dev) {
  if (!simt_cudart::valid_device(dev)) return simt_cudart::fail(cudaErrorInvalidDevice, "no such device");
  simt_cudart::current_device() = dev;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (!simt_cudart::valid_device(dev)) return simt_cudart::fail(cudaErrorInvalidDevice, "no such device");
  const simt_cudart::DeviceSpec& d = simt_cudart::devices()[static_cast<size_t>(dev)];
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrMaxGridDimX:
      *value = 0x7fffffff;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = d.sms;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = d.cc / 10;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = d.cc % 10;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = d.smem_optin;
      return cudaSuccess;
    case cudaDevAttrClusterLaunch:
      *value = d.clusters ? 1 : 0;
      return cudaSuccess;
  }
  return simt_cudart::fail(cudaErrorInvalidValue, "a device attribute the harness does not describe");
}

inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* out, const void* kernel) {
  simt_cudart::State& s = simt_cudart::state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto k = s.kernels.find(kernel);
  if (k == s.kernels.end()) return simt_cudart::fail(cudaErrorInvalidDeviceFunction, "an undeclared kernel");
  const int dev = simt_cudart::current_device();
  *out = cudaFuncAttributes{};
  out->sharedSizeBytes = k->second.static_smem;
  out->maxThreadsPerBlock = k->second.max_threads;
  out->ptxVersion = simt_cudart::devices()[static_cast<size_t>(dev)].cc;  // built for every architecture
  out->binaryVersion = out->ptxVersion;
  auto g = s.max_dynamic_smem.find({kernel, dev});
  out->maxDynamicSharedSizeBytes = g == s.max_dynamic_smem.end() ? static_cast<int>(48 * 1024 - k->second.static_smem)
                                                                 : g->second;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* out, F* kernel) {
  return cudaFuncGetAttributes(out, reinterpret_cast<const void*>(kernel));
}

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  simt_cudart::State& s = simt_cudart::state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto k = s.kernels.find(kernel);
  if (k == s.kernels.end()) return simt_cudart::fail(cudaErrorInvalidDeviceFunction, "an undeclared kernel");
  const int dev = simt_cudart::current_device();
  const simt_cudart::DeviceSpec& d = simt_cudart::devices()[static_cast<size_t>(dev)];
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) + k->second.static_smem > static_cast<size_t>(d.smem_optin)) {
      return simt_cudart::fail(cudaErrorInvalidValue,
                               "cudaFuncAttributeMaxDynamicSharedMemorySize " + std::to_string(value) + " + static " +
                                   std::to_string(k->second.static_smem) + " exceeds the opt-in maximum of " +
                                   std::to_string(d.smem_optin));
    }
    s.max_dynamic_smem[{kernel, dev}] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    s.non_portable[{kernel, dev}] = value != 0;
    return cudaSuccess;
  }
  return simt_cudart::fail(cudaErrorInvalidValue, "a function attribute the harness does not describe");
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// As the driver: the launch rules first (an invalid configuration is an error, not "0 clusters"),
// then whether one cluster of that shape can be resident.
template <typename F>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, F* kernel, const cudaLaunchConfig_t* cfg) {
  *clusters = 0;
  simt_cudart::KernelFacts facts;
  unsigned k = 1;
  const cudaError_t e = simt_cudart::check_launch(reinterpret_cast<const void*>(kernel), *cfg, &facts, &k);
  if (e != cudaSuccess) return e;
  const int dev = simt_cudart::current_device();
  const simt_cudart::DeviceSpec& d = simt_cudart::devices()[static_cast<size_t>(dev)];
  {
    simt_cudart::State& s = simt_cudart::state();
    std::lock_guard<std::mutex> lock(s.mu);
    int& left = s.occupancy_failures_left[static_cast<size_t>(dev)];
    if (left > 0) {
      --left;
      return simt_cudart::fail(cudaErrorUnknown, "cudaOccupancyMaxActiveClusters failed (a transient error of " +
                                                     std::string(d.name) + ")");
    }
  }
  *clusters = d.clusters_placeable ? static_cast<int>(d.sms / 2 / k * 2) : 0;  // ~ GPCs' worth of SMs
  return cudaSuccess;
}

template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... args) {
  simt_cudart::KernelFacts facts;
  unsigned k = 1;
  const cudaError_t e = simt_cudart::check_launch(reinterpret_cast<const void*>(kernel), *cfg, &facts, &k);
  if (e != cudaSuccess) return e;
  simt::LaunchConfig lc;
  lc.grid = cfg->grid;
  lc.block = cfg->block;
  lc.dynamic_smem = cfg->dynamicSmemBytes;
  lc.cluster = k;
  {
    simt_cudart::State& s = simt_cudart::state();
    std::lock_guard<std::mutex> lock(s.mu);
    lc.schedule = s.schedule;
    lc.seed = s.seed + s.log.size();
    s.log.push_back(simt_cudart::LaunchRecord{facts.name, facts.tag, simt_cudart::current_device(), cfg->grid,
                                              cfg->block, cfg->dynamicSmemBytes, k});
  }
  simt::launch_kernel(lc, kernel, std::forward<A>(args)...);  // a kernel fault throws simt::Error
  return cudaSuccess;
}
