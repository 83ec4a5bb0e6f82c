"""fastreg.optim.SGD: torch.optim.SGD's algorithm, one fused operator call per device and dtype."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _bf16, _ops
from ._base import FusedOptimizer, _Bucket, check_tensor_lr, hyper_float


class SGD(FusedOptimizer):
    """Stochastic gradient descent (optionally with momentum), as ``torch.optim.SGD``.

    Same constructor, defaults, validation, param groups and ``state_dict`` layout
    (``momentum_buffer`` per parameter) as torch.optim.SGD, so checkpoints move between the two.
    Complex parameters are updated as their real views, as torch does. Sparse gradients
    (``nn.Embedding(sparse=True)``) take torch.optim.SGD's single-tensor algorithm in Python
    instead of the fused kernel (a GradScaler step then reads ``found_inf`` on the host); their
    momentum buffers are dense.

    torch.optim's implementation switches, and what they mean here: every step is one fused
    kernel call per (device, dtype) whatever ``foreach`` and ``fused`` say (validated as torch
    does: not both True); ``differentiable=True`` is refused (RuntimeError).

    bf16 training (see fastreg.optim._bf16): ``stochastic_rounding=True`` (bfloat16 params;
    steps are then counted per parameter in ``state["step"]``) and ``master_weights=True``
    (bfloat16/float16 params; ``state["master_param"]``, fp32). Neither takes sparse gradients.

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
        stochastic_rounding: bool = False,
        master_weights: bool = False,
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
            **_bf16.mode_defaults(stochastic_rounding, master_weights),
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
        names = ("momentum_buffer", "momentum_started") if group["momentum"] != 0 else ()
        names += ("step",) if group["stochastic_rounding"] else ()
        return names + (_bf16.MASTER_KEY,) if group["master_weights"] else names

    def _layout_key(self, group: dict) -> tuple:
        return (group["momentum"] != 0, bool(group["stochastic_rounding"]), bool(group["master_weights"]))

    def _init_state(self, p: Tensor, state: dict, group: dict) -> dict[str, Tensor]:
        out = {}
        if group["stochastic_rounding"]:  # the step count keying the rounding streams
            step = state.get("step")
            if not isinstance(step, Tensor) or step.device != p.device or step.dtype != torch.float32:
                step = torch.tensor(float(step) if step is not None else 0.0, dtype=torch.float32, device=p.device)
            state["step"] = out["step"] = step
        _bf16.init_master(p, state, group)
        if _bf16.MASTER_KEY in state:
            out[_bf16.MASTER_KEY] = state[_bf16.MASTER_KEY]
        if group["momentum"] == 0:
            return out
        buf = state.get("momentum_buffer")
        flag = self._momentum_started.get(p)
        if buf is None:
            buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["momentum_buffer"] = buf
            flag = torch.zeros((), dtype=torch.uint8, device=p.device)
        elif flag is None:  # a buffer that came with a checkpoint or from the user: it holds a value
            flag = torch.ones((), dtype=torch.uint8, device=p.device)
        self._momentum_started[p] = flag
        return {**out, "momentum_buffer": buf, "momentum_started": flag}

    def _launch(self, group, bucket: _Bucket, grads, lr, lr_tensor, grad_scale, found_inf) -> None:
        try:
            self._fused(group, bucket, grads, lr, lr_tensor, grad_scale, found_inf)
        except RuntimeError as e:
            # Sparse gradients reach the operator's sparse kernel, which refuses them before
            # touching anything; looking for them only then keeps dense steps free of a pass over
            # the gradients.
            if "sparse" not in str(e) or not any(g.is_sparse for g in grads):
                raise
            bucket, grads = self._step_sparse(group, bucket, grads, lr, lr_tensor, grad_scale, found_inf)
            if bucket is not None:
                self._fused(group, bucket, grads, lr, lr_tensor, grad_scale, found_inf)

    def _fused(self, group, bucket: _Bucket, grads, lr, lr_tensor, grad_scale, found_inf) -> None:
        lists = bucket.lists
        _ops.fused_sgd_(
            bucket.kernel_params,
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
            _bf16.call_seed(group),
            lists.get("step", []) if group["stochastic_rounding"] else [],
            lists.get(_bf16.MASTER_KEY, []),
        )

    def _step_sparse(self, group, bucket: _Bucket, grads, lr, lr_tensor, grad_scale, found_inf):
        """Steps the parameters of `bucket` whose gradient is sparse with torch.optim.SGD's
        single-tensor algorithm; returns the bucket of the others (None if none) and their grads."""
        if group["stochastic_rounding"] or group["master_weights"]:
            raise RuntimeError("fastreg.optim.SGD: sparse gradients cannot be used with stochastic_rounding or "
                               "master_weights")
        if found_inf is not None and bool(found_inf.item()):  # host sync: sparse path only
            return None, grads
        momentum, dampening = hyper_float(group["momentum"]), hyper_float(group["dampening"])
        weight_decay, nesterov = hyper_float(group["weight_decay"]), bool(group["nesterov"])
        step_lr = lr_tensor if lr_tensor is not None else lr
        dense = [i for i, g in enumerate(grads) if not g.is_sparse]
        for i, g in enumerate(grads):
            if not g.is_sparse:
                continue
            p = bucket.kernel_params[i]
            g = torch.view_as_real(g.to_dense()) if bucket.complex else g
            if grad_scale is not None:
                g = g / grad_scale
            g = -g if group["maximize"] else g
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            if momentum != 0:
                buf, flag = bucket.lists["momentum_buffer"][i], self._momentum_started[bucket.keys[i]]
                if bool(flag):
                    buf.mul_(momentum).add_(g, alpha=1 - dampening)
                else:
                    buf.copy_(g.to_dense() if g.is_sparse else g)
                    flag.fill_(1)
                g = (buf * momentum).add_(g) if nesterov else buf  # dense + sparse (torch: g + momentum * buf)
            p.add_(g, alpha=-hyper_float(step_lr))
        if not dense:
            return None, grads
        params = [bucket.keys[i] for i in dense]
        lists = {k: [v[i] for i in dense] for k, v in bucket.lists.items() if k != "momentum_started"}
        if momentum != 0:
            lists["momentum_started"] = [self._momentum_started[p] for p in params]
        return _Bucket(params, lists), [grads[i] for i in dense]
