// Fused linear -> mean-squared error: F.mse_loss(F.linear(input, W, b), target), forward and
// backward in one op (linear regression's loss), CPU and CUDA.
//
// Two drivers, picked per call:
//   small path (CPU, float/double, V <= 64, little work): csrc/small/small_dense.h computes the
//     predictions of a row on the stack, its squared errors and all gradients in one pass;
//   chunk path (everything else): rows in chunks of a (chunk, V) buffer, never N x V at once:
//       r_c      = x_c W^T + b - y_c          GEMM 1 (addmm), then subtract the targets
//       loss    += sum r_c^2                  (accumulated in fp32/fp64)
//       r_c     *= 2 s                        s: 1/(N V) 'mean', 1 'sum', grad_loss 'none'
//       grad_x_c = r_c W                      GEMM 2
//       grad_W  += r_c^T x_c, grad_b += sum_rows r_c    GEMM 3
// For scalar reductions the forward produces the gradients (for a unit upstream gradient) and the
// backward scales them; for 'none' the backward op recomputes the residuals with the per-element
// upstream gradient. The autograd formula is the C++ kernel at the Autograd key below.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "fixed_order_sum.h"
#include "mem/cpu_buffers.h"
#include "small/small_dense.h"
#include "small/fused_linear_autograd.h"
#include "small/small_parallel.h"

namespace fastreg {
namespace {

using at::Tensor;
constexpr int64_t kNone = 0, kMean = 1, kSum = 2;
constexpr const char* kFn = "fastreg.linear_mse_loss";

struct MseProblem {
  Tensor x, w, y, bias;  // x (N, D), w (V, D), y (N, V), bias (V,) or undefined
  int64_t N, D, V;
  at::ScalarType acc;
};

void check_operands(const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias) {
  TORCH_CHECK_VALUE(input.dim() >= 1, kFn, ": input must be a tensor of shape (*, in_features), got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, kFn, ": linear_weight must be 2-D (out_features, in_features), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.size(-1) == weight.size(1), kFn, ": input has ", input.size(-1),
                    " features but linear_weight has shape ", weight.sizes(), " (expected (out_features, ",
                    input.size(-1), "))");
  std::vector<int64_t> want(input.sizes().begin(), input.sizes().end());
  want.back() = weight.size(0);
  TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef(want), kFn, ": target has shape ", target.sizes(),
                    " but the predictions have shape ", at::IntArrayRef(want),
                    " (input's leading shape, then out_features); for one output use a (V=1, D) weight and a (*, 1) "
                    "target");
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, kFn,
                   ": input must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, kFn, ": linear_weight dtype ", weight.scalar_type(),
                   " does not match input dtype ", dt);
  TORCH_CHECK_TYPE(target.scalar_type() == dt, kFn, ": target dtype ", target.scalar_type(),
                   " does not match input dtype ", dt);
  const auto dev = input.device();
  auto same_device = [&](const Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device() == dev, kFn, ": all tensors must be on one device, got ", name, " on ", t.device(),
                      " and input on ", dev);
  };
  same_device(weight, "linear_weight");
  same_device(target, "target");
  if (bias) {
    same_device(*bias, "linear_bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), kFn, ": linear_bias has shape ",
                      bias->sizes(), " but expected (", weight.size(0), ",)");
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, kFn, ": linear_bias dtype ", bias->scalar_type(),
                     " does not match input dtype ", dt);
  }
}

MseProblem prepare(const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias) {
  check_operands(input, weight, target, bias);
  MseProblem p;
  p.D = input.size(-1);
  p.V = weight.size(0);
  p.x = input.reshape({-1, p.D});
  p.y = target.reshape({-1, p.V});
  p.N = p.x.size(0);
  p.w = weight;
  if (bias) p.bias = *bias;
  p.acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return p;
}

struct Grads {
  Tensor input, weight, bias;
};

// The same routing as the cross-entropy's small path (small::prefer_one_pass), measured the same
// way against F.mse_loss(F.linear(...)) with the one pass forced (EPYC): 64x64x10 0.62, 1024x64x10
// 0.62, 4096x256x32 0.57, 512x2048x16 0.61, 16384x128x64 0.59, 2048x512x64 0.65, 4096x1024x64 0.83.
bool use_small_path(const MseProblem& p) {
  const auto dt = p.x.scalar_type();
  return p.x.is_cpu() && (dt == at::kFloat || dt == at::kDouble) && small::prefer_one_pass(p.N, p.D, p.V);
}

// scale: upstream scale of every squared error; elem_scale: (N, V) per-element upstream gradient
// (or undefined); loss_elems: (N, V) output of the squared errors (or undefined). Returns their sum.
template <typename T>
double run_small(const MseProblem& p, double scale, const Tensor& elem_scale, bool write_grad,
                 std::array<bool, 3> mask, Tensor& loss_elems, Grads& g) {
  const Tensor x = p.x.stride(1) == 1 ? p.x : p.x.contiguous();
  const Tensor y = p.y.stride(1) == 1 ? p.y : p.y.contiguous();
  const Tensor w = p.w.contiguous();
  const Tensor b = p.bias.defined() ? p.bias.contiguous() : Tensor();  // the kernel reads it densely
  const bool want_gi = write_grad && mask[0], want_gw = write_grad && mask[1],
             want_gb = write_grad && mask[2] && p.bias.defined();
  if (want_gi) g.input = at::empty({p.N, p.D}, p.x.options());
  if (want_gw) g.weight = at::zeros({p.V, p.D}, p.w.options());
  if (want_gb) g.bias = at::zeros({p.V}, p.w.options());
  small::SmallMse<T> a;
  a.n = p.N, a.D = p.D, a.V = p.V;
  a.x = x.data_ptr<T>(), a.x_stride = x.stride(0);
  a.w = w.data_ptr<T>();
  a.b = b.defined() ? b.data_ptr<T>() : nullptr;
  a.grad_x = want_gi ? g.input.data_ptr<T>() : nullptr, a.grad_x_stride = p.D;
  a.grad_w = want_gw ? g.weight.data_ptr<T>() : nullptr;
  a.grad_b = want_gb ? g.bias.data_ptr<T>() : nullptr;
  a.y = y.data_ptr<T>(), a.y_stride = y.stride(0);
  a.scale = T(scale);
  if (elem_scale.defined()) a.elem_scale = elem_scale.data_ptr<T>(), a.elem_scale_stride = p.V;
  if (loss_elems.defined()) a.loss_elems = loss_elems.data_ptr<T>(), a.loss_stride = p.V;
  if (p.N == 0) return 0.0;
  return small::small_rows_parallel<T>(a, [](small::SmallMse<T> part, int64_t r0, int64_t r1) {
    part.n = r1 - r0;
    part.x += r0 * part.x_stride;
    part.y += r0 * part.y_stride;
    if (part.grad_x) part.grad_x += r0 * part.grad_x_stride;
    if (part.elem_scale) part.elem_scale += r0 * part.elem_scale_stride;
    if (part.loss_elems) part.loss_elems += r0 * part.loss_stride;
    return small::mse_small(part);
  });
}

// The chunk path (same contract as run_small; elem_scale / loss_elems in any float dtype).
// Returns the sum of squared errors as a 0-d tensor of the accumulate dtype.
Tensor run_chunks(const MseProblem& p, double scale, const Tensor& elem_scale, bool write_grad,
                  std::array<bool, 3> mask, Tensor& loss_elems, Grads& g) {
  const bool want_gi = write_grad && mask[0], want_gw = write_grad && mask[1],
             want_gb = write_grad && mask[2] && p.bias.defined();
  const auto dt = p.x.scalar_type();
  const bool low = dt != p.acc;
  if (want_gi) g.input = cpu_buffers::empty({p.N, p.D}, p.x.options());
  if (want_gw) g.weight = cpu_buffers::zeros({p.V, p.D}, p.w.options().dtype(p.acc));
  if (want_gb) g.bias = at::zeros({p.V}, p.w.options().dtype(p.acc));
  Tensor total = at::zeros({}, p.x.options().dtype(p.acc));
  if (p.N == 0) return total;
  const int64_t budget = p.x.is_cpu() ? (int64_t(64) << 20) : (int64_t(1) << 30);
  int64_t rows_per = std::max<int64_t>(budget / std::max<int64_t>(p.V * p.x.element_size(), 1), 1);
  if (rows_per < p.N) rows_per = (p.N + (p.N + rows_per - 1) / rows_per - 1) / ((p.N + rows_per - 1) / rows_per);
  rows_per = std::min(rows_per, p.N);
  const Tensor wt = p.w.t();
  Tensor buf = cpu_buffers::empty({rows_per, p.V}, p.x.options());
  Tensor gw_tmp;
  for (int64_t r0 = 0; r0 < p.N; r0 += rows_per) {
    const int64_t rows = std::min(rows_per, p.N - r0);
    const Tensor xc = p.x.narrow(0, r0, rows);
    Tensor r = buf.narrow(0, 0, rows);
    if (p.bias.defined()) at::addmm_out(r, p.bias, xc, wt);
    else at::mm_out(r, xc, wt);
    r.sub_(p.y.narrow(0, r0, rows));
    const Tensor r_acc = low ? r.to(p.acc) : r;
    total.add_(fixed_order_sum(r_acc.square()));
    if (loss_elems.defined()) loss_elems.narrow(0, r0, rows).copy_(r_acc.square());
    if (!write_grad) continue;
    if (elem_scale.defined()) r.mul_(elem_scale.narrow(0, r0, rows)).mul_(2.0);
    else r.mul_(2.0 * scale);
    if (want_gi) {
      Tensor gi = g.input.narrow(0, r0, rows);
      at::mm_out(gi, r, p.w);
    }
    if (want_gw) {
      if (!low) {
        g.weight.addmm_(r.t(), xc);
      } else if (!p.x.is_cpu()) {
        at::addmm_out(g.weight, g.weight, r.t(), xc, p.acc);  // cuBLAS: low precision in, fp32 accumulate
      } else {
        if (!gw_tmp.defined()) gw_tmp = cpu_buffers::empty({p.V, p.D}, p.w.options());
        at::mm_out(gw_tmp, r.t(), xc);
        g.weight.add_(gw_tmp);
      }
    }
    if (want_gb) g.bias.add_(at::sum(r, {0}, false, p.acc));
  }
  if (g.weight.defined()) g.weight = g.weight.to(dt);
  if (g.bias.defined()) g.bias = g.bias.to(dt);
  return total;
}

Tensor empty_like_none(const Tensor& ref) { return at::empty({0}, ref.options()); }

std::tuple<Tensor, Tensor, Tensor, Tensor> mse_forward(const Tensor& input, const Tensor& weight, const Tensor& target,
                                                       const std::optional<Tensor>& bias, int64_t reduction,
                                                       std::array<bool, 3> output_mask) {
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum, kFn,
                    ": reduction must be 'none', 'mean' or 'sum' (0, 1, 2), got ", reduction);
  const MseProblem p = prepare(input, weight, target, bias);
  const bool write_grad = reduction != kNone && (output_mask[0] || output_mask[1] || (output_mask[2] && bias));
  const double count = double(p.N) * double(p.V);
  const double scale = reduction == kMean ? 1.0 / count : 1.0;  // inf for an empty mean: no row has a gradient
  Tensor loss_elems = reduction == kNone ? at::empty({p.N, p.V}, p.x.options()) : Tensor();
  Grads g;
  Tensor loss;
  if (use_small_path(p)) {
    AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "fastreg_mse_small", [&] {
      const double total = run_small<scalar_t>(p, scale, Tensor(), write_grad, output_mask, loss_elems, g);
      if (reduction != kNone) loss = at::scalar_tensor(reduction == kSum ? total : total / count, p.x.options());
    });
  } else {
    const Tensor total = run_chunks(p, scale, Tensor(), write_grad, output_mask, loss_elems, g);
    if (reduction != kNone) loss = (reduction == kSum ? total : total / count).to(p.x.scalar_type());
  }
  if (reduction == kNone) loss = loss_elems.view(target.sizes());
  return {loss, g.input.defined() ? g.input.view(input.sizes()) : empty_like_none(input),
          g.weight.defined() ? g.weight : empty_like_none(weight),
          g.bias.defined() ? g.bias : empty_like_none(weight)};
}

std::tuple<Tensor, Tensor, Tensor> mse_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& weight,
                                                const Tensor& target, const std::optional<Tensor>& bias,
                                                std::array<bool, 3> output_mask) {
  const MseProblem p = prepare(input, weight, target, bias);
  TORCH_CHECK_VALUE(grad_loss.numel() == p.N * p.V, "fastreg.linear_mse_loss_backward: grad_loss has ",
                    grad_loss.numel(), " elements, expected ", p.N * p.V);
  Tensor none;
  Grads g;
  if (use_small_path(p)) {
    const Tensor es = grad_loss.reshape({p.N, p.V}).to(p.x.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "fastreg_mse_small_backward",
                               [&] { run_small<scalar_t>(p, 1.0, es, true, output_mask, none, g); });
  } else {
    run_chunks(p, 1.0, grad_loss.reshape({p.N, p.V}), true, output_mask, none, g);
  }
  return {g.input.defined() ? g.input.view(input.sizes()) : empty_like_none(input),
          g.weight.defined() ? g.weight : empty_like_none(weight),
          g.bias.defined() ? g.bias : empty_like_none(weight)};
}

// -------------------------------------------------------------------------------- autograd
class LinearMseFunction : public torch::autograd::Function<LinearMseFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& input,
                                                const Tensor& weight, const Tensor& target,
                                                const std::optional<Tensor>& bias, int64_t reduction,
                                                std::array<bool, 3> output_mask) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastreg::linear_mse_loss", "")
                         .typed<decltype(mse_forward)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, gi, gw, gb] = op.call(input, weight, target, bias, reduction, output_mask);
    ctx->mark_non_differentiable({gi, gw, gb});
    ctx->set_materialize_grads(false);
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["has_bias"] = bias.has_value();
    if (reduction == kNone) ctx->save_for_backward({input, weight, target, bias.value_or(Tensor())});
    else ctx->save_for_backward({gi, gw, gb});
    return {loss, gi, gw, gb};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(6);
    const Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return out;
    check_not_double_backward(grad_loss, "fastreg.linear_mse_loss", "F.mse_loss(F.linear(...))");
    const bool need_input = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1),
               need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
    const auto saved = ctx->get_saved_variables();
    if (ctx->saved_data["reduction"].toInt() == kNone) {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("fastreg::linear_mse_loss_backward", "")
                           .typed<decltype(mse_backward)>();
      auto [gi, gw, gb] = op.call(grad_loss, saved[0], saved[1], saved[2],
                                  saved[3].defined() ? std::optional<Tensor>(saved[3]) : std::nullopt,
                                  {need_input, need_weight, need_bias});
      if (need_input) out[0] = gi;
      if (need_weight) out[1] = gw;
      if (need_bias) out[3] = gb;
    } else {
      scale_saved_grads(saved, grad_loss, need_input, need_weight, need_bias, out);
    }
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> mse_autograd(const Tensor& input, const Tensor& weight,
                                                        const Tensor& target, const std::optional<Tensor>& bias,
                                                        int64_t reduction, std::array<bool, 3> output_mask) {
  check_operands(input, weight, target, bias);  // before dispatch: a meta / other-device tensor is reported
  const bool grad_mode = at::GradMode::is_enabled();
  TORCH_CHECK(!(grad_mode && target.requires_grad()), kFn,
              " is not differentiable with respect to argument 'target': pass target.detach()");
  output_mask = mask_for_autograd(output_mask, input, weight, bias);
  auto outs = LinearMseFunction::apply(input, weight, target, bias, reduction, output_mask);
  return {outs[0], outs[1], outs[2], outs[3]};
}

Tensor mse_loss(const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias,
                int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastreg::linear_mse_loss", "")
                       .typed<decltype(mse_forward)>();
  return std::get<0>(op.call(input, weight, target, bias, reduction, {false, false, false}));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CompositeImplicitAutograd, m) { m.impl("_mse_loss", &mse_loss); }
TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("linear_mse_loss", &mse_forward);
  m.impl("linear_mse_loss_backward", &mse_backward);
}
// GEMMs and elementwise ops are ATen's, so the chunk path serves CUDA tensors as it is.
TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("linear_mse_loss", &mse_forward);
  m.impl("linear_mse_loss_backward", &mse_backward);
}
TORCH_LIBRARY_IMPL(fastreg, Autograd, m) { m.impl("linear_mse_loss", &mse_autograd); }

}  // namespace fastreg
