"""Fused optimizers (filled in by the optimizer kernels' issue)."""
