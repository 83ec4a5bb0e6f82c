"""The functional API: ``fastreg.linear_cross_entropy``, a drop-in for
``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` (and for
torch 2.13's ``F.linear_cross_entropy``) that never materialises the N x V logits.

The heavy lifting is the operator ``torch.ops.fastreg.linear_cross_entropy`` (schema in
csrc/fastreg.cpp, CPU/CUDA driver in csrc/lce/lce.cpp). This module adds its fake (meta)
implementation for torch.compile and its autograd formula.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C_loader  # noqa: F401  (registers torch.ops.fastreg)

__all__ = ["linear_cross_entropy"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


# --------------------------------------------------------------------------- fake implementations
@torch.library.register_fake("fastreg::linear_cross_entropy")
def _lce_fake(input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing, softcap, z_loss,
              chunk_size, output_mask):
    torch._check(input.dim() == 2 and weight.dim() == 2 and input.shape[1] == weight.shape[1],
                 lambda: f"fastreg.linear_cross_entropy: bad shapes input {tuple(input.shape)}, weight {tuple(weight.shape)}")
    torch._check(target.dim() == 1 and target.shape[0] == input.shape[0],
                 lambda: "fastreg.linear_cross_entropy: target must be (N,)")
    write = reduction != 0 and (output_mask[0] or output_mask[1] or (output_mask[2] and bias is not None))
    loss = input.new_empty((input.shape[0],) if reduction == 0 else ())
    gi = input.new_empty(input.shape) if write and output_mask[0] else input.new_empty(0)
    gw = weight.new_empty(weight.shape) if write and output_mask[1] else weight.new_empty(0)
    gb = (weight.new_empty((weight.shape[0],)) if write and output_mask[2] and bias is not None
          else weight.new_empty(0))
    return loss, gi, gw, gb


@torch.library.register_fake("fastreg::linear_cross_entropy_backward")
def _lce_backward_fake(grad_loss, input, weight, target, bias, class_weight, ignore_index, label_smoothing, softcap,
                       z_loss, chunk_size, output_mask):
    gi = input.new_empty(input.shape) if output_mask[0] else input.new_empty(0)
    gw = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0)
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] and bias is not None else weight.new_empty(0)
    return gi, gw, gb


@torch.library.register_fake("fastreg::_lce_rows")
def _lce_rows_fake(logits, target, class_weight, row_scale, ignore_index, label_smoothing, softcap, z_loss,
                   write_grad, loss_rows):
    return None


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing, softcap, z_loss,
     chunk_size, output_mask) = inputs
    _, gi, gw, gb = output
    # Only the loss output carries a gradient: without this autograd would materialise a zero
    # "gradient" for each gradient output in the backward (a weight-sized buffer).
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.has_bias = bias is not None
    if reduction == 0:
        # 'none': the backward needs each row's upstream gradient, so it recomputes the logits.
        ctx.save_for_backward(input, weight, target, bias, class_weight)
        ctx.args = (ignore_index, label_smoothing, softcap, z_loss, chunk_size)
    else:
        # scalar reductions: the forward already produced the gradients for a unit upstream gradient.
        ctx.save_for_backward(gi, gw, gb)
        ctx.output_mask = output_mask


def _backward(ctx, grad_loss, _gi, _gw, _gb):
    if grad_loss is None:  # grads are not materialised (see _setup_context): nothing flows back
        return (None,) * 12
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # backward(create_graph=True): the gradients below are not themselves differentiable, so a
        # second-order term (e.g. a gradient penalty) would silently come out as zero.
        raise RuntimeError("fastreg.linear_cross_entropy does not support double backward "
                           "(create_graph=True); use the eager F.cross_entropy(F.linear(...)) for that")
    need_input, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    if ctx.reduction == 0:
        input, weight, target, bias, class_weight = ctx.saved_tensors
        gi, gw, gb = torch.ops.fastreg.linear_cross_entropy_backward(
            grad_loss, input, weight, target, bias, class_weight, *ctx.args,
            [need_input, need_weight, need_bias and ctx.has_bias])
    else:
        gi, gw, gb = ctx.saved_tensors
        # The forward computed exactly the gradients that were requested then (output_mask).
        torch._check(not need_input or ctx.output_mask[0], lambda: _MASK_MSG)
        torch._check(not need_weight or ctx.output_mask[1], lambda: _MASK_MSG)
        # Out of place, so backward can run more than once over the graph (gradcheck, retain_graph).
        gi, gw, gb = (g * grad_loss if want else None for g, want in ((gi, need_input), (gw, need_weight), (gb, need_bias)))
    return (gi if need_input else None, gw if need_weight else None, None,
            gb if need_bias and ctx.has_bias else None) + (None,) * 8


_MASK_MSG = ("fastreg.linear_cross_entropy: a gradient was requested that the forward did not compute "
             "(requires_grad changed between forward and backward?)")

torch.library.register_autograd("fastreg::linear_cross_entropy", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
) -> Tensor:
    r"""Fused ``cross_entropy(linear(input, linear_weight, linear_bias), target)``.

    Same semantics as ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target,
    weight=weight, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)``
    (and torch 2.13's ``F.linear_cross_entropy``), computed chunk by chunk so the ``(N, V)``
    logits are never stored whole. Extra options:

    * ``softcap``: logits become ``softcap * tanh(z / softcap)`` before the softmax (Gemma 2).
    * ``z_loss``: adds ``z_loss * logsumexp(z)**2`` to every non-ignored row's loss, which is
      then reduced like the loss (for ``'mean'`` it shares the loss's denominator).
    * ``chunk_size``: rows per chunk (default: as many as fit a fixed logits budget).

    Args:
        input: ``(*, D)`` features. float32/float64/bfloat16/float16.
        linear_weight: ``(V, D)``, same dtype and device as ``input``.
        target: ``(*)`` class indices (int64 or int32) in ``[0, V)`` or ``ignore_index``.
        linear_bias: optional ``(V,)``.
        weight: optional ``(V,)`` class weights.
        reduction: ``'mean'`` | ``'sum'`` | ``'none'`` (shape ``(*)``).

    Gradients flow to ``input``, ``linear_weight`` and ``linear_bias``; the loss has ``input``'s dtype.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fastreg.linear_cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not isinstance(input, Tensor) or input.dim() < 1:
        raise ValueError("fastreg.linear_cross_entropy: input must be a tensor of shape (*, in_features)")
    if linear_weight.dim() != 2:
        raise ValueError(f"fastreg.linear_cross_entropy: linear_weight must be 2-D (num_classes, in_features), "
                         f"got shape {tuple(linear_weight.shape)}")
    lead = input.shape[:-1]
    if tuple(target.shape) != tuple(lead):
        raise ValueError(f"fastreg.linear_cross_entropy: target has shape {tuple(target.shape)} but input has "
                         f"shape {tuple(input.shape)}; expected target of shape {tuple(lead)}")
    if target.dtype.is_floating_point or target.dtype.is_complex:
        raise TypeError(f"fastreg.linear_cross_entropy: target must hold class indices (int64 or int32), got "
                        f"{target.dtype}; class-probability targets are not supported")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"fastreg.linear_cross_entropy: softcap must be > 0 or None, got {softcap}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size <= 0):
        raise ValueError(f"fastreg.linear_cross_entropy: chunk_size must be a positive number of rows or None, "
                         f"got {chunk_size}")
    devices = {t.device for t in (input, linear_weight, target, linear_bias, weight) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"fastreg.linear_cross_entropy: all tensors must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")
    if ignore_index is None:  # torch's F.linear_cross_entropy maps None to -100
        ignore_index = -100
    grad = torch.is_grad_enabled()
    if grad and weight is not None and weight.requires_grad:
        raise RuntimeError("fastreg.linear_cross_entropy is not differentiable with respect to argument 'weight' "
                           "(the class weights), like F.cross_entropy: pass weight.detach()")
    output_mask = [grad and input.requires_grad, grad and linear_weight.requires_grad,
                   grad and linear_bias is not None and linear_bias.requires_grad]
    loss = torch.ops.fastreg.linear_cross_entropy(
        input.reshape(lead.numel(), input.shape[-1]), linear_weight, target.reshape(-1), linear_bias, weight,
        _REDUCTIONS[reduction], int(ignore_index), float(label_smoothing), float(softcap or 0.0), float(z_loss),
        int(chunk_size or 0), output_mask)[0]
    return loss.reshape(lead) if reduction == "none" else loss
