"""Modules: the fused loss as a module, and the multinomial logistic regression model."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._fit import CROSS_ENTROPY, MEAN_SQUARED_ERROR, fit_linear
from .functional import linear_cross_entropy, linear_mse_loss

__all__ = ["LinearCrossEntropyLoss", "MultinomialLogisticRegression", "LinearRegression"]

_FIT_DOC = """
        Trains the model on ``(X, y)`` with mini-batch gradient descent; the whole batch loop runs
        in C++ (``torch.ops.fastreg._fit_epoch``, csrc/fit/fit.cpp): batch gather, fused loss and
        gradients, and the optimizer's own update rule, with no return to Python between batches
        (Python runs once per epoch: permutation, history, validation, callback, early stopping).
        The result equals the same loop written in Python with ``model.loss``, ``backward`` and
        ``optimizer.step()`` (and the same generator) to rounding.

        Args:
            X: (n_samples, in_features) CPU tensor, the model's dtype (float32 or float64).
            y: {y_doc}
            optimizer: a ``fastreg.optim.SGD``, ``Adam`` or ``AdamW`` over (some of) the model's
                parameters. Its param groups and hyper-parameters are honoured (lr, betas, eps,
                weight_decay = L2, momentum, dampening, nesterov, amsgrad, maximize), read at the
                start of every epoch; its state (step counts, moments, momentum buffers) is
                created as by the first ``step()`` and continues afterwards exactly as if
                ``step()`` had been called once per batch. Parameters outside it or with
                ``requires_grad=False`` stay fixed. A learning-rate scheduler can only step per
                epoch (from ``callback``), never per batch; GradScaler is refused.
            epochs: passes over the data (>= 1).
            batch_size: rows per step; ``None`` = the full batch. The last batch may be smaller.
            shuffle: visit the rows in the order ``torch.randperm(n, generator=generator)``, drawn
                afresh every epoch (as a Python loop would); ``False``: in order.
            generator: the ``torch.Generator`` for the permutations (default: torch's global one).
            validation_data: optional ``(X_val, y_val)``, evaluated after every epoch:
                ``history_["val_loss"]`` and ``history_["val_score"]`` ({score_doc}).
            patience: early stopping: stop after this many epochs without a validation-loss
                improvement larger than ``tol`` (needs validation_data).
            restore_best: with validation data, end with the parameters of the best epoch (the
                optimizer state stays that of the last epoch).
            l1: L1 penalty ``l1 * |weight|_1``, applied as a proximal soft-threshold step
                (by ``lr * l1``) after each update of the weight (not the bias).
            {extra_doc}callback: ``callback(epoch, model, history)`` after every epoch; returning True stops.

        Returns ``self``, with ``history_`` (``loss``: the mean training batch loss per epoch,
        ``val_loss``, ``val_score``, ``epochs``, ``best_epoch``, ``stopped_early``) and
        ``n_iter_`` (epochs run). Bad input (shapes, dtypes, devices, labels out of range, NaN or
        inf, empty X) raises before any parameter changes. CPU only: other devices and dtypes
        are refused with a clear error (train those with ``model.loss`` in a Python loop).
"""


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`fastreg.linear_cross_entropy`.

    ``forward(input, linear_weight, target, linear_bias=None)``; the options are fixed at
    construction, like ``nn.CrossEntropyLoss``. ``weight`` (class weights) is a buffer. With
    ``return_stats=True`` it returns ``(loss, LinearCrossEntropyStats)``.
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, softcap: Optional[float] = None, z_loss: float = 0.0,
                 chunk_size: Optional[int] = None, shift: bool = False,
                 grad_filter_eps: Union[float, str, None] = None, skip_ignored: Optional[bool] = None,
                 return_stats: bool = False):
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {softcap}")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.z_loss = z_loss
        self.chunk_size = chunk_size
        self.shift = shift
        self.grad_filter_eps = grad_filter_eps
        self.skip_ignored = skip_ignored
        self.return_stats = return_stats

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, softcap=self.softcap, z_loss=self.z_loss,
                                    chunk_size=self.chunk_size, shift=self.shift,
                                    grad_filter_eps=self.grad_filter_eps, skip_ignored=self.skip_ignored,
                                    return_stats=self.return_stats)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)!r}" for k in ("shift", "grad_filter_eps", "skip_ignored",
                                                                 "return_stats") if getattr(self, k) not in (None, False))
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, softcap={self.softcap}, z_loss={self.z_loss}{extra}")


class MultinomialLogisticRegression(nn.Module):
    r"""Multinomial logistic regression: ``P(y = k | x) = softmax(x W^T + b)_k``.

    Parameters ``weight`` ``(num_classes, in_features)`` and ``bias`` ``(num_classes,)``,
    initialised like ``nn.Linear``. ``forward(x)`` gives the logits (scores),
    ``predict_proba(x)`` the class probabilities, ``predict(x)`` the most likely class and
    ``loss(x, target, **kw)`` the fused cross-entropy (keyword options of
    :func:`fastreg.linear_cross_entropy`), which never stores the logits whole.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_classes, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        return torch.softmax(self.forward(x), dim=-1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.forward(x).argmax(dim=-1)

    def loss(self, x: Tensor, target: Tensor, **kwargs) -> Tensor:
        return linear_cross_entropy(x, self.weight, target, linear_bias=self.bias, **kwargs)

    @torch.no_grad()
    def score(self, x: Tensor, y: Tensor) -> float:
        """Mean accuracy on ``(x, y)``, as scikit-learn's ``ClassifierMixin.score``."""
        return float((self.predict(x) == y).double().mean())

    def fit(self, X: Tensor, y: Tensor, *, optimizer, epochs: int = 1, batch_size: Optional[int] = None,
            shuffle: bool = True, generator: Optional[torch.Generator] = None, validation_data=None,
            patience: Optional[int] = None, tol: float = 1e-4, restore_best: bool = True, l1: float = 0.0,
            class_weight: Optional[Tensor] = None, callback=None) -> "MultinomialLogisticRegression":
        return fit_linear(self, X, y, loss=CROSS_ENTROPY, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
                          shuffle=shuffle, generator=generator, validation_data=validation_data, patience=patience,
                          tol=tol, restore_best=restore_best, l1=l1, class_weight=class_weight, callback=callback,
                          out_features=self.num_classes)

    fit.__doc__ = _FIT_DOC.format(
        y_doc="(n_samples,) integer class labels in [0, num_classes).",
        score_doc="accuracy",
        extra_doc="class_weight: (num_classes,) weights of the classes in the loss, as\n"
                  "                ``linear_cross_entropy(weight=...)`` (weighted mean).\n            ")

    @torch.no_grad()
    def _validation_metrics(self, X: Tensor, y: Tensor, class_weight: Optional[Tensor]) -> tuple[float, float]:
        return float(self.loss(X, y, weight=class_weight)), self.score(X, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}"


class LinearRegression(nn.Module):
    r"""Linear regression ``y = x W^T + b`` fitted on the mean squared error.

    Parameters ``weight`` ``(out_features, in_features)`` and ``bias`` ``(out_features,)``,
    initialised like ``nn.Linear``. ``forward(x)`` / ``predict(x)`` give the predictions,
    ``loss(x, target)`` the mean squared error (:func:`fastreg.linear_mse_loss`, fused linear +
    MSE), ``score(x, y)`` the coefficient of determination R^2 exactly as scikit-learn's
    ``r2_score`` (multi-output: uniform average), and ``fit(X, y, optimizer=...)`` trains in C++.
    For ``out_features == 1`` targets may be ``(N,)``.
    """

    def __init__(self, in_features: int, out_features: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    reset_parameters = MultinomialLogisticRegression.reset_parameters

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def _as_2d(self, target: Tensor) -> Tensor:
        return target.unsqueeze(-1) if self.out_features == 1 and target.dim() == 1 else target

    def loss(self, x: Tensor, target: Tensor) -> Tensor:
        """Mean squared error over all outputs (``F.mse_loss(model(x), target)``), fused."""
        return linear_mse_loss(x, self.weight, self._as_2d(target), linear_bias=self.bias)

    @torch.no_grad()
    def score(self, x: Tensor, y: Tensor) -> float:
        """R^2 = 1 - SS_res / SS_tot per output, averaged uniformly over outputs, computed in float64;
        like scikit-learn, an output with SS_tot = 0 scores 1 if predicted exactly, else 0."""
        y = self._as_2d(y).double()
        pred = self.forward(x).double().reshape(y.shape)
        ss_res = ((y - pred) ** 2).sum(0)
        ss_tot = ((y - y.mean(0)) ** 2).sum(0)
        exact = ss_res == 0
        r2 = torch.where(ss_tot != 0, 1 - ss_res / torch.where(ss_tot != 0, ss_tot, 1.0),
                         torch.where(exact, 1.0, 0.0).double())
        return float(r2.mean())

    def fit(self, X: Tensor, y: Tensor, *, optimizer, epochs: int = 1, batch_size: Optional[int] = None,
            shuffle: bool = True, generator: Optional[torch.Generator] = None, validation_data=None,
            patience: Optional[int] = None, tol: float = 1e-4, restore_best: bool = True, l1: float = 0.0,
            callback=None) -> "LinearRegression":
        return fit_linear(self, X, y, loss=MEAN_SQUARED_ERROR, optimizer=optimizer, epochs=epochs,
                          batch_size=batch_size, shuffle=shuffle, generator=generator,
                          validation_data=validation_data, patience=patience, tol=tol, restore_best=restore_best,
                          l1=l1, class_weight=None, callback=callback, out_features=self.out_features)

    fit.__doc__ = _FIT_DOC.format(y_doc="(n_samples, out_features) float targets ((n_samples,) when out_features == 1).",
                                  score_doc="R^2", extra_doc="")

    @torch.no_grad()
    def _validation_metrics(self, X: Tensor, y: Tensor, class_weight: Optional[Tensor]) -> tuple[float, float]:
        return float(self.loss(X, y)), self.score(X, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
