// Small kernels that check the SIMT runtime itself (tests/test_simt.py): the errors it must
// report instead of hanging, the order dependence its schedules expose, warp collectives with
// partial masks, clusters with distributed shared memory, and the bf16/fp16 conversions.
#include <cstdio>
#include <cstring>
#include <string>

#include "simt.h"
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

}  // namespace

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
