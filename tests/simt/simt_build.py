"""Builds the SIMT harness (tests/simt) as the test-only torch extension ``fastreg_simt``.

The kernel sources compiled are those of the checkout this file lives in (csrc/ next to tests/),
so the tests always execute the kernels being changed. torch.utils.cpp_extension + ninja, cached
in <repo>/build/simt (ninja rebuilds what a source or header change touches).

``build_kernel_library(csrc_dir, out_dir, runtime_obj, harness=...)`` compiles the plain C interface
(simt_harness.h) of one harness against a possibly mutated kernel tree into a shared library for
ctypes, as the teeth tests do.
"""
from __future__ import annotations

import os
import subprocess
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
BUILD_DIR = os.path.join(ROOT, "build", "simt")

# -fno-strict-aliasing: the kernels reinterpret 128-bit packs as their elements, as CUDA allows.
CFLAGS = ["-O2", "-std=c++20", "-DFASTREG_SIMT", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
          "-Wno-maybe-uninitialized"]
RUNTIME_SOURCES = ["simt.cpp", "lce_rows_simt.cpp", "optim_simt.cpp", "selftest.cpp"]

_loaded = False


def load():
    """Builds (if needed) and loads the extension; afterwards torch.ops.fastreg_simt.* exist."""
    global _loaded
    if _loaded:
        return
    import torch
    from torch.utils import cpp_extension

    os.makedirs(BUILD_DIR, exist_ok=True)
    cpp_extension.load(
        name="fastreg_simt",
        sources=[os.path.join(HERE, s) for s in RUNTIME_SOURCES + ["ops.cpp"]],
        extra_cflags=CFLAGS,
        extra_include_paths=[HERE, CSRC],
        build_directory=BUILD_DIR,
        is_python_module=False,
        verbose=False,
    )
    assert hasattr(torch.ops.fastreg_simt, "_lce_rows")
    _loaded = True


def build_runtime_object(out_dir: str) -> str:
    """g++ -c the SIMT runtime (simt.cpp) once for several kernel libraries."""
    obj = os.path.join(out_dir, "simt.o")
    cmd = [os.environ.get("CXX", "g++"), "-c", "-fPIC", *CFLAGS, f"-I{HERE}", os.path.join(HERE, "simt.cpp"), "-o", obj]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return obj


def build_kernel_library(csrc_dir: str, out_dir: str, runtime_obj: str, float_only: bool = True,
                         harness: str = "lce_rows_simt.cpp") -> str:
    """g++ one harness (the row pass: lce_rows_simt.cpp, or the optimizers: optim_simt.cpp) against
    the kernel and launcher tree `csrc_dir`, linked with the runtime object, into
    out_dir/libsimt_kernels.so (no torch headers: seconds, not minutes)."""
    out = os.path.join(out_dir, "libsimt_kernels.so")
    cmd = [os.environ.get("CXX", "g++"), "-shared", "-fPIC", *CFLAGS, *(["-DSIMT_FLOAT_ONLY"] if float_only else []),
           f"-I{HERE}", f"-I{csrc_dir}", os.path.join(HERE, harness), runtime_obj, "-o", out, "-lpthread"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out
