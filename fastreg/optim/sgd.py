"""fastreg.optim.SGD: torch.optim.SGD's algorithm, one fused operator call per device and dtype."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ops
from ._base import FusedOptimizer, _Bucket, check_tensor_lr, hyper_float


class SGD(FusedOptimizer):
    """Stochastic gradient descent (optionally with momentum), as ``torch.optim.SGD``.

    Same constructor, defaults, validation, param groups and ``state_dict`` layout
    (``momentum_buffer`` per parameter) as torch.optim.SGD, so checkpoints move between the two.
    ``foreach`` and ``fused`` are accepted for compatibility and ignored: every step is one fused
    kernel call per (device, dtype). ``differentiable=True`` and sparse gradients are not
    supported.

    Like torch, the momentum buffer of a parameter starts as a copy of its first (decayed)
    gradient. The buffer is allocated, zeroed, when the parameter is first stepped, together with
    a device-side flag saying whether it holds a value yet; a step skipped by GradScaler (inf/NaN
    gradients) leaves the flag down, so the next real step still starts the buffer from the
    gradient (no uninitialised or zero momentum leaks in). ``state_dict()`` leaves out buffers
    that never received a value, exactly as torch.optim.SGD would have no buffer then.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        check_tensor_lr(lr)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise RuntimeError("fastreg.optim.SGD does not support differentiable=True")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self._momentum_started: dict[Tensor, Tensor] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)
        self._momentum_started = {}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Loaded buffers hold values (torch only stores buffers once they do).
        self._momentum_started = {}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        unstarted = self._unstarted_params()
        if unstarted:
            index: dict[int, int] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    index.setdefault(id(p), len(index))
            for p in unstarted:
                i = index.get(id(p))
                if i is None or i not in sd["state"]:
                    continue
                entry = {k: v for k, v in sd["state"][i].items() if k != "momentum_buffer"}
                if entry:
                    sd["state"][i] = entry
                else:
                    del sd["state"][i]
        return sd

    def _unstarted_params(self) -> list[Tensor]:
        """Parameters whose momentum buffer exists but never received a value (reads the flags
        on the host: one transfer per device)."""
        by_device: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}
        for p, flag in self._momentum_started.items():
            by_device.setdefault(flag.device, []).append((p, flag))
        out = []
        for pairs in by_device.values():
            values = torch.stack([flag.reshape(()) for _, flag in pairs]).cpu().tolist()
            out += [p for (p, _), v in zip(pairs, values) if not v]
        return out

    # ---- FusedOptimizer hooks --------------------------------------------------------------

    _COUNTERS = "momentum_started"

    def _set_counter(self, p: Tensor, counter: Tensor) -> None:
        self._momentum_started[p] = counter

    def _state_lists(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer", "momentum_started") if group["momentum"] != 0 else ()

    def _layout_key(self, group: dict) -> tuple:
        return (group["momentum"] != 0,)

    def _init_state(self, p: Tensor, state: dict, group: dict) -> dict[str, Tensor]:
        if group["momentum"] == 0:
            return {}
        buf = state.get("momentum_buffer")
        flag = self._momentum_started.get(p)
        if buf is None:
            buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["momentum_buffer"] = buf
            flag = torch.zeros((), dtype=torch.uint8, device=p.device)
        elif flag is None:  # a buffer that came with a checkpoint or from the user: it holds a value
            flag = torch.ones((), dtype=torch.uint8, device=p.device)
        self._momentum_started[p] = flag
        return {"momentum_buffer": buf, "momentum_started": flag}

    def _launch(self, group, bucket: _Bucket, grads, lr, lr_tensor, grad_scale, found_inf) -> None:
        lists = bucket.lists
        _ops.fused_sgd_(
            bucket.params,
            grads,
            lists.get("momentum_buffer", []),
            lists.get("momentum_started", []),
            lr,
            lr_tensor,
            hyper_float(group["momentum"]),
            hyper_float(group["dampening"]),
            hyper_float(group["weight_decay"]),
            bool(group["nesterov"]),
            bool(group["maximize"]),
            grad_scale,
            found_inf,
        )
