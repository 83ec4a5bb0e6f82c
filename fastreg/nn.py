"""Modules: the fused loss as a module, and the multinomial logistic regression model."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .functional import linear_cross_entropy

__all__ = ["LinearCrossEntropyLoss", "MultinomialLogisticRegression"]


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`fastreg.linear_cross_entropy`.

    ``forward(input, linear_weight, target, linear_bias=None)``; the options are fixed at
    construction, like ``nn.CrossEntropyLoss``. ``weight`` (class weights) is a buffer.
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, softcap: Optional[float] = None, z_loss: float = 0.0,
                 chunk_size: Optional[int] = None):
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

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, softcap=self.softcap, z_loss=self.z_loss,
                                    chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, softcap={self.softcap}, z_loss={self.z_loss}")


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

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}"
