"""Build fastreg's C++ (and, when torch has CUDA, CUDA) extension ``fastreg._C``.

Environment switches:
  FASTREG_SKIP_CUDA=1      never compile the CUDA sources
  FASTREG_FORCE_CUDA=1     compile them even if torch.version.cuda is None
  FASTREG_CUDA_ARCHS       ';'-separated compute capabilities, default "80;90" (+PTX of the last)
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build)
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("FASTREG_SKIP_CUDA", "0") == "1":
        return False
    if os.environ.get("FASTREG_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_gencode_flags(archs: str | None = None) -> list[str]:
    """-gencode flags for FASTREG_CUDA_ARCHS (default sm_80 and sm_90, plus PTX of the newest)."""
    archs = archs or os.environ.get("FASTREG_CUDA_ARCHS", "80;90")
    caps = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    flags = []
    for cap in caps:
        flags += ["-gencode", f"arch=compute_{cap},code=sm_{cap}"]
    flags += ["-gencode", f"arch=compute_{caps[-1]},code=compute_{caps[-1]}"]
    return flags


# Flags shared by the build and by `make cuda-check` (scripts/cuda_check.py).
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-DUSE_CUDA",
    "-DTORCH_TARGET_VERSION=0x020a000000000000",
    "--expt-relaxed-constexpr",
    "-lineinfo",
]
CXX_FLAGS = ["-O3", "-std=c++20", "-Wno-psabi", "-fopenmp", "-fopenmp-simd", "-fvisibility=hidden"]


def extensions():
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        return [
            CUDAExtension(
                "fastreg._C",
                cpp + cu,
                include_dirs=include_dirs,
                define_macros=[("FASTREG_WITH_CUDA", "1")],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + cuda_gencode_flags()},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fastreg._C",
            cpp,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]


if __name__ == "__main__":
    setup(
        name="fastreg",
        packages=find_packages(include=["fastreg", "fastreg.*"]),
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension},
    )
