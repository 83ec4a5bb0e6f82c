"""Shared machinery of the benchmarks: timing, memory, correctness metrics, provenance, CSV, tables.

Nothing in here knows about a particular operator; ``lce.py`` and ``optim.py`` build on it.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .._C_loader import build_summary

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join("benchmarks", "results")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}

# Correctness gates. Errors are relative, against a float64 reference computed from the same
# (already rounded) inputs: |a - ref| / |ref| for a loss, ||a - ref||_2 / ||ref||_2 for a tensor.
# A provider may have GATE_FACTOR times the error that torch's own computation in the same dtype
# makes on the same inputs, measured in the same run (the project's rule), but never less than the
# rounding floor of the dtype, so that torch happening to land close (a scalar, or float64 where
# torch computes what the reference computes) does not fail a correct provider. See
# docs/benchmarks-method.md.
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}
GATE_FACTOR = 2.0

# Status values of a result row.
OK, WRONG, ERROR, UNAVAILABLE, REFERENCE = "OK", "WRONG", "ERROR", "n/a", "floor"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(set(DTYPES))}") from None


# ----------------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


# Where the commit comes from when the tree is not a git checkout (a copy sent to a GPU machine):
# FASTREG_GIT_REV, or this file at the repository root (`make gpu-rev` writes it; git-ignored).
GIT_REV_FILE = ".fastreg-git-rev"


def git_commit() -> str:
    """Short commit of the fastreg checkout, with '-dirty' when the tree has local changes.

    FASTREG_GIT_REV, when set, wins (the caller knows best); then git; then the first line of
    GIT_REV_FILE at the repository root; else "unknown"."""
    env = os.environ.get("FASTREG_GIT_REV", "").strip()
    if env:
        return env

    def git(*args):
        return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open(os.path.join(REPO_ROOT, GIT_REV_FILE)) as f:
            return f.readline().strip() or "unknown"
    except OSError:
        return "unknown"


def cpu_platform() -> str:
    """The machine's architecture and the CPU code path fastreg's kernels picked at load, e.g.
    "x86_64 / x86_64-avx512f" or "aarch64 / aarch64-neon" (csrc/optim/optim_cpu.cpp)."""
    from fastreg import _C

    return f"{platform.machine()} / {_C.cpu_code_path()}"


def provenance(device: str) -> dict:
    return {
        "platform": cpu_platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "fastreg_commit": git_commit(),
        "fastreg_build": build_summary(),  # version, built-against torch, CPU path, threads, CUDA archs
        "python": platform.python_version(),
        # 1-minute load average when the run started: timings are only meaningful near 0
        "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
    }


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Per-iteration wall times in milliseconds, measured after warm-up."""
    samples: list

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """Relative spread: (p75 - p25) / median (0 with fewer than 4 samples: then max-min is used)."""
        s = sorted(self.samples)
        if len(s) >= 4:
            q = statistics.quantiles(s, n=4)
            return (q[2] - q[0]) / self.median
        return (s[-1] - s[0]) / self.median if self.median else 0.0


def time_fn(fn: Callable[[], object], device: str, warmup: int, repeats: int,
            max_time: Optional[float] = None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times, each timed on its own.

    With ``max_time`` (seconds), stop early once the timed samples add up to more than that and
    there are at least 3 of them, or right after a first sample that alone took longer (slow
    providers on a small CPU would otherwise dominate a sweep).

    On CUDA every iteration is bracketed by synchronisations (so queued work of the previous
    iteration is not charged to the next one) and timed with CUDA events; on the CPU with
    ``time.perf_counter``.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(max(1, repeats)):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if max_time is not None and sum(samples) > max_time * 1e3 and (len(samples) >= 3 or
                                                                      samples[0] > max_time * 1e3):
            break
    return Timing(samples)


def copy_bandwidth_gbs(device: str, nbytes: int, repeats: int = 5) -> float:
    """Device memory bandwidth of a large ``dst.copy_(src)``: bytes read + written per second (GB/s)."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    src = dst = None  # noqa: F841  (release the buffers before emptying the CUDA cache)
    free_memory(device)
    return 2 * n * 4 / (t.median * 1e-3) / 1e9


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# correctness metrics
# ----------------------------------------------------------------------------------------------
def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float32 for the half types (torch's and fastreg's GEMMs
    and reductions on them), else the dtype itself."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def rounding_floor(dtype: torch.dtype, n_terms: int) -> float:
    """The relative error a correct result in ``dtype`` may have whatever torch's own happens to
    be: u/2 for rounding the result to the dtype (u: unit roundoff; the largest relative error of
    round-to-nearest is u, its mean about u/2), plus u_acc * sqrt(n) for sums of up to ``n_terms``
    terms accumulated in ``accumulation_dtype``: the probabilistic error bound of a sum in any
    order (rounding errors independent and of mean zero add up like a random walk; Higham & Mary,
    SIAM J. Sci. Comput. 2019), which pairwise and blocked sums stay well under."""
    u_acc = UNIT_ROUNDOFF[accumulation_dtype(dtype)]
    return UNIT_ROUNDOFF[dtype] / 2 + u_acc * math.sqrt(max(1, n_terms))


def error_gate(torch_error: float, floor: float) -> float:
    """The error a provider may have: GATE_FACTOR x the larger of torch's own error in the same
    dtype on the same inputs and the rounding floor."""
    if not math.isfinite(torch_error):
        raise ValueError(f"torch's own error is {torch_error}: no gate can be derived from it")
    return GATE_FACTOR * max(torch_error, floor)


def print_bars(title: str, results) -> None:
    """Prints the pass/fail targets of a section: `title`, then one line per (text, passed, value)."""
    print(title)
    for text, passed, value in results:
        print(f"  {'PASS' if passed else 'FAIL'}  {text}: {value}")


def rel_err(value, ref) -> float:
    """Relative error of ``value`` against ``ref`` (both tensors or numbers), computed in float64."""
    a = torch.as_tensor(value).detach().to("cpu", torch.float64)
    b = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        return float("inf")
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


# ----------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------
CPU_MEMORY_METHOD = (
    "CPU peak extra memory = peak resident set size (VmHWM) minus the RSS with the inputs allocated, "
    "after one warm-up iteration whose results were freed and with every cache of freed buffers emptied "
    "(fastreg's CPU buffer cache, fastreg.empty_cpu_cache()), in a fresh subprocess per (provider, size); "
    "the peak is reset through /proc/self/clear_refs before the measured forward+backward, and glibc is "
    "told to mmap every block >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed buffers leave the RSS. It counts "
    "every byte the process touches (tensors, malloc'd scratch, per-thread buffers), page-granular."
)
CUDA_MEMORY_METHOD = (
    "CUDA peak extra memory = torch.cuda.max_memory_allocated() during one forward+backward minus "
    "memory_allocated() with the inputs allocated (after a warm-up iteration), from the caching allocator."
)
MEMORY_SCOPE = "It includes the gradients the step produces (dX, dW[, db])."


def memory_method(device: str) -> str:
    return (CUDA_MEMORY_METHOD if device == "cuda" else CPU_MEMORY_METHOD) + " " + MEMORY_SCOPE


def cuda_peak_extra_bytes(step: Callable[[], object], reset: Callable[[], None]) -> int:
    """Peak bytes allocated above the current level while running ``step`` once (call after warm-up)."""
    reset()
    free_memory("cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    reset()
    return int(peak)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def release_cached_buffers() -> int:
    """Collect garbage and give every cached free buffer back to the system, so that an RSS read
    next holds live data only. The caches: fastreg's CPU buffer cache (freed blocks of >= 2 MiB
    kept for the next step, csrc/mem/cpu_buffers.h) and, on CUDA, torch's caching allocator.
    Returns the bytes fastreg's cache still holds afterwards (0 unless the cache misbehaves)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        from ..memory import cpu_cache_info, empty_cpu_cache
    except ImportError:  # fastreg's extension not built: nothing of it is cached either
        return 0
    empty_cpu_cache()
    return int(cpu_cache_info()["cached_bytes"])


def rss_peak_extra_of(step: Callable[[], object]) -> dict:
    """Peak RSS above the current live memory while running ``step`` once (Linux; the process's
    glibc should mmap large blocks, see :func:`run_child`). Caches of freed buffers are emptied
    before the baseline: buffers they kept from an earlier step would sit in the baseline and be
    reused by the measured one, which would then look as if it needed (almost) nothing."""
    left_cached = release_cached_buffers()
    if left_cached:
        raise RuntimeError(f"fastreg's CPU buffer cache still holds {left_cached} bytes after emptying it")
    base = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    out = step()
    peak = _proc_status_kib("VmHWM")
    del out
    return {"peak_extra_bytes": max(0, peak - base) * 1024, "hwm_reset": hwm_reset,
            "baseline_rss_bytes": base * 1024}


def rss_peak_extra_bytes(step: Callable[[], object], reset: Callable[[], None]) -> dict:
    """In-process part of the CPU method (runs in the child): warm-up, free, empty the caches,
    baseline, reset the high-water mark, measure."""
    step()  # warm-up: lazy initialisation, compilation, thread pools
    reset()
    return rss_peak_extra_of(step)


def peak_extra_bytes(step: Callable[[], object], reset: Callable[[], None], device: str) -> int:
    """Peak extra bytes of one ``step`` by this device's method (CPU: call it in a fresh child)."""
    if device == "cuda":
        step()  # warm-up
        return cuda_peak_extra_bytes(step, reset)
    return rss_peak_extra_bytes(step, reset)["peak_extra_bytes"]


CHILD_MARK = "FASTREG_BENCH_CHILD "


def run_child(argv: Sequence[str], timeout: float = 900) -> dict:
    """Run ``python *argv`` in a fresh interpreter set up for the CPU memory method and return the
    dict it passed to :func:`report_to_parent` (or ``{"error": ...}``)."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    # the child must import the same fastreg as this process, wherever it was started from
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return {"error": f"measurement child failed (rc={proc.returncode}): {lines[-1] if lines else 'no output'}"}


def report_to_parent(result: dict) -> None:
    """The child's side of :func:`run_child`."""
    print(CHILD_MARK + json.dumps(result), flush=True)


def run_memory_child(spec: dict, timeout: float = 900) -> dict:
    """Measure the CPU peak memory of one (provider, size) in a fresh interpreter (see ``_memchild``)."""
    return run_child(["-m", "fastreg.bench._memchild", json.dumps(spec)], timeout)


# ----------------------------------------------------------------------------------------------
# output: CSV, tables, progress
# ----------------------------------------------------------------------------------------------
def append_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Append ``rows`` to ``path``; a file whose header differs is moved aside, never mixed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(columns):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            os.replace(path, path[:-4] + f".old-{stamp}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: fmt_csv(r.get(k)) for k in columns})


def fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def ratio(a, b):
    """a / b, or None when either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def fmt(v, spec: str = ".3g", missing: str = "-") -> str:
    if v is None or v == "":
        return missing
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def render_table(rows: Sequence[dict], columns: Sequence[tuple], markdown: bool = False) -> str:
    """``columns``: (header, key or callable(row) -> str)."""
    cells = [[h for h, _ in columns]]
    for r in rows:
        cells.append([str(k(r)) if callable(k) else fmt(r.get(k)) for _, k in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    else:
        lines = ["  ".join(c.rjust(w) for c, w in zip(cells[0], widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(lines)


class Progress:
    """A tqdm bar on stderr (when tqdm is installed and ``enabled``): ``tick()`` per finished task."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                pass

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def human_bytes(n) -> str:
    if n is None or n == "":
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe_exception(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:120]}"


def sizes_to_run(explicit, all_sweeps: dict, chosen) -> dict:
    """{size: [sweeps it belongs to]}: the explicit --sizes, or the chosen default sweeps, with a
    size shared by two sweeps measured once."""
    sweeps = {"custom": explicit} if explicit else {k: v for k, v in all_sweeps.items() if not chosen or k in chosen}
    sizes: dict = {}
    for sweep, shapes in sweeps.items():
        for shape in shapes:
            sizes.setdefault(tuple(shape), []).append(sweep)
    return sizes


def time_interleaved(steps: dict, device: str, warmup: int, repeats: int,
                     max_time: Optional[float] = None) -> dict:
    """Time several functions round robin: ``warmup`` untimed calls of each, then ``repeats`` rounds
    in which each runs once, timed on its own -> {key: Timing}. Their ratios then come from the same
    machine state (load drifts on a shared machine). With ``max_time``, stop after a round once
    every function has >= 3 samples and the rounds took more than ``max_time`` per function."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples = {k: [] for k in steps}
    for _ in range(max(1, repeats)):
        for k, fn in steps.items():
            samples[k] += time_fn(fn, device, 0, 1).samples
        spent = sum(sum(s) for s in samples.values())
        if max_time is not None and len(samples[next(iter(samples))]) >= 3 and spent > max_time * 1e3 * len(steps):
            break
    return {k: Timing(s) for k, s in samples.items()}
