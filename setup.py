"""Build fastreg's C++ (and, when torch has CUDA, CUDA) extension ``fastreg._C``.

Environment switches:
  FASTREG_SKIP_CUDA=1      never compile the CUDA sources
  FASTREG_FORCE_CUDA=1     compile them even if torch.version.cuda is None
  FASTREG_CUDA_ARCHS       ';'-separated compute capabilities, default "80;90" (+PTX of the last)
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build)
  FASTREG_NO_EXT=1         no extension at all: what scripts/bootstrap.sh sets for its editable
                           install, which then only maps the package, because it builds the
                           extension in place itself (once, not a second time in a temporary dir)
  FASTREG_OPENMP           "auto" (default): use OpenMP when the compiler has it (on macOS: libomp,
                           see openmp_flags); "0": build without it (the CPU kernels then run on one
                           thread); "1": require it

Platforms: Linux x86-64 and aarch64 (GCC or clang), macOS arm64/x86-64 (Apple clang, with or
without libomp). Windows/MSVC is not supported (the kernels use GCC/clang vector extensions and
attributes that MSVC lacks): setup fails at once there; use WSL2.
"""
import ast
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

if sys.platform == "win32":
    sys.exit("fastreg does not support Windows/MSVC: its C++ kernels use GCC/clang vector extensions and "
             "attributes that MSVC does not have. Use Linux (WSL2 on Windows) or macOS.")

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def fastreg_version() -> str:
    """The version, from its one place: fastreg/_version.py (pyproject.toml's dynamic version too)."""
    with open(os.path.join(ROOT, "fastreg", "_version.py")) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and node.targets[0].id == "__version__":
                return node.value.value
    raise RuntimeError("no __version__ in fastreg/_version.py")


def cuda_caps(archs: str | None = None) -> list[str]:
    """FASTREG_CUDA_ARCHS (default "80;90") as a list of compute capabilities, e.g. ["80", "90"]."""
    archs = archs or os.environ.get("FASTREG_CUDA_ARCHS", "80;90")
    return [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]


def _want_cuda() -> bool:
    if os.environ.get("FASTREG_SKIP_CUDA", "0") == "1":
        return False
    if os.environ.get("FASTREG_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_gencode_flags(archs: str | None = None) -> list[str]:
    """-gencode flags for FASTREG_CUDA_ARCHS (default sm_80 and sm_90, plus PTX of the newest)."""
    caps = cuda_caps(archs)
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
# The OpenMP flags (openmp_flags()) come on top; `omp simd` loops need only -fopenmp-simd, which
# every GCC and clang (Apple's too) has, with or without an OpenMP runtime.
CXX_FLAGS = ["-O3", "-std=c++20", "-Wno-psabi", "-fopenmp-simd", "-fvisibility=hidden"]


def _compiles(cxx: str, flags: list[str], ldflags: list[str]) -> bool:
    """True if `cxx` compiles and links a small OpenMP program with these flags."""
    src = "#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel reduction(+: n)\n n += 1;\n return n > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "omp_probe.cpp")
        with open(path, "w") as f:
            f.write(src)
        try:
            proc = subprocess.run([*cxx.split(), *flags, path, "-o", os.path.join(tmp, "a.out"), *ldflags],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return proc.returncode == 0


def openmp_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for OpenMP, or ([], []) when the build goes without it.

    OpenMP is what at::parallel_for (ATen/Parallel.h, inlined into the kernels) runs on: without
    it the CPU row pass and optimizer steps run on one thread (torch's own ops stay parallel).
    Linux: -fopenmp (GCC's libgomp, or clang's libomp where installed). macOS: Apple clang has no
    -fopenmp; with libomp present (torch's wheel ships libomp.dylib; the headers come from
    `brew install libomp`) it is -Xpreprocessor -fopenmp against torch's own libomp, so the process
    holds one OpenMP runtime.
    """
    mode = os.environ.get("FASTREG_OPENMP", "auto").lower()
    if mode in ("0", "off", "no", "false"):
        return [], []
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if sys.platform == "darwin":
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        prefixes = [os.environ.get("LIBOMP_PREFIX"), "/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
        brew = shutil.which("brew")
        if brew:
            out = subprocess.run([brew, "--prefix", "libomp"], capture_output=True, text=True)
            prefixes.insert(1, out.stdout.strip() if out.returncode == 0 else None)
        candidates = []
        for prefix in filter(None, prefixes):
            if os.path.isfile(os.path.join(prefix, "include", "omp.h")):
                inc = ["-Xpreprocessor", "-fopenmp", "-I" + os.path.join(prefix, "include")]
                if os.path.exists(os.path.join(torch_lib, "libomp.dylib")):
                    candidates.append((inc, ["-L" + torch_lib, "-lomp", "-Wl,-rpath," + torch_lib]))
                candidates.append((inc, ["-L" + os.path.join(prefix, "lib"), "-lomp"]))
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    for cflags, ldflags in candidates:
        if _compiles(cxx, cflags, ldflags):
            return cflags, ldflags
    msg = (f"fastreg: {cxx} has no usable OpenMP; building without it (the CPU row pass and optimizer steps will "
           "run on one thread)." + (" On macOS: `brew install libomp`, then rebuild." if sys.platform == "darwin" else ""))
    if mode in ("1", "on", "yes", "true"):
        sys.exit(msg.replace("building without it", "FASTREG_OPENMP=1 requires it"))
    print(msg, file=sys.stderr)
    return [], []


EXTENSION_NAME = "fastreg._C"


def cpu_defines() -> list[tuple[str, str]]:
    """The extension's defines: build facts for csrc/module.cpp (no quotes or commas: it
    stringifies them, nvcc splits at commas). Also used by scripts/port_check.py."""
    return [("FASTREG_VERSION", fastreg_version())]


def cuda_defines(archs: str | None = None) -> list[tuple[str, str]]:
    """The extension's defines when it is built with CUDA."""
    return cpu_defines() + [("FASTREG_WITH_CUDA", "1"), ("FASTREG_CUDA_ARCHS", "_".join(cuda_caps(archs)))]


def nvcc_compile_flags(archs: str | None = None) -> list[str]:
    """Every nvcc flag the build passes for one .cu file, in the order torch's BuildExtension
    assembles them (its COMMON_NVCC_FLAGS such as -D__CUDA_NO_HALF_OPERATORS__, -fPIC, the
    extension's defines, NVCC_FLAGS, the -gencode flags), without include paths. One list shared
    with scripts/cuda_check.py, so that `make cuda-check` compiles exactly what the build compiles."""
    return (list(COMMON_NVCC_FLAGS) + ["-Xcompiler", "-fPIC"]
            + [f"-D{k}={v}" for k, v in cuda_defines(archs)]
            + ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME.rsplit('.', 1)[-1]}"]
            + NVCC_FLAGS + cuda_gencode_flags(archs))


def extensions():
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    omp_cflags, omp_ldflags = openmp_flags()
    cxx_flags = CXX_FLAGS + omp_cflags
    if _want_cuda():
        return [
            CUDAExtension(
                EXTENSION_NAME,
                cpp + cu,
                include_dirs=include_dirs,
                define_macros=cuda_defines(),
                extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS + cuda_gencode_flags()},
                extra_link_args=omp_ldflags,
            )
        ]
    return [
        CppExtension(
            EXTENSION_NAME,
            cpp,
            include_dirs=include_dirs,
            define_macros=cpu_defines(),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp_ldflags,
        )
    ]


if __name__ == "__main__":
    setup(
        name="fastreg",
        packages=find_packages(include=["fastreg", "fastreg.*"]),
        ext_modules=[] if os.environ.get("FASTREG_NO_EXT") == "1" else extensions(),
        cmdclass={"build_ext": BuildExtension},
    )
