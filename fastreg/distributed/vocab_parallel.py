"""Vocab-parallel fused linear cross-entropy: ``fastreg.distributed.linear_cross_entropy``.

Rank r of a process group holds rows [start_r, start_r + V_r) of ``linear_weight`` (and of
``linear_bias`` and the class weights); ``input`` and ``target`` are the same on every rank. Per
chunk of rows (csrc/lce/lce_vocab_parallel.cpp holds the two row passes, csrc/lce/lce_math.h the
formulas):

    logits_r = x_c W_r^T + b_r                         local GEMM, (rows, V_r) — never (rows, V)
    stats    = _lce_vp_stats(logits_r)                 local lse, z_t / w_t where owned, sum w z
    stats    = all_reduce(stats)                       the chunk's one collective, O(rows) numbers
    loss, dlogits_r = _lce_vp_rows(logits_r, stats)    global lse -> row loss, local gradient
    dX += dlogits_r W_r;  dW_r += dlogits_r^T x_c;  db_r += sum dlogits_r

and once per call the partial dX is all-reduced (the group's sum is the true gradient). The
collectives are torch.distributed functional collectives, so the whole thing traces under
torch.compile; nothing reads a tensor value on the host. For scalar reductions the gradients are
computed in the forward (three GEMMs, as the single-process op); for reduction='none' the
backward recomputes the local logits from the saved O(N) statistics (no collective but dX's).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from .. import _C_loader  # noqa: F401  (registers torch.ops.fastreg)
from ..functional import _REDUCTIONS

__all__ = ["linear_cross_entropy"]

_FN = "fastreg.distributed.linear_cross_entropy"


# --------------------------------------------------------------------------- fake implementations
@torch.library.register_fake("fastreg::_lce_vp_stats")
def _vp_stats_fake(logits, target, class_weight, vocab_start, num_classes, ignore_index, softcap, want_wz, slot,
                   num_slots, stats):
    return None


@torch.library.register_fake("fastreg::_lce_vp_rows")
def _vp_rows_fake(logits, target, class_weight, stats, row_scale, class_weight_sum, vocab_start, num_classes,
                  ignore_index, label_smoothing, softcap, z_loss, logits_capped, write_grad, num_slots, loss_rows):
    return None


# --------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class _Layout:
    group_name: str      # the process group of the vocabulary split (funcol takes its name)
    rank: int            # this process's index in that group (its stats slot)
    world: int
    vocab_start: int     # first global class id held here
    num_classes: int     # V, the global class count


_validated: dict = {}


def _group_rank(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _agree(group, key: tuple, local: tuple, every_call: bool) -> list:
    """Every rank exchanges its (key, local) description of the call and checks that the keys
    agree, so bad input raises the same error on every rank before any tensor collective runs (a
    mismatch there would hang or garble). A host collective, eager only. On CPU tensors it runs on
    every call (it costs a fraction of a millisecond and catches ranks that diverge at any time);
    on accelerators, where it would be a host sync, only the first time this rank sees a call
    signature (ranks that change shapes differently later are then caught only by the process
    group's timeout)."""
    cache_key = (id(group), key, local)
    if not every_call and cache_key in _validated:
        return _validated[cache_key]
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{_FN}: under torch.compile the layout must be known: call it once eagerly with the "
                           "same shapes first, or pass vocab_start= and num_classes= (plain tensors)")
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (key, local), group=group)
    keys = {k for k, _ in everyone}
    if len(keys) != 1:
        diffs = "; ".join(f"rank {r}: {k}" for r, (k, _) in enumerate(everyone))
        raise ValueError(f"{_FN}: the ranks of the group disagree on the call (shapes, dtypes or options must be "
                         f"the same on every rank): {diffs}")
    locals_ = [loc for _, loc in everyone]
    _validated[cache_key] = locals_
    return locals_


def _check_tiling(shards: list, num_classes: Optional[int]) -> int:
    """shards: (vocab_start, V_r) per rank. They must tile [0, V) exactly, in rank order."""
    total = sum(v for _, v in shards)
    V = total if num_classes is None else num_classes
    pos = 0
    for r, (start, v) in enumerate(shards):
        if start != pos:
            raise ValueError(f"{_FN}: the vocabulary shards do not tile [0, {V}): rank {r} holds "
                             f"[{start}, {start + v}) but the previous ranks end at {pos} (rank r must hold the "
                             f"classes right after rank r-1's; shards: {shards})")
        pos += v
    if pos != V:
        raise ValueError(f"{_FN}: the vocabulary shards cover [0, {pos}) but num_classes is {V} (shards: {shards})")
    return V


def _signature(x: Tensor, w: Tensor, b, cw, target: Tensor, opts: tuple) -> tuple:
    return (tuple(x.shape), str(x.dtype), str(w.dtype), w.shape[1], b is not None, cw is not None,
            None if cw is None else str(cw.dtype), tuple(target.shape), opts)


# --------------------------------------------------------------------------- the chunk loop
def _chunk_rows(n: int, v_local: int, world: int, elem: int, on_cpu: bool, chunk_size: int) -> int:
    if chunk_size:
        return max(1, min(chunk_size, n))
    # The single-process op's logits budget / (4 x world): the chunk per rank is a quarter of the
    # single-process op's, which pays for what does not shrink with the group (dX and its
    # all-reduce, N x D each), so a rank's extra memory stays under half of the single-process
    # op's (dW shard + chunk + dX). Smaller chunks cost more (tiny) all-reduces, not more bytes.
    budget = (128 << 20 if on_cpu else 1 << 30) // (4 * world)
    rows = max(budget // max(v_local * elem, 1), 1)
    if rows < n:
        chunks = -(-n // rows)
        rows = -(-n // chunks)
    return max(1, min(rows, n))


@dataclasses.dataclass(frozen=True)
class _Cfg:
    lay: _Layout
    reduction: int
    ignore_index: int
    label_smoothing: float
    softcap: float
    z_loss: float
    chunk_size: int


def _stats_width(lay: _Layout, has_cw: bool, eps: float) -> int:
    return lay.world + 1 + int(has_cw) + int(eps != 0.0)


def _wait(t: Tensor) -> Tensor:
    return funcol.wait_tensor(t)


def _run(cfg: _Cfg, x, w, b, cw, cw_sum, target, row_scale, write_grad, want, saved_stats=None):
    """One sweep over the rows. Returns (loss_rows, stats (N, width) reduced, dX partial, dW, db).

    saved_stats: the reduced statistics of an earlier sweep (backward of reduction='none'); then
    no collective runs and logits are softcapped inside the row pass."""
    lay = cfg.lay
    N, D = x.shape
    V_r = w.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    width = _stats_width(lay, cw is not None, cfg.label_smoothing)
    rows_per = _chunk_rows(N, V_r, lay.world, x.element_size(), x.device.type == "cpu", cfg.chunk_size)
    loss_rows = x.new_empty((N,), dtype=acc)
    gx = x.new_empty((N, D)) if write_grad and want[0] else None
    gw = w.new_zeros((V_r, D), dtype=acc) if write_grad and want[1] else None
    gb = w.new_zeros((V_r,), dtype=acc) if write_grad and want[2] and b is not None else None
    all_stats = []
    wt = w.t()
    for r0 in range(0, N, rows_per):
        rows = min(rows_per, N - r0)
        xc = x.narrow(0, r0, rows)
        tc = target.narrow(0, r0, rows)
        logits = torch.addmm(b, xc, wt) if b is not None else torch.mm(xc, wt)
        if saved_stats is None:
            stats = x.new_empty((rows + 1, width), dtype=acc)
            torch.ops.fastreg._lce_vp_stats(logits, tc, cw, lay.vocab_start, lay.num_classes, cfg.ignore_index,
                                            cfg.softcap, cfg.label_smoothing != 0.0, lay.rank, lay.world, stats)
            stats = _wait(funcol.all_reduce(stats, "sum", lay.group_name))
            # every rank sees the same reduced count, so every rank raises here (never a hang)
            torch._assert_async(stats[rows, 0] == 0,
                                f"{_FN}: a target is out of range [0, {lay.num_classes}) and not ignore_index "
                                f"({cfg.ignore_index}) on at least one rank (targets are global class ids)")
            stats = stats.narrow(0, 0, rows)
            capped = True
        else:
            stats = saved_stats.narrow(0, r0, rows)
            capped = False
        all_stats.append(stats)
        sc = row_scale if row_scale.numel() == 1 else row_scale.narrow(0, r0, rows)
        torch.ops.fastreg._lce_vp_rows(logits, tc, cw, stats, sc, cw_sum, lay.vocab_start, lay.num_classes,
                                       cfg.ignore_index, cfg.label_smoothing, cfg.softcap, cfg.z_loss, capped,
                                       write_grad, lay.world, loss_rows.narrow(0, r0, rows))
        if write_grad:
            if gx is not None:
                torch.mm(logits, w, out=gx.narrow(0, r0, rows))
            if gw is not None:
                if logits.dtype == acc:
                    gw.addmm_(logits.t(), xc)
                else:  # CPU has no mixed-precision GEMM: reduced-precision partial, fp32 accumulation
                    gw.add_(torch.mm(logits.t(), xc))
            if gb is not None:
                gb.add_(logits.sum(0, dtype=acc))
        del logits
    stats = torch.cat(all_stats) if len(all_stats) > 1 else all_stats[0] if all_stats else x.new_zeros((0, width),
                                                                                                       dtype=acc)
    return loss_rows, stats, gx, gw, gb


def _denominator(cfg: _Cfg, target: Tensor, stats: Tensor, has_cw: bool) -> Tensor:
    active = target != cfg.ignore_index
    if has_cw:  # the group's w_t column (only the owning rank contributed it)
        return torch.where(active, stats[:, cfg.lay.world + 1], 0).sum()
    return active.sum().to(stats.dtype)


def _all_reduce_grad_input(gx: Tensor, cfg: _Cfg) -> Tensor:
    return _wait(funcol.all_reduce(gx, "sum", cfg.lay.group_name))


class _VocabParallelLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, cw, target, cfg: _Cfg):
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        cw_acc = cw.to(acc).contiguous() if cw is not None else None
        cw_sum = _wait(funcol.all_reduce(cw_acc.sum(), "sum", cfg.lay.group_name)) if cw is not None else None
        scalar = cfg.reduction != _REDUCTIONS["none"]
        write_grad = scalar and any(want)
        one = x.new_ones((1,), dtype=acc)
        loss_rows, stats, gx, gw, gb = _run(cfg, x, w, b, cw_acc, cw_sum, target, one, write_grad, want)
        ctx.cfg, ctx.scalar, ctx.want = cfg, scalar, want
        if cfg.reduction == _REDUCTIONS["none"]:
            ctx.save_for_backward(x, w, b, cw_acc, cw_sum, target, stats)
            return loss_rows.to(x.dtype)
        loss = loss_rows.sum()
        if cfg.reduction == _REDUCTIONS["mean"]:
            # torch's denominator: non-ignored rows, or the sum of their class weights (0/0 = nan
            # when every row is ignored, like torch). The gradients scale by it afterwards.
            denom = _denominator(cfg, target, stats, cw is not None)
            loss = loss / denom
            # every row ignored: the loss is nan (0/0, like torch) and the gradients stay 0 (as
            # the single-process op's, whose inactive rows write exact zeros), not 0 * inf
            scale = torch.where(denom == 0, 0, denom.reciprocal())
            gx, gw, gb = (g.mul_(scale) if g is not None else None for g in (gx, gw, gb))
        if gx is not None:
            gx = _all_reduce_grad_input(gx, cfg)
        gw = None if gw is None else gw.to(w.dtype)
        gb = None if gb is None else gb.to(b.dtype)
        if torch.compiler.is_compiling():
            ctx.save_for_backward(gx, gw, gb)
            ctx.grads = None
        else:
            # Eager: held outside save_for_backward so that the backward can hand them over (scaled
            # in place) instead of copying them: autograd then adopts dW as the parameter's .grad
            # without a second weight-shard-sized buffer. The price: a second backward through the
            # same graph (retain_graph=True) is refused.
            ctx.grads = [gx, gw, gb]
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        cfg = ctx.cfg
        if ctx.scalar:
            if ctx.grads is None:
                gx, gw, gb = ctx.saved_tensors
                gx, gw, gb = (None if g is None else g * grad_loss for g in (gx, gw, gb))
                return gx, gw, gb, None, None, None
            if not ctx.grads:
                raise RuntimeError(f"{_FN}: backward ran twice through the same loss (retain_graph=True); with "
                                   "reduction 'mean'/'sum' the gradients are handed over by the first backward. "
                                   "Compute the loss again, or use reduction='none' and reduce it yourself")
            gx, gw, gb = ctx.grads
            ctx.grads = []
            gx, gw, gb = (None if g is None else g.mul_(grad_loss) for g in (gx, gw, gb))
            return gx, gw, gb, None, None, None
        x, w, b, cw_acc, cw_sum, target, stats = ctx.saved_tensors
        row_scale = grad_loss.reshape(-1).to(stats.dtype).contiguous()
        _, _, gx, gw, gb = _run(cfg, x, w, b, cw_acc, cw_sum, target, row_scale, True, ctx.want, saved_stats=stats)
        if gx is not None:
            gx = _all_reduce_grad_input(gx, cfg)
        return (gx, None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(b.dtype), None, None, None)


# --------------------------------------------------------------------------- public API
def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover
        return None, None, None
    return DTensor, Replicate, Shard


def _dtensor_layout(w, b, cw, sig) -> tuple[_Layout, object, int]:
    """Layout of a Shard(0) DTensor weight: the mesh dimension it is sharded over is the group."""
    DTensor, Replicate, Shard = _dtensor_types()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = w.device_mesh, tuple(w.placements)
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    others_ok = all(isinstance(p, Replicate) for i, p in enumerate(placements) if i not in shard_dims)
    if len(shard_dims) != 1 or not others_ok:
        raise ValueError(f"{_FN}: linear_weight must be a DTensor sharded over the vocabulary (Shard(0)) on one "
                         f"mesh dimension and replicated on the others, got placements {placements}")
    for name, t in (("linear_bias", b), ("weight (class weights)", cw)):
        if t is None:
            continue
        if not isinstance(t, DTensor) or t.device_mesh != mesh or tuple(t.placements) != placements:
            raise ValueError(f"{_FN}: {name} must be a DTensor on linear_weight's mesh with its placements "
                             f"{placements}, got {type(t).__name__}"
                             + (f" with placements {tuple(t.placements)}" if isinstance(t, DTensor) else ""))
        if t.shape[0] != w.shape[0]:
            raise ValueError(f"{_FN}: {name} has {t.shape[0]} classes but linear_weight has {w.shape[0]}")
    dim = shard_dims[0]
    _, offset = compute_local_shape_and_global_offset(w.shape, mesh, placements)
    group = mesh.get_group(dim)
    rank, world = _group_rank(group)
    lay = _Layout(funcol._resolve_group_name(group), rank, world, int(offset[0]), int(w.shape[0]))
    if not torch.compiler.is_compiling():
        _agree(group, sig, (lay.vocab_start,), w.device.type == "cpu")
    return lay, mesh, dim


def _plain_layout(w, group, vocab_start, num_classes, sig) -> _Layout:
    if group is None:
        raise ValueError(f"{_FN}: with plain-tensor shards pass process_group= (the group the vocabulary is split "
                         "over), or pass linear_weight as a DTensor sharded with Shard(0)")
    rank, world = _group_rank(group)
    name = funcol._resolve_group_name(group)
    V_r = w.shape[0]
    if torch.compiler.is_compiling():
        if vocab_start is None or num_classes is None:
            cached = [v for k, v in _validated.items() if k[0] == id(group) and k[1] == sig and k[2][1] == V_r]
            if not cached:
                raise RuntimeError(f"{_FN}: under torch.compile pass vocab_start= and num_classes= or call once "
                                   "eagerly with the same shapes first")
            shards = [(s, v) for s, v in cached[0]]
            start = sum(v for _, v in shards[:rank])
            return _Layout(name, rank, world, start, sum(v for _, v in shards))
        return _Layout(name, rank, world, int(vocab_start), int(num_classes))
    shards = _agree(group, (sig, num_classes), (vocab_start, V_r), w.device.type == "cpu")
    if all(s is None for s, _ in shards):
        starts, pos = [], 0
        for _, v in shards:
            starts.append(pos)
            pos += v
        shards = [(s, v) for s, (_, v) in zip(starts, shards)]
    elif any(s is None for s, _ in shards):
        raise ValueError(f"{_FN}: vocab_start was given on some ranks only: {shards}")
    V = _check_tiling(shards, num_classes)
    return _Layout(name, rank, world, shards[rank][0], V)


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
    process_group: Optional["dist.ProcessGroup"] = None,
    vocab_start: Optional[int] = None,
    num_classes: Optional[int] = None,
) -> Tensor:
    r"""Vocab-parallel ``cross_entropy(linear(input, linear_weight, linear_bias), target)``.

    The semantics of :func:`fastreg.linear_cross_entropy` (targets are global class indices), with
    the classes split over a process group. Not taken: class-probability targets,
    ``return_stats``, ``grad_filter_eps``, ``skip_ignored``; for ``'mean'``/``'sum'`` a second
    backward through the same graph (``retain_graph=True``) raises. Layouts:

    * **DTensor**: ``linear_weight`` (and ``linear_bias``, class ``weight``) sharded ``Shard(0)``
      (as ``ColwiseParallel`` leaves an LM head; uneven splits are fine); ``input`` and ``target``
      plain tensors holding the same values on every rank of that group, or ``Replicate()``
      DTensors. The loss comes back as a replicated DTensor; each gradient has its input's type
      and placements.
    * **plain shards**: ``linear_weight`` is this rank's ``(V_r, D)`` block, ``process_group`` the
      group the vocabulary is split over. The blocks lie in rank order unless ``vocab_start`` (and
      ``num_classes``) say where; the offsets are exchanged and checked once per shape.

    The first call for a new shape exchanges a small description of the call between the ranks
    (a host collective), so that mismatched shapes/dtypes/shards raise on every rank instead of
    hanging a collective; later calls only run the per-chunk all-reduce of O(rows) statistics and
    one all-reduce of the input gradient.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_FN}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    DTensor, Replicate, Shard = _dtensor_types()
    is_dt = DTensor is not None and isinstance(linear_weight, DTensor)
    if DTensor is not None:
        for name, t in (("input", input), ("target", target)):
            if isinstance(t, DTensor) and not all(isinstance(p, Replicate) for p in t.placements):
                raise ValueError(f"{_FN}: {name} must be replicated over the group (a plain tensor with the same "
                                 f"values on every rank or a Replicate() DTensor), got placements {t.placements}")
        if not is_dt and any(isinstance(t, DTensor) for t in (linear_bias, weight)):
            raise ValueError(f"{_FN}: linear_bias / weight are DTensors but linear_weight is not")
    if is_dt and process_group is not None:
        raise ValueError(f"{_FN}: process_group= is for plain-tensor shards; a DTensor weight carries its mesh")
    x = input.to_local() if DTensor is not None and isinstance(input, DTensor) else input
    tgt = target.to_local() if DTensor is not None and isinstance(target, DTensor) else target
    if x.dim() < 1 or linear_weight.dim() != 2:
        raise ValueError(f"{_FN}: input must be (*, D) and linear_weight (V_local, D), got {tuple(x.shape)} and "
                         f"{tuple(linear_weight.shape)}")
    lead = x.shape[:-1]
    if tuple(tgt.shape) != tuple(lead):
        raise ValueError(f"{_FN}: target has shape {tuple(tgt.shape)} but input has shape {tuple(x.shape)}; "
                         f"expected target of shape {tuple(lead)}")
    if tgt.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_FN}: target must hold class indices (int64 or int32), got {tgt.dtype}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{_FN}: softcap must be > 0 or None, got {softcap}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_FN}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size <= 0):
        raise ValueError(f"{_FN}: chunk_size must be a positive number of rows or None, got {chunk_size}")
    if ignore_index is None:
        ignore_index = -100
    if torch.is_grad_enabled() and weight is not None and weight.requires_grad:
        raise RuntimeError(f"{_FN} is not differentiable with respect to argument 'weight' (the class weights), "
                           "like F.cross_entropy: pass weight.detach()")

    w_loc = linear_weight.to_local() if is_dt else linear_weight
    b_loc = linear_bias.to_local() if is_dt and linear_bias is not None else linear_bias
    cw_loc = weight.to_local() if is_dt and weight is not None else weight
    x2 = x.reshape(lead.numel(), x.shape[-1])
    t1 = tgt.reshape(-1).to(torch.int64).contiguous()
    _check_local(x2, w_loc, b_loc, cw_loc, t1)
    opts = (reduction, int(ignore_index), float(label_smoothing), float(softcap or 0.0), float(z_loss))
    sig = _signature(x2, w_loc, b_loc, cw_loc, t1, opts)
    if is_dt:
        lay, mesh, _ = _dtensor_layout(linear_weight, linear_bias, weight, sig)
    else:
        lay = _plain_layout(w_loc, process_group, vocab_start, num_classes, sig)
    if reduction == "mean" and cw_loc is not None and z_loss:
        z_loss = _zloss_over_count(z_loss, lay, w_loc, cw_loc, t1, int(ignore_index))
    cfg = _Cfg(lay, _REDUCTIONS[reduction], int(ignore_index), float(label_smoothing), float(softcap or 0.0),
               float(z_loss), int(chunk_size or 0))
    loss = _VocabParallelLCE.apply(x2, w_loc, b_loc, cw_loc, t1, cfg)
    if reduction == "none":
        loss = loss.reshape(lead)
    if is_dt:
        loss = DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return loss


def _zloss_over_count(z_loss: float, lay: _Layout, w, cw, target: Tensor, ignore_index: int) -> float:
    """The z-loss coefficient that makes 'mean' average the z-loss over the non-ignored rows (as the
    single-process op) while the rows' losses share the class-weight denominator: z_loss * W / count,
    W = the group's sum of the targets' class weights (one all-reduce of a scalar). It is read on the
    host, which on an accelerator would be a sync: refused there."""
    if target.device.type != "cpu":
        raise ValueError(f"{_FN}: z_loss with class weights under reduction='mean' is CPU-only here (its "
                         "denominator, the non-ignored count, would need a host sync); use reduction='sum' and "
                         "divide by the number of non-ignored targets")
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    local = target - lay.vocab_start
    owned = (target != ignore_index) & (local >= 0) & (local < w.shape[0])
    part = torch.where(owned, cw.to(acc)[local.clamp(0, max(w.shape[0] - 1, 0))] if w.shape[0] else 0, 0).sum()
    denom = float(_wait(funcol.all_reduce(part, "sum", lay.group_name)))
    count = int((target != ignore_index).sum())
    return z_loss * denom / count if count else z_loss


def _check_local(x, w, b, cw, t):
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{_FN}: input has {x.shape[1]} features but the linear_weight shard has shape "
                         f"{tuple(w.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"{_FN}: input must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if w.dtype != x.dtype:
        raise TypeError(f"{_FN}: linear_weight dtype {w.dtype} does not match input dtype {x.dtype}")
    if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0] or b.dtype != x.dtype):
        raise ValueError(f"{_FN}: linear_bias shard must be ({w.shape[0]},) of dtype {x.dtype}, got "
                         f"{tuple(b.shape)} {b.dtype}")
    if cw is not None and (cw.dim() != 1 or cw.shape[0] != w.shape[0] or not cw.dtype.is_floating_point):
        raise ValueError(f"{_FN}: weight (class weights) shard must be a floating ({w.shape[0]},) tensor, got "
                         f"{tuple(cw.shape)} {cw.dtype}")
    devices = {v.device for v in (x, w, b, cw, t) if v is not None}
    if len(devices) > 1:
        raise ValueError(f"{_FN}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
