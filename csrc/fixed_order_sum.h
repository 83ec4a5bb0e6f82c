// A full sum whose result does not depend on the thread count, for the fused losses' reductions
// (csrc/lce/lce.cpp, csrc/mse/mse.cpp). torch's CPU sum of a large tensor splits it by thread and
// adds the per-thread partials, so the same call gives other bits on another thread count. Here
// the blocks are fixed by the size alone: each block is summed in order (blocks in parallel), then
// the block sums in order, in double. Other devices keep torch's sum (a GPU reduction's order
// is fixed by its launch, not by a thread count).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>

#include <vector>

namespace fastreg {

constexpr int64_t kFixedSumBlock = 4096;

// The sum of every element of a floating-point tensor, as a 0-d tensor of its dtype.
inline at::Tensor fixed_order_sum(const at::Tensor& t) {
  if (!t.is_cpu()) return t.sum();
  const at::Tensor c = t.contiguous();
  const int64_t n = c.numel(), blocks = (n + kFixedSumBlock - 1) / kFixedSumBlock;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "fixed_order_sum", [&] {
    const scalar_t* v = c.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double s = 0;
        const int64_t end = std::min(n, (b + 1) * kFixedSumBlock);
        for (int64_t i = b * kFixedSumBlock; i < end; ++i) s += static_cast<double>(v[i]);
        partial[b] = s;
      }
    });
  });
  double total = 0;
  for (double s : partial) total += s;
  return at::scalar_tensor(total, c.options());
}

}  // namespace fastreg
