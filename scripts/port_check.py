#!/usr/bin/env python3
"""Compile every C++ source of fastreg (csrc/**/*.cpp) for the platforms its users run on.

Run by `make port-check` (after scripts/port_tools.sh has installed the compilers where it can).
Each file is compiled to a real object (`-c -o <tmp>/x.o`, not -fsyntax-only: target attributes,
target_clones and inlining across ISAs are only checked when code is generated) against the
installed torch's headers, with the flags of the real build (setup.CXX_FLAGS, imported from
setup.py so the two cannot drift), by
  gcc-aarch64    aarch64-linux-gnu-g++ (Debian's cross compiler), with OpenMP, as on Linux aarch64
  clang-x86_64   clang++ --target=x86_64-linux-gnu, without OpenMP  } as Apple clang builds on
  clang-aarch64  clang++ --target=aarch64-linux-gnu, without OpenMP } macOS (no libomp)
The native GCC x86-64 build is `make build` itself. fastreg.cpp includes Python.h; the host
Python's headers serve every target (only LP64 Linux targets are checked, whose sizes agree).

Prints one status line per (compiler, file), the compiler's diagnostics, and exits non-zero if any
compile fails. A compiler that is not installed is skipped with a message (exit 0) unless
FASTREG_REQUIRE_PORT_TOOLS=1. Environment: FASTREG_PORT_CHECK_JOBS (parallel jobs, capped at 2),
FASTREG_PORT_CHECK_TARGETS (comma-separated subset of the names above).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from cuda_check import load_setup_module  # noqa: E402  (setup.py imported side-effect free)

MAX_JOBS = 2

# name -> (compiler, target flags, with OpenMP)
TARGETS = {
    "gcc-aarch64": ("aarch64-linux-gnu-g++", [], True),
    "clang-x86_64": ("clang++", ["--target=x86_64-linux-gnu"], False),
    "clang-aarch64": ("clang++", ["--target=aarch64-linux-gnu"], False),
}


def compile_flags(setup_mod, openmp: bool, clang: bool) -> list[str]:
    import torch.utils.cpp_extension as cpp_ext

    flags = list(setup_mod.CXX_FLAGS) + (["-fopenmp"] if openmp else [])
    flags += ["-fPIC", "-DNDEBUG", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    flags += [f"-D{k}={v}" for k, v in setup_mod.cpu_defines()]
    flags += ["-I" + p for p in cpp_ext.include_paths()]
    flags += ["-I" + os.path.join(ROOT, "csrc"), "-I" + sysconfig.get_paths()["include"]]
    return flags


def compile_one(name: str, cmd: list[str], src: str):
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return name, src, proc.returncode, proc.stdout, time.monotonic() - t0, cmd


def main() -> int:
    require = os.environ.get("FASTREG_REQUIRE_PORT_TOOLS", "0") == "1"
    wanted = os.environ.get("FASTREG_PORT_CHECK_TARGETS")
    names = [n.strip() for n in wanted.split(",")] if wanted else list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        print(f"port-check: unknown target(s) {unknown}; choose from {list(TARGETS)}", flush=True)
        return 2

    setup_mod = load_setup_module()
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"),
                                                                 recursive=True))
    jobs_list, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="fastreg-port-check-") as tmpdir:
        for name in names:
            compiler, target_flags, openmp = TARGETS[name]
            path = shutil.which(compiler)
            if path is None:
                skipped.append(f"{name} ({compiler} not found)")
                continue
            flags = compile_flags(setup_mod, openmp, clang="clang" in compiler)
            for i, src in enumerate(sources):
                obj = os.path.join(tmpdir, f"{name}-{i}.o")
                jobs_list.append((name, [path, *target_flags, *flags, "-c", src, "-o", obj], src))
        for s in skipped:
            print(f"port-check: SKIPPED {s}" + (" (FASTREG_REQUIRE_PORT_TOOLS=1: failing)" if require else ""),
                  flush=True)
        if skipped and require:
            return 1
        if not jobs_list:
            print("port-check: nothing to compile", flush=True)
            return 0
        try:
            jobs = int(os.environ.get("FASTREG_PORT_CHECK_JOBS", MAX_JOBS))
        except ValueError:
            jobs = MAX_JOBS
        jobs = max(1, min(MAX_JOBS, jobs))
        print(f"port-check: {len(sources)} file(s) x {len(jobs_list) // max(len(sources), 1)} compiler(s), "
              f"{jobs} job(s)", flush=True)
        failed = []
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(compile_one, *job) for job in jobs_list]
            for fut in futures:
                name, src, rc, out, secs, cmd = fut.result()
                out = out.strip()
                status = "FAILED" if rc != 0 else ("OK (with warnings)" if "warning" in out.lower() else "OK")
                print(f"  [{status}] {name}: {src} ({secs:.1f}s)", flush=True)
                if out:
                    print("\n".join("      " + line for line in out.splitlines()), flush=True)
                if rc != 0:
                    failed.append(f"{name}: {src}")
                    print("      command: " + " ".join(cmd), flush=True)
    secs = time.monotonic() - t0
    if failed:
        print(f"port-check: {len(failed)} of {len(jobs_list)} compile(s) FAILED ({secs:.0f}s): {'; '.join(failed)}",
              flush=True)
        return 1
    print(f"port-check: all {len(jobs_list)} compile(s) OK ({secs:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
