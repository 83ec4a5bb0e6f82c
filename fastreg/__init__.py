"""fastreg: fused linear + softmax + cross-entropy and fused optimizers for PyTorch.

    import fastreg
    loss = fastreg.linear_cross_entropy(hidden, lm_head.weight, labels)

Submodules: ``fastreg.nn`` (modules), ``fastreg.optim`` (SGD, Adam, AdamW), ``fastreg.bench``,
``fastreg.integrations.transformers`` (one-line Hugging Face patch). ``python -m fastreg``
prints how this fastreg was built (``fastreg.build_info()``).
The operators themselves are ``torch.ops.fastreg.*`` (schemas in csrc/fastreg.cpp).
"""
from ._version import __version__  # noqa: F401
from ._C_loader import build_info, has_cuda_kernels  # noqa: F401  (loads the operator library first)
from .functional import LinearCrossEntropyStats, linear_cross_entropy, linear_mse_loss  # noqa: F401
from .memory import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit  # noqa: F401
from . import nn  # noqa: F401
from . import optim  # noqa: F401

__all__ = ["linear_cross_entropy", "linear_mse_loss", "nn", "optim", "has_cuda_kernels", "build_info",
           "cpu_cache_info", "empty_cpu_cache", "set_cpu_cache_limit"]
