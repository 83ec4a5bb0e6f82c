// Test-only torch operators torch.ops.fastreg_simt.*: fastreg's CUDA kernels executed by the CPU
// SIMT runtime on CPU tensors (built by tests/simt/simt_build.py for tests/test_simt.py).
//
//   _lce_rows(<the first 10 arguments of fastreg::_lce_rows>, str device, str strategy, str schedule, int seed,
//             <its 6 optional arguments>) -> str
//       device: "h100" | "a100" (the planner's device description); strategy: "auto" (the plan
//       of the real launcher) or a forced one ("single-cached", "cluster4-streaming", ...).
//       Returns the strategy executed ("none" for zero rows).
//   _fused_sgd_ / _fused_adam_(<the arguments of fastreg's op>, str schedule, int seed) -> str
//       Returns "launches=<n> batches=<tensors per launch>".
//   _lce_plan(str device, int rows, int V, ScalarType dtype, bool write_grad, str strategy) -> str
//   _optim_batch_cap(int lists) -> int
//   _selftest(str name, str schedule) -> str   runtime self-tests (selftest.cpp)
//   _launch_rule(str name) -> str               the SIMT CUDA runtime's launch rules (selftest.cpp)
//   _convert(Tensor x, ScalarType dtype) -> (bits, back)   the runtime's bf16/fp16 conversions
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "simt_harness.h"

namespace {

using at::Tensor;

int32_t simt_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float:
      return kSimtF32;
    case c10::ScalarType::Double:
      return kSimtF64;
    case c10::ScalarType::BFloat16:
      return kSimtBF16;
    case c10::ScalarType::Half:
      return kSimtF16;
    default:
      TORCH_CHECK(false, "fastreg_simt: unsupported dtype ", t);
  }
}

bool is_f64(const Tensor& t) { return t.scalar_type() == c10::ScalarType::Double; }

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "fastreg_simt: ", name, " must be a contiguous CPU tensor");
}

std::string lce_rows(Tensor logits, const Tensor& target, const std::optional<Tensor>& class_weight,
                     const Tensor& row_scale, int64_t ignore_index, double label_smoothing, double softcap,
                     double z_loss, bool write_grad, Tensor loss_rows, const std::string& device,
                     const std::string& strategy, const std::string& schedule, int64_t seed,
                     const std::optional<Tensor>& target_probs, const std::optional<Tensor>& zloss_scale,
                     const std::optional<Tensor>& lse_rows, const std::optional<Tensor>& argmax_rows,
                     double grad_filter_eps, const std::optional<Tensor>& block_keep) {
  auto given = [](const std::optional<Tensor>& t) { return t.has_value() && t->defined(); };
  check_cpu(logits, "logits");
  const bool soft = given(target_probs);
  if (!soft) check_cpu(target, "target");
  check_cpu(row_scale, "row_scale");
  check_cpu(loss_rows, "loss_rows");
  TORCH_CHECK(logits.dim() == 2, "fastreg_simt: logits must be 2-D");
  const int64_t rows = logits.size(0);
  TORCH_CHECK((soft || target.numel() == rows) && loss_rows.numel() == rows,
              "fastreg_simt: target/loss_rows must have rows elements");
  TORCH_CHECK(row_scale.numel() == 1 || row_scale.numel() == rows, "fastreg_simt: row_scale must have 1 or rows elements");
  SimtLceCall c{};
  c.logits = logits.data_ptr();
  c.target = target.const_data_ptr();
  c.weight = nullptr;
  if (class_weight.has_value() && class_weight->defined()) {
    check_cpu(*class_weight, "class_weight");
    TORCH_CHECK(class_weight->numel() == logits.size(1), "fastreg_simt: class_weight must have V elements");
    c.weight = class_weight->const_data_ptr();
    c.weight_f64 = is_f64(*class_weight);
  }
  c.scale = row_scale.const_data_ptr();
  c.loss = loss_rows.data_ptr();
  c.rows = rows;
  c.V = logits.size(1);
  c.ignore_index = ignore_index;
  c.label_smoothing = label_smoothing;
  c.softcap = softcap;
  c.z_loss = z_loss;
  c.dtype = simt_dtype(logits.scalar_type());
  c.target_i32 = target.scalar_type() == c10::ScalarType::Int;
  c.scale_f64 = is_f64(row_scale);
  c.scale_per_row = row_scale.numel() != 1;
  c.loss_f64 = is_f64(loss_rows);
  c.write_grad = write_grad;
  c.device = device.c_str();
  c.strategy = strategy.c_str();
  c.schedule = schedule.c_str();
  c.seed = static_cast<uint64_t>(seed);
  if (soft) {
    check_cpu(*target_probs, "target_probs");
    TORCH_CHECK(target_probs->sizes() == logits.sizes() && target_probs->scalar_type() == logits.scalar_type(),
                "fastreg_simt: target_probs must be (rows, V) of the logits' dtype");
    c.probs = target_probs->const_data_ptr();
    c.target = nullptr;
  }
  if (given(zloss_scale)) {
    check_cpu(*zloss_scale, "zloss_scale");
    TORCH_CHECK(zloss_scale->numel() == 1, "fastreg_simt: zloss_scale must have one element");
    c.zloss_scale = zloss_scale->const_data_ptr();
    c.zscale_f64 = is_f64(*zloss_scale);
  }
  if (given(lse_rows)) {
    check_cpu(*lse_rows, "lse_rows");
    TORCH_CHECK(lse_rows->numel() == rows, "fastreg_simt: lse_rows must have rows elements");
    c.lse = lse_rows->data_ptr();
    c.lse_f64 = is_f64(*lse_rows);
  }
  if (given(argmax_rows)) {
    check_cpu(*argmax_rows, "argmax_rows");
    TORCH_CHECK(argmax_rows->numel() == rows && argmax_rows->scalar_type() == c10::ScalarType::Long,
                "fastreg_simt: argmax_rows must be int64 with rows elements");
    c.argmax = argmax_rows->data_ptr();
  }
  if (given(block_keep)) {
    check_cpu(*block_keep, "block_keep");
    TORCH_CHECK(block_keep->dim() == 2 && block_keep->scalar_type() == c10::ScalarType::Byte,
                "fastreg_simt: block_keep must be a 2-D uint8 tensor");
    c.keep = block_keep->data_ptr();
    c.row_tiles = block_keep->size(0);
    c.num_blocks = block_keep->size(1);
    c.keep_eps = grad_filter_eps;
  }
  char msg[1024];
  TORCH_CHECK(simt_lce_rows(&c, msg, sizeof msg) == 0, "fastreg_simt._lce_rows: ", msg);
  return msg;
}

std::string lce_plan(const std::string& device, int64_t rows, int64_t V, c10::ScalarType dtype, bool write_grad,
                     const std::string& strategy) {
  char msg[1024];
  TORCH_CHECK(simt_lce_plan(device.c_str(), rows, V, simt_dtype(dtype), write_grad, strategy.c_str(), msg, sizeof msg) == 0,
              "fastreg_simt._lce_plan: ", msg);
  return msg;
}

const void* scalar_ptr(const std::optional<Tensor>& t, int32_t& f64, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_cpu(*t, name);
  TORCH_CHECK(t->numel() == 1, "fastreg_simt: ", name, " must have one element");
  f64 = is_f64(*t);
  return t->const_data_ptr();
}

// Shared by both optimizers: lists of equal-shape contiguous tensors, one counter per tensor
// (one-element tensors, or one packed tensor).
std::string run_optim(SimtOptimCall& c, const std::vector<std::vector<Tensor>>& lists, const std::vector<Tensor>& counters,
                      const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                      const std::optional<Tensor>& found_inf, const std::string& schedule, int64_t seed) {
  const int64_t n = static_cast<int64_t>(lists[0].size());
  TORCH_CHECK(n > 0, "fastreg_simt: the params list is empty");
  std::vector<void*> ptrs;
  std::vector<int64_t> numel;
  for (const auto& list : lists) {
    TORCH_CHECK(static_cast<int64_t>(list.size()) == n, "fastreg_simt: tensor lists of different lengths");
    for (int64_t i = 0; i < n; ++i) {
      check_cpu(list[i], "every tensor");
      TORCH_CHECK(list[i].numel() == lists[0][i].numel(), "fastreg_simt: shapes differ");
      TORCH_CHECK(list[i].scalar_type() == lists[0][0].scalar_type(), "fastreg_simt: dtypes differ");
      ptrs.push_back(list[i].data_ptr());
    }
  }
  for (int64_t i = 0; i < n; ++i) numel.push_back(lists[0][i].numel());
  std::vector<void*> cptr;
  if (!counters.empty()) {
    if (counters.size() == 1 && n > 1) {
      check_cpu(counters[0], "counters");
      TORCH_CHECK(counters[0].numel() == n, "fastreg_simt: packed counters need one element per param");
      char* base = static_cast<char*>(counters[0].data_ptr());
      for (int64_t i = 0; i < n; ++i) cptr.push_back(base + i * counters[0].element_size());
    } else {
      TORCH_CHECK(static_cast<int64_t>(counters.size()) == n, "fastreg_simt: one counter per param");
      for (const Tensor& t : counters) cptr.push_back(t.data_ptr());
    }
  }
  c.n = static_cast<int32_t>(n);
  c.lists = static_cast<int32_t>(lists.size());
  c.ptrs = ptrs.data();
  c.numel = numel.data();
  c.counters = cptr.empty() ? nullptr : cptr.data();
  c.dtype = simt_dtype(lists[0][0].scalar_type());
  c.lr_tensor = scalar_ptr(lr_tensor, c.lr_f64, "lr_tensor");
  c.grad_scale = scalar_ptr(grad_scale, c.grad_scale_f64, "grad_scale");
  c.found_inf = scalar_ptr(found_inf, c.found_inf_f64, "found_inf");
  c.schedule = schedule.c_str();
  c.seed = static_cast<uint64_t>(seed);
  char msg[4096];
  TORCH_CHECK(simt_fused_optim(&c, msg, sizeof msg) == 0, "fastreg_simt optimizer: ", msg);
  return msg;
}

std::string fused_sgd(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> momentum_buffers,
                      std::vector<Tensor> momentum_started, double lr, std::optional<Tensor> lr_tensor, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool maximize,
                      std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf, std::string schedule,
                      int64_t seed) {
  SimtOptimCall c{};
  c.adam = 0;
  c.lr = lr;
  c.momentum = momentum;
  c.dampening = dampening;
  c.weight_decay = weight_decay;
  c.nesterov = nesterov;
  c.maximize = maximize;
  std::vector<std::vector<Tensor>> lists = {params, grads};
  if (momentum != 0.0) lists.push_back(momentum_buffers);
  return run_optim(c, lists, momentum != 0.0 ? momentum_started : std::vector<Tensor>{}, lr_tensor, grad_scale, found_inf,
                   schedule, seed);
}

std::string fused_adam(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> exp_avgs,
                       std::vector<Tensor> exp_avg_sqs, std::vector<Tensor> max_exp_avg_sqs,
                       std::vector<Tensor> state_steps, double lr, std::optional<Tensor> lr_tensor, double beta1,
                       double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                       bool decoupled_weight_decay, std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf,
                       std::string schedule, int64_t seed) {
  SimtOptimCall c{};
  c.adam = 1;
  c.lr = lr;
  c.beta1 = beta1;
  c.beta2 = beta2;
  c.weight_decay = weight_decay;
  c.eps = eps;
  c.amsgrad = amsgrad;
  c.maximize = maximize;
  c.decoupled = decoupled_weight_decay;
  std::vector<std::vector<Tensor>> lists = {params, grads, exp_avgs, exp_avg_sqs};
  if (amsgrad) lists.push_back(max_exp_avg_sqs);
  return run_optim(c, lists, state_steps, lr_tensor, grad_scale, found_inf, schedule, seed);
}

int64_t optim_batch_cap(int64_t lists) { return simt_optim_batch_cap(static_cast<int32_t>(lists)); }

std::string selftest(const std::string& name, const std::string& schedule) {
  char msg[1024];
  const int rc = simt_selftest(name.c_str(), schedule.c_str(), msg, sizeof msg);
  TORCH_CHECK(rc != 2, msg);
  return rc == 0 ? std::string(msg) : "error: " + std::string(msg);
}

std::string launch_rule(const std::string& name) {
  char msg[1024];
  const int rc = simt_launch_rule(name.c_str(), msg, sizeof msg);
  return rc == 0 ? std::string(msg) : "error: " + std::string(msg);
}

std::tuple<Tensor, Tensor> convert(const Tensor& x, c10::ScalarType dtype) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == c10::ScalarType::Float, "fastreg_simt._convert: x must be float32");
  Tensor bits = at::empty(x.sizes(), x.options().dtype(c10::ScalarType::Short));
  Tensor back = at::empty(x.sizes(), x.options());
  simt_convert(x.const_data_ptr<float>(), reinterpret_cast<uint16_t*>(bits.data_ptr<int16_t>()),
               back.data_ptr<float>(), x.numel(), simt_dtype(dtype));
  return {bits, back};
}

}  // namespace

TORCH_LIBRARY(fastreg_simt, m) {
  m.def(
      "_lce_rows(Tensor(a!) logits, Tensor target, Tensor? class_weight, Tensor row_scale, int ignore_index, "
      "float label_smoothing, float softcap, float z_loss, bool write_grad, Tensor(b!) loss_rows, str device, "
      "str strategy, str schedule, int seed, Tensor? target_probs=None, Tensor? zloss_scale=None, "
      "Tensor(c!)? lse_rows=None, Tensor(d!)? argmax_rows=None, float grad_filter_eps=0.0, "
      "Tensor(e!)? block_keep=None) -> str",
      &lce_rows);
  m.def("_lce_plan(str device, int rows, int V, ScalarType dtype, bool write_grad, str strategy) -> str", &lce_plan);
  m.def(
      "_fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] momentum_started, float lr, Tensor? lr_tensor, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, Tensor? grad_scale, Tensor? found_inf, str schedule, "
      "int seed) -> str",
      &fused_sgd);
  m.def(
      "_fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? grad_scale, Tensor? found_inf, str schedule, int seed) -> str",
      &fused_adam);
  m.def("_optim_batch_cap(int lists) -> int", &optim_batch_cap);
  m.def("_selftest(str name, str schedule) -> str", &selftest);
  m.def("_launch_rule(str name) -> str", &launch_rule);
  m.def("_convert(Tensor x, ScalarType dtype) -> (Tensor bits, Tensor back)", &convert);
}
