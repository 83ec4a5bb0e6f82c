"""fastreg: fused linear + softmax + cross-entropy and fused optimizers for PyTorch.

    import fastreg
    loss = fastreg.linear_cross_entropy(hidden, lm_head.weight, labels)

Submodules: ``fastreg.nn`` (modules), ``fastreg.optim`` (SGD, Adam, AdamW), ``fastreg.bench``.
The operators themselves are ``torch.ops.fastreg.*`` (schemas in csrc/fastreg.cpp).
"""
from ._C_loader import has_cuda_kernels  # noqa: F401  (loads the operator library first)
from .functional import linear_cross_entropy, linear_mse_loss  # noqa: F401
from . import nn  # noqa: F401
from . import optim  # noqa: F401

__version__ = "0.1.0"
__all__ = ["linear_cross_entropy", "linear_mse_loss", "nn", "optim", "has_cuda_kernels"]
