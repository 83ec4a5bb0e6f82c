// fastreg::_fit_epoch: one epoch of mini-batch training of a linear model, entirely in C++ (the
// engine of MultinomialLogisticRegression.fit / LinearRegression.fit, fastreg/_fit.py).
//
// Data flow per batch (no allocation, no ATen call, no return to Python), one of two paths:
//   batch <= 2^21 multiply-adds, V <= 64:  the one-pass row kernels of csrc/small/small_dense.h:
//                          per row (read in place through the permutation) logits, loss, d loss/d
//                          logits, and the accumulated grad_W / grad_b; from 2^19 multiply-adds
//                          and 512 rows the rows are split over the threads (RowBlocks), each
//                          with its own grad_W / grad_b partial, summed after the region
//   otherwise:             gather the rows into a reused buffer; GEMM Z = x_b W^T (BLAS sgemm /
//                          dgemm when torch links one); + bias, loss and dZ in place; GEMM
//                          grad_W = dZ^T x_b; grad_b = column sums of dZ
// then every trainable parameter is updated with its param group's optimizer rule: the fused
// optimizers' own loops (csrc/optim/optim_cpu.cpp via fit/optim_spans.h), and the L1 proximal step
// (soft-threshold by lr * l1) on the weight.
// The epoch's permutation comes from Python (torch.randperm with the user's generator), so a fit
// draws exactly the random numbers of the same loop written in Python. Buffers are allocated once
// per call. With check_data, X and y are first checked (finite values, labels in range). Returns
// the epoch's mean batch loss, weighted by batch size (float64, 0-d).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fit/optim_spans.h"
#include "optim/optim_math.h"
#include "small/small_dense.h"

// Fortran BLAS of the library torch links (MKL, OpenBLAS), when it exports one; weak so that the
// extension still loads against a torch without it (the plain loops below are used then).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // MKL's C name of mkl_set_num_threads_local
}

namespace fastreg {
namespace fit {
namespace {

constexpr int64_t kCrossEntropy = 0, kMeanSquaredError = 1;
constexpr int64_t kSgd = 0, kAdam = 1;
constexpr int64_t kHyperPerParam = 8;

// ---- dense kernels on row-major arrays ---------------------------------------------------------

// Column-major BLAS call; false when no BLAS is linked or a size does not fit an int.
template <typename T>
bool blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
               T* c, int64_t ldc) {
  constexpr int64_t kIntMax = 2147483647;
  if (std::max({m, n, k, lda, ldb, ldc}) > kIntMax) return false;
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  const T one = 1, zero = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ == nullptr) return false;
    sgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &zero, c, &lc);
  } else {
    if (dgemm_ == nullptr) return false;
    dgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &zero, c, &lc);
  }
  return true;
}

// Batches below this many multiply-adds per product run their BLAS calls on one thread: waking a
// thread pool for a few microseconds of work costs more than it saves (far more on a loaded
// machine). Restores MKL's setting on exit.
constexpr int64_t kThreadedMinWork = int64_t(1) << 21;
constexpr int64_t kRowKernelMaxWork = int64_t(1) << 21;  // multiply-adds per batch product
struct SingleThreadedBlas {
  int previous = -1;
  explicit SingleThreadedBlas(bool on) {
    if (on && MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (previous >= 0) MKL_Set_Num_Threads_Local(previous);
  }
};

// z (b, V) = x (b, D) W^T, W (V, D).
template <typename T>
void linear_rows(const T* x, int64_t b, int64_t D, const T* W, int64_t V, T* z) {
  if (blas_gemm<T>('T', 'N', V, b, D, W, D, x, D, z, V)) return;
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t v = 0; v < V; ++v) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += x[i * D + d] * W[v * D + d];
      z[i * V + v] = acc;
    }
  }
}

// gW (V, D) = dz (b, V)^T x (b, D);  gb (V) = column sums of dz (gb may be nullptr).
template <typename T>
void linear_grads(const T* x, int64_t b, int64_t D, const T* dz, int64_t V, T* gW, T* gb) {
  if (!blas_gemm<T>('N', 'T', D, V, b, x, D, dz, V, gW, D)) {
    std::fill(gW, gW + V * D, T(0));
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t v = 0; v < V; ++v) {
        const T s = dz[i * V + v];
        T* row = gW + v * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) row[d] += s * x[i * D + d];
      }
    }
  }
  if (gb != nullptr) {
    std::fill(gb, gb + V, T(0));
    for (int64_t i = 0; i < b; ++i) {
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) gb[v] += dz[i * V + v];
    }
  }
}

// Softmax cross-entropy over the rows of z (b, V) (+ bias), mean weighted by the targets' class
// weights (torch's reduction='mean'). Replaces z by d loss / d z; returns the loss.
template <typename T>
double cross_entropy_rows(T* z, int64_t b, int64_t V, const T* bias, const int64_t* target, const T* class_weight) {
  double total = 0, weight_sum = 0;
  for (int64_t i = 0; i < b; ++i) {
    T* row = z + i * V;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) row[v] += bias[v];
    }
    T m = row[0];
    for (int64_t v = 1; v < V; ++v) m = std::max(m, row[v]);
    T s = 0;
    for (int64_t v = 0; v < V; ++v) {
      row[v] = std::exp(row[v] - m);
      s += row[v];
    }
    const int64_t y = target[i];
    const T w = class_weight != nullptr ? class_weight[y] : T(1);
    // row[y] = exp(z_y - m): loss = log s - (z_y - m)
    total += static_cast<double>(w) * (static_cast<double>(std::log(s)) - std::log(static_cast<double>(row[y])));
    weight_sum += w;
    const T scale = w / s;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) row[v] *= scale;
    row[y] -= w;
  }
  const T inv = static_cast<T>(1.0 / weight_sum);
  for (int64_t j = 0; j < b * V; ++j) z[j] *= inv;
  return total / weight_sum;
}

// Mean squared error over all b * V entries (F.mse_loss's mean). Replaces z by d loss / d z.
template <typename T>
double squared_error_rows(T* z, int64_t b, int64_t V, const T* bias, const T* y) {
  double total = 0;
  const T scale = static_cast<T>(2.0 / static_cast<double>(b * V));
  for (int64_t i = 0; i < b; ++i) {
    T* row = z + i * V;
    const T* target = y + i * V;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t v = 0; v < V; ++v) {
      const T r = row[v] + (bias != nullptr ? bias[v] : T(0)) - target[v];
      acc += r * r;
      row[v] = scale * r;
    }
    total += acc;
  }
  return total / static_cast<double>(b * V);
}

// ---- the row kernels over several threads --------------------------------------------------

// A batch of the row kernels is split over threads from this many multiply-adds on (per batch
// product): below it, waking the pool costs more than the halved kernel saves.
constexpr int64_t kRowThreadsMinWork = int64_t(1) << 19;
constexpr int64_t kRowThreadsMinRows = 256;

inline int threads_for_rows(int64_t B, int64_t D, int64_t V) {
  if (at::in_parallel_region() || B * D * V < kRowThreadsMinWork) return 1;
  return static_cast<int>(std::clamp<int64_t>(B / kRowThreadsMinRows, 1, at::get_num_threads()));
}

// Splits a batch's rows into `blocks` contiguous blocks, one per thread, each accumulating its
// own grad_W / grad_b (block 0 into the real gradients, the others into scratch allocated once
// per epoch), summed into the gradients after the parallel region.
// A parallel region per batch needs every thread scheduled at once: on a loaded machine a
// descheduled worker stalls the batch for a time slice (measured: 2-30x slower fits with other
// processes busy on both cores). So each epoch times its first kProbeBatches batches alternately
// in parallel and on the calling thread, and runs the rest the faster way. Either way the blocks
// and their order of summation are the same, so the results do not depend on the choice.
template <typename T>
struct RowBlocks {
  static constexpr int kProbeBatches = 6;
  int blocks;
  int64_t stride;          // V * D (+ V): one block's gradients, laid out like `grads`
  std::vector<T> scratch;  // (blocks - 1) * stride
  std::vector<double> sums;
  int64_t batches_run = 0;
  double best_seconds[2] = {1e300, 1e300};  // fastest probe batch: [serial, parallel]
  RowBlocks(int blocks_, int64_t stride_) : blocks(blocks_), stride(stride_), scratch((blocks_ - 1) * stride_), sums(blocks_) {}

  template <typename Args, typename Pass>
  double run(const Args& a, Pass pass) {
    if (blocks <= 1) return pass(a);
    const bool probing = batches_run < kProbeBatches;
    const bool parallel = probing ? batches_run % 2 == 0 : best_seconds[1] < best_seconds[0];
    const auto t0 = std::chrono::steady_clock::now();
    const double total = run_blocks(a, pass, parallel);
    if (probing) {
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best_seconds[parallel] = std::min(best_seconds[parallel], seconds);
    }
    ++batches_run;
    return total;
  }

  template <typename Args, typename Pass>
  double run_blocks(const Args& a, Pass pass, bool parallel) {
    std::fill(scratch.begin(), scratch.end(), T(0));
    auto run_block = [&](int64_t blk) {
      Args part = a;
      const int64_t r0 = a.n * blk / blocks, r1 = a.n * (blk + 1) / blocks;
      part.n = r1 - r0;
      if (a.rows != nullptr) part.rows = a.rows + r0;
      else part.x = a.x + r0 * a.x_stride;
      if constexpr (std::is_same_v<Args, small::SmallMse<T>>) {
        if (a.rows == nullptr) part.y = a.y + r0 * a.y_stride;
      } else {
        if (a.rows == nullptr) part.target = a.target + r0;
      }
      if (blk > 0) {
        T* g = scratch.data() + (blk - 1) * stride;
        part.grad_w = g;
        part.grad_b = a.grad_b != nullptr ? g + a.V * a.D : nullptr;
      }
      sums[blk] = pass(part);
    };
    if (parallel) {
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) run_block(blk);
      });
    } else {
      for (int64_t blk = 0; blk < blocks; ++blk) run_block(blk);
    }
    double total = sums[0];
    for (int blk = 1; blk < blocks; ++blk) {
      const T* g = scratch.data() + (blk - 1) * stride;
      T* gw = a.grad_w;
#pragma omp simd
      for (int64_t k = 0; k < a.V * a.D; ++k) gw[k] += g[k];
      for (int64_t k = 0; a.grad_b != nullptr && k < a.V; ++k) a.grad_b[k] += g[a.V * a.D + k];
      total += sums[blk];
    }
    return total;
  }
};

// ---- parameters and their optimizer --------------------------------------------------------

template <typename T>
struct Param {
  T* p = nullptr;
  T* grad = nullptr;
  int64_t n = 0;
  bool trainable = false;
  double lr = 0;
  // Adam
  optim::AdamHyper<T> adam{};
  T *m = nullptr, *v = nullptr, *vmax = nullptr;
  void* step = nullptr;
  bool step_f64 = false;
  // SGD
  optim::SgdHyper<T> sgd{};
  T* buf = nullptr;
  uint8_t* started = nullptr;
};

template <typename T>
void step_param(Param<T>& q, int64_t optimizer) {
  if (optimizer == kAdam) {
    T step;
    if (q.step_f64) {
      double* c = static_cast<double*>(q.step);
      *c += 1.0;
      step = static_cast<T>(*c);
    } else {
      float* c = static_cast<float*>(q.step);
      *c += 1.0f;
      step = static_cast<T>(*c);
    }
    const auto scalars = optim::adam_step_scalars(q.adam, q.adam.lr_exact, step);
    optim_cpu::adam_span_for_fit(q.p, q.grad, q.m, q.v, q.vmax, q.n, q.adam, scalars);
  } else {
    bool first = false;
    if (q.started != nullptr) {
      first = *q.started == 0;
      *q.started = 1;
    }
    optim_cpu::sgd_span_for_fit(q.p, q.grad, q.buf, q.n, first, q.sgd);
  }
}

// The proximal step of an L1 penalty l1 * |p|_1 after a gradient step of size lr.
template <typename T>
void soft_threshold(T* p, int64_t n, T threshold) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T a = p[i];
    p[i] = a > threshold ? a - threshold : (a < -threshold ? a + threshold : T(0));
  }
}

// ---- argument checks (the data values too, with check_data, before any update) ------------------

constexpr const char* kOp = "fastreg::_fit_epoch";

template <typename T>
T* data_of(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK_VALUE(t.defined() && t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.numel() == numel, kOp, ": ", name, " has ", t.numel(), " elements, expected ", numel);
  return t.data_ptr<T>();
}

template <typename T>
at::Tensor fit_epoch_impl(const at::Tensor& X, const at::Tensor& y, const std::optional<at::Tensor>& perm,
                          const std::vector<at::Tensor>& params, const std::optional<at::Tensor>& class_weight,
                          int64_t loss_kind, int64_t batch_size, double l1, int64_t optimizer,
                          const std::vector<at::Tensor>& state, const std::vector<double>& hyper,
                          const std::vector<bool>& trainable, bool check_data) {
  const auto dtype = X.scalar_type();
  const int64_t N = X.size(0), D = X.size(1);
  const at::Tensor& W = params[0];
  TORCH_CHECK_VALUE(W.dim() == 2 && W.size(1) == D, kOp, ": weight must be (out, ", D, "), got ", W.sizes());
  const int64_t V = W.size(0);
  const bool has_bias = params.size() == 2;
  const int64_t num_params = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(hyper.size()) == kHyperPerParam * num_params &&
                        static_cast<int64_t>(trainable.size()) == num_params,
                    kOp, ": hyper must hold ", kHyperPerParam, " numbers and trainable one flag per param");
  const int64_t slots = optimizer == kAdam ? 4 : 2;
  TORCH_CHECK_VALUE(optimizer == kAdam || optimizer == kSgd, kOp, ": unknown optimizer code ", optimizer);
  TORCH_CHECK_VALUE(static_cast<int64_t>(state.size()) == slots * num_params, kOp, ": state must hold ", slots,
                    " tensors per param, got ", state.size());
  TORCH_CHECK_VALUE(batch_size >= 1, kOp, ": batch_size must be >= 1");

  const T* x = data_of<T>(X, "X", dtype, N * D);
  const int64_t* labels = nullptr;
  const T* targets = nullptr;
  if (loss_kind == kCrossEntropy) {
    labels = data_of<int64_t>(y, "y", at::kLong, N);
  } else {
    TORCH_CHECK_VALUE(loss_kind == kMeanSquaredError, kOp, ": unknown loss code ", loss_kind);
    targets = data_of<T>(y, "y", dtype, N * V);
  }
  if (check_data) {
    // Once per fit (first epoch), before any update; serial: a parallel region costs more than
    // the scan at these sizes, far more on a loaded machine.
    for (int64_t j = 0; j < N * D; ++j) {
      TORCH_CHECK_VALUE(std::isfinite(x[j]), "fit: X contains NaN or infinite values (first at row ", j / D,
                        ", column ", j % D, ")");
    }
    for (int64_t i = 0; labels != nullptr && i < N; ++i) {
      TORCH_CHECK_VALUE(labels[i] >= 0 && labels[i] < V, "fit: y holds label ", labels[i], " (row ", i,
                        "), outside [0, ", V - 1, "] for ", V, " classes");
    }
    for (int64_t j = 0; targets != nullptr && j < N * V; ++j) {
      TORCH_CHECK_VALUE(std::isfinite(targets[j]), "fit: y contains NaN or infinite values (first at row ", j / V,
                        ")");
    }
  }
  const int64_t* order = perm.has_value() && perm->defined() ? data_of<int64_t>(*perm, "perm", at::kLong, N) : nullptr;
  const T* cw = class_weight.has_value() && class_weight->defined()
                    ? data_of<T>(*class_weight, "class_weight", dtype, V)
                    : nullptr;
  TORCH_CHECK_VALUE(cw == nullptr || loss_kind == kCrossEntropy, kOp, ": class_weight needs the cross-entropy loss");

  if (order != nullptr) {
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK_INDEX(order[i] >= 0 && order[i] < N, kOp, ": perm holds ", order[i], ", out of range for ", N,
                        " rows");
    }
  }
  const int64_t B = std::min(batch_size, N);
  // Batches with few outputs: the one-pass row kernels of csrc/small (logits on the stack, shuffled
  // rows read in place, no gather), split over threads when large. Larger ones: two BLAS products
  // per batch through reused buffers. At 1000 x 100 x 10 (the synthetic benchmark) the threaded
  // row kernels measured ~1.5x faster than the BLAS path (MKL runs its generic kernels on this AMD
  // host, and single-threaded below kThreadedMinWork).
  const bool row_kernels = V <= small::kSmallMaxV && B * D * V <= kRowKernelMaxWork;
  const bool gather = order != nullptr && !row_kernels;
  std::vector<T> grads(V * D + (has_bias ? V : 0)), z(row_kernels ? 0 : B * V),
      x_batch(gather ? B * D : 0), y_batch(gather && targets != nullptr ? B * V : 0);
  std::vector<int64_t> label_batch(gather && labels != nullptr ? B : 0);

  std::vector<Param<T>> ps(num_params);
  for (int64_t i = 0; i < num_params; ++i) {
    Param<T>& q = ps[i];
    const at::Tensor& p = params[i];
    q.n = p.numel();
    q.p = data_of<T>(p, i == 0 ? "weight" : "bias", dtype, i == 0 ? V * D : V);
    q.grad = grads.data() + (i == 0 ? 0 : V * D);
    q.trainable = trainable[i];
    const double* h = hyper.data() + kHyperPerParam * i;
    q.lr = h[0];
    if (!q.trainable) continue;
    const at::Tensor* st = state.data() + slots * i;
    if (optimizer == kAdam) {
      // h: lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled
      q.adam = optim::make_adam_hyper<T>(h[0], h[1], h[2], h[3], h[4], 1.0, h[6] != 0, h[7] != 0);
      q.m = data_of<T>(st[0], "exp_avg", dtype, q.n);
      q.v = data_of<T>(st[1], "exp_avg_sq", dtype, q.n);
      q.vmax = h[5] != 0 ? data_of<T>(st[2], "max_exp_avg_sq", dtype, q.n) : nullptr;
      const at::Tensor& step = st[3];
      TORCH_CHECK_TYPE(step.numel() == 1 && step.device().is_cpu() &&
                           (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
                       kOp, ": the Adam step counter must be a one-element float32/float64 CPU tensor");
      q.step = step.data_ptr();
      q.step_f64 = step.scalar_type() == at::kDouble;
    } else {
      // h: lr, momentum, dampening, weight_decay, nesterov, maximize
      q.sgd = optim::make_sgd_hyper<T>(h[0], h[1], h[2], h[3], 1.0, h[4] != 0, h[5] != 0);
      if (h[1] != 0) {
        q.buf = data_of<T>(st[0], "momentum_buffer", dtype, q.n);
        TORCH_CHECK_TYPE(st[1].numel() == 1 && st[1].device().is_cpu() &&
                             (st[1].scalar_type() == at::kByte || st[1].scalar_type() == at::kBool),
                         kOp, ": the momentum flag must be a one-element uint8/bool CPU tensor");
        q.started = static_cast<uint8_t*>(st[1].data_ptr());
      }
    }
  }
  const T* bias = has_bias ? ps[1].p : nullptr;
  T* grad_bias = has_bias ? ps[1].grad : nullptr;
  const T l1_threshold = static_cast<T>(ps[0].lr * l1);

  T class_weight_sum = 0;
  for (int64_t v = 0; cw != nullptr && v < V; ++v) class_weight_sum += cw[v];
  RowBlocks<T> row_blocks(row_kernels ? threads_for_rows(B, D, V) : 1, static_cast<int64_t>(grads.size()));
  const SingleThreadedBlas blas_threads(!row_kernels && B * D * V < kThreadedMinWork);
  double loss_sum = 0;
  for (int64_t start = 0; start < N; start += B) {
    const int64_t b = std::min(B, N - start);
    double loss;
    if (row_kernels) {
      std::fill(grads.begin(), grads.end(), T(0));  // the row kernels accumulate
      const int64_t* rows = order != nullptr ? order + start : nullptr;
      const int64_t first = order != nullptr ? 0 : start;  // without rows, batch row i is data row first + i
      auto set_linear = [&](small::SmallLinear<T>& a) {
        a.n = b, a.D = D, a.V = V;
        a.x = x + first * D, a.x_stride = D, a.rows = rows;
        a.w = ps[0].p, a.b = bias, a.grad_w = ps[0].grad, a.grad_b = grad_bias;
      };
      if (loss_kind == kCrossEntropy) {
        small::SmallCe<T> a;
        set_linear(a);
        a.target = labels + first, a.class_weight = cw, a.class_weight_sum = class_weight_sum;
        const double denominator = small::ce_small_denominator(a);
        a.scale = static_cast<T>(1.0 / denominator);
        loss = row_blocks.run(a, [](const small::SmallCe<T>& part) { return small::ce_small(part); }) / denominator;
      } else {
        small::SmallMse<T> a;
        set_linear(a);
        a.y = targets + first * V, a.y_stride = V;
        const double denominator = static_cast<double>(b * V);
        a.scale = static_cast<T>(1.0 / denominator);
        loss = row_blocks.run(a, [](const small::SmallMse<T>& part) { return small::mse_small(part); }) / denominator;
      }
    } else {
      const T* xb = x + start * D;
      const int64_t* lb = labels != nullptr ? labels + start : nullptr;
      const T* yb = targets != nullptr ? targets + start * V : nullptr;
      if (order != nullptr) {
        for (int64_t i = 0; i < b; ++i) {
          const int64_t r = order[start + i];
          std::memcpy(x_batch.data() + i * D, x + r * D, D * sizeof(T));
          if (labels != nullptr) label_batch[i] = labels[r];
          if (targets != nullptr) std::memcpy(y_batch.data() + i * V, targets + r * V, V * sizeof(T));
        }
        xb = x_batch.data();
        lb = label_batch.data();
        yb = y_batch.data();
      }
      linear_rows(xb, b, D, ps[0].p, V, z.data());
      loss = loss_kind == kCrossEntropy ? cross_entropy_rows(z.data(), b, V, bias, lb, cw)
                                        : squared_error_rows(z.data(), b, V, bias, yb);
      linear_grads(xb, b, D, z.data(), V, ps[0].grad, grad_bias);
    }
    for (auto& q : ps) {
      if (q.trainable) step_param(q, optimizer);
    }
    if (l1 != 0 && ps[0].trainable) soft_threshold(ps[0].p, ps[0].n, l1_threshold);
    loss_sum += loss * static_cast<double>(b);
  }
  return at::scalar_tensor(loss_sum / static_cast<double>(N), at::TensorOptions().dtype(at::kDouble));
}

at::Tensor fit_epoch(const at::Tensor& X, const at::Tensor& y, const std::optional<at::Tensor>& perm,
                     at::TensorList params, const std::optional<at::Tensor>& class_weight, int64_t loss_kind,
                     int64_t batch_size, double l1, int64_t optimizer, at::TensorList state,
                     at::ArrayRef<double> hyper, at::IntArrayRef trainable, bool check_data) {
  TORCH_CHECK_VALUE(X.dim() == 2 && X.size(0) >= 1 && X.size(1) >= 1, kOp, ": X must be (N, D) with N, D >= 1, got ",
                    X.sizes());
  TORCH_CHECK_VALUE(params.size() == 1 || params.size() == 2, kOp, ": params must be [weight] or [weight, bias]");
  const std::vector<at::Tensor> ps(params.begin(), params.end()), st(state.begin(), state.end());
  const std::vector<double> h(hyper.begin(), hyper.end());
  std::vector<bool> tr;
  for (int64_t t : trainable) tr.push_back(t != 0);
  if (X.scalar_type() == at::kDouble) {
    return fit_epoch_impl<double>(X, y, perm, ps, class_weight, loss_kind, batch_size, l1, optimizer, st, h, tr, check_data);
  }
  TORCH_CHECK_TYPE(X.scalar_type() == at::kFloat, kOp, ": X must be float32 or float64, got ", X.scalar_type());
  return fit_epoch_impl<float>(X, y, perm, ps, class_weight, loss_kind, batch_size, l1, optimizer, st, h, tr, check_data);
}

}  // namespace
}  // namespace fit
}  // namespace fastreg

TORCH_LIBRARY_IMPL(fastreg, CPU, m) { m.impl("_fit_epoch", &fastreg::fit::fit_epoch); }
