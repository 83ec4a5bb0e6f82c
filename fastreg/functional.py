"""The functional API: ``fastreg.linear_cross_entropy``, a drop-in for
``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` (and for
torch 2.13's ``F.linear_cross_entropy``) that never materialises the N x V logits, and
``fastreg.linear_mse_loss``, the same for ``F.mse_loss(F.linear(...), target)``.

The heavy lifting is the operators ``torch.ops.fastreg.linear_cross_entropy`` and
``torch.ops.fastreg.linear_mse_loss`` (schemas in csrc/fastreg.cpp, drivers in csrc/lce/lce.cpp and
csrc/mse/mse.cpp, autograd formulas as C++ kernels at the Autograd key next to them). This module
adds their fake (meta) implementations for torch.compile and the public functions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C_loader  # noqa: F401  (registers torch.ops.fastreg)

__all__ = ["linear_cross_entropy", "linear_mse_loss"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


# --------------------------------------------------------------------------- fake implementations
# The operators validate their arguments in C++ (csrc/lce/lce.cpp), before dispatch, so a traced
# call fails with the same message as an eager one; the fakes only give the output shapes.
def _grads_fake(input, weight, bias, mask):
    """(grad_input, grad_weight, grad_bias) of the fused ops; an unrequested gradient is empty."""
    gi = input.new_empty(input.shape) if mask[0] else input.new_empty(0)
    gw = weight.new_empty(weight.shape) if mask[1] else weight.new_empty(0)
    gb = weight.new_empty((weight.shape[0],)) if mask[2] and bias is not None else weight.new_empty(0)
    return gi, gw, gb


def _fused_outputs_fake(input, weight, bias, none_shape, reduction, mask):
    """(loss, grads...) of a fused forward: gradients only for scalar reductions."""
    write = reduction != 0 and (mask[0] or mask[1] or (mask[2] and bias is not None))
    loss = input.new_empty(none_shape if reduction == 0 else ())
    return (loss,) + _grads_fake(input, weight, bias, mask if write else (False, False, False))


@torch.library.register_fake("fastreg::linear_cross_entropy")
def _lce_fake(input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing, softcap, z_loss,
              chunk_size, output_mask):
    torch._check(input.dim() >= 1 and weight.dim() == 2 and input.shape[-1] == weight.shape[1],
                 lambda: f"fastreg.linear_cross_entropy: bad shapes input {tuple(input.shape)}, weight {tuple(weight.shape)}")
    torch._check(tuple(target.shape) == tuple(input.shape[:-1]),
                 lambda: "fastreg.linear_cross_entropy: target must have input's leading shape")
    return _fused_outputs_fake(input, weight, bias, input.shape[:-1], reduction, output_mask)


@torch.library.register_fake("fastreg::linear_cross_entropy_backward")
def _lce_backward_fake(grad_loss, input, weight, target, bias, class_weight, ignore_index, label_smoothing, softcap,
                       z_loss, chunk_size, output_mask):
    return _grads_fake(input, weight, bias, output_mask)


@torch.library.register_fake("fastreg::linear_mse_loss")
def _mse_fake(input, weight, target, bias, reduction, output_mask):
    torch._check(input.dim() >= 1 and weight.dim() == 2 and input.shape[-1] == weight.shape[1],
                 lambda: f"fastreg.linear_mse_loss: bad shapes input {tuple(input.shape)}, weight {tuple(weight.shape)}")
    return _fused_outputs_fake(input, weight, bias, target.shape, reduction, output_mask)


@torch.library.register_fake("fastreg::linear_mse_loss_backward")
def _mse_backward_fake(grad_loss, input, weight, target, bias, output_mask):
    return _grads_fake(input, weight, bias, output_mask)


@torch.library.register_fake("fastreg::_lce_rows")
def _lce_rows_fake(logits, target, class_weight, row_scale, ignore_index, label_smoothing, softcap, z_loss,
                   write_grad, loss_rows, target_probs=None, zloss_scale=None, lse_rows=None, argmax_rows=None,
                   grad_filter_eps=0.0, block_keep=None):
    return None


# --------------------------------------------------------------------------- autograd
# The autograd formulas of fastreg::linear_cross_entropy and fastreg::linear_mse_loss are C++ kernels at the Autograd key
# (csrc/lce/lce.cpp, csrc/mse/mse.cpp): one call from Python does validation, forward and the
# gradients of scalar reductions. They refuse double backward (create_graph=True) with a clear error.
# The loss-only composites (_lce_loss, _mse_loss) return one tensor to Python; the Autograd
# kernels add to their empty output_mask the gradients that autograd needs.
_lce_loss = torch.ops.fastreg._lce_loss.default
_mse_loss = torch.ops.fastreg._mse_loss.default


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
    red = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        raise ValueError(f"fastreg.linear_cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"fastreg.linear_cross_entropy: softcap must be > 0 or None, got {softcap}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size <= 0):
        raise ValueError(f"fastreg.linear_cross_entropy: chunk_size must be a positive number of rows or None, "
                         f"got {chunk_size}")
    # Shapes, dtypes, devices and targets are checked in C++, in this one call.
    return _lce_loss(input, linear_weight, target, linear_bias, weight, red,
                     -100 if ignore_index is None else ignore_index,  # None: torch's F.linear_cross_entropy default
                     label_smoothing, softcap or 0.0, z_loss, chunk_size or 0)


def linear_mse_loss(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
                    reduction: str = "mean") -> Tensor:
    r"""Fused ``F.mse_loss(F.linear(input, linear_weight, linear_bias), target, reduction=reduction)``:
    the loss of linear regression.

    Args:
        input: ``(*, D)`` features. float32/float64/bfloat16/float16.
        linear_weight: ``(V, D)`` (``V`` outputs), same dtype and device as ``input``.
        target: ``(*, V)``, same dtype: the predictions' shape exactly (no broadcasting; for one
            output use a ``(1, D)`` weight and a ``(*, 1)`` target).
        linear_bias: optional ``(V,)``.
        reduction: ``'mean'`` (over all ``N * V`` squared errors) | ``'sum'`` | ``'none'`` (shape ``(*, V)``).

    Gradients flow to ``input``, ``linear_weight`` and ``linear_bias`` (not to ``target``). Few
    outputs on CPU run in one pass over the rows; otherwise the rows go in chunks, so the
    ``(N, V)`` predictions are never stored whole.
    """
    red = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        raise ValueError(f"fastreg.linear_mse_loss: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return _mse_loss(input, linear_weight, target, linear_bias, red)
