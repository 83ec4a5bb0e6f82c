#!/usr/bin/env python3
"""Compile-check every CUDA source of fastreg (csrc/**/*.cu) with nvcc -- no GPU needed.

Run by `make cuda-check`. Each file is compiled on its own (`nvcc -c -o <tmp>/x.o`) against the
installed torch's headers (cpp_extension.include_paths("cuda"), as CUDAExtension) with exactly the
flags of the real build (setup.nvcc_compile_flags: torch's COMMON_NVCC_FLAGS such as
-D__CUDA_NO_HALF_OPERATORS__, the extension's defines, NVCC_FLAGS and the -gencode flags, imported
from setup.py so the two cannot drift) for sm_80 and sm_90,
at most 2 files at a time. Prints one status line per file (plus the compiler's diagnostics) and
exits non-zero if any file fails.

Without nvcc it prints "SKIPPED: nvcc not found" and exits 0, unless FASTREG_REQUIRE_NVCC=1.
Environment: NVCC (compiler path), FASTREG_CUDA_CHECK_JOBS (parallel jobs, capped at 2),
FASTREG_CUDA_CHECK_ARCHS (default "80;90").
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_JOBS = 2


def load_setup_module():
    """Import the repository's setup.py as a module (its setup() call runs only under __main__)."""
    spec = importlib.util.spec_from_file_location("fastreg_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # setup.py globs relative paths in extensions(); keep imports side-effect free
        spec.loader.exec_module(mod)
    finally:
        os.chdir(cwd)
    return mod


def find_nvcc() -> str | None:
    env = os.environ.get("NVCC")
    if env and os.path.isfile(env) and os.access(env, os.X_OK):
        return env
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    return None


def compile_one(nvcc: str, flags: list[str], src: str, tmpdir: str, idx: int):
    obj = os.path.join(tmpdir, f"x{idx}.o")
    cmd = [nvcc, "-c", *flags, src, "-o", obj]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return src, proc.returncode, proc.stdout, time.monotonic() - t0, cmd


def main() -> int:
    require = os.environ.get("FASTREG_REQUIRE_NVCC", "0") == "1"
    nvcc = find_nvcc()
    if nvcc is None:
        msg = "cuda-check: SKIPPED: nvcc not found"
        if require:
            print(msg + " (FASTREG_REQUIRE_NVCC=1: failing)", flush=True)
            return 1
        print(msg, flush=True)
        return 0

    import torch.utils.cpp_extension as cpp_ext

    # CUDAExtension's include paths need CUDA_HOME: without one, the toolkit of the nvcc found here
    if cpp_ext.CUDA_HOME is None:
        cpp_ext.CUDA_HOME = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))

    setup_mod = load_setup_module()
    archs = os.environ.get("FASTREG_CUDA_CHECK_ARCHS", "80;90")
    flags = list(setup_mod.nvcc_compile_flags(archs))
    flags += ["-I" + os.path.join(ROOT, "csrc")]
    flags += ["-I" + p for p in cpp_ext.include_paths("cuda")]

    sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
    )
    version = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
    print(f"cuda-check: {nvcc} ({version[-1] if version else '?'}), archs {archs}, {len(sources)} file(s)", flush=True)
    if not sources:
        print("cuda-check: no CUDA sources under csrc/", flush=True)
        return 0

    try:
        jobs = int(os.environ.get("FASTREG_CUDA_CHECK_JOBS", MAX_JOBS))
    except ValueError:
        jobs = MAX_JOBS
    jobs = max(1, min(MAX_JOBS, jobs, len(sources)))

    failed = []
    with tempfile.TemporaryDirectory(prefix="fastreg-cuda-check-") as tmpdir:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(compile_one, nvcc, flags, src, tmpdir, i) for i, src in enumerate(sources)]
            for fut in futures:
                src, rc, out, secs, cmd = fut.result()
                out = out.strip()
                warned = "warning" in out.lower()
                status = "OK" if rc == 0 else "FAILED"
                if rc == 0 and warned:
                    status = "OK (with warnings)"
                print(f"  [{status}] {src} ({secs:.1f}s)", flush=True)
                if out:
                    print("\n".join("      " + line for line in out.splitlines()), flush=True)
                if rc != 0:
                    failed.append(src)
                    print("      command: " + " ".join(cmd), flush=True)
    if failed:
        print(f"cuda-check: {len(failed)} of {len(sources)} file(s) FAILED: {', '.join(failed)}", flush=True)
        return 1
    print(f"cuda-check: all {len(sources)} file(s) compiled", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
