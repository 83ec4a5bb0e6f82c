"""Fused optimizers: drop-in replacements for torch.optim.SGD, Adam and AdamW whose whole step is
one kernel call per (device, dtype) group of parameters (C++ on CPU, CUDA on GPUs).

    opt = fastreg.optim.AdamW(model.parameters(), lr=1e-3)

Constructor arguments, param groups, hooks, LR schedulers, GradScaler and ``state_dict`` work as
with torch.optim (checkpoints load into either). The operators are
``torch.ops.fastreg._fused_sgd_`` and ``torch.ops.fastreg._fused_adam_``.
"""
from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
