// Splitting a small-problem pass (csrc/small/small_dense.h) over threads, for the ops' CPU
// small paths (csrc/lce/lce.cpp, csrc/mse/mse.cpp). Unlike small_dense.h this uses ATen (its
// thread pool and one scratch tensor), so the allocation-free kernels stay free of it.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace fastreg {
namespace small {

// Below this many multiply-adds a batch runs on the calling thread: a parallel region costs more.
constexpr int64_t kSmallParallelWork = int64_t(1) << 19;
// The rows are split into blocks by the work alone, never by the thread count, so the sums come
// out the same on any number of threads; a few more blocks than threads cost one more partial
// grad_W each (V x D, small here). Capped so that the partials stay within kSmallScratchBytes.
constexpr int64_t kSmallMaxBlocks = 16;
constexpr int64_t kSmallScratchBytes = int64_t(16) << 20;
// grad_W / grad_b are summed over at most this many rows in one running sum, then added to the
// block's total: a serial float sum over N rows loses ~N ulps, two levels ~(512 + N / 512)
// (measured at 20000 x 40 x 8 fp32: grad_W error 4e-4 in one sum, eager's GEMM 4e-5).
constexpr int64_t kSmallSumRows = 512;

// Runs `pass(args, row_begin, row_end)` over the rows, in parallel blocks when the work pays for
// it (their number set by the work, not the threads), each block accumulating its own grad_W / grad_b that are summed at the end; within a block,
// rows go in runs of kSmallSumRows with their own partial sums. Returns the sum of the passes'
// results.
template <typename T, typename Args, typename Pass>
double small_rows_parallel(Args a, Pass pass) {
  const int64_t work = a.n * a.D * a.V;
  const bool partial = a.grad_w || a.grad_b;
  const int64_t by_memory = partial ? kSmallScratchBytes / (2 * int64_t(sizeof(T)) * (a.V * a.D + a.V)) : kSmallMaxBlocks;
  int64_t blocks = std::clamp<int64_t>(std::min(work / kSmallParallelWork, by_memory), 1, kSmallMaxBlocks);
  if (at::in_parallel_region()) blocks = 1;
  const bool runs = partial && a.n > kSmallSumRows;
  if (blocks <= 1 && !runs) return pass(a, 0, a.n);
  const int64_t stride = a.V * a.D + a.V;
  // per block: its total (when several blocks) and its run's partial sum (when rows go in runs)
  const int64_t total_at = 0, run_at = blocks > 1 ? stride : 0;
  const int64_t per_block = (blocks > 1 ? stride : 0) + (runs ? stride : 0);
  at::Tensor scratch = partial ? at::zeros({blocks, per_block}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))
                               : at::Tensor();
  std::vector<double> totals(blocks, 0.0);
  auto run_block = [&](int64_t blk) {
    T* base = partial ? scratch.data_ptr<T>() + blk * per_block : nullptr;
    T* total_w = blocks > 1 ? base + total_at : a.grad_w;
    T* total_b = blocks > 1 ? base + total_at + a.V * a.D : a.grad_b;
    const int64_t r0 = a.n * blk / blocks, r1 = a.n * (blk + 1) / blocks;
    double sum = 0;
    for (int64_t q0 = r0; q0 < r1; q0 += runs ? kSmallSumRows : r1 - r0) {
      const int64_t q1 = runs ? std::min(q0 + kSmallSumRows, r1) : r1;
      Args part = a;
      T* run = runs ? base + run_at : nullptr;
      if (runs) std::fill(run, run + stride, T(0));
      if (a.grad_w) part.grad_w = runs ? run : total_w;
      if (a.grad_b) part.grad_b = runs ? run + a.V * a.D : total_b;
      sum += pass(part, q0, q1);
      if (runs) {
        if (a.grad_w)
          for (int64_t k = 0; k < a.V * a.D; ++k) total_w[k] += run[k];
        if (a.grad_b)
          for (int64_t k = 0; k < a.V; ++k) total_b[k] += run[a.V * a.D + k];
      }
    }
    totals[blk] = sum;
  };
  if (blocks <= 1) {
    run_block(0);
  } else {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) run_block(blk);
    });
    if (partial) {
      const at::Tensor sum = scratch.narrow(1, total_at, stride).sum(0);
      const T* s = sum.data_ptr<T>();
      if (a.grad_w)
        for (int64_t k = 0; k < a.V * a.D; ++k) a.grad_w[k] += s[k];
      if (a.grad_b)
        for (int64_t k = 0; k < a.V; ++k) a.grad_b[k] += s[a.V * a.D + k];
    }
  }
  double total = 0;
  for (double t : totals) total += t;
  return total;
}

}  // namespace small
}  // namespace fastreg
