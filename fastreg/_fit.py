"""``fit()`` of fastreg's linear models: the mini-batch training loop runs in C++.

``MultinomialLogisticRegression.fit`` and ``LinearRegression.fit`` (fastreg/nn.py) come here.
Python checks the data once, prepares the optimizer's state, then calls the operator
``torch.ops.fastreg._fit_epoch`` (csrc/fit/fit.cpp) once per epoch: it gathers each batch, computes
the loss and its gradients in one fused pass and applies the optimizer's own update rule (the
fused optimizers' C++ loops) without coming back to Python between batches. Between epochs Python
draws the next permutation (``torch.randperm(n, generator=generator)``, exactly what the same loop
written in Python draws), records the history, evaluates the validation data, calls the callback
and decides on early stopping.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _C_loader  # noqa: F401  (registers torch.ops.fastreg)
from .optim import SGD, Adam
from .optim._base import hyper_float

CROSS_ENTROPY, MEAN_SQUARED_ERROR = 0, 1
_OPT_SGD, _OPT_ADAM = 0, 1
_EMPTY = torch.empty(0)

_fit_epoch = torch.ops.fastreg._fit_epoch.default


@torch.library.register_fake("fastreg::_fit_epoch")
def _fit_epoch_fake(X, y, perm, params, class_weight, loss, batch_size, l1, optimizer, state, hyper, trainable,
                    check_data):
    return X.new_empty((), dtype=torch.float64)


def _check_data(name: str, X: Any, in_features: int, dtype: torch.dtype, values: bool = True) -> Tensor:
    """Type, device, shape and dtype; with ``values`` also finiteness (the training data's values
    are checked by the C++ loop itself before its first update: cheaper than ATen's parallel
    reductions at these sizes)."""
    if not isinstance(X, Tensor):
        raise TypeError(f"fit: {name} must be a torch.Tensor, got {type(X).__name__}")
    if X.device.type != "cpu":
        raise ValueError(f"fit: {name} is on {X.device}; fit() runs on the CPU only (move the data and model "
                         "with .cpu(), or write the training loop with model.loss on other devices)")
    if X.dim() != 2:
        raise ValueError(f"fit: {name} must be 2-D (n_samples, n_features), got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"fit: {name} is empty (0 samples)")
    if X.shape[1] != in_features:
        raise ValueError(f"fit: {name} has {X.shape[1]} features but the model expects {in_features}")
    if X.dtype != dtype:
        raise TypeError(f"fit: {name} has dtype {X.dtype} but the model's parameters are {dtype}; "
                        f"convert one of them (e.g. {name}.to({dtype}))")
    if values and not bool(torch.isfinite(X).all()):
        raise ValueError(f"fit: {name} contains NaN or infinite values")
    return X.contiguous()


def _check_labels(name: str, y: Any, n: int, num_classes: int, values: bool = True) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"fit: {name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"fit: {name} must hold integer class labels, got dtype {y.dtype}")
    if y.device.type != "cpu":
        raise ValueError(f"fit: {name} is on {y.device}; fit() runs on the CPU only")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"fit: {name} must have shape ({n},) (one label per row of X), got {tuple(y.shape)}")
    lo, hi = (int(y.min()), int(y.max())) if values else (0, 0)
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"fit: {name} holds label {bad}, outside [0, {num_classes - 1}] for {num_classes} classes")
    return y.to(torch.int64).contiguous()


def _check_targets(name: str, y: Any, n: int, out_features: int, dtype: torch.dtype, values: bool = True) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"fit: {name} must be a torch.Tensor, got {type(y).__name__}")
    if not y.dtype.is_floating_point:
        raise TypeError(f"fit: {name} must be a floating-point tensor of targets, got dtype {y.dtype}")
    if y.device.type != "cpu":
        raise ValueError(f"fit: {name} is on {y.device}; fit() runs on the CPU only")
    if y.dim() == 1 and out_features == 1:
        y = y.unsqueeze(1)
    if y.dim() != 2 or y.shape[0] != n or y.shape[1] != out_features:
        raise ValueError(f"fit: {name} must have shape ({n}, {out_features})"
                         + (f" or ({n},)" if out_features == 1 else "") + f", got {tuple(y.shape)}")
    if values and not bool(torch.isfinite(y).all()):
        raise ValueError(f"fit: {name} contains NaN or infinite values")
    return y.to(dtype).contiguous()


class _OptimizerPlan:
    """The optimizer's view of the model's parameters: which are trained, with which group's
    hyper-parameters, and the state tensors the C++ update reads and writes."""

    def __init__(self, optimizer: Any, params: list[Tensor]):
        if not isinstance(optimizer, (SGD, Adam)):
            raise TypeError("fit: optimizer must be a fastreg.optim.SGD, Adam or AdamW instance (its update rule "
                            f"runs inside the C++ loop), got {type(optimizer).__module__}.{type(optimizer).__name__}")
        if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
            raise ValueError("fit: the optimizer carries GradScaler state (grad_scale / found_inf); fit() does not "
                             "scale gradients")
        self.optimizer = optimizer
        self.kind = _OPT_ADAM if isinstance(optimizer, Adam) else _OPT_SGD
        group_of = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                group_of[p] = group
        self.params = params
        self.groups = [group_of.get(p) for p in params]
        self.trainable = [int(g is not None and p.requires_grad) for p, g in zip(params, self.groups)]
        if not any(self.trainable):
            raise ValueError("fit: none of the model's parameters is both in the optimizer and requires grad")
        for p, g in zip(params, self.groups):
            if g is not None and g.get("differentiable", False):
                raise ValueError("fit: differentiable=True optimizers are not supported")

    def state(self) -> list[Tensor]:
        """Per parameter, the state tensors of the operator (created like the first
        ``optimizer.step()`` would)."""
        out = []
        for p, g, t in zip(self.params, self.groups, self.trainable):
            if self.kind == _OPT_ADAM:
                if not t:
                    out += [_EMPTY] * 4
                    continue
                st = self.optimizer._init_state(p, self.optimizer.state[p], g)
                out += [st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq", _EMPTY) if g["amsgrad"] else _EMPTY,
                        st["step"]]
            else:
                if not t or g["momentum"] == 0:
                    out += [_EMPTY] * 2
                    continue
                st = self.optimizer._init_state(p, self.optimizer.state[p], g)
                out += [st["momentum_buffer"], st["momentum_started"]]
        return out

    def hyper(self) -> tuple[list[float], float]:
        """8 numbers per parameter (read every epoch, so a per-epoch scheduler or callback that
        changes a group's lr is honoured) and the weight's learning rate."""
        out = []
        for g in self.groups:
            if g is None:
                out += [0.0] * 8
            elif self.kind == _OPT_ADAM:
                b1, b2 = g["betas"]
                out += [hyper_float(g["lr"]), hyper_float(b1), hyper_float(b2), hyper_float(g["weight_decay"]),
                        hyper_float(g["eps"]), float(bool(g["amsgrad"])), float(bool(g["maximize"])),
                        float(bool(g.get("decoupled_weight_decay", False)))]
            else:
                out += [hyper_float(g["lr"]), hyper_float(g["momentum"]), hyper_float(g["dampening"]),
                        hyper_float(g["weight_decay"]), float(bool(g["nesterov"])), float(bool(g["maximize"])),
                        0.0, 0.0]
        return out


def fit_linear(model, X: Tensor, y: Tensor, *, loss: int, optimizer, epochs: int, batch_size: Optional[int],
               shuffle: bool, generator: Optional[torch.Generator], validation_data, patience: Optional[int],
               tol: float, restore_best: bool, l1: float, class_weight: Optional[Tensor],
               callback: Optional[Callable], out_features: int):
    """The body of both models' ``fit`` (see their docstrings)."""
    weight = model.weight
    params = [weight] + ([model.bias] if model.bias is not None else [])
    dtype = weight.dtype
    if weight.device.type != "cpu":
        raise ValueError(f"fit: the model is on {weight.device}; fit() runs on the CPU only")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"fit: the model's parameters are {dtype}; fit() supports float32 and float64")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be an int >= 1, got {epochs!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"fit: batch_size must be None (full batch) or an int >= 1, got {batch_size!r}")
    if not (isinstance(l1, (int, float)) and math.isfinite(l1) and l1 >= 0):
        raise ValueError(f"fit: l1 must be a finite number >= 0, got {l1!r}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"fit: patience must be None or an int >= 1, got {patience!r}")
    if patience is not None and validation_data is None:
        raise ValueError("fit: early stopping (patience) needs validation_data")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"fit: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"fit: generator must be a CPU generator, got one on {generator.device}")

    X = _check_data("X", X, weight.shape[1], dtype, values=False)
    n = X.shape[0]
    if loss == CROSS_ENTROPY:
        y = _check_labels("y", y, n, out_features, values=False)
    else:
        y = _check_targets("y", y, n, out_features, dtype, values=False)
    if class_weight is not None:
        if loss != CROSS_ENTROPY:
            raise ValueError("fit: class_weight applies to classification only")
        if not isinstance(class_weight, Tensor):
            class_weight = torch.as_tensor(class_weight)
        if class_weight.shape != (out_features,):
            raise ValueError(f"fit: class_weight must have shape ({out_features},), got {tuple(class_weight.shape)}")
        class_weight = class_weight.to(device="cpu", dtype=dtype).contiguous()
        if not bool(torch.isfinite(class_weight).all()) or bool((class_weight < 0).any()):
            raise ValueError("fit: class_weight must be finite and >= 0")
    X_val = y_val = None
    if validation_data is not None:
        if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
            raise TypeError("fit: validation_data must be a pair (X_val, y_val)")
        X_val = _check_data("X_val", validation_data[0], weight.shape[1], dtype)
        if loss == CROSS_ENTROPY:
            y_val = _check_labels("y_val", validation_data[1], X_val.shape[0], out_features)
        else:
            y_val = _check_targets("y_val", validation_data[1], X_val.shape[0], out_features, dtype)

    plan = _OptimizerPlan(optimizer, params)
    state = plan.state()
    batch = n if batch_size is None else min(batch_size, n)
    history: dict[str, Any] = {"loss": [], "val_loss": [], "val_score": []}
    best_loss, best_epoch, best_params, since_best, stopped_early = math.inf, None, None, 0, False
    trainable = plan.trainable

    with torch.no_grad():
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=generator) if shuffle else None
            hyper = plan.hyper()
            epoch_loss = _fit_epoch(X, y, perm, params, class_weight, loss, batch, float(l1), plan.kind, state,
                                    hyper, trainable, epoch == 0)
            history["loss"].append(float(epoch_loss))
            if X_val is not None:
                val_loss, val_score = model._validation_metrics(X_val, y_val, class_weight)
                history["val_loss"].append(val_loss)
                history["val_score"].append(val_score)
                if val_loss < best_loss - tol:
                    best_loss, best_epoch, since_best = val_loss, epoch, 0
                    if restore_best:
                        best_params = [p.detach().clone() for p in params]
                else:
                    since_best += 1
            if callback is not None and callback(epoch, model, history):
                break
            if patience is not None and since_best >= patience and epoch < epochs - 1:
                stopped_early = True
                break
        if restore_best and best_params is not None and best_epoch != len(history["loss"]) - 1:
            for p, saved in zip(params, best_params):
                p.copy_(saved)
    for p in params:  # updated in place: autograd must see a new version, as after optimizer.step()
        torch.autograd.graph.increment_version(p)
    history["epochs"] = len(history["loss"])
    history["best_epoch"] = best_epoch
    history["stopped_early"] = stopped_early
    model.history_ = history
    model.n_iter_ = len(history["loss"])
    return model
