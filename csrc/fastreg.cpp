// fastreg: every operator schema lives here, in one place.
//
//   op                                   CPU kernel                 CUDA kernel                 Python API
//   linear_cross_entropy                 csrc/lce/lce.cpp (driver)  same driver + _lce_rows     fastreg/functional.py
//     (autograd: C++ kernel at the Autograd key in csrc/lce/lce.cpp; V <= 64 on CPU: csrc/small/small_dense.h)
//   linear_cross_entropy_backward        csrc/lce/lce.cpp           same                        (autograd, reduction='none')
//   _lce_loss, _mse_loss (loss only)    composite kernels next to the autograd kernels              fastreg/functional.py
//   linear_mse_loss (+ _backward)        csrc/mse/mse.cpp           same (ATen GEMMs)           fastreg/functional.py
//     (autograd: C++ kernel at the Autograd key in csrc/mse/mse.cpp; V <= 64 on CPU: csrc/small/small_dense.h)
//   _lce_rows (fused per-row pass)       csrc/lce/lce_cpu.cpp       csrc/cuda/lce_rows.cu
//   _lce_vp_stats, _lce_vp_rows          csrc/lce/lce_vocab_parallel.cpp  same file (ATen ops)  fastreg/distributed/
//     (vocab-parallel row passes)
//   fused optimizer steps                csrc/optim/optim_cpu.cpp   csrc/cuda/optim.cu          fastreg/optim/
//   module fastreg._C (build info)       csrc/module.cpp (pybind11)                             fastreg/_C_loader.py
//   _fit_epoch (fit() of linear models)  csrc/fit/fit.cpp           (none: CPU only)            fastreg/_fit.py
//
// Importing `fastreg._C` loads this library, whose static initialisers register the operators
// with the dispatcher.
#include <torch/library.h>

TORCH_LIBRARY(fastreg, m) {
  // ---- fused linear -> softmax -> cross-entropy ---------------------------------------------
  // input (N, D), weight (V, D), target (N,) int64/int32 or class probabilities (N, V) of input's
  // dtype, bias (V,), class_weight (V,). grad_filter_eps > 0: the backward GEMMs skip (row tile,
  // vocabulary block) products while their bounded total stays within eps of the gradient's scale. skip_ignored: -1 auto (CPU on, CUDA off), 0, 1 (on
  // CUDA one host sync). return_stats: lse (N,) accumulate dtype, predictions (N,) int64; else empty.
  // reduction: 0 none, 1 mean, 2 sum. softcap <= 0 means off. output_mask: which of
  // (grad_input, grad_weight, grad_bias) to compute *in the forward* (scalar reductions only;
  // they come out scaled for a unit upstream gradient). Unrequested gradients are empty.
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "int reduction, int ignore_index, float label_smoothing, float softcap, float z_loss, int chunk_size, "
      "bool[3] output_mask, float grad_filter_eps=0., int skip_ignored=-1, bool return_stats=False) "
      "-> (Tensor loss, Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor lse, Tensor predictions)");
  // The loss alone (composite over linear_cross_entropy): what the Python API calls, so one call
  // returns one tensor to Python.
  m.def(
      "_lce_loss(Tensor input, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, int reduction, "
      "int ignore_index, float label_smoothing, float softcap, float z_loss, int chunk_size, "
      "float grad_filter_eps=0., int skip_ignored=-1) -> Tensor");
  // The loss with each row's log-sum-exp and prediction (return_stats=True; composite as well).
  m.def(
      "_lce_loss_stats(Tensor input, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "int reduction, int ignore_index, float label_smoothing, float softcap, float z_loss, int chunk_size, "
      "float grad_filter_eps=0., int skip_ignored=-1) -> (Tensor loss, Tensor lse, Tensor predictions)");
  // Gradients for reduction='none' given the per-row upstream gradient grad_loss (N,): recomputes
  // the logits chunk by chunk.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor target, Tensor? bias, "
      "Tensor? class_weight, int ignore_index, float label_smoothing, float softcap, float z_loss, int chunk_size, "
      "bool[3] output_mask, float grad_filter_eps=0., int skip_ignored=-1) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Internal: the fused per-row pass over one chunk of logits (rows, V), contiguous, float32/float64/
  // bfloat16/float16 (16-bit logits are read and written directly, fp32 maths). Writes each row's
  // loss (log-sum-exp, smoothing, z-loss included) into loss_rows (accumulate dtype: fp32, fp64 for
  // fp64 logits) and, if write_grad, the gradient of the loss w.r.t. the (pre-softcap) logits in
  // place, times row_scale (numel 1 or rows). Ignored rows get loss 0 and gradient 0.
  //   target_probs   (rows, V) class-probability targets in the logits' dtype; `target` is then not
  //                  read (pass an empty int64 tensor) and every row is active. Row loss
  //                  sum_c w_c q'_c (lse - z_c), q' = (1-e) q + e/V: torch's probability-target CE.
  //   zloss_scale    numel 1, accumulate dtype: multiplies every row's z-loss term (loss and gradient).
  //   lse_rows       (rows,) accumulate dtype: each active row's log-sum-exp of the (softcapped)
  //                  logits, 0 for ignored rows.
  //   argmax_rows    (rows,) int64: the first maximum of each active row's (softcapped) logits (a NaN
  //                  counts as the maximum, like torch.argmax), -1 for ignored rows.
  //   block_keep     (row_tiles, num_blocks) uint8, zero-filled by the caller, with write_grad: raised
  //                  to the largest lce_block_code (lce_math.h) of the written gradient entries of the
  //                  tile's rows (ceil(rows / row_tiles) each) and the block's columns (ceil(V /
  //                  num_blocks) each): 0 where all |g| <= grad_filter_eps (>= 0), else the biased
  //                  fp32 exponent of the largest |g| (a bound 2^(code - 126); 255: inf/NaN).
  m.def(
      "_lce_rows(Tensor(a!) logits, Tensor target, Tensor? class_weight, Tensor row_scale, int ignore_index, "
      "float label_smoothing, float softcap, float z_loss, bool write_grad, Tensor(b!) loss_rows, "
      "Tensor? target_probs=None, Tensor? zloss_scale=None, Tensor(c!)? lse_rows=None, "
      "Tensor(d!)? argmax_rows=None, float grad_filter_eps=0.0, Tensor(e!)? block_keep=None) -> ()");

  // ---- vocab-parallel linear cross-entropy (csrc/lce/lce_vocab_parallel.cpp) -----------------
  // Internal row passes of fastreg.distributed.linear_cross_entropy; this rank holds classes
  // [vocab_start, vocab_start + V_local) of num_classes. stats rows: [num_slots local log-sum-exps
  // (this rank writes column `slot`), z_t, w_t (with class_weight), sum_c w_c z_c (with label
  // smoothing)]. _lce_vp_stats softcaps logits in place and overwrites stats (rows + 1, width); its
  // last row holds the number of targets that are neither a class nor ignore_index. After the
  // group's all-reduce of stats, _lce_vp_rows writes the row losses and, if write_grad, the
  // gradient of this rank's logits in place, times row_scale (numel 1 or rows).
  m.def(
      "_lce_vp_stats(Tensor(a!) logits, Tensor target, Tensor? class_weight, int vocab_start, int num_classes, "
      "int ignore_index, float softcap, bool want_wz, int slot, int num_slots, Tensor(b!) stats) -> ()");
  m.def(
      "_lce_vp_rows(Tensor(a!) logits, Tensor target, Tensor? class_weight, Tensor stats, Tensor row_scale, "
      "Tensor? class_weight_sum, int vocab_start, int num_classes, int ignore_index, float label_smoothing, "
      "float softcap, float z_loss, bool logits_capped, bool write_grad, int num_slots, Tensor(b!) loss_rows) -> ()");
  // ---- fused linear -> mean-squared error ------------------------------------------------------
  // input (*, D), weight (V, D), target (*, V) of input's dtype, bias (V,). reduction as above;
  // 'none' gives the (*, V) squared errors. output_mask as for linear_cross_entropy (the Autograd
  // kernel adds the gradients of inputs that require grad).
  m.def(
      "linear_mse_loss(Tensor input, Tensor weight, Tensor target, Tensor? bias, int reduction, bool[3] output_mask) "
      "-> (Tensor loss, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The loss alone (composite over linear_mse_loss), as _lce_loss.
  m.def("_mse_loss(Tensor input, Tensor weight, Tensor target, Tensor? bias, int reduction) -> Tensor");
  // Gradients for reduction='none' given the per-element upstream gradient grad_loss (*, V).
  m.def(
      "linear_mse_loss_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor target, Tensor? bias, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // ---- fused optimizers (csrc/optim) ----------------------------------------------------------
  // FASTREG-OPTIM-SCHEMAS (owned by the optimizer kernels; keep them below this line)
  // One call updates every tensor of one (device, dtype) group; all lists are parallel to params.
  // lr_tensor (one element, on the params' device), when given, replaces lr. grad_scale: the
  // gradients are divided by it inside the kernel. found_inf: when nonzero nothing changes at all
  // (params, state, step counters, momentum flags). Both are read on the device (no host sync).
  // SGD: momentum_buffers and momentum_started (one-element uint8/bool flags: 0 until the buffer
  // holds a value, torch's `buf is None`) are empty when momentum == 0. Per-param counters and flags
  // (momentum_started, state_steps) may also come as ONE contiguous tensor holding all of them.
  // bf16 training modes (both ops, exclusive): sr_seed >= 0 stores bf16 params with stochastic
  // rounding, Philox bits keyed by (sr_seed, step, tensor index, element index) (optim_math.h);
  // SGD then counts steps in sr_steps (like state_steps). master_params: fp32 copies of bf16/fp16
  // params that take the update; the params receive their nearest rounding.
  m.def(
      "_fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] momentum_started, float lr, Tensor? lr_tensor, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "int sr_seed=-1, Tensor(d!)[]? sr_steps=None, Tensor(e!)[]? master_params=None) -> ()");
  // Adam, and AdamW with decoupled_weight_decay. state_steps: one-element float32 counters (float64
  // accepted on CPU), incremented by the kernel. max_exp_avg_sqs is empty unless amsgrad.
  m.def(
      "_fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? grad_scale, Tensor? found_inf, int sr_seed=-1, Tensor(f!)[]? master_params=None) -> ()");

  // ---- fit() of the linear models (csrc/fit) ---------------------------------------------------
  // One epoch of mini-batch training in C++: batches of batch_size rows in the order perm (None:
  // 0..N-1), loss 0 = softmax cross-entropy (y int64 labels, class_weight optional), 1 = mean squared
  // error (y (N, out)); params = [weight] or [weight, bias], updated in place after every batch by
  // optimizer 0 = SGD, 1 = Adam/AdamW with per-param hyper-parameters (8 numbers per param, see
  // csrc/fit/fit.cpp) and state (SGD: momentum_buffer, momentum flag; Adam: exp_avg, exp_avg_sq,
  // max_exp_avg_sq, step), then the L1 soft-threshold (lr * l1) on the weight. check_data: first refuse non-finite X/y and
  // labels out of range (fit() sets it on the first epoch). Returns the
  // epoch's mean batch loss (float64, 0-d).
  m.def(
      "_fit_epoch(Tensor X, Tensor y, Tensor? perm, Tensor(a!)[] params, Tensor? class_weight, int loss, "
      "int batch_size, float l1, int optimizer, Tensor(b!)[] state, float[] hyper, int[] trainable, bool check_data) -> Tensor");
}
