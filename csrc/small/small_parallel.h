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

// Runs `pass(args, row_begin, row_end)` over the rows, in parallel blocks when the work pays for
// it, each block accumulating its own grad_W / grad_b that are summed at the end. Returns the sum
// of the passes' results.
template <typename T, typename Args, typename Pass>
double small_rows_parallel(Args a, Pass pass) {
  const int64_t work = a.n * a.D * a.V;
  const int64_t blocks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(work / kSmallParallelWork, 1));
  if (blocks <= 1 || at::in_parallel_region()) return pass(a, 0, a.n);
  const bool partial = a.grad_w || a.grad_b;
  const int64_t stride = a.V * a.D + a.V;
  at::Tensor scratch = partial ? at::zeros({blocks, stride}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))
                           : at::Tensor();
  std::vector<double> totals(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      Args part = a;
      if (partial) {
        T* base = scratch.data_ptr<T>() + blk * stride;
        if (a.grad_w) part.grad_w = base;
        if (a.grad_b) part.grad_b = base + a.V * a.D;
      }
      totals[blk] = pass(part, a.n * blk / blocks, a.n * (blk + 1) / blocks);
    }
  });
  if (partial) {
    const at::Tensor sum = scratch.sum(0);
    const T* s = sum.data_ptr<T>();
    if (a.grad_w)
      for (int64_t k = 0; k < a.V * a.D; ++k) a.grad_w[k] += s[k];
    if (a.grad_b)
      for (int64_t k = 0; k < a.V; ++k) a.grad_b[k] += s[a.V * a.D + k];
  }
  double total = 0;
  for (double t : totals) total += t;
  return total;
}

}  // namespace small
}  // namespace fastreg
