"""Loads fastreg's compiled operator library (``fastreg._C``) and says what it was built with."""
import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastreg.*)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "fastreg's C++ extension is not built. From the repository root run `make build` "
        "(or `pip install --no-build-isolation -e .`)."
    ) from e


def has_cuda_kernels() -> bool:
    """True if this build of fastreg contains its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastreg::_lce_rows", "CUDA")
