// A CPU SIMT runtime that executes fastreg's CUDA kernel source (csrc/cuda/*_kernels.cuh, compiled
// with FASTREG_SIMT by the host C++ compiler) thread by thread, for CI machines without a GPU.
//
// Model
// -----
// Every CUDA thread of a block is a fiber (ucontext) with its own stack, so a 512-thread block runs
// in one OS thread. A fiber runs until it reaches a synchronisation point (__syncthreads, a warp
// collective, cluster.sync()) or returns; the block's scheduler then picks the next runnable fiber
// by the launch's schedule:
//   forward   lowest thread index first (a warp runs ahead of the next one)
//   reverse   highest thread index first
//   shuffle   a fresh random order after every block-wide barrier (seeded)
// so code that relies on an order CUDA does not guarantee (a missing barrier, a race on shared
// memory) gives different results under different schedules. Warp collectives (__shfl_*_sync,
// __ballot_sync, __any/__all_sync, __syncwarp) complete when every lane of their mask has arrived
// with the same mask; the values are exchanged at that moment, so no lane can see a later value.
//
// Errors instead of hangs: a barrier that cannot complete (a thread exited or waits elsewhere, a
// lane of a mask exited, masks disagree, a lane outside the block) raises simt::Error naming the
// threads, as does __trap(). The launch throws after the whole grid has been abandoned.
//
// Memory: `__shared__` variables are thread_local (block scope: static per OS thread), and every
// block of a thread-block cluster runs on its own OS thread, so each block has its own copy;
// the blocks of a cluster run concurrently (interleaved at their barriers, one at a time, in the
// schedule's order). map_shared_rank() maps the address of a __shared__ variable (or of the
// dynamic shared memory) to the same variable of another block of the cluster. Dynamic shared
// memory and the global buffers the harness hands to kernels come from guarded_alloc(): the bytes
// end at a PROT_NONE page and are surrounded by canary bytes checked after the launch, so an
// out-of-bounds access faults (SIGSEGV, reported with the buffer's name) or fails the launch.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

// ---- CUDA spellings ------------------------------------------------------------------------------
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000  // the toolkit the real build uses: 32 KiB kernel parameters
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__ __restrict
// Block scope thread_local is static: one copy per OS thread, i.e. per running block.
#define __shared__ thread_local

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) float2 {
  float x, y;
};

namespace simt {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The indices of the running CUDA thread (valid inside a kernel only).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
int lane_id();

void sync_threads();
[[noreturn]] void trap(const char* what);
// A vector access of `bytes` bytes at p (the kernels' vector_load/vector_store): traps, naming the
// guarded buffer and the byte offset, unless p is `bytes`-aligned, as the GPU faults
// (cudaErrorMisalignedAddress) where x86 does not.
void check_vector_access(const void* p, size_t bytes, const char* what);
void* dynamic_shared_memory();

enum class CollectiveKind { kSync, kShuffle, kBallot };
// A warp collective over `mask`: returns the 64-bit payload of lane src_lane (kShuffle), the
// ballot of the lanes' predicates (kBallot), 0 (kSync).
uint64_t warp_collective(CollectiveKind kind, unsigned mask, uint64_t payload, int src_lane);

// Cluster (of the running block).
void cluster_sync();
unsigned cluster_block_rank();
unsigned cluster_num_blocks();
void* map_shared_rank(const void* addr, unsigned rank);

// ---- launches ------------------------------------------------------------------------------------
enum class Schedule { kForward, kReverse, kShuffle };
Schedule parse_schedule(const std::string& name);  // "forward" | "reverse" | "shuffle"

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t dynamic_smem = 0;
  unsigned cluster = 1;  // blocks per cluster along x (grid.x must be a multiple)
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
};

// Runs body() as every thread of the grid. Throws simt::Error on a barrier error, a trap or an
// out-of-bounds write into shared-memory canaries.
void launch(const LaunchConfig& cfg, const std::function<void()>& body);

template <typename... P, typename... A>
void launch_kernel(const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  launch(cfg, [&]() { kernel(args...); });
}

// ---- guarded buffers (global memory of the harness) ---------------------------------------------
// `bytes` bytes whose first byte has address == align_mod (mod 16), ending at (or at most 15 bytes
// before) a PROT_NONE page; the bytes around them up to the page boundaries are canaries.
void* guarded_alloc(size_t bytes, size_t align_mod, const char* name);
// Checks the canaries (throws simt::Error naming the buffer) and unmaps.
void guarded_free(void* p);
// Checks the canaries of every live guarded buffer; throws on damage.
void check_guards();

}  // namespace simt

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
constexpr int warpSize = 32;

inline void __syncthreads() { simt::sync_threads(); }
[[noreturn]] inline void __trap() { simt::trap("__trap() called"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::warp_collective(simt::CollectiveKind::kSync, mask, 0, 0);
}

namespace simt {
template <typename T>
inline T shuffle_from(unsigned mask, T v, int src) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of an unsupported type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_collective(CollectiveKind::kShuffle, mask, bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
// The lane range [base, base + width) of a lane's sub-warp segment.
inline int segment_base(int width) { return lane_id() & ~(width - 1); }
}  // namespace simt

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return simt::shuffle_from(mask, v, simt::segment_base(width) + (src & (width - 1)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = simt::lane_id();
  int src = lane ^ lane_mask;
  if (src >= simt::segment_base(width) + width) src = lane;  // outside the segment: own value
  return simt::shuffle_from(mask, v, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  const int src = lane + static_cast<int>(delta);
  return simt::shuffle_from(mask, v, src < simt::segment_base(width) + width ? src : lane);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  const int src = lane - static_cast<int>(delta);
  return simt::shuffle_from(mask, v, src >= simt::segment_base(width) ? src : lane);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(simt::warp_collective(simt::CollectiveKind::kBallot, mask, pred != 0, 0));
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- atomics (the blocks of a launch never run in parallel: plain read-modify-write) ------------
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old > v ? old : v;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = old < v ? old : v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ---- math intrinsics ------------------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
// expf, logf, tanhf, powf, sqrtf, ...: the C library's (declared by <cmath>).

// ---- bf16 / fp16 storage types, conversions round to nearest even (as the GPU's _rn) -------------
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet and NaN
    h.bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return h;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  h.bits = static_cast<uint16_t>(u >> 16);
  return h;
}

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t man = h.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: value man * 2^-24
    float f = std::ldexp(static_cast<float>(man), -24);
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  __half h;
  if (a > 0x7f800000u) {  // NaN
    h.bits = static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    return h;
  }
  if (a >= 0x477ff000u) {  // rounds to >= 65520: infinity
    h.bits = static_cast<uint16_t>(sign | 0x7c00u);
    return h;
  }
  if (a < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero, in units of 2^-24
    float mag;
    std::memcpy(&mag, &a, 4);
    const float scaled = mag * 16777216.0f;  // exact: a power-of-two scaling
    h.bits = static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)));  // ties to even
    return h;
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits to nearest even
  r -= 112u << 23;                              // rebias 127 -> 15
  h.bits = static_cast<uint16_t>(sign | (r >> 13));
  return h;
}

// ---- cooperative groups: the cluster of the running block ----------------------------------------
namespace cooperative_groups {
class cluster_group {
 public:
  void sync() const { simt::cluster_sync(); }
  unsigned block_rank() const { return simt::cluster_block_rank(); }
  unsigned num_blocks() const { return simt::cluster_num_blocks(); }
  template <typename T>
  T* map_shared_rank(T* addr, unsigned rank) const {
    return static_cast<T*>(simt::map_shared_rank(addr, rank));
  }
};
inline cluster_group this_cluster() { return cluster_group(); }
}  // namespace cooperative_groups
