"""Eager reference implementations (used by the tests and the benchmarks).

``linear_cross_entropy_reference`` composes ``F.linear`` + ``F.cross_entropy`` with softcap,
z-loss, shifted labels and the logged statistics written out by hand; it materialises the full
(N, V) logits.
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
                                   chunk_size: Optional[int] = None, shift: bool = False,
                                   grad_filter_eps=None, skip_ignored: Optional[bool] = None,
                                   return_stats: bool = False):
    """What ``fastreg.linear_cross_entropy`` computes, the eager way (``chunk_size``,
    ``grad_filter_eps`` and ``skip_ignored`` do not change the result and are ignored)."""
    if shift:
        target = torch.cat([target[..., 1:], torch.full_like(target[..., :1], ignore_index)], dim=-1)
    z = F.linear(input, linear_weight, linear_bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = z.reshape(-1, z.shape[-1])
    probs = target.dtype.is_floating_point
    t = target.reshape(-1, z.shape[-1]) if probs else target.reshape(-1)
    loss = F.cross_entropy(flat, t, weight=weight, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    active = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device) if probs else t != ignore_index
    lse = torch.logsumexp(flat.float() if flat.dtype in (torch.bfloat16, torch.float16) else flat, dim=-1)
    if z_loss:
        zl = z_loss * lse ** 2 * active
        if reduction == "none":
            loss = loss + zl.to(loss.dtype)
        elif reduction == "sum":
            loss = loss + zl.sum().to(loss.dtype)
        else:
            # the z-loss is averaged over the non-ignored rows, whatever the class weights
            loss = loss + (zl.sum() / active.sum()).to(loss.dtype)
    lead = input.shape[:-1]
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    pred = torch.where(active, flat.argmax(-1), -1)
    truth = t.argmax(-1) if probs else t
    accuracy = ((pred == truth) & active).sum().float() / active.sum()
    return loss, (torch.where(active, lse, 0).detach().reshape(lead), pred.reshape(lead), accuracy)
