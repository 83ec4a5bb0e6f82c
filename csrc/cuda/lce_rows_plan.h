// The launch plan of fastreg's CUDA row pass (csrc/cuda/lce_rows.cu): plain C++ of a device
// description, shared by the real launcher and the CPU SIMT harness (tests/simt), so that the plans
// for an H100 and an A100 are executed and tested on any machine.
//
// A plan says how many CTAs share a row (K = 1, or a thread-block cluster of 2/4/8 on sm_90+),
// whether each CTA keeps its slice of the row in dynamic shared memory between the two passes
// ("cached") or re-reads it ("streaming"), the CTA size and the dynamic shared memory.
//   cached:    the smallest K in {1,2,4,8} whose slice fits 96 KiB (2 CTAs per SM), else the
//              smallest that fits the opt-in maximum; none fits (or no gradient): streaming.
//   few rows:  with clusters, K doubles while rows * K < 2 * SMs and each CTA keeps >= 512 vectors.
//   threads:   128/256/512 by the slice's vector count.
// A forced strategy (tests, benchmarks, FASTREG_LCE_ROWS_MODE) narrows the choice.
#pragma once
#include <cstdint>
#include <string>

namespace fastreg {
namespace lce_cuda {

// What the planner needs to know about a GPU.
struct DeviceDesc {
  int sms = 0;
  int64_t smem_optin = 0;  // max dynamic + static shared memory per block (opt-in)
  int cc = 0;              // compute capability, major * 10 + minor
  bool clusters = false;   // cluster launch supported (and the cluster kernels hold sm_90+ code)
};

// Restrictions of the automatic choice. force_k > 0 / force_cached >= 0 pin K / the mode outright
// (the caller makes sure the forced plan is launchable, e.g. a cluster only on sm_90).
struct RowPolicy {
  bool no_cache = false;    // never cache the row (pass 2 re-reads global memory)
  bool no_cluster = false;  // never split a row over a cluster
  int force_k = 0;
  int force_cached = -1;
};

// FASTREG_LCE_ROWS_MODE: "stream" | "nocluster" | "single" (both); anything else: automatic.
inline RowPolicy policy_from_mode(const char* mode) {
  RowPolicy p;
  if (mode != nullptr) {
    const std::string m(mode);
    p.no_cache = m == "stream" || m == "single";
    p.no_cluster = m == "nocluster" || m == "single";
  }
  return p;
}

struct RowPlan {
  int K = 1;
  bool cached = false;
  int threads = 128;
  int64_t smem = 0;  // dynamic shared memory per CTA, bytes
};

constexpr int kPlanMaxCluster = 8;          // portable cluster size limit
constexpr int64_t kPreferredSlice = 96 * 1024;  // keeps 2 CTAs per SM
constexpr int kPlanUnroll = 2;             // the kernel's kUnroll: 16-byte vectors in flight per thread

inline int threads_for(int64_t slice_vecs) {
  if (slice_vecs >= 4096) return 512;
  if (slice_vecs >= 1024) return 256;
  return 128;
}

// nvec_bound: an upper bound on any row's 16-byte vector count (V / vector width);
// static_smem: the kernel's static shared memory.
inline int64_t slice_vecs(int64_t nvec_bound, int K) { return (nvec_bound + K - 1) / K; }

inline RowPlan finish_plan(int K, bool cached, int64_t nvec_bound) {
  RowPlan p;
  p.K = K;
  p.cached = cached;
  p.threads = threads_for(slice_vecs(nvec_bound, K));
  p.smem = cached ? slice_vecs(nvec_bound, K) * 16 : 0;
  return p;
}

inline RowPlan plan_rows(const DeviceDesc& d, int64_t rows, int64_t nvec_bound, bool write_grad,
                         int64_t static_smem, const RowPolicy& pol) {
  const int64_t cache_cap = d.smem_optin - static_smem - 1024;
  const bool clusters = d.clusters && d.cc >= 90 && !pol.no_cluster;
  auto slice_bytes = [&](int k) { return slice_vecs(nvec_bound, k) * 16; };
  if (pol.force_k > 0 && pol.force_cached >= 0) return finish_plan(pol.force_k, pol.force_cached != 0, nvec_bound);

  int K = 1;
  bool cached = false;
  const bool may_cache = write_grad && nvec_bound > 0 && !pol.no_cache && pol.force_cached != 0;
  if (may_cache) {
    const int kmax = pol.force_k > 0 ? pol.force_k : (clusters ? kPlanMaxCluster : 1);
    const int kmin = pol.force_k > 0 ? pol.force_k : 1;
    int k_fit = 0;
    for (int k = kmin; k <= kmax && k_fit == 0; k *= 2)
      if (slice_bytes(k) <= kPreferredSlice && slice_bytes(k) <= cache_cap) k_fit = k;
    for (int k = kmin; k <= kmax && k_fit == 0; k *= 2)
      if (slice_bytes(k) <= cache_cap) k_fit = k;
    if (k_fit > 0) {
      K = k_fit;
      cached = true;
    }
  }
  if (pol.force_k > 0) {
    K = pol.force_k;
  } else if (clusters) {  // few long rows: split them over a cluster so that the whole GPU takes part
    while (K < kPlanMaxCluster && rows * K < 2LL * d.sms && slice_vecs(nvec_bound, K * 2) >= 2LL * 128 * kPlanUnroll)
      K *= 2;
  }
  return finish_plan(K, cached, nvec_bound);
}

// The fallback when a cluster cannot be placed: one CTA per row, cached only if the whole row fits.
inline RowPlan single_cta_fallback(const DeviceDesc& d, const RowPlan& p, int64_t nvec_bound, int64_t static_smem) {
  const int64_t cache_cap = d.smem_optin - static_smem - 1024;
  return finish_plan(1, p.cached && slice_vecs(nvec_bound, 1) * 16 <= cache_cap, nvec_bound);
}

// "single-cached", "single-streaming", "cluster4-cached", ...
inline std::string strategy_name(const RowPlan& p) {
  std::string s = p.K == 1 ? std::string("single") : "cluster" + std::to_string(p.K);
  return s + (p.cached ? "-cached" : "-streaming");
}

}  // namespace lce_cuda
}  // namespace fastreg
