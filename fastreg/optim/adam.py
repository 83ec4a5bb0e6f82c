"""fastreg.optim.Adam / AdamW: torch.optim's algorithms, one fused operator call per device and dtype."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _bf16, _ops
from ._base import FusedOptimizer, _Bucket, check_tensor_lr, hyper_float


def _step_dtype(p: Tensor) -> torch.dtype:
    # torch.optim's non-capturable layout on CPU (float32, float64 under a float64 default dtype);
    # the device kernels count in float32, like torch's fused/capturable Adam.
    if p.device.type == "cpu" and torch.get_default_dtype() == torch.float64:
        return torch.float64
    return torch.float32


class Adam(FusedOptimizer):
    """Adam, as ``torch.optim.Adam`` (AdamW with ``decoupled_weight_decay=True``).

    Same constructor, defaults, validation, param groups and ``state_dict`` layout as torch.optim
    (per parameter: ``step`` a 0-d float32 tensor, on the CPU for CPU parameters as torch's
    default Adam keeps it, on the parameter's device for GPU parameters as torch's fused Adam
    does; ``exp_avg``, ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq``), so checkpoints move
    between the two both ways. Complex parameters are updated as their real views, as torch does.

    torch.optim's implementation switches, and what they mean here: every step is one fused
    kernel call per (device, dtype) whatever ``foreach`` and ``fused`` say (both are validated
    as torch validates them: not both True; with ``foreach=True`` and ``capturable=False``
    tensor ``lr``/``betas`` raise torch's ValueError). ``capturable`` needs nothing: on GPUs a
    step with float hyper-parameters (or a tensor ``lr``) makes no host sync and counts steps on
    the device, so it can be captured in a CUDA graph. Tensor betas are read on the host each
    step: one sync per step on GPUs, refused during CUDA graph capture. ``differentiable=True`` and sparse gradients are refused
    (RuntimeError), as torch's fused Adam refuses them.

    bf16 training (see fastreg.optim._bf16): ``stochastic_rounding=True`` (bfloat16 params)
    rounds each updated value stochastically to bf16 with reproducible Philox bits;
    ``master_weights=True`` (bfloat16/float16 params) keeps an fp32 copy in
    ``state["master_param"]`` that takes the update. States stay in the parameter dtype.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None:
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor) and not capturable and foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if isinstance(beta, Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if differentiable:
            raise RuntimeError(f"fastreg.optim.{type(self).__name__} does not support differentiable=True")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            **_bf16.mode_defaults(stochastic_rounding, master_weights),
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)

    # ---- FusedOptimizer hooks --------------------------------------------------------------

    _COUNTERS = "step"

    def _set_counter(self, p: Tensor, counter: Tensor) -> None:
        self.state[p]["step"] = counter

    def _state_lists(self, group: dict) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step") if group["amsgrad"] else (
            "exp_avg", "exp_avg_sq", "step")
        return names + (_bf16.MASTER_KEY,) if group["master_weights"] else names

    def _layout_key(self, group: dict) -> tuple:
        return (bool(group["amsgrad"]), bool(group["master_weights"]))

    def _init_state(self, p: Tensor, state: dict, group: dict) -> dict[str, Tensor]:
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=_step_dtype(p), device=p.device if p.device.type != "cpu" else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            # A loaded checkpoint may keep the counter as a number, on the CPU for a GPU
            # parameter, or in another dtype: bring it to where the kernel counts.
            step = state["step"]
            if not isinstance(step, Tensor):
                step = torch.tensor(float(step))
            if p.device.type != "cpu":
                step = step.to(device=p.device, dtype=torch.float32)
            elif step.dtype not in (torch.float32, torch.float64):
                step = step.to(torch.float32)
            state["step"] = step
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        _bf16.init_master(p, state, group)
        return state

    def _launch(self, group, bucket: _Bucket, grads, lr, lr_tensor, grad_scale, found_inf) -> None:
        lists = bucket.lists
        beta1, beta2 = group["betas"]
        _ops.fused_adam_(
            bucket.kernel_params,
            grads,
            lists["exp_avg"],
            lists["exp_avg_sq"],
            lists.get("max_exp_avg_sq", []),
            lists["step"],
            lr,
            lr_tensor,
            hyper_float(beta1, "betas[0]"),
            hyper_float(beta2, "betas[1]"),
            hyper_float(group["weight_decay"], "weight_decay"),
            hyper_float(group["eps"], "eps"),
            bool(group["amsgrad"]),
            bool(group["maximize"]),
            bool(group["decoupled_weight_decay"]),
            grad_scale,
            found_inf,
            _bf16.call_seed(group),
            lists.get(_bf16.MASTER_KEY, []),
        )


class AdamW(Adam):
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW``; see :class:`Adam` for what
    ``foreach``, ``fused``, ``capturable`` and ``differentiable`` mean here and for the bf16 modes
    (``stochastic_rounding``, ``master_weights``)."""

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            stochastic_rounding=stochastic_rounding,
            master_weights=master_weights,
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
