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

import sys
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _C_loader  # noqa: F401  (registers torch.ops.fastreg)

__all__ = ["linear_cross_entropy", "linear_mse_loss", "LinearCrossEntropyStats"]

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


def _lce_stats_fake(input, return_stats):
    """(lse, predictions) of the fused cross-entropy: (*,) each, or empty."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    lead = input.shape[:-1] if return_stats else (0,)
    return input.new_empty(lead, dtype=acc), input.new_empty(lead, dtype=torch.int64)


def _lce_check_fake(input, weight, target):
    torch._check(input.dim() >= 1 and weight.dim() == 2 and input.shape[-1] == weight.shape[1],
                 lambda: f"fastreg.linear_cross_entropy: bad shapes input {tuple(input.shape)}, weight {tuple(weight.shape)}")
    lead = tuple(input.shape[:-1])
    shape = tuple(target.shape)
    torch._check(shape == lead or (target.dtype.is_floating_point and shape == lead + (weight.shape[0],)),
                 lambda: "fastreg.linear_cross_entropy: target must have input's leading shape (class indices) "
                         "or that plus (num_classes,) (class probabilities)")


@torch.library.register_fake("fastreg::linear_cross_entropy")
def _lce_fake(input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing, softcap, z_loss,
              chunk_size, output_mask, grad_filter_eps=0.0, skip_ignored=-1, return_stats=False):
    _lce_check_fake(input, weight, target)
    return _fused_outputs_fake(input, weight, bias, input.shape[:-1], reduction, output_mask) + \
        _lce_stats_fake(input, return_stats)


@torch.library.register_fake("fastreg::linear_cross_entropy_backward")
def _lce_backward_fake(grad_loss, input, weight, target, bias, class_weight, ignore_index, label_smoothing, softcap,
                       z_loss, chunk_size, output_mask, grad_filter_eps=0.0, skip_ignored=-1):
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
# The loss-only composites (_lce_loss, _mse_loss; _lce_loss_stats adds lse and predictions) return
# one tensor (three) to Python; the Autograd
# kernels add to their empty output_mask the gradients that autograd needs.
_lce_loss = torch.ops.fastreg._lce_loss.default
_lce_loss_stats = torch.ops.fastreg._lce_loss_stats.default
_mse_loss = torch.ops.fastreg._mse_loss.default


# --------------------------------------------------------------------------- public API
class LinearCrossEntropyStats(NamedTuple):
    """What trainers log, from the same pass over the logits as the loss (``return_stats=True``).

    * ``lse``: ``(*)`` each row's log-sum-exp of the (softcapped) logits, float32 (float64 for
      float64 input), detached; 0 for ignored rows.
    * ``predictions``: ``(*)`` int64, each row's argmax class (the first maximum); -1 for ignored rows.
    * ``accuracy``: 0-d float32, the mean over non-ignored rows of ``predictions == target`` (for
      class-probability targets: the target's argmax); nan when every row is ignored.
    """

    lse: Tensor
    predictions: Tensor
    accuracy: Tensor


def _filter_eps(grad_filter_eps, dtype) -> float:
    if grad_filter_eps is None:
        return 0.0
    if isinstance(grad_filter_eps, str):
        if grad_filter_eps != "auto":
            raise ValueError(f"fastreg.linear_cross_entropy: grad_filter_eps must be a float > 0, 'auto' or None, "
                             f"got {grad_filter_eps!r}")
        # a quarter of the dtype's unit roundoff (finfo.eps / 2): what filtering leaves out stays within
        # u/4 of each gradient's scale, below the rounding eager's own gradients carry
        return torch.finfo(dtype).eps / 8 if dtype in (torch.bfloat16, torch.float16, torch.float32) else 0.0
    if isinstance(grad_filter_eps, bool) or not float(grad_filter_eps) > 0 or grad_filter_eps == float("inf"):
        raise ValueError(f"fastreg.linear_cross_entropy: grad_filter_eps must be a float > 0, 'auto' or None, "
                         f"got {grad_filter_eps!r}")
    return float(grad_filter_eps)


def _shifted(input: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Labels of next-token prediction: position t of each sequence is scored against label t + 1; the
    last position is ignored. Only the (small) label tensor is built anew, never the input."""
    if target.dtype.is_floating_point:
        raise ValueError("fastreg.linear_cross_entropy: shift=True needs class-index targets (labels), "
                         "not class probabilities")
    if input.dim() not in (2, 3) or tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"fastreg.linear_cross_entropy: shift=True needs input (B, T, D) or (T, D) and target "
                         f"(B, T) or (T,) of labels, got input {tuple(input.shape)} and target {tuple(target.shape)}")
    pad = torch.full_like(target[..., :1], ignore_index)
    return torch.cat([target[..., 1:], pad], dim=-1)


def _dtensor_class():
    """torch's DTensor class if its module is loaded (no DTensor can exist otherwise), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _vocab_parallel(input, linear_weight, target, options: dict, unsupported: list):
    """A call with DTensor arguments. A linear_weight sharded over the vocabulary (``Shard(0)``, as
    ``ColwiseParallel`` leaves an LM head) runs fastreg.distributed.linear_cross_entropy, which
    takes it as it is; any other DTensor layout is refused by name (torch's own message about mixed
    Tensor and DTensor arguments would not say what to call)."""
    from torch.distributed.tensor import DTensor, Shard

    vp = "fastreg.distributed.linear_cross_entropy"
    placements = tuple(linear_weight.placements) if isinstance(linear_weight, DTensor) else ()
    if not any(isinstance(pl, Shard) and pl.dim == 0 for pl in placements):
        where = f"linear_weight placements {placements}" if placements else "linear_weight is a plain tensor"
        raise ValueError(f"fastreg.linear_cross_entropy: got DTensor arguments but {where}; it runs on plain "
                         f"tensors, and a linear_weight sharded over the vocabulary (a Shard(0) DTensor) goes to "
                         f"{vp} (call it directly for plain-tensor shards with process_group=)")
    if unsupported:
        raise ValueError(f"fastreg.linear_cross_entropy: a Shard(0) DTensor linear_weight runs {vp}, which does "
                         f"not take {', '.join(unsupported)}")
    from .distributed import linear_cross_entropy as vocab_parallel_lce

    return vocab_parallel_lce(input, linear_weight, target, **options)


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
    shift: bool = False,
    grad_filter_eps: Union[float, str, None] = None,
    skip_ignored: Optional[bool] = None,
    return_stats: bool = False,
):
    r"""Fused ``cross_entropy(linear(input, linear_weight, linear_bias), target)``.

    Same semantics as ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target,
    weight=weight, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)``
    (and torch 2.13's ``F.linear_cross_entropy``), computed chunk by chunk so the ``(N, V)``
    logits are never stored whole. Extra options:

    * ``softcap``: logits become ``softcap * tanh(z / softcap)`` before the softmax (Gemma 2).
    * ``z_loss``: adds ``z_loss * logsumexp(z)**2`` to every non-ignored row's loss. Under
      ``'mean'`` the z-loss is averaged over the non-ignored rows (their count), whatever the class
      weights (the cross-entropy keeps torch's weighted mean): scaling the class weights leaves it alone.
    * ``chunk_size``: rows per chunk (default: as many as fit a fixed logits budget).
    * ``shift``: next-token prediction: ``input`` ``(B, T, D)`` (or ``(T, D)``), ``target``
      ``(B, T)`` (or ``(T,)``) labels; position ``t`` is scored against label ``t + 1`` of the same
      sequence and the last position is ignored. The input is not copied. ``'none'`` returns
      ``(B, T)`` with 0 at the last position.
    * ``grad_filter_eps``: gradient filtering (off by default), a relative tolerance. The backward
      GEMMs (``dX``, ``dW``) leave out (tile of 256 rows, block of ~256 classes) products whose
      contribution is provably small: the row pass records per row and block a power-of-two bound
      on ``|d loss_i / d z_ic|``; a product is skipped only while the summed bounds of everything
      skipped (times ``|x_i|`` for ``dW``, the block's ``sum |W_c|`` for ``dX``) stay within
      ``eps`` times the gradient's scale, per entry and in Frobenius norm (the scale: the target
      entries' part of the gradient). The rows are grouped by target for this (a stable sort);
      each row's target entry is added exactly, outside the GEMMs. The loss is unchanged.
      ``"auto"``: ``finfo(dtype).eps / 8`` (a quarter of the unit roundoff: bf16 2**-10, fp16
      2**-13, fp32 2**-26; float64: off), so bf16/fp16 gradients stay within 2x eager's error.
      Derivation and measurements: docs/gradient-filtering.md. On CUDA the bounds are read on the
      host: one sync per chunk.
    * ``skip_ignored``: rows whose target is ``ignore_index`` take no part in the GEMMs (their
      rows are gathered out chunk by chunk; their gradient is 0). ``None``: on CPU always; on CUDA
      off, so the call stays sync-free and CUDA-graph capturable. ``True`` on CUDA costs one host
      sync per call (counting the active rows); ``False`` forces the full GEMMs.
    * ``return_stats``: return ``(loss, stats)``, ``stats`` a :class:`LinearCrossEntropyStats`
      (per-row log-sum-exp, argmax predictions, token accuracy), computed by the same pass as the
      loss. With ``shift=True`` they are aligned with the input positions.

    Args:
        input: ``(*, D)`` features. float32/float64/bfloat16/float16.
        linear_weight: ``(V, D)``, same dtype and device as ``input``.
        target: ``(*)`` class indices (int64 or int32) in ``[0, V)`` or ``ignore_index``; or class
            probabilities ``(*, V)`` of ``input``'s dtype (as ``F.cross_entropy``: every row counts,
            ``'mean'`` divides by the number of rows).
        linear_bias: optional ``(V,)``.
        weight: optional ``(V,)`` class weights.
        reduction: ``'mean'`` | ``'sum'`` | ``'none'`` (shape ``(*)``).

    Gradients flow to ``input``, ``linear_weight`` and ``linear_bias``; the loss has ``input``'s dtype.
    bf16/fp16 GEMMs accumulate in fp32. fp16 on an x86 CPU without AVX512-FP16/AMX-FP16 (where
    torch's fp16 GEMM is a slow scalar fallback) runs the whole call in fp32 on upcast copies and
    rounds the results to fp16 once. Large CPU buffers come from fastreg's huge-page block cache
    (:mod:`fastreg.memory`).
    """
    dtensor = _dtensor_class()
    # an or-chain, not any() over a generator: this runs on every call, small models' too
    if dtensor is not None and (isinstance(linear_weight, dtensor) or isinstance(input, dtensor)
                                or isinstance(target, dtensor) or isinstance(linear_bias, dtensor)
                                or isinstance(weight, dtensor)):
        unsupported = [name for name, given in (("return_stats", return_stats), ("skip_ignored=True", skip_ignored),
                                                ("grad_filter_eps", grad_filter_eps is not None)) if given]
        options = dict(linear_bias=linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
                       label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss, chunk_size=chunk_size,
                       shift=shift)
        return _vocab_parallel(input, linear_weight, target, options, unsupported)
    red = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        raise ValueError(f"fastreg.linear_cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"fastreg.linear_cross_entropy: softcap must be > 0 or None, got {softcap}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size <= 0):
        raise ValueError(f"fastreg.linear_cross_entropy: chunk_size must be a positive number of rows or None, "
                         f"got {chunk_size}")
    ignore = -100 if ignore_index is None else ignore_index  # None: torch's F.linear_cross_entropy default
    if shift:
        target = _shifted(input, target, ignore)
    eps = 0.0 if grad_filter_eps is None else _filter_eps(grad_filter_eps, input.dtype)
    skip = -1 if skip_ignored is None else int(bool(skip_ignored))
    # Shapes, dtypes, devices and targets are checked in C++, in this one call.
    if not return_stats:
        return _lce_loss(input, linear_weight, target, linear_bias, weight, red, ignore, label_smoothing,
                         softcap or 0.0, z_loss, chunk_size or 0, eps, skip)
    loss, lse, predictions = _lce_loss_stats(input, linear_weight, target, linear_bias, weight, red, ignore,
                                             label_smoothing, softcap or 0.0, z_loss, chunk_size or 0, eps, skip)
    if target.dtype.is_floating_point:
        hits = (predictions == target.argmax(-1)).sum()
        count = predictions.numel()
    else:
        active = target != ignore
        hits = ((predictions == target) & active).sum()
        count = active.sum()
    accuracy = hits.to(torch.float32) / count
    return loss, LinearCrossEntropyStats(lse, predictions, accuracy)


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
