"""Loads fastreg's compiled library (``fastreg._C``, csrc/module.cpp) and says how it was built.

Importing ``_C`` registers ``torch.ops.fastreg.*``. A binary built against another torch
major.minor is refused with a message naming both versions: torch's C++ ABI changes between
minor releases, so such a build would crash or misbehave instead of failing cleanly.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re

import torch

from ._version import __version__


def built_torch_from_binary(path: str) -> str | None:
    """The torch version a compiled fastreg library was built against, read from the file itself
    (its build stamp, csrc/module.cpp) without loading it; None if there is none."""
    try:
        with open(path, "rb") as f:
            m = re.search(rb"fastreg-build-stamp: fastreg=[^ ]+ torch=([0-9.]+);", f.read())
    except OSError:
        return None
    return m.group(1).decode() if m else None


def import_failure_message(error: ImportError, library: str | None) -> str:
    """Why ``from . import _C`` failed, in words a user can act on."""
    built = built_torch_from_binary(library) if library else None
    if built is None:
        return ("fastreg's C++ extension is not built or cannot be loaded. From the repository root run "
                f"`make build` (or `pip install --no-build-isolation -e .`). ({error})")
    if _major_minor(built) != _major_minor(torch.__version__):
        return version_mismatch_message(built, torch.__version__)
    return f"fastreg's C++ extension (built against torch {built}) cannot be loaded: {error}"


def _major_minor(version: str) -> tuple:
    parts = str(version).split("+")[0].split(".")
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts[:2])


def check_torch_version(built: str, running: str) -> None:
    """Raise ImportError unless ``built`` and ``running`` torch versions share major.minor."""
    if _major_minor(built) != _major_minor(running):
        raise ImportError(version_mismatch_message(built, running))


def version_mismatch_message(built: str, running: str) -> str:
    return (f"fastreg was built against torch {built} but the running torch is {running}: "
            f"torch's C++ ABI differs between minor versions. Rebuild fastreg against torch {running} "
            f"(`make build`, or `pip install --no-build-isolation .`), or install torch {built}.")


try:
    from . import _C  # registers torch.ops.fastreg.*
except ImportError as e:
    spec = importlib.util.find_spec(f"{__package__}._C")
    raise ImportError(import_failure_message(e, spec.origin if spec else None)) from e


check_torch_version(_C.torch_version(), torch.__version__)


def has_cuda_kernels() -> bool:
    """True if this build of fastreg contains its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastreg::_lce_rows", "CUDA")


def build_info() -> dict:
    """How this fastreg was built and what it runs on (``python -m fastreg`` prints it)."""
    cuda_ok = torch.cuda.is_available()
    return {
        "fastreg": __version__,
        "fastreg_binary": _C.version(),  # differs from "fastreg" only for a stale in-place build
        "built_against_torch": _C.torch_version(),
        "running_torch": torch.__version__,
        "cuda_kernels": _C.cuda_kernels_compiled(),
        "cuda_archs": list(_C.cuda_archs()),
        "torch_cuda": torch.version.cuda or "",
        "cuda_device": torch.cuda.get_device_name() if cuda_ok else "",
        "cpu_code_path": _C.cpu_code_path(),
        "openmp": _C.openmp(),
        "openmp_threads": _C.openmp_threads(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "library": os.path.abspath(_C.__file__),
    }


def build_summary() -> str:
    """One line for benchmark provenance, e.g. '0.1.0 torch-2.13.0 cpu=AVX-512 omp=2 cuda=sm_80,sm_90'."""
    info = build_info()
    cuda = ",".join(info["cuda_archs"]) if info["cuda_kernels"] else "none"
    return (f"{info['fastreg_binary']} torch-{info['built_against_torch']} cpu={info['cpu_code_path']} "
            f"omp={info['openmp_threads']} cuda={cuda}")
