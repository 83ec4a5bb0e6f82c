"""Eager reference implementations (used by the tests and the benchmarks).

``linear_cross_entropy_reference`` composes ``F.linear`` + ``F.cross_entropy`` with softcap and
z-loss written out by hand; it materialises the full (N, V) logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F


def linear_cross_entropy_reference(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                                   linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                                   reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                                   softcap: Optional[float] = None, z_loss: float = 0.0,
                                   chunk_size: Optional[int] = None) -> Tensor:
    """What ``fastreg.linear_cross_entropy`` computes, the eager way (``chunk_size`` is ignored)."""
    z = F.linear(input, linear_weight, linear_bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = z.reshape(-1, z.shape[-1])
    t = target.reshape(-1)
    loss = F.cross_entropy(flat, t, weight=weight, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    if z_loss:
        active = t != ignore_index
        zl = z_loss * torch.logsumexp(flat.float() if flat.dtype in (torch.bfloat16, torch.float16) else flat,
                                      dim=-1) ** 2 * active
        if reduction == "none":
            loss = loss + zl.to(loss.dtype)
        elif reduction == "sum":
            loss = loss + zl.sum().to(loss.dtype)
        else:
            # (an ignore_index >= V is a valid target value, so index with 0 in its place)
            denom = (weight[torch.where(active, t, 0)] * active).sum() if weight is not None else active.sum()
            loss = loss + (zl.sum() / denom).to(loss.dtype)
    return loss.reshape(target.shape) if reduction == "none" else loss
