"""Which devices fastreg's operators have kernels for, read from torch's dispatcher.

``fastreg_ops()`` lists every operator the compiled library registered in the ``fastreg``
namespace (their schemas live in csrc/fastreg.cpp), so an operator added there is checked without
anyone listing it again. ``kernel_coverage(device)`` says, for each, how the dispatcher serves
that device: a kernel registered at the device's own key, a composite kernel (which serves every
device), an operator that is CPU-only by design (CPU_ONLY, with the reason), or nothing.
``python -m fastreg`` prints the CUDA summary; ``make cuda-build`` and ``make gpu-check`` fail on
an operator with no CUDA kernel (``python -m fastreg --require-cuda``).
"""
from __future__ import annotations

import torch

NAMESPACE = "fastreg"

# Operators that have no CUDA kernel on purpose, and why.
CPU_ONLY = {
    "fastreg::_fit_epoch": "fit() of the linear models runs on the CPU only (fastreg/_fit.py refuses other devices)",
}

KERNEL, COMPOSITE, BY_DESIGN, MISSING = "kernel", "composite", "cpu only", "missing"
_COMPOSITE_KEYS = ("CompositeImplicitAutograd", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def fastreg_ops() -> list[str]:
    """Qualified names ("fastreg::op") of every operator registered in the fastreg namespace."""
    from . import _C  # noqa: F401  (importing it registers the operators)

    prefix = NAMESPACE + "::"
    return sorted({s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith(prefix)})


def kernel_coverage(device: str) -> dict[str, str]:
    """{op: KERNEL | COMPOSITE | BY_DESIGN | MISSING} for device "cpu" or "cuda"."""
    key = _DEVICE_KEYS[device]
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    coverage = {}
    for op in fastreg_ops():
        if has(op, key):
            coverage[op] = KERNEL
        elif any(has(op, k) for k in _COMPOSITE_KEYS):
            coverage[op] = COMPOSITE
        elif device != "cpu" and op in CPU_ONLY:
            coverage[op] = BY_DESIGN
        else:
            coverage[op] = MISSING
    return coverage


def missing_kernels(device: str) -> list[str]:
    """The operators that device cannot run: no kernel of its own, no composite one, not CPU-only by design."""
    return [op for op, how in kernel_coverage(device).items() if how == MISSING]


def coverage_summary(device: str) -> str:
    """One line, e.g. "15 of 16 ops (1 CPU only: _fit_epoch)" or "12 of 16 ops; MISSING: _lce_rows, ..."."""
    coverage = kernel_coverage(device)
    short = lambda ops: ", ".join(op.split("::", 1)[1] for op in ops)  # noqa: E731
    served = [op for op, how in coverage.items() if how in (KERNEL, COMPOSITE)]
    by_design = [op for op, how in coverage.items() if how == BY_DESIGN]
    missing = [op for op, how in coverage.items() if how == MISSING]
    line = f"{len(served)} of {len(coverage)} ops"
    if by_design:
        line += f" ({len(by_design)} CPU only: {short(by_design)})"
    if missing:
        line += f"; MISSING: {short(missing)}"
    return line
