// CUDA kernels of fastreg's fused optimizers: fastreg::_fused_sgd_ and fastreg::_fused_adam_
// (schemas in csrc/fastreg.cpp, update rules in csrc/optim/optim_math.h shared with the CPU kernel
// csrc/optim/optim_cpu.cpp, Python API in fastreg/optim/).
//
// Built against the LibTorch stable ABI only (no ATen CUDA headers): tensors are
// torch::stable::Tensor, the current stream comes from aoti_torch_get_current_cuda_stream.
//
// Design: multi-tensor apply
// --------------------------
// One call updates every tensor of one (device, dtype) group. The tensors are cut into chunks of
// kChunk elements; one CTA updates one chunk. The data pointers, sizes and counters of up to
// Batch::kCap tensors travel by value in the kernel-argument struct (CUDA >= 12.1 allows 32 KiB
// of kernel parameters: ~500 tensors per launch with Adam+amsgrad, more otherwise), together with
// each tensor's running chunk count, so a CTA finds its tensor by a binary search over
// `chunk_end` and its chunk by subtraction. A group is therefore one launch (a few for thousands
// of tensors), plus one tiny epilogue launch per batch that advances the per-tensor counters
// (Adam's step, SGD's momentum-started flag): the main kernel only reads them, because several
// CTAs of the same tensor read them and none may see another's write.
//
// Per element: 128-bit loads/stores of every list when all of a tensor's arrays are 16-byte
// aligned (4 fp32 / 8 bf16 or fp16 / 2 fp64 lanes), scalar otherwise and for the tail; math in
// fp32 (fp64 for fp64 tensors) through the functors of optim_math.h.
//
// Capturable, no host sync: lr (when a tensor), grad_scale and found_inf are read by the kernels
// on the device, the counters live on the device; when found_inf is nonzero both kernels return
// before writing anything, so a skipped step changes nothing at all.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "cuda/dtype_convert.cuh"
#include "optim/optim_math.h"

namespace fastreg {
namespace optim_cuda {

using optim::AdamHyper;
using optim::AdamStepScalars;
using optim::SgdHyper;
using torch::headeronly::Layout;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per CTA (a multiple of every vector width)

// Kernel parameter space: 32764 bytes from CUDA 12.1 on (sm_70+), 4 KiB before.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr size_t kParamBytes = 32764;
#else
constexpr size_t kParamBytes = 4096;
#endif
constexpr size_t kReservedBytes = 256;  // the hyper-parameters and scalar pointers next to the batch

// ---------------------------------------------------------------------------------------------
// Element types: storage S, math M (float, or double for double storage)

// (conversions: csrc/cuda/dtype_convert.cuh)

// A one-element float32/float64 tensor read on the device.
struct DeviceScalar {
  const void* ptr = nullptr;
  bool f64 = false;
  __device__ __forceinline__ bool present() const { return ptr != nullptr; }
};

template <typename M>
__device__ __forceinline__ M load(const DeviceScalar& s) {
  return s.f64 ? static_cast<M>(*static_cast<const double*>(s.ptr)) : static_cast<M>(*static_cast<const float*>(s.ptr));
}

// found_inf set and nonzero: the step is skipped.
__device__ __forceinline__ bool skipped(const DeviceScalar& found_inf) {
  return found_inf.present() && load<double>(found_inf) != 0.0;  // as the CPU kernel: no rounding to 0
}

// ---------------------------------------------------------------------------------------------
// The kernel-argument table of one launch

template <int kLists>
struct Batch {
  // per tensor: kLists data pointers, numel, counter pointer, running chunk count
  static constexpr int kCap =
      static_cast<int>((kParamBytes - kReservedBytes) / (kLists * sizeof(void*) + 2 * sizeof(int64_t) + 4));
  void* data[kLists][kCap];
  int64_t numel[kCap];
  void* counter[kCap];      // Adam: float step; SGD: uint8 momentum-started flag
  int32_t chunk_end[kCap];  // chunks of tensors 0..i
  int32_t count;
};

// The tensor arguments every call reads on the device.
struct DeviceScalars {
  DeviceScalar lr;          // replaces the lr of the hyper-parameters when present
  DeviceScalar grad_scale;  // gradients are divided by it when present
  DeviceScalar found_inf;   // nonzero: the kernels write nothing
};

template <int kLists, typename Hyper>
struct Args {
  Batch<kLists> batch;
  Hyper h;
  DeviceScalars sc;
};
static_assert(sizeof(Args<5, AdamHyper<double>>) <= kParamBytes, "kernel arguments exceed the parameter space");
static_assert(sizeof(Args<3, SgdHyper<double>>) <= kParamBytes, "kernel arguments exceed the parameter space");
static_assert(sizeof(Args<2, SgdHyper<double>>) <= kParamBytes, "kernel arguments exceed the parameter space");

// The tensor and the element range [begin, begin + len) of this CTA's chunk.
template <int kLists>
__device__ __forceinline__ int locate(const Batch<kLists>& b, int64_t& begin, int64_t& len) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = b.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (b.chunk_end[mid] > block) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int32_t first_chunk = lo == 0 ? 0 : b.chunk_end[lo - 1];
  begin = static_cast<int64_t>(block - first_chunk) * kChunk;
  len = b.numel[lo] - begin < kChunk ? b.numel[lo] - begin : kChunk;
  return lo;
}

// Applies op(M (&x)[kLists]) to every element of the chunk: x[l] is element i of list l, stored
// back for the lists in kWritten (bit l). 128-bit accesses when every list is 16-byte aligned.
template <typename S, int kLists, unsigned kWritten, typename Op>
__device__ __forceinline__ void apply_chunk(S* const (&ptr)[kLists], int64_t len, Op op) {
  using M = typename AccOf<S>::type;
  constexpr int kVec = 16 / sizeof(S);
  uintptr_t bits = 0;
#pragma unroll
  for (int l = 0; l < kLists; ++l) bits |= reinterpret_cast<uintptr_t>(ptr[l]);
  int64_t done = 0;
  if (bits % 16 == 0) {
    const int64_t nvec = len / kVec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      uint4 raw[kLists];
#pragma unroll
      for (int l = 0; l < kLists; ++l) raw[l] = reinterpret_cast<const uint4*>(ptr[l])[v];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        M x[kLists];
#pragma unroll
        for (int l = 0; l < kLists; ++l) x[l] = to_acc(reinterpret_cast<const S*>(&raw[l])[e]);
        op(x);
#pragma unroll
        for (int l = 0; l < kLists; ++l) {
          if (kWritten & (1u << l)) reinterpret_cast<S*>(&raw[l])[e] = from_acc<S>(x[l]);
        }
      }
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        if (kWritten & (1u << l)) reinterpret_cast<uint4*>(ptr[l])[v] = raw[l];
      }
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
    M x[kLists];
#pragma unroll
    for (int l = 0; l < kLists; ++l) x[l] = to_acc(ptr[l][i]);
    op(x);
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (kWritten & (1u << l)) ptr[l][i] = from_acc<S>(x[l]);
    }
  }
}

template <typename S, int kLists>
__device__ __forceinline__ void chunk_pointers(const Batch<kLists>& b, int t, int64_t begin, S* (&ptr)[kLists]) {
#pragma unroll
  for (int l = 0; l < kLists; ++l) ptr[l] = static_cast<S*>(b.data[l][t]) + begin;
}

// ---------------------------------------------------------------------------------------------
// Kernels. Lists: Adam p, g, m, v[, vmax]; SGD p, g[, buf]. The gradient (list 1) is never written.

template <typename S, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ Args<AMSGRAD ? 5 : 4, AdamHyper<typename AccOf<S>::type>> a) {
  using M = typename AccOf<S>::type;
  constexpr int kLists = AMSGRAD ? 5 : 4;
  if (skipped(a.sc.found_inf)) return;
  int64_t begin, len;
  const int t = locate(a.batch, begin, len);
  AdamHyper<M> h = a.h;
  if (a.sc.grad_scale.present()) h.inv_grad_scale = M(1) / load<M>(a.sc.grad_scale);
  const M lr = a.sc.lr.present() ? load<M>(a.sc.lr) : h.lr;
  const M step = static_cast<M>(*static_cast<const float*>(a.batch.counter[t]) + 1.0f);  // epilogue stores it
  const AdamStepScalars<M> s = optim::adam_step_scalars(h, lr, step);
  S* ptr[kLists];
  chunk_pointers(a.batch, t, begin, ptr);
  apply_chunk<S, kLists, ~2u>(ptr, len, [&](M(&x)[kLists]) {
    M unused = M(0);
    optim::adam_update<AMSGRAD>(x[0], x[1], x[2], x[3], AMSGRAD ? x[kLists - 1] : unused, h, s);
  });
}

template <typename S, bool MOMENTUM>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const __grid_constant__ Args<MOMENTUM ? 3 : 2, SgdHyper<typename AccOf<S>::type>> a) {
  using M = typename AccOf<S>::type;
  constexpr int kLists = MOMENTUM ? 3 : 2;
  if (skipped(a.sc.found_inf)) return;
  int64_t begin, len;
  const int t = locate(a.batch, begin, len);
  SgdHyper<M> h = a.h;
  if (a.sc.grad_scale.present()) h.inv_grad_scale = M(1) / load<M>(a.sc.grad_scale);
  if (a.sc.lr.present()) h.neg_lr = -load<M>(a.sc.lr);
  const bool first = MOMENTUM && *static_cast<const uint8_t*>(a.batch.counter[t]) == 0;  // epilogue sets it
  S* ptr[kLists];
  chunk_pointers(a.batch, t, begin, ptr);
  apply_chunk<S, kLists, ~2u>(ptr, len, [&](M(&x)[kLists]) {
    M unused = M(0);
    optim::sgd_update<MOMENTUM>(x[0], x[1], MOMENTUM ? x[kLists - 1] : unused, first, h);
  });
}

// After the update: every tensor's counter advances (Adam: step += 1; SGD: started = 1), unless
// found_inf says the step was skipped.
enum class Counter { kAdamStep, kSgdStarted };

template <Counter kKind, int kLists, typename Hyper>
__global__ void counter_epilogue(const __grid_constant__ Args<kLists, Hyper> a) {
  if (skipped(a.sc.found_inf)) return;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < a.batch.count; t += gridDim.x * blockDim.x) {
    if (kKind == Counter::kAdamStep) {
      *static_cast<float*>(a.batch.counter[t]) += 1.0f;
    } else {
      *static_cast<uint8_t*>(a.batch.counter[t]) = 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: checks, layout, batching, launches

bool is_float_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16 || t == ScalarType::Half;
}

// True if the tensor's elements fill exactly numel() slots of memory from data_ptr() on (any
// dimension order), so that tensors sharing its strides can be walked as flat arrays.
bool dense_layout(const Tensor& t) {
  const int64_t d = t.dim();
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the non-trivial dimensions
  for (int64_t i = 0; i < d; ++i) {
    if (t.size(i) != 1) dims.emplace_back(t.stride(i), t.size(i));
  }
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

bool same_shape_and_strides(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i) {
    if (a.size(i) != b.size(i) || (a.size(i) != 1 && a.stride(i) != b.stride(i))) return false;
  }
  return true;
}

bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i) {
    if (a.size(i) != b.size(i)) return false;
  }
  return true;
}

// A named list of the call, and whether the kernels write it.
struct NamedList {
  const char* name;
  const std::vector<Tensor>* tensors;
  bool written;
};

// The checked tensors of one call: data[l][i] is list l's tensor i as the kernels walk it (a
// contiguous temporary where the tensors of set i do not share one dense layout; finish() copies
// those back).
class Group {
 public:
  Group(const char* op, const std::vector<NamedList>& lists) {
    const std::vector<Tensor>& params = *lists[0].tensors;
    n_ = static_cast<int64_t>(params.size());
    STD_TORCH_CHECK(n_ > 0, op, ": the params list is empty");
    for (const NamedList& l : lists) {
      STD_TORCH_CHECK(static_cast<int64_t>(l.tensors->size()) == n_, op, ": ", l.name, " has ", l.tensors->size(),
                      " tensors but params has ", n_);
    }
    dtype_ = params[0].scalar_type();
    STD_TORCH_CHECK(is_float_dtype(dtype_), op, ": params must be float32, float64, bfloat16 or float16");
    STD_TORCH_CHECK(params[0].is_cuda(), op, ": params[0] is not a CUDA tensor");
    device_ = params[0].get_device_index();
    data_.assign(lists.size(), std::vector<Tensor>());
    for (int64_t i = 0; i < n_; ++i) {
      const Tensor& p = params[i];
      bool contiguous = true;
      bool shared_dense = dense_layout(p);
      for (size_t l = 0; l < lists.size(); ++l) {
        const Tensor& t = (*lists[l].tensors)[i];
        const char* name = lists[l].name;
        STD_TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
        STD_TORCH_CHECK(t.layout() == Layout::Strided, op, ": ", name, "[", i,
                        "] is sparse; sparse gradients are not supported");
        STD_TORCH_CHECK(on_device(t), op, ": ", name, "[", i, "] is not on cuda:", device_,
                        " like params[0] (one call takes tensors of one device)");
        STD_TORCH_CHECK(t.scalar_type() == dtype_, op, ": ", name, "[", i, "] has another dtype than params[0]",
                        " (one call takes tensors of one dtype)");
        STD_TORCH_CHECK(same_shape(t, p), op, ": ", name, "[", i, "] has another shape than params[", i, "]");
        contiguous = contiguous && t.is_contiguous();
        shared_dense = shared_dense && same_shape_and_strides(t, p);
      }
      for (size_t l = 0; l < lists.size(); ++l) {
        Tensor t = (*lists[l].tensors)[i];
        if (!(contiguous || shared_dense) && !t.is_contiguous()) {
          Tensor tmp = torch::stable::contiguous(t);
          if (lists[l].written) writeback_.emplace_back(t, tmp);
          t = tmp;
        }
        data_[l].push_back(t);
      }
    }
  }

  bool on_device(const Tensor& t) const { return t.is_cuda() && t.get_device_index() == device_; }
  int64_t size() const { return n_; }
  ScalarType dtype() const { return dtype_; }
  int32_t device() const { return device_; }
  const Tensor& at(size_t list, int64_t i) const { return data_[list][i]; }

  // Copies results computed in contiguous temporaries back into their strided tensors (stream
  // ordered after the kernels).
  void finish() {
    for (auto& [dst, src] : writeback_) torch::stable::copy_(dst, src);
  }

 private:
  int64_t n_ = 0;
  ScalarType dtype_ = ScalarType::Float;
  int32_t device_ = 0;
  std::vector<std::vector<Tensor>> data_;
  std::vector<std::pair<Tensor, Tensor>> writeback_;
};

// A one-element float32/float64 tensor argument on the group's device (lr, grad_scale, found_inf).
DeviceScalar device_scalar(const char* op, const char* name, const std::optional<Tensor>& t, const Group& g) {
  DeviceScalar s;
  if (!t.has_value() || !t->defined()) return s;
  STD_TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element");
  STD_TORCH_CHECK(g.on_device(*t), op, ": ", name, " must be on the params' device cuda:", g.device(),
                  " (it is read by the kernel)");
  const ScalarType st = t->scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Float || st == ScalarType::Double, op, ": ", name,
                  " must be a float32 or float64 tensor");
  s.ptr = t->const_data_ptr();
  s.f64 = st == ScalarType::Double;
  return s;
}

// Where the per-tensor counters live (Adam steps: float32; SGD flags: uint8/bool): one
// one-element tensor per parameter, or a single contiguous tensor holding all of them (what the
// Python optimizers pass).
std::vector<void*> counter_pointers(const char* op, const char* name, const std::vector<Tensor>& list,
                                    const Group& g, ScalarType want, ScalarType also) {
  auto check = [&](const Tensor& t, size_t i) {
    STD_TORCH_CHECK(g.on_device(t), op, ": ", name, "[", i, "] must be on the params' device cuda:", g.device());
    STD_TORCH_CHECK(t.scalar_type() == want || t.scalar_type() == also, op, ": ", name, "[", i,
                    "] has an unsupported dtype");
  };
  const int64_t n = g.size();
  std::vector<void*> out(n);
  if (list.size() == 1 && n > 1) {  // packed
    const Tensor& t = list[0];
    STD_TORCH_CHECK(t.defined() && t.numel() == n && t.is_contiguous(), op, ": ", name,
                    " must hold one one-element tensor per param, or one contiguous tensor of ", n, " elements");
    check(t, 0);
    char* base = static_cast<char*>(t.mutable_data_ptr());
    for (int64_t i = 0; i < n; ++i) out[i] = base + i * static_cast<int64_t>(t.element_size());
    return out;
  }
  STD_TORCH_CHECK(static_cast<int64_t>(list.size()) == n, op, ": ", name, " has ", list.size(),
                  " tensors but params has ", n);
  for (size_t i = 0; i < list.size(); ++i) {
    const Tensor& t = list[i];
    STD_TORCH_CHECK(t.defined() && t.numel() == 1, op, ": ", name, "[", i, "] must be a one-element tensor");
    check(t, i);
    out[i] = t.mutable_data_ptr();
  }
  return out;
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Launches `main` over the group in batches of at most Batch::kCap tensors, each followed by
// `epilogue` over the batch's counters (when the operator has counters).
template <int kLists, typename Hyper, typename MainKernel, typename EpilogueKernel>
void launch_batches(const char* op, const Group& g, const std::vector<void*>* counters, const Hyper& h,
                    const DeviceScalars& sc, MainKernel main, EpilogueKernel epilogue) {
  torch::stable::accelerator::DeviceGuard guard(g.device());
  void* stream_ptr = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(g.device(), &stream_ptr));
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  std::vector<Args<kLists, Hyper>> holder(1);  // ~32 KiB: on the heap, not the host stack
  Args<kLists, Hyper>& args = holder[0];
  args.h = h;
  args.sc = sc;
  Batch<kLists>& b = args.batch;
  auto flush = [&]() {
    if (b.count == 0) return;
    const int32_t chunks = b.chunk_end[b.count - 1];
    if (chunks > 0) {
      main<<<chunks, kThreads, 0, stream>>>(args);
      check_launch(op);
    }
    if (counters != nullptr) {
      epilogue<<<(b.count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(args);
      check_launch(op);
    }
    b.count = 0;
  };
  b.count = 0;
  for (int64_t i = 0; i < g.size(); ++i) {
    const int64_t numel = g.at(0, i).numel();
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    STD_TORCH_CHECK(chunks < INT32_MAX / 2, op, ": tensor ", i, " is too large");
    const int32_t before = b.count == 0 ? 0 : b.chunk_end[b.count - 1];
    if (b.count == Batch<kLists>::kCap || static_cast<int64_t>(before) + chunks > INT32_MAX / 2) flush();
    const int32_t start = b.count == 0 ? 0 : b.chunk_end[b.count - 1];
    for (int l = 0; l < kLists; ++l) b.data[l][b.count] = g.at(l, i).mutable_data_ptr();
    b.numel[b.count] = numel;
    b.counter[b.count] = counters == nullptr ? nullptr : (*counters)[i];
    b.chunk_end[b.count] = start + static_cast<int32_t>(chunks);
    ++b.count;
  }
  flush();
}

// Runs f(S()) with S = the CUDA storage type of dtype.
template <typename F>
void dispatch_storage(ScalarType dtype, F f) {
  switch (dtype) {
    case ScalarType::Float:
      f(float());
      break;
    case ScalarType::Double:
      f(double());
      break;
    case ScalarType::BFloat16:
      f(__nv_bfloat16());
      break;
    case ScalarType::Half:
      f(__half());
      break;
    default:
      STD_TORCH_CHECK(false, "fastreg optimizers: unsupported dtype");
  }
}

// ---------------------------------------------------------------------------------------------
// Operators

void fused_sgd_cuda(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> momentum_buffers,
                    std::vector<Tensor> momentum_started, double lr, std::optional<Tensor> lr_tensor, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize,
                    std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf) {
  constexpr const char* op = "fastreg::_fused_sgd_";
  const bool use_momentum = momentum != 0.0;
  std::vector<NamedList> lists = {{"params", &params, true}, {"grads", &grads, false}};
  if (use_momentum) {
    lists.push_back({"momentum_buffers", &momentum_buffers, true});
  } else {
    STD_TORCH_CHECK(momentum_buffers.empty() && momentum_started.empty(), op,
                    ": momentum is 0 so momentum_buffers and momentum_started must be empty");
  }
  Group g(op, lists);
  std::vector<void*> flags;
  if (use_momentum) {
    flags = counter_pointers(op, "momentum_started", momentum_started, g, ScalarType::Byte, ScalarType::Bool);
  }
  const DeviceScalars sc{device_scalar(op, "lr_tensor", lr_tensor, g), device_scalar(op, "grad_scale", grad_scale, g),
                         device_scalar(op, "found_inf", found_inf, g)};

  dispatch_storage(g.dtype(), [&](auto zero) {
    using S = decltype(zero);
    using M = typename AccOf<S>::type;
    // the kernels replace lr and the grad scale when those come as tensors
    const auto h = optim::make_sgd_hyper<M>(lr, momentum, dampening, weight_decay, 1.0, nesterov, maximize);
    auto run = [&](auto momentum_tag) {
      constexpr bool kMomentum = decltype(momentum_tag)::value;
      constexpr int kLists = kMomentum ? 3 : 2;
      launch_batches<kLists>(op, g, kMomentum ? &flags : nullptr, h, sc, sgd_kernel<S, kMomentum>,
                             counter_epilogue<Counter::kSgdStarted, kLists, SgdHyper<M>>);
    };
    if (use_momentum) {
      run(std::true_type());
    } else {
      run(std::false_type());
    }
  });
  g.finish();
}

void fused_adam_cuda(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> exp_avgs,
                     std::vector<Tensor> exp_avg_sqs, std::vector<Tensor> max_exp_avg_sqs,
                     std::vector<Tensor> state_steps, double lr, std::optional<Tensor> lr_tensor, double beta1,
                     double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                     bool decoupled_weight_decay, std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf) {
  constexpr const char* op = "fastreg::_fused_adam_";
  std::vector<NamedList> lists = {{"params", &params, true},
                                  {"grads", &grads, false},
                                  {"exp_avgs", &exp_avgs, true},
                                  {"exp_avg_sqs", &exp_avg_sqs, true}};
  if (amsgrad) {
    lists.push_back({"max_exp_avg_sqs", &max_exp_avg_sqs, true});
  } else {
    STD_TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": amsgrad is off so max_exp_avg_sqs must be empty");
  }
  Group g(op, lists);
  const std::vector<void*> steps = counter_pointers(op, "state_steps", state_steps, g, ScalarType::Float, ScalarType::Float);
  const DeviceScalars sc{device_scalar(op, "lr_tensor", lr_tensor, g), device_scalar(op, "grad_scale", grad_scale, g),
                         device_scalar(op, "found_inf", found_inf, g)};

  dispatch_storage(g.dtype(), [&](auto zero) {
    using S = decltype(zero);
    using M = typename AccOf<S>::type;
    // the kernels replace lr and the grad scale when those come as tensors
    const auto h = optim::make_adam_hyper<M>(lr, beta1, beta2, weight_decay, eps, 1.0, maximize, decoupled_weight_decay);
    auto run = [&](auto amsgrad_tag) {
      constexpr bool kAmsgrad = decltype(amsgrad_tag)::value;
      constexpr int kLists = kAmsgrad ? 5 : 4;
      launch_batches<kLists>(op, g, &steps, h, sc, adam_kernel<S, kAmsgrad>,
                             counter_epilogue<Counter::kAdamStep, kLists, AdamHyper<M>>);
    };
    if (amsgrad) {
      run(std::true_type());
    } else {
      run(std::false_type());
    }
  });
  g.finish();
}

}  // namespace optim_cuda
}  // namespace fastreg

STABLE_TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("_fused_sgd_", TORCH_BOX(&fastreg::optim_cuda::fused_sgd_cuda));
  m.impl("_fused_adam_", TORCH_BOX(&fastreg::optim_cuda::fused_adam_cuda));
}
