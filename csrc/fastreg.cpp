// fastreg: every operator schema lives here, in one place.
//
//   op                                   CPU kernel                 CUDA kernel                 Python API
//   linear_cross_entropy                 csrc/lce/lce.cpp (driver)  same driver + _lce_rows     fastreg/functional.py
//   linear_cross_entropy_backward        csrc/lce/lce.cpp           same                        (autograd, reduction='none')
//   _lce_rows (fused per-row pass)       csrc/lce/lce_cpu.cpp       csrc/cuda/lce_rows.cu
//   fused optimizer steps                csrc/optim/optim_cpu.cpp   csrc/cuda/optim.cu          fastreg/optim/
//   _cpu_code_path (CPU ISA picked)      csrc/optim/optim_cpu.cpp   -                           fastreg/bench/common.py
//
// The module `fastreg._C` itself is empty: importing it loads this library, whose static
// initialisers register the operators with the dispatcher.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastreg operators (see torch.ops.fastreg)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastreg, m) {
  // Which CPU code the kernels run (x86-64 ISA clone or aarch64 NEON; "-serial" without OpenMP).
  m.def("_cpu_code_path() -> str", &fastreg::cpu_code_path);
  // ---- fused linear -> softmax -> cross-entropy ---------------------------------------------
  // input (N, D), weight (V, D), target (N,) int64/int32, bias (V,), class_weight (V,).
  // reduction: 0 none, 1 mean, 2 sum. softcap <= 0 means off. output_mask: which of
  // (grad_input, grad_weight, grad_bias) to compute *in the forward* (scalar reductions only;
  // they come out scaled for a unit upstream gradient). Unrequested gradients are empty.
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "int reduction, int ignore_index, float label_smoothing, float softcap, float z_loss, int chunk_size, "
      "bool[3] output_mask) -> (Tensor loss, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Gradients for reduction='none' given the per-row upstream gradient grad_loss (N,): recomputes
  // the logits chunk by chunk.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor target, Tensor? bias, "
      "Tensor? class_weight, int ignore_index, float label_smoothing, float softcap, float z_loss, int chunk_size, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Internal: the fused per-row pass over one chunk of logits (rows, V), contiguous. Writes each
  // row's loss (log-sum-exp, smoothing, z-loss included) into loss_rows and, if write_grad, the
  // gradient of the loss w.r.t. the (pre-softcap) logits in place, times row_scale (numel 1 or rows).
  // Ignored rows get loss 0 and gradient 0.
  m.def(
      "_lce_rows(Tensor(a!) logits, Tensor target, Tensor? class_weight, Tensor row_scale, int ignore_index, "
      "float label_smoothing, float softcap, float z_loss, bool write_grad, Tensor(b!) loss_rows) -> ()");

  // ---- fused optimizers (csrc/optim) ----------------------------------------------------------
  // FASTREG-OPTIM-SCHEMAS (owned by the optimizer kernels; keep them below this line)
  // One call updates every tensor of one (device, dtype) group; all lists are parallel to params.
  // lr_tensor (one element, on the params' device), when given, replaces lr. grad_scale: the
  // gradients are divided by it inside the kernel. found_inf: when nonzero nothing changes at all
  // (params, state, step counters, momentum flags). Both are read on the device (no host sync).
  // SGD: momentum_buffers and momentum_started (one-element uint8/bool flags: 0 until the buffer
  // holds a value, torch's `buf is None`) are empty when momentum == 0. Per-param counters and flags
  // (momentum_started, state_steps) may also come as ONE contiguous tensor holding all of them.
  m.def(
      "_fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] momentum_started, float lr, Tensor? lr_tensor, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");
  // Adam, and AdamW with decoupled_weight_decay. state_steps: one-element float32 counters (float64
  // accepted on CPU), incremented by the kernel. max_exp_avg_sqs is empty unless amsgrad.
  m.def(
      "_fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
}
