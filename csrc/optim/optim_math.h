// The per-element update rules of fastreg's fused optimizers, shared by the CPU kernel
// (csrc/optim/optim_cpu.cpp) and the CUDA kernel (csrc/cuda/optim.cu).
//
// T is the math type: float for fp32/bf16/fp16 tensors, double for fp64 tensors. Every formula
// follows torch.optim's single-tensor (foreach=False) implementation operation by operation, so
// that fp32 trajectories agree to rounding:
//
// SGD (torch.optim.SGD):
//   g  = grad * inv_scale;  g = maximize ? -g : g;  g += weight_decay * p   (if weight_decay != 0)
//   momentum != 0:  buf = first ? g : buf * momentum + (1 - dampening) * g
//                   g   = nesterov ? g + momentum * buf : buf
//   p += -lr * g
//
// Adam / AdamW (torch.optim.Adam, decoupled_weight_decay for AdamW), t = the step after increment:
//   g  = grad * inv_scale;  g = maximize ? -g : g
//   AdamW: p *= 1 - lr * weight_decay          Adam: g += weight_decay * p   (if weight_decay != 0)
//   m  = lerp(m, g, 1 - beta1);  v = v * beta2 + (1 - beta2) * g * g
//   vmax = max(vmax, v) (amsgrad);  denom = sqrt(amsgrad ? vmax : v) / sqrt(1 - beta2^t) + eps
//   p += -(lr / (1 - beta1^t)) * (m / denom)
#pragma once
#include <cmath>
#include <cstdint>

#include "common.h"

namespace fastreg {
namespace optim {

FASTREG_HD float math_pow(float a, float b) { return powf(a, b); }
FASTREG_HD double math_pow(double a, double b) { return pow(a, b); }
FASTREG_HD float math_sqrt(float a) { return sqrtf(a); }
FASTREG_HD double math_sqrt(double a) { return sqrt(a); }

// torch.lerp's formula (the two forms keep it exact at both ends, as ATen's does). Written as a
// select so that loops over it vectorise.
template <typename V, typename T>
FASTREG_HD V torch_lerp(V self, V end, T weight) {
  const V low = self + weight * (end - self);
  const V high = end - (end - self) * (T(1) - weight);
  return (weight < T(0.5)) & (weight > T(-0.5)) ? low : high;
}

// ---- SGD ---------------------------------------------------------------------------------------

// Hyper-parameters of one call, in math type. The host converts torch's float (double) arguments
// once; one_minus_dampening is computed there in double, as torch.optim does in Python.
template <typename T>
struct SgdHyper {
  T neg_lr;                 // -lr
  T momentum;
  T one_minus_dampening;    // 1 - dampening
  T weight_decay;
  T inv_grad_scale;         // 1 / grad_scale, or 1
  bool nesterov;
  bool maximize;
};

// From the operator's arguments (doubles, as torch.optim's Python computes 1 - dampening).
template <typename T>
inline SgdHyper<T> make_sgd_hyper(double lr, double momentum, double dampening, double weight_decay,
                                  double inv_grad_scale, bool nesterov, bool maximize) {
  SgdHyper<T> h;
  h.neg_lr = static_cast<T>(-lr);
  h.momentum = static_cast<T>(momentum);
  h.one_minus_dampening = static_cast<T>(1.0 - dampening);
  h.weight_decay = static_cast<T>(weight_decay);
  h.inv_grad_scale = static_cast<T>(inv_grad_scale);
  h.nesterov = nesterov;
  h.maximize = maximize;
  return h;
}

// One element. MOMENTUM: momentum != 0 (buf is then the momentum buffer); first: the buffer has
// never been written (torch's `buf is None`): it becomes a copy of the gradient.
template <bool MOMENTUM, typename T>
FASTREG_HD void sgd_update(T& p, T grad, T& buf, bool first, const SgdHyper<T>& h) {
  T g = grad * h.inv_grad_scale;
  g = h.maximize ? -g : g;
  g = h.weight_decay != T(0) ? g + h.weight_decay * p : g;
  if (MOMENTUM) {
    buf = first ? g : buf * h.momentum + h.one_minus_dampening * g;
    g = h.nesterov ? g + h.momentum * buf : buf;
  }
  p = p + h.neg_lr * g;
}

// ---- Adam / AdamW ------------------------------------------------------------------------------

template <typename T>
struct AdamHyper {
  T lr;
  T beta1, beta2;
  T one_minus_beta1, one_minus_beta2;   // computed by the host in double, as torch does
  T eps;
  T weight_decay;
  T inv_grad_scale;
  bool decoupled;                        // AdamW
  bool maximize;
};

// From the operator's arguments (doubles, as torch.optim's Python computes 1 - beta).
template <typename T>
inline AdamHyper<T> make_adam_hyper(double lr, double beta1, double beta2, double weight_decay, double eps,
                                    double inv_grad_scale, bool maximize, bool decoupled) {
  AdamHyper<T> h;
  h.lr = static_cast<T>(lr);
  h.beta1 = static_cast<T>(beta1);
  h.beta2 = static_cast<T>(beta2);
  h.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  h.eps = static_cast<T>(eps);
  h.weight_decay = static_cast<T>(weight_decay);
  h.inv_grad_scale = static_cast<T>(inv_grad_scale);
  h.decoupled = decoupled;
  h.maximize = maximize;
  return h;
}

// What one tensor's update needs from its step count t (already incremented).
template <typename T>
struct AdamStepScalars {
  T neg_step_size;   // -lr / (1 - beta1^t)
  T bc2_sqrt;        // sqrt(1 - beta2^t)
  T decay;           // AdamW: 1 - lr * weight_decay; Adam: 1
};

template <typename T>
FASTREG_HD AdamStepScalars<T> adam_step_scalars(const AdamHyper<T>& h, T lr, T step) {
  AdamStepScalars<T> s;
  s.neg_step_size = -(lr / (T(1) - math_pow(h.beta1, step)));
  s.bc2_sqrt = math_sqrt(T(1) - math_pow(h.beta2, step));
  s.decay = h.decoupled ? T(1) - lr * h.weight_decay : T(1);
  return s;
}

// The element update comes in two halves around the square root, so that the CPU kernel can run
// them on SIMD vectors (V = a GCC vector of T) with its own vector sqrt in between; elsewhere
// V = T. Branch-free: the flags are uniform, every ?: is a select.
//
// First half: the moments. Returns the second-moment estimate whose square root the update needs
// (v, or its running maximum vmax with AMSGRAD; vmax is unused otherwise).
template <bool AMSGRAD, typename V, typename T>
FASTREG_HD V adam_moments(V p, V grad, V& m, V& v, V& vmax, const AdamHyper<T>& h) {
  V g = grad * h.inv_grad_scale;
  g = h.maximize ? -g : g;
  const bool coupled_decay = !h.decoupled & (h.weight_decay != T(0));
  g = coupled_decay ? g + h.weight_decay * p : g;   // Adam: L2 penalty in the gradient
  m = torch_lerp(m, g, h.one_minus_beta1);
  v = v * h.beta2 + h.one_minus_beta2 * g * g;
  if (AMSGRAD) {
    vmax = (v > vmax) | (v != v) ? v : vmax;   // torch.maximum: NaN propagates
    return vmax;
  }
  return v;
}

// Second half: the parameter, given root = sqrt(second-moment estimate).
template <typename V, typename T>
FASTREG_HD V adam_apply(V p, V m, V root, const AdamHyper<T>& h, const AdamStepScalars<T>& s) {
  p = p * s.decay;   // AdamW: decoupled decay (decay == 1 otherwise)
  const V denom = root / s.bc2_sqrt + h.eps;
  return p + s.neg_step_size * (m / denom);
}

// One element, both halves.
template <bool AMSGRAD, typename T>
FASTREG_HD void adam_update(T& p, T grad, T& m, T& v, T& vmax, const AdamHyper<T>& h, const AdamStepScalars<T>& s) {
  const T second = adam_moments<AMSGRAD>(p, grad, m, v, vmax, h);
  p = adam_apply(p, m, math_sqrt(second), h, s);
}

}  // namespace optim
}  // namespace fastreg
