// CUDA kernels of fastreg's fused optimizers: fastreg::_fused_sgd_ and fastreg::_fused_adam_
// (schemas in csrc/fastreg.cpp, update rules in csrc/optim/optim_math.h shared with the CPU kernel
// csrc/optim/optim_cpu.cpp, Python API in fastreg/optim/).
//
// Built against the LibTorch stable ABI only (no ATen CUDA headers): tensors are
// torch::stable::Tensor, the current stream comes from aoti_torch_get_current_cuda_stream.
//
// The kernels and the launch plan live in csrc/cuda/optim_kernels.cuh, the host launch code in
// csrc/cuda/optim_launch.h (all shared with the CPU SIMT harness of tests/simt); this file checks
// and groups the tensors and hands them to the launcher with the current stream.
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
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
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

#include "cuda/optim_launch.h"

namespace fastreg {
namespace optim_cuda {

using torch::headeronly::Layout;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

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
  // fp32_list: the index of a float32 list of a bf16/fp16 group (the master weights), or -1.
  Group(const char* op, const std::vector<NamedList>& lists, int fp32_list = -1) {
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
        if (static_cast<int>(l) == fp32_list) {
          STD_TORCH_CHECK(t.scalar_type() == ScalarType::Float, op, ": ", name, "[", i,
                          "] must be float32 (master weights)");
        } else {
          STD_TORCH_CHECK(t.scalar_type() == dtype_, op, ": ", name, "[", i, "] has another dtype than params[0]",
                          " (one call takes tensors of one dtype)");
        }
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

// Launches `main` over the group in batches, each followed by `epilogue` over the batch's counters
// (when the operator has counters): launch_group (optim_launch.h), on the group's device and the
// current stream. `extra`, in the bf16 modes: the per-tensor pointers of the kernels' last list
// when it is not a list of the group (SGD's stochastic-rounding step counters).
template <int kLists, typename Hyper, typename MainKernel, typename EpilogueKernel>
void launch_batches(const char* op, const Group& g, const std::vector<void*>* counters, const Hyper& h,
                    const DeviceScalars& sc, MainKernel main, EpilogueKernel epilogue, uint64_t sr_seed = 0,
                    const std::vector<void*>* extra = nullptr) {
  void* stream_ptr = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(g.device(), &stream_ptr));
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  for (int64_t i = 0; i < g.size(); ++i) {
    STD_TORCH_CHECK((g.at(0, i).numel() + kChunk - 1) / kChunk < kMaxChunksPerLaunch, op, ": tensor ", i,
                    " is too large");
  }
  launch_group<kLists>(
      op, g.device(), stream, g.size(),
      [&](int l, int64_t i) {
        return extra != nullptr && l == kLists - 1 ? (*extra)[i] : g.at(l, i).mutable_data_ptr();
      },
      [&](int64_t i) { return g.at(0, i).numel(); }, counters, h, sc, main, epilogue, sr_seed);
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
// bf16 training modes (host side): which kernel a call takes, and its checks

Bf16Mode bf16_mode(int64_t sr_seed, const std::optional<std::vector<Tensor>>& master_params) {
  const bool master = master_params.has_value() && !master_params->empty();
  STD_TORCH_CHECK(!(master && sr_seed >= 0), "fastreg optimizers: stochastic rounding and master weights are "
                  "exclusive (the params are the nearest rounding of their master copy)");
  return master ? Bf16Mode::kMaster : (sr_seed >= 0 ? Bf16Mode::kStochastic : Bf16Mode::kPlain);
}

// Appends the master weights to the call's lists (kMaster); returns their index, or -1.
int append_master_list(Bf16Mode mode, std::optional<std::vector<Tensor>>& master_params,
                       std::vector<NamedList>& lists) {
  if (mode != Bf16Mode::kMaster) return -1;
  lists.push_back({"master_params", &*master_params, true});
  return static_cast<int>(lists.size()) - 1;
}

void check_mode(const char* op, Bf16Mode mode, ScalarType dtype) {
  STD_TORCH_CHECK(mode != Bf16Mode::kStochastic || dtype == ScalarType::BFloat16, op,
                  ": stochastic rounding needs bfloat16 params");
  STD_TORCH_CHECK(mode != Bf16Mode::kMaster || dtype == ScalarType::BFloat16 || dtype == ScalarType::Half, op,
                  ": master weights need bfloat16 or float16 params");
}

// Calls f(std::integral_constant<Bf16Mode, mode>()).
template <typename F>
void with_mode(Bf16Mode mode, F f) {
  switch (mode) {
    case Bf16Mode::kStochastic:
      f(std::integral_constant<Bf16Mode, Bf16Mode::kStochastic>());
      break;
    case Bf16Mode::kMaster:
      f(std::integral_constant<Bf16Mode, Bf16Mode::kMaster>());
      break;
    default:
      f(std::integral_constant<Bf16Mode, Bf16Mode::kPlain>());
  }
}

// ---------------------------------------------------------------------------------------------
// Operators

void fused_sgd_cuda(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> momentum_buffers,
                    std::vector<Tensor> momentum_started, double lr, std::optional<Tensor> lr_tensor, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize,
                    std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf, int64_t sr_seed,
                    std::optional<std::vector<Tensor>> sr_steps, std::optional<std::vector<Tensor>> master_params) {
  constexpr const char* op = "fastreg::_fused_sgd_";
  const bool use_momentum = momentum != 0.0;
  std::vector<NamedList> lists = {{"params", &params, true}, {"grads", &grads, false}};
  if (use_momentum) {
    lists.push_back({"momentum_buffers", &momentum_buffers, true});
  } else {
    STD_TORCH_CHECK(momentum_buffers.empty() && momentum_started.empty(), op,
                    ": momentum is 0 so momentum_buffers and momentum_started must be empty");
  }
  const Bf16Mode mode = bf16_mode(sr_seed, master_params);
  const int master_list = append_master_list(mode, master_params, lists);
  Group g(op, lists, master_list);
  check_mode(op, mode, g.dtype());
  std::vector<void*> flags;
  if (use_momentum) {
    flags = counter_pointers(op, "momentum_started", momentum_started, g, ScalarType::Byte, ScalarType::Bool);
  }
  std::vector<void*> steps;
  if (mode == Bf16Mode::kStochastic) {
    STD_TORCH_CHECK(sr_steps.has_value(), op, ": stochastic rounding needs sr_steps");
    steps = counter_pointers(op, "sr_steps", *sr_steps, g, ScalarType::Float, ScalarType::Float);
    if (!use_momentum) flags.assign(g.size(), nullptr);  // the epilogue still runs: it counts the steps
  }
  const DeviceScalars sc{device_scalar(op, "lr_tensor", lr_tensor, g), device_scalar(op, "grad_scale", grad_scale, g),
                         device_scalar(op, "found_inf", found_inf, g)};

  dispatch_storage(g.dtype(), [&](auto zero) {
    using S = decltype(zero);
    using M = typename AccOf<S>::type;
    // the kernels replace lr and the grad scale when those come as tensors
    const auto h = optim::make_sgd_hyper<M>(lr, momentum, dampening, weight_decay, 1.0, nesterov, maximize);
    auto run = [&](auto momentum_tag, auto mode_tag) {
      constexpr bool kMomentum = decltype(momentum_tag)::value;
      constexpr Bf16Mode kMode = decltype(mode_tag)::value;
      constexpr int kLists = (kMomentum ? 3 : 2) + kModeLists<kMode, true>;
      if constexpr (kMode == Bf16Mode::kPlain || sizeof(S) == 2) {
        launch_batches<kLists>(op, g, kMomentum || kMode == Bf16Mode::kStochastic ? &flags : nullptr, h, sc,
                               sgd_kernel<S, kMomentum, kMode>,
                               counter_epilogue<Counter::kSgdStarted, kLists, SgdHyper<M>, kMode>,
                               static_cast<uint64_t>(sr_seed), kMode == Bf16Mode::kStochastic ? &steps : nullptr);
      }
    };
    with_mode(mode, [&](auto mode_tag) {
      if (use_momentum) {
        run(std::true_type(), mode_tag);
      } else {
        run(std::false_type(), mode_tag);
      }
    });
  });
  g.finish();
}

void fused_adam_cuda(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> exp_avgs,
                     std::vector<Tensor> exp_avg_sqs, std::vector<Tensor> max_exp_avg_sqs,
                     std::vector<Tensor> state_steps, double lr, std::optional<Tensor> lr_tensor, double beta1,
                     double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                     bool decoupled_weight_decay, std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf,
                     int64_t sr_seed, std::optional<std::vector<Tensor>> master_params) {
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
  const Bf16Mode mode = bf16_mode(sr_seed, master_params);
  const int master_list = append_master_list(mode, master_params, lists);
  Group g(op, lists, master_list);
  check_mode(op, mode, g.dtype());
  const std::vector<void*> steps = counter_pointers(op, "state_steps", state_steps, g, ScalarType::Float, ScalarType::Float);
  const DeviceScalars sc{device_scalar(op, "lr_tensor", lr_tensor, g), device_scalar(op, "grad_scale", grad_scale, g),
                         device_scalar(op, "found_inf", found_inf, g)};

  dispatch_storage(g.dtype(), [&](auto zero) {
    using S = decltype(zero);
    using M = typename AccOf<S>::type;
    // the kernels replace lr and the grad scale when those come as tensors
    const auto h = optim::make_adam_hyper<M>(lr, beta1, beta2, weight_decay, eps, 1.0, maximize, decoupled_weight_decay);
    auto run = [&](auto amsgrad_tag, auto mode_tag) {
      constexpr bool kAmsgrad = decltype(amsgrad_tag)::value;
      constexpr Bf16Mode kMode = decltype(mode_tag)::value;
      constexpr int kLists = (kAmsgrad ? 5 : 4) + kModeLists<kMode, false>;
      if constexpr (kMode == Bf16Mode::kPlain || sizeof(S) == 2) {
        launch_batches<kLists>(op, g, &steps, h, sc, adam_kernel<S, kAmsgrad, kMode>,
                               counter_epilogue<Counter::kAdamStep, kLists, AdamHyper<M>>,
                               static_cast<uint64_t>(sr_seed));
      }
    };
    with_mode(mode, [&](auto mode_tag) {
      if (amsgrad) {
        run(std::true_type(), mode_tag);
      } else {
        run(std::false_type(), mode_tag);
      }
    });
  });
  g.finish();
}

}  // namespace optim_cuda
}  // namespace fastreg

STABLE_TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("_fused_sgd_", TORCH_BOX(&fastreg::optim_cuda::fused_sgd_cuda));
  m.impl("_fused_adam_", TORCH_BOX(&fastreg::optim_cuda::fused_adam_cuda));
}
