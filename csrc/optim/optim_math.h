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
//
// bf16 training modes (the end of this file): stochastic rounding of the updated fp32 value to
// bf16 with random bits from Philox4x32-10 keyed by (seed, step, tensor, element), and the nearest
// rounding of an fp32 master copy. Both kernels call the same functions, so the CPU and the CUDA
// kernel write the same bits.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

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
  // The operator's lr and betas unrounded: the bias corrections are computed from them in double
  // and rounded once, as torch.optim does on the host (1 - 0.9999f^t in float is 1e-4 off).
  double lr_exact, beta1_exact, beta2_exact;
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
  h.lr_exact = lr, h.beta1_exact = beta1, h.beta2_exact = beta2;
  return h;
}

// What one tensor's update needs from its step count t (already incremented); lr is h.lr_exact or
// the value of a lr tensor.
template <typename T>
struct AdamStepScalars {
  T neg_step_size;   // -lr / (1 - beta1^t)
  T bc2_sqrt;        // sqrt(1 - beta2^t)
  T decay;           // AdamW: 1 - lr * weight_decay; Adam: 1
};

template <typename T>
FASTREG_HD AdamStepScalars<T> adam_step_scalars(const AdamHyper<T>& h, double lr, T step) {
  AdamStepScalars<T> s;
  const double t = static_cast<double>(step);
  s.neg_step_size = static_cast<T>(-(lr / (1.0 - math_pow(h.beta1_exact, t))));
  s.bc2_sqrt = static_cast<T>(math_sqrt(1.0 - math_pow(h.beta2_exact, t)));
  s.decay = h.decoupled ? T(1) - static_cast<T>(lr) * h.weight_decay : T(1);
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

// ---- bf16 rounding: nearest and stochastic -----------------------------------------------------

// The bits of a float, and back (memcpy: defined behaviour, compiles to a register move).
FASTREG_HD uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
}

// bf16 bits nearest to x (ties to even), as c10::BFloat16 and __float2bfloat16_rn round; NaN stays
// a quiet NaN of the same sign.
FASTREG_HD uint16_t bf16_bits_nearest(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Stochastic rounding of x to bf16, given 16 uniformly random bits: a bf16 value keeps the top 16
// bits of a float, so adding the random bits to the 16 dropped ones carries into the kept part with
// probability (dropped bits) / 2^16, i.e. x rounds away from zero with probability equal to its
// distance from the bf16 value below it in magnitude, over the gap: E[result] = x exactly
// (sign-magnitude: the same holds for negative x). A value beyond the largest finite bf16 rounds
// to inf with that same probability. Inf stays inf, NaN stays NaN.
FASTREG_HD uint16_t bf16_bits_stochastic(float x, uint32_t random16) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return bf16_bits_nearest(x);  // inf, NaN
  return static_cast<uint16_t>((u + (random16 & 0xffffu)) >> 16);
}

// ---- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) -------
//
// A counter-based generator: 128 random bits are a pure function of a 128-bit counter and a 64-bit
// key, so any element's bits can be computed anywhere, in any order, by any thread.

struct Philox4 {
  uint32_t v[4];
};

FASTREG_HD constexpr uint32_t mul_hi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

FASTREG_HD constexpr Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mul_hi32(kM0, c.v[0]), lo0 = kM0 * c.v[0];
    const uint32_t hi1 = mul_hi32(kM1, c.v[2]), lo1 = kM1 * c.v[2];
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// Stochastic rounding streams. Element e of tensor `tensor` at optimizer step `step` (the step
// count after the update, 1-based) takes 16 bits of the Philox block
//   counter = (e / 8 low 32 bits, e / 8 high 32 bits, step, tensor),  key = seed (64 bits)
// namely 16-bit half (e % 2) of 32-bit word (e % 8) / 2: read as little-endian 16-bit words, the
// four 32-bit outputs of block b are the random bits of elements 8b .. 8b + 7 in order. The bits
// depend on nothing but (seed, step, tensor, e): not on threads, chunks or launch layout.
constexpr int kSrElementsPerBlock = 8;

FASTREG_HD constexpr Philox4 sr_block(uint64_t seed, uint32_t step, uint32_t tensor, uint64_t block) {
  return philox4x32_10(
      Philox4{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), step, tensor}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The 16 random bits of element e (one Philox block per call: kernels that round 8 consecutive
// elements compute the block once and take its halves in order instead).
FASTREG_HD uint32_t sr_random16(uint64_t seed, uint32_t step, uint32_t tensor, uint64_t e) {
  const Philox4 r = sr_block(seed, step, tensor, e / kSrElementsPerBlock);
  const uint32_t lane = static_cast<uint32_t>(e % kSrElementsPerBlock);
  return (r.v[lane / 2] >> (16 * (lane % 2))) & 0xffffu;
}

// The step a stream is keyed by: the optimizer's step counter (a float holding an integer),
// wrapped to 32 bits.
template <typename T>
FASTREG_HD uint32_t sr_step_key(T step) {
  return static_cast<uint32_t>(static_cast<uint64_t>(step));
}

}  // namespace optim
}  // namespace fastreg
