// Small kernels that check the SIMT runtime itself (tests/test_simt.py): the errors it must
// report instead of hanging, the order dependence its schedules expose, warp collectives with
// partial masks, clusters with distributed shared memory, and the bf16/fp16 conversions.
#include <cstdio>
#include <cstring>
#include <string>

#include "cuda/cuda_api.h"
#include "cuda/device_compat.cuh"
#include "simt.h"
#include "simt_cudart.h"
#include "simt_harness.h"

namespace {

__global__ void divergent_syncthreads(int* out) {
  if (threadIdx.x < 16) return;  // these threads never reach the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_with_exited_lane(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 20);
}

__global__ void half_warps(int* out) {  // two independent 16-lane groups, each summing its lanes
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u;
  int v = static_cast<int>(threadIdx.x);
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off);
  out[threadIdx.x] = v;
}

__global__ void ballot_odd(int* out) {
  out[threadIdx.x] = static_cast<int>(__ballot_sync(0xffffffffu, threadIdx.x & 1));
}

__global__ void missing_barrier(int* out) {  // thread 1 reads what thread 0 writes, unsynchronised
  __shared__ int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x == 0) flag = 1;
  if (threadIdx.x == 1) out[0] = flag;
}

__global__ void cluster_ring(int* out) {  // each block reads its right neighbour's shared word
  __shared__ int mine;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) mine = 100 + static_cast<int>(blockIdx.x);
  cluster.sync();
  if (threadIdx.x == 0) {
    const unsigned next = (cluster.block_rank() + 1) % cluster.num_blocks();
    out[blockIdx.x] = *cluster.map_shared_rank(&mine, next);
  }
  cluster.sync();
}

__global__ void cluster_block_exits(int* out) {
  namespace cg = cooperative_groups;
  if (cg::this_cluster().block_rank() == 1) return;
  cg::this_cluster().sync();
  out[0] = 1;
}

__global__ void traps(int*) {
  if (threadIdx.x == 3) __trap();
}

__global__ void dynamic_smem_overrun(int*) {  // 30 ints of dynamic shared memory
  int* s = static_cast<int*>(simt::dynamic_shared_memory());
  if (threadIdx.x == 29) s[threadIdx.x + 1] = 1;  // one int past the end (into the canary bytes)
}

__global__ void vector_load_at(int* out) {  // a 16-byte load at out + 1 (4 bytes past alignment)
  if (threadIdx.x == 0) out[0] = static_cast<int>(fastreg::vector_load<uint4>(out + 1).x);
}

// The launch rules of simt_cudart.h, one trivial kernel per case (attributes are per kernel and
// device, for the process). Returns the launch's error text, or "" when it ran.
template <int kCase>
__global__ void rule_kernel(int* out) {
  if (threadIdx.x == 0) out[0] = kCase;
}

template <int kCase>
std::string try_launch(int dev, size_t static_smem, int bounds, dim3 grid, dim3 block, size_t dyn, unsigned cluster,
                       int attr_smem, bool non_portable, int stream_dev, int* out) {
  simt_cudart::register_kernel(rule_kernel<kCase>, {"rule_kernel<" + std::to_string(kCase) + ">", static_smem, bounds, 0});
  fastreg::cuda_api::DeviceScope scope(dev);
  if (attr_smem > 0) {
    const cudaError_t e = cudaFuncSetAttribute(rule_kernel<kCase>, cudaFuncAttributeMaxDynamicSharedMemorySize, attr_smem);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  if (non_portable) (void)cudaFuncSetAttribute(rule_kernel<kCase>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  cudaLaunchConfig_t cfg = fastreg::cuda_api::launch_config(grid, block, dyn, simt_cudart::stream(stream_dev));
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, rule_kernel<kCase>, out);
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

// name -> the launch's error ("" if it ran)
std::string launch_rule(const std::string& n, int* out) {
  const int h100 = simt_cudart::device_index("h100"), a100 = simt_cudart::device_index("a100");
  const dim3 one(1), warp(32);
  if (n == "smem_default_limit") return try_launch<0>(h100, 1120, 1024, one, warp, 48 * 1024, 1, 0, false, h100, out);
  if (n == "smem_default_fits") return try_launch<1>(h100, 1120, 1024, one, warp, 48 * 1024 - 1120, 1, 0, false, h100, out);
  if (n == "smem_raised") return try_launch<2>(h100, 1120, 1024, one, warp, 48 * 1024, 1, 48 * 1024, false, h100, out);
  if (n == "smem_raised_too_little") return try_launch<3>(h100, 1120, 1024, one, warp, 60000, 1, 50000, false, h100, out);
  if (n == "smem_over_optin") return try_launch<4>(a100, 1120, 1024, one, warp, 166000, 1, 166000, false, a100, out);
  if (n == "raised_on_other_device") {  // the attribute is set on the A100; the launch is on the H100
    try_launch<5>(a100, 1120, 1024, one, warp, 0, 1, 60000, false, a100, out);
    return try_launch<5>(h100, 1120, 1024, one, warp, 60000, 1, 0, false, h100, out);
  }
  if (n == "block_over_launch_bounds") return try_launch<6>(h100, 0, 128, one, dim3(256), 0, 1, 0, false, h100, out);
  if (n == "block_over_1024") return try_launch<7>(h100, 0, 1024, one, dim3(2048), 0, 1, 0, false, h100, out);
  if (n == "grid_y_over_limit") return try_launch<8>(h100, 0, 1024, dim3(1, 70000), warp, 0, 1, 0, false, h100, out);
  if (n == "cluster_of_16") return try_launch<9>(h100, 0, 1024, dim3(16), warp, 0, 16, 0, false, h100, out);
  if (n == "cluster_of_16_non_portable") return try_launch<10>(h100, 0, 1024, dim3(16), warp, 0, 16, 0, true, h100, out);
  if (n == "cluster_on_a100") return try_launch<11>(a100, 0, 1024, dim3(2), warp, 0, 2, 0, false, a100, out);
  if (n == "grid_not_cluster_multiple") return try_launch<12>(h100, 0, 1024, dim3(6), warp, 0, 4, 0, false, h100, out);
  if (n == "stream_of_other_device") return try_launch<13>(h100, 0, 1024, one, warp, 0, 1, 0, false, a100, out);
  return "unknown launch rule " + n;
}

}  // namespace

// name: "launch_rule:<case>" (launch_rule above): out=... when it ran, else the error text.
extern "C" int simt_launch_rule(const char* name, char* msg, int msg_len) {
  int* out = static_cast<int*>(simt::guarded_alloc(64 * sizeof(int), 0, "out"));
  std::string err;
  try {
    err = launch_rule(name, out);
  } catch (const std::exception& e) {
    err = e.what();
  }
  const int value = out[0];
  simt::guarded_free(out);
  snprintf(msg, static_cast<size_t>(msg_len), "%s", err.empty() ? ("out=" + std::to_string(value)).c_str() : err.c_str());
  return err.empty() ? 0 : 1;
}

extern "C" int simt_selftest(const char* name, const char* schedule, char* msg, int msg_len) {
  int out[64] = {};
  simt::LaunchConfig cfg;
  cfg.grid = dim3(1);
  cfg.block = dim3(32);
  const std::string n(name);
  try {
    cfg.schedule = simt::parse_schedule(schedule);
    if (n == "divergent_syncthreads") {
      simt::launch_kernel(cfg, divergent_syncthreads, out);
    } else if (n == "shuffle_with_exited_lane") {
      simt::launch_kernel(cfg, shuffle_with_exited_lane, out);
    } else if (n == "shuffle_outside_mask") {
      simt::launch_kernel(cfg, shuffle_outside_mask, out);
    } else if (n == "half_warps") {
      simt::launch_kernel(cfg, half_warps, out);
    } else if (n == "ballot_odd") {
      simt::launch_kernel(cfg, ballot_odd, out);
    } else if (n == "missing_barrier") {
      simt::launch_kernel(cfg, missing_barrier, out);
    } else if (n == "cluster_ring") {
      cfg.grid = dim3(8);
      cfg.cluster = 4;
      simt::launch_kernel(cfg, cluster_ring, out);
    } else if (n == "cluster_block_exits") {
      cfg.grid = dim3(2);
      cfg.cluster = 2;
      simt::launch_kernel(cfg, cluster_block_exits, out);
    } else if (n == "traps") {
      simt::launch_kernel(cfg, traps, out);
    } else if (n == "misaligned_vector_load") {
      int* buf = static_cast<int*>(simt::guarded_alloc(64 * sizeof(int), 0, "vector_buffer"));
      try {
        simt::launch_kernel(cfg, vector_load_at, buf);
      } catch (...) {
        simt::guarded_free(buf);
        throw;
      }
      simt::guarded_free(buf);
    } else if (n == "dynamic_smem_overrun") {
      cfg.dynamic_smem = 30 * sizeof(int);
      simt::launch_kernel(cfg, dynamic_smem_overrun, out);
    } else {
      snprintf(msg, static_cast<size_t>(msg_len), "unknown self-test %s", name);
      return 2;
    }
  } catch (const std::exception& e) {
    snprintf(msg, static_cast<size_t>(msg_len), "%s", e.what());
    return 1;
  }
  std::string s = "out=";
  for (int i = 0; i < 32; ++i) s += (i ? "," : "") + std::to_string(out[i]);
  snprintf(msg, static_cast<size_t>(msg_len), "%s", s.c_str());
  return 0;
}

// bf16 (kind 1) / fp16 (kind 2): float -> bits with round-to-nearest-even, and bits -> float.
extern "C" void simt_convert(const float* in, uint16_t* bits, float* back, int64_t n, int32_t kind) {
  for (int64_t i = 0; i < n; ++i) {
    if (kind == kSimtBF16) {
      const __nv_bfloat16 h = __float2bfloat16_rn(in[i]);
      bits[i] = h.bits;
      back[i] = __bfloat162float(h);
    } else {
      const __half h = __float2half_rn(in[i]);
      bits[i] = h.bits;
      back[i] = __half2float(h);
    }
  }
}
