// The C interface of the SIMT harness: fastreg's CUDA kernels (run by the CPU SIMT runtime) on
// host buffers. Used by the torch ops of ops.cpp and, through ctypes, by tests/test_simt.py's
// teeth test. Every function returns 0 on success (msg: what ran) or 1 (msg: the error).
#pragma once
#include <cstdint>

enum SimtDtype { kSimtF32 = 0, kSimtBF16 = 1, kSimtF16 = 2, kSimtF64 = 3 };

struct SimtLceCall {
  void* logits;  // (rows, V), in place
  const void* target;
  const void* weight;  // or null
  const void* scale;
  void* loss;
  int64_t rows, V, ignore_index;
  double label_smoothing, softcap, z_loss;
  int32_t dtype, target_i32, weight_f64, scale_f64, scale_per_row, loss_f64, write_grad;
  const char* device;    // "h100" | "a100"
  const char* strategy;  // "auto" | "single-cached" | ... | "cluster8-streaming"
  const char* schedule;  // "forward" | "reverse" | "shuffle"
  uint64_t seed;
  // the optional arguments of _lce_rows (null / 0: absent)
  const void* probs;        // (rows, V) of the logits' dtype
  const void* zloss_scale;  // one float32/float64 element (zscale_f64)
  void* lse;                // (rows,) float32/float64 (lse_f64)
  void* argmax;             // (rows,) int64
  void* keep;               // (row_tiles, num_blocks) uint8
  int64_t row_tiles, num_blocks;
  double keep_eps;
  int32_t zscale_f64, lse_f64;
};

// One fused optimizer step over n tensors. ptrs[l * n + i]: list l of tensor i (Adam p, g, m, v[,
// vmax]; SGD p, g[, buf]); counters[i]: Adam float32 step / SGD uint8 flag (or null without).
struct SimtOptimCall {
  int32_t adam;  // 1: Adam/AdamW, 0: SGD
  int32_t n, lists;
  void** ptrs;
  const int64_t* numel;
  void** counters;
  int32_t dtype;
  double lr, momentum, dampening, weight_decay, beta1, beta2, eps;
  int32_t nesterov, maximize, amsgrad, decoupled;
  const void* lr_tensor;  // one-element float32/float64 tensors, or null
  int32_t lr_f64;
  const void* grad_scale;
  int32_t grad_scale_f64;
  const void* found_inf;
  int32_t found_inf_f64;
  const char* schedule;
  uint64_t seed;
};

extern "C" {
int simt_lce_rows(const SimtLceCall* call, char* msg, int msg_len);
// The plan only: msg = the strategy the planner picks for (device, rows, V, dtype, write_grad, strategy).
int simt_lce_plan(const char* device, int64_t rows, int64_t V, int32_t dtype, int32_t write_grad,
                  const char* strategy, char* msg, int msg_len);
// msg = "launches=<main launches> batches=<tensors per launch, comma-separated>"
int simt_fused_optim(const SimtOptimCall* call, char* msg, int msg_len);
// Batch capacity of one launch for a list count (the kernel-argument table).
int simt_optim_batch_cap(int32_t lists);
// Runtime self-tests (selftest.cpp): 0 and msg "out=..." when the kernel ran, 1 and the error.
int simt_selftest(const char* name, const char* schedule, char* msg, int msg_len);
// The launch rules of the SIMT CUDA runtime (simt_cudart.h, selftest.cpp): 0 and "out=..." when the
// launch ran, 1 and the runtime's error text.
int simt_launch_rule(const char* name, char* msg, int msg_len);
// float -> bf16 (kind kSimtBF16) / fp16 (kSimtF16) bits with the runtime's conversion, and back.
void simt_convert(const float* in, uint16_t* bits, float* back, int64_t n, int32_t kind);
}
