// Pieces shared by the C++ autograd kernels of the fused linear + loss ops (csrc/lce/lce.cpp,
// csrc/mse/mse.cpp). Both ops return (loss, grad_input, grad_weight, grad_bias): for scalar
// reductions the forward computes the gradients for a unit upstream gradient, which the backward
// scales; only the loss is differentiable.
#pragma once
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <array>
#include <optional>

namespace fastreg {

// True while torch.compile / AOTAutograd traces (fake or functional tensors): the backward is then
// traced with grad mode on, which is not a double backward.
inline bool is_traced(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// The gradients the forward must produce: those asked for, plus those autograd will need.
inline std::array<bool, 3> mask_for_autograd(std::array<bool, 3> mask, const at::Tensor& input,
                                             const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (at::GradMode::is_enabled()) {
    mask[0] = mask[0] || input.requires_grad();
    mask[1] = mask[1] || weight.requires_grad();
    mask[2] = mask[2] || (bias && bias->requires_grad());
  }
  return mask;
}

// True for the common `loss.backward()`: a plain CPU scalar upstream gradient equal to 1 (read
// from host memory, so no device sync; never while tracing).
inline bool is_unit_cpu_scalar(const at::Tensor& g) {
  if (!g.is_cpu() || g.layout() != c10::kStrided || g.numel() != 1 || is_traced(g) || g.is_neg()) return false;
  switch (g.scalar_type()) {
    case at::kFloat: return *g.const_data_ptr<float>() == 1.0f;
    case at::kDouble: return *g.const_data_ptr<double>() == 1.0;
    case at::kBFloat16: return static_cast<float>(*g.const_data_ptr<at::BFloat16>()) == 1.0f;
    case at::kHalf: return static_cast<float>(*g.const_data_ptr<at::Half>()) == 1.0f;
    default: return false;
  }
}

// Backward of a scalar reduction: the saved unit-upstream gradients (input, weight, bias) times
// grad_loss into out[0], out[1], out[3] (the argument positions of input, weight and bias).
// A unit upstream gradient hands the saved tensors on as they are: autograd's AccumulateGrad
// adopts one only when nothing else refers to it (the graph was freed), and copies it otherwise
// (retain_graph), so a later backward still sees them intact. Anything else is scaled out of place.
inline void scale_saved_grads(const torch::autograd::variable_list& saved, const at::Tensor& grad_loss,
                              bool need_input, bool need_weight, bool need_bias, torch::autograd::variable_list& out) {
  if (is_unit_cpu_scalar(grad_loss)) {
    if (need_input) out[0] = saved[0];
    if (need_weight) out[1] = saved[1];
    if (need_bias) out[3] = saved[2];
    return;
  }
  if (need_input) out[0] = saved[0] * grad_loss;
  if (need_weight) out[1] = saved[1] * grad_loss;
  if (need_bias) out[3] = saved[2] * grad_loss;
}

inline void check_not_double_backward(const at::Tensor& grad_loss, const char* fn, const char* eager) {
  TORCH_CHECK(!at::GradMode::is_enabled() || is_traced(grad_loss), fn,
              " does not support double backward (create_graph=True); use the eager ", eager, " for that");
}

}  // namespace fastreg
