"""The GPU check's script and the kernel table it relies on, exercised on a CPU machine.

`make gpu-check` (scripts/gpu_check.sh) runs only on a lent GPU machine; its --dry-run walks the
same steps here with the CUDA ones skipped, so the script cannot rot between GPU runs: every step
recorded, the CUDA test files collected and run (they skip themselves), junit written per step,
the benchmark command lines accepted, time boxes that cut a hanging step and let the next run, and
what comes back from the device tool (at most 8 plain files in $OUT). The operator table
(fastreg/_op_kernels.py) that `make cuda-build` and the GPU check use to demand a CUDA kernel for
every operator is checked against the schemas of csrc/fastreg.cpp.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from fastreg import _op_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def dry_run(tmp_path, **env) -> tuple[subprocess.CompletedProcess, dict, str]:
    """Runs `gpu_check.sh --dry-run` with $OUT in tmp_path; returns the process, the summary's
    `key: value` lines and $OUT."""
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), GPU_PYTHON=sys.executable, GPU_RESULTS_DIR=str(tmp_path / "results"),
                    GPU_CASES_ARGS="tests/test_reliability.py -k cuda", FASTREG_GIT_REV="feedc0ffee12")
    full_env.update(env)
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=600)
    summary = {}
    for line in (out / "summary.txt").read_text().splitlines():
        key, _, value = line.partition(": ")
        summary[key] = value
    return proc, summary, str(out)


def test_dry_run_walks_every_step(tmp_path):
    proc, summary, out = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert summary["result"] == "PASS" and summary["dry_run"] == "yes"
    assert summary["git_rev"] == "feedc0ffee12"
    assert summary["toolchain"].startswith("skipped (dry run")
    assert summary["build"] == "skipped (dry run: no CUDA build; the existing build imports)"
    # the CUDA test files, each alone, then the other files' CUDA cases: collected, run, skipped here
    for step in ("tests:lce_cuda", "tests:optim_cuda", "tests:cases"):
        m = re.fullmatch(r"ok \((\d+) passed, 0 failed, 0 errors, (\d+) skipped\)", summary[step])
        assert m and int(m.group(1)) == 0 and int(m.group(2)) > 0, (step, summary[step])
    for step in ("bench:bars", "bench:lce", "bench:optim"):
        assert summary[step] == "skipped (dry run: arguments parse)", (step, summary[step])
    log = open(os.path.join(out, "gpu_check.log")).read()
    assert "dry run: CUDA build skipped (would run:" in log and "setup.py build_ext --inplace" in log
    assert "dry run: GPU benchmark skipped (would run: python -m fastreg.bench --device cuda" in log
    # what the device tool brings back: at most 8 plain files, all written by the script
    names = sorted(os.listdir(out))
    assert names == ["gpu-results.tar.gz", "gpu_check.log", "junit-cases.xml", "junit-lce_cuda.xml",
                     "junit-optim_cuda.xml", "summary.txt"], names
    with tarfile.open(os.path.join(out, "gpu-results.tar.gz")) as tar:
        members = {os.path.basename(m) for m in tar.getnames()}
    assert {"env.txt", "summary.txt", "gpu_check.log", "junit-lce_cuda.xml"} <= members, members


def test_a_hanging_step_is_cut_and_the_next_still_runs(tmp_path):
    hang = tmp_path / "test_hang.py"
    hang.write_text("import time\n\ndef test_hangs():\n    time.sleep(600)\n")
    proc, summary, out = dry_run(tmp_path, GPU_TEST_FILES=str(hang), TEST_TIMEOUT="30",
                                 GPU_CASES_ARGS="tests/test_optim_cuda.py", SKIP_BENCH="1")
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert summary["tests:hang"].startswith("FAILED (timed out after 30s"), summary["tests:hang"]
    assert os.path.exists(os.path.join(out, "junit-hang.xml"))  # pytest, interrupted, still wrote it
    assert summary["tests:cases"].startswith("ok ("), summary["tests:cases"]
    assert summary["bench"] == "skipped" and summary["result"] == "FAIL"


def test_a_spent_budget_leaves_steps_not_run_and_fails(tmp_path):
    proc, summary, _ = dry_run(tmp_path, GPU_CHECK_BUDGET="1", SKIP_BENCH="1")
    assert proc.returncode == 1
    assert summary["tests:lce_cuda"] == summary["tests:cases"] == "NOT RUN (budget spent)", summary
    assert summary["result"] == "FAIL"


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", SCRIPT, "--no-such-flag"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --no-such-flag" in proc.stderr


# ------------------------------------------------------------------------------------ operator table
def schema_names() -> set[str]:
    """Operator names defined in csrc/fastreg.cpp (m.def("name(...")."""
    src = open(os.path.join(ROOT, "csrc", "fastreg.cpp")).read()
    return {"fastreg::" + m for m in re.findall(r'm\.def\(\s*"([A-Za-z_][A-Za-z0-9_]*)\(', src)}


def test_every_schema_is_enumerated_from_the_dispatcher():
    ops = _op_kernels.fastreg_ops()
    assert set(ops) == schema_names() and len(ops) >= 10, ops
    assert set(_op_kernels.CPU_ONLY) <= set(ops)  # no stale exemption


def test_every_op_has_a_cpu_kernel():
    coverage = _op_kernels.kernel_coverage("cpu")
    assert set(coverage.values()) <= {_op_kernels.KERNEL, _op_kernels.COMPOSITE}, coverage
    assert coverage["fastreg::_lce_rows"] == _op_kernels.KERNEL
    assert coverage["fastreg::_lce_loss"] == _op_kernels.COMPOSITE
    assert _op_kernels.missing_kernels("cpu") == []


def test_cuda_coverage_matches_the_build():
    """With the CUDA kernels compiled in, nothing is missing on CUDA; without them, the operators
    whose only kernels are in csrc/cuda/*.cu are reported missing (and the summary says so)."""
    missing = _op_kernels.missing_kernels("cuda")
    summary = _op_kernels.coverage_summary("cuda")
    assert "1 CPU only: _fit_epoch" in summary
    if torch._C._dispatch_has_kernel_for_dispatch_key("fastreg::_lce_rows", "CUDA"):
        assert missing == [] and "MISSING" not in summary
    else:
        assert {"fastreg::_lce_rows", "fastreg::_fused_sgd_", "fastreg::_fused_adam_"} <= set(missing)
        assert "MISSING: " in summary and "_lce_rows" in summary


def test_python_m_fastreg_require_cuda_agrees_with_the_build():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "fastreg", "--ops", "--require-cuda"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert "ops with a CUDA kernel" in proc.stdout and "fastreg::_lce_rows" in proc.stdout
    if _op_kernels.missing_kernels("cuda"):
        assert proc.returncode == 1 and "error:" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
