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
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

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
CUDA_DEFINES = [("FASTREG_WITH_CUDA", "1")]
EXTENSION_NAME = "fastreg._C"


def nvcc_compile_flags(archs: str | None = None) -> list[str]:
    """Every nvcc flag the build passes for one .cu file, in the order torch's BuildExtension
    assembles them (its COMMON_NVCC_FLAGS such as -D__CUDA_NO_HALF_OPERATORS__, -fPIC, the
    extension's defines, NVCC_FLAGS, the -gencode flags), without include paths. One list shared
    with scripts/cuda_check.py, so that `make cuda-check` compiles exactly what the build compiles."""
    return (list(COMMON_NVCC_FLAGS) + ["-Xcompiler", "-fPIC"]
            + [f"-D{k}={v}" for k, v in CUDA_DEFINES]
            + ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME.rsplit('.', 1)[-1]}"]
            + NVCC_FLAGS + cuda_gencode_flags(archs))


def extensions():
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        return [
            CUDAExtension(
                EXTENSION_NAME,
                cpp + cu,
                include_dirs=include_dirs,
                define_macros=CUDA_DEFINES,
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
