"""Bookkeeping shared by fastreg's fused optimizers.

Python only organises tensors; the whole update runs in one operator call per (device, dtype)
group of parameters (``torch.ops.fastreg._fused_sgd_`` / ``_fused_adam_``, C++ on CPU, CUDA on
GPUs). To keep the per-step Python work small (it dominates with thousands of small tensors),
the lists handed to the operator are built once and cached per param group; a step only gathers
the gradients. The cache is rebuilt when the group's parameter list, the set of parameters that
have gradients, or a state-shaping option (amsgrad, momentum on/off) changes, and dropped by
``load_state_dict``/``add_param_group``. State tensors replaced behind the optimizer's back
(``opt.state[p]["exp_avg"] = t``) are not seen until the next rebuild.

GradScaler: these optimizers set ``_step_supports_amp_scaling``, so ``GradScaler.step`` hands
them its scale and inf flag as the attributes ``grad_scale`` and ``found_inf`` instead of
unscaling and syncing; the kernels divide the gradients by ``grad_scale`` and, when ``found_inf``
is nonzero, change nothing at all (parameters, state, step counters). All of it is read on the
device: a step makes no host sync.

DTensor parameters (FSDP2 ``fully_shard``, tensor parallel): the kernels run on the local shards
(one call per (device, dtype) group over all local shards, DTensor or plain, mixed freely); the
state tensors are DTensors with their parameter's placements, as torch.optim makes them, so
``state_dict``/``load_state_dict`` and ``torch.distributed.checkpoint`` treat both alike. A
``found_inf`` handed over by a (Sharded)GradScaler is first all-reduced (max) over the meshes of
the DTensor parameters, so an overflow on any rank skips the step on every rank: the scaler's
fused-optimizer path does not synchronise it (only ``ShardedGradScaler.unscale_`` does; call that
before ``scaler.step`` to also keep the scale itself identical across ranks).
"""
from __future__ import annotations

import itertools
import operator
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover  (torch built without distributed)
    DTensor = None

from . import _bf16, _ops  # noqa: F401  (_ops loads the operators and their fake implementations)

_REPEAT_NONE = itertools.repeat(None)


def _all_present(grads: list) -> bool:
    return all(map(operator.is_not, grads, _REPEAT_NONE))


def _local(t: Tensor) -> Tensor:
    """What a kernel updates in place: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _any_dtensor(ts) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in ts)


def hyper_float(x: Any, name: str = "a hyper-parameter") -> float:
    """A hyper-parameter as a Python float. A tensor one is read on the host: one device sync per
    step for a GPU tensor, which a CUDA graph cannot capture, so that case is refused by name
    (only ``lr`` is read on the device)."""
    if not isinstance(x, Tensor):
        return float(x)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{name} as a CUDA tensor is read on the host at every step, which cannot be captured "
                           f"in a CUDA graph: pass it as a float (a tensor lr is fine, it is read on the device)")
    return float(x.item())


def check_tensor_lr(lr: Any) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


class _Bucket:
    """The operator arguments for one (device, dtype) set of parameters: the parameters as the
    kernel sees them (``params``: local shards of DTensors) and, parallel to them, one list per
    state tensor (``lists[name]``, local too). ``keys`` are the parameters themselves (the keys of
    the optimizer state, the holders of ``.grad``)."""

    __slots__ = ("keys", "params", "sharded", "device", "lists", "subsets", "complex", "kernel_params")

    def __init__(self, keys: list[Tensor], lists: dict[str, list[Tensor]]):
        self.keys = keys
        self.sharded = _any_dtensor(keys)
        self.params = [_local(p) for p in keys] if self.sharded else keys
        self.device = self.params[0].device
        # complex params go to the kernels as their real views (torch.optim's treatment): the
        # params (kernel_params), the state lists and, each step, the gradients
        self.complex = self.params[0].is_complex()
        self.kernel_params = [torch.view_as_real(p) for p in self.params] if self.complex else self.params
        self.lists = lists
        # presence pattern (tuple of bools) -> _Bucket over the parameters that have gradients
        self.subsets: dict[tuple, _Bucket] = {}


class _GroupPlan:
    """The buckets of one param group, valid while ``key`` matches the group."""

    __slots__ = ("key", "buckets", "meshes")

    def __init__(self, key: tuple, buckets: list[_Bucket]):
        self.key = key
        self.buckets = buckets
        # the device meshes of the group's DTensor parameters (found_inf is reduced over them)
        self.meshes = list({p.device_mesh: None for b in buckets for p in b.keys
                            if DTensor is not None and isinstance(p, DTensor)})


class FusedOptimizer(Optimizer):
    """Base class: subclasses define the state layout (``_state_lists``, ``_init_state``), the
    cache key of a group (``_layout_key``) and the operator call (``_launch``)."""

    _step_supports_amp_scaling = True
    _MAX_SUBSETS = 16  # presence patterns cached per bucket before the cache is reset

    def __init__(self, params, defaults: dict[str, Any]):
        super().__init__(params, defaults)
        self._reset_plans()

    # ---- hooks for subclasses -------------------------------------------------------------

    def _state_lists(self, group: dict) -> tuple[str, ...]:
        """Names of the per-parameter state lists the operator takes for this group."""
        raise NotImplementedError

    def _layout_key(self, group: dict) -> tuple:
        """Group options that change the state lists (e.g. amsgrad)."""
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict, group: dict) -> dict[str, Tensor]:
        """Creates missing state for p (a parameter about to be stepped) and returns the tensors
        of each list of ``_state_lists(group)``."""
        raise NotImplementedError

    def _launch(self, group: dict, bucket: _Bucket, grads: list[Tensor], lr: float, lr_tensor: Optional[Tensor],
                grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        raise NotImplementedError

    # The state list holding one-element per-parameter counters (Adam's step, SGD's momentum flag),
    # and how to re-point a parameter's counter at a new tensor.
    _COUNTERS: Optional[str] = None

    def _set_counter(self, p: Tensor, counter: Tensor) -> None:
        raise NotImplementedError

    # ---- cache ------------------------------------------------------------------------------

    def _reset_plans(self) -> None:
        self._plans: dict[int, _GroupPlan] = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _bf16.fill_modes(self)
        self._reset_plans()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            _bf16.check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        if hasattr(self, "_plans"):
            self._reset_plans()

    def state_dict(self) -> dict:
        return _bf16.strip_unused(super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        old_groups = [dict(g) for g in self.param_groups]
        masters, state_dict = _bf16.pop_masters(self, state_dict)
        super().load_state_dict(state_dict)
        _bf16.restore_masters(self, masters)
        _bf16.after_load(self, old_groups)
        self._reset_plans()

    def _plan(self, index: int, group: dict) -> _GroupPlan:
        params = group["params"]
        key = (id(group), id(params), len(params), self._layout_key(group))
        plan = self._plans.get(index)
        if plan is None or plan.key != key:
            by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in params:
                by_kind[(p.device, p.dtype)].append(p)
            plan = _GroupPlan(key, [_Bucket(ps, {}) for ps in by_kind.values()])
            self._plans[index] = plan
        return plan

    def _subset(self, group: dict, bucket: _Bucket, grads: list) -> tuple[_Bucket, list[Tensor]]:
        """The bucket over the parameters of `bucket` whose gradient is not None, with its state
        (created here, lazily, the first time a parameter has a gradient)."""
        pattern = tuple(g is not None for g in grads)
        sub = bucket.subsets.get(pattern)
        if sub is None:
            if len(bucket.subsets) >= self._MAX_SUBSETS:
                bucket.subsets.clear()
            names = self._state_lists(group)
            params = [p for p, has in zip(bucket.keys, pattern) if has]
            lists: dict[str, list[Tensor]] = {name: [] for name in names}
            for p in params if names else ():  # no state at all (SGD without momentum): like torch, no entry
                tensors = self._init_state(p, self.state[p], group)
                for name in names:
                    lists[name].append(_local(tensors[name]) if bucket.sharded else tensors[name])
            if params and params[0].is_complex():
                lists = {name: [torch.view_as_real(t) if t.is_complex() else t for t in ts]
                         for name, ts in lists.items()}
            sub = _Bucket(params, lists) if params else None
            bucket.subsets[pattern] = sub
        return sub, [g for g in grads if g is not None]

    def _pack_counters(self, bucket: _Bucket, sub: _Bucket) -> None:
        """Makes the per-parameter counters of `sub` views of one tensor and hands the kernel that
        tensor instead of n one-element tensors (thousands of tiny tensors cost far more to pass
        and to touch than their values). The views are what the state holds (``state[p]["step"]``
        stays a 0-d tensor); other cached subsets referenced the replaced counters and are dropped."""
        counters = sub.lists.get(self._COUNTERS) if self._COUNTERS else None
        if not counters or len(counters) < 2:
            return
        base = counters[0]._base
        packed = (base is not None and base.dim() == 1 and base.numel() == len(counters) and base.is_contiguous()
                  and all(t._base is base and t.storage_offset() == base.storage_offset() + i
                          for i, t in enumerate(counters)))
        if not packed:
            base = torch.stack([t.reshape(()).to(counters[0].dtype) for t in counters])
            for p, view in zip(sub.keys, base.unbind(0)):
                self._set_counter(p, view)
            for key in [k for k, other in bucket.subsets.items() if other is not sub]:
                del bucket.subsets[key]
        sub.lists[self._COUNTERS] = [base]

    # ---- step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plans = [self._plan(index, group) for index, group in enumerate(self.param_groups)]
        if found_inf is not None:
            found_inf = _agree_found_inf(found_inf, plans)
        for group, plan in zip(self.param_groups, plans):
            lr = group["lr"]
            for bucket in plan.buckets:
                grads = [p.grad for p in bucket.keys]
                if bucket.sharded:
                    grads = [None if g is None else _local(g) for g in grads]
                if _all_present(grads):
                    sub = bucket.subsets.get(None)
                    if sub is None:
                        sub, _ = self._subset(group, bucket, grads)
                        self._pack_counters(bucket, sub)
                        bucket.subsets[None] = sub  # the all-present pattern, looked up without a tuple
                else:
                    sub, grads = self._subset(group, bucket, grads)
                    if sub is None:
                        continue
                if sub.complex:
                    grads = [torch.view_as_real(g) for g in grads]
                device = sub.device
                if isinstance(lr, Tensor):
                    lr_value, lr_tensor = 0.0, _on(lr, device)
                else:
                    lr_value, lr_tensor = float(lr), None
                self._launch(group, sub, grads, lr_value, lr_tensor, _on(grad_scale, device), _on(found_inf, device))
        return loss


def _agree_found_inf(found_inf: Tensor, plans: list[_GroupPlan]) -> Tensor:
    """found_inf, max-reduced over every mesh dimension of the DTensor parameters: the gradient
    shards differ between ranks, so one rank may overflow where the others do not, and then no
    rank may step. An asynchronous device collective (no host sync)."""
    meshes = list({m: None for plan in plans for m in plan.meshes})
    if not meshes:
        return found_inf
    import torch.distributed as dist

    agreed = found_inf.clone()
    for mesh in meshes:
        for dim in range(mesh.ndim):
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return agreed


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """t on `device` (an asynchronous copy if it lives elsewhere)."""
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)
