"""The benchmark suite: one quick end-to-end run (CSV, plots, table, correctness gate) plus unit
tests of its pieces (timing, CSV, the pass/fail logic of --bars)."""
import csv
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from fastreg.bench import bars
from fastreg.bench import common as C
from fastreg.bench import lce, optim
from fastreg.bench.__main__ import main as bench_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDERS = "fastreg,eager,floor,wrong,forloop,fused"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "fastreg.bench", "--quick", "--out", str(out), "--no-progress",
           "--providers", PROVIDERS, "--optimizers", "adam"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(out), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_csv_with_provenance(quick_run):
    out, _ = quick_run
    for name in ("lce.csv", "optim.csv"):
        rows = read_csv(out / name)
        assert rows, name
        for r in rows:
            assert r["torch"] == torch.__version__
            assert r["device"] == "cpu" and r["device_name"] and r["date"].endswith("Z")
            assert r["fastreg_commit"] and r["fastreg_commit"] != "unknown"
    lce_rows = read_csv(out / "lce.csv")
    sizes = {(int(r["N"]), int(r["D"]), int(r["V"])) for r in lce_rows}
    assert sizes == {(64, 32, 512), (64, 32, 2048), (16, 32, 2048)}  # quick sweeps, shared size once
    assert {r["provider"] for r in lce_rows} == {"fastreg", "eager", "floor", "wrong"}
    opt_rows = read_csv(out / "optim.csv")
    assert {r["optimizer"] for r in opt_rows} == {"adam"}
    assert {r["provider"] for r in opt_rows} == {"fastreg", "forloop", "fused", "wrong"}


def test_quick_run_checks_correctness_before_timing(quick_run):
    out, stdout = quick_run
    for r in read_csv(out / "lce.csv"):
        if r["provider"] == "wrong":  # the canary disagrees with the reference and is never timed
            assert r["status"] == "WRONG" and r["median_ms"] == "" and r["peak_extra_bytes"] == ""
            assert float(r["err_dx"]) > float(r["tol"])
        elif r["provider"] == "floor":
            assert r["status"] == "floor" and float(r["median_ms"]) > 0
        else:
            assert r["status"] == "OK", r
            assert max(float(r[k]) for k in ("err_loss", "err_dx", "err_dw")) <= float(r["tol"])
            assert float(r["median_ms"]) > 0 and float(r["tflops"]) > 0
            assert float(r["x_floor"]) > 0 and float(r["speedup_vs_eager"]) > 0
            assert r["memory_method"].startswith("rss-hwm-subprocess")
    for r in read_csv(out / "optim.csv"):
        if r["provider"] == "wrong":
            assert r["status"] == "WRONG" and r["median_ms"] == ""
            assert float(r["err_update"]) > float(r["tol"])
        else:
            assert r["status"] == "OK", r
            assert float(r["err_update"]) <= float(r["tol"])
            assert float(r["gbs"]) > 0 and float(r["speedup_vs_best_torch"]) > 0
    assert "WRONG" in stdout


def test_quick_run_memory_is_measured(quick_run):
    out, _ = quick_run
    eager = {int(r["V"]): r for r in read_csv(out / "lce.csv") if r["provider"] == "eager" and r["N"] == "64"}
    # eager keeps the logits and their log-softmax alive at once: at least 2 x N x V x 4 bytes
    assert int(eager[2048]["peak_extra_bytes"]) >= 2 * 64 * 2048 * 4
    assert int(eager[2048]["peak_extra_bytes"]) > int(eager[512]["peak_extra_bytes"])


def test_quick_run_table_and_plots(quick_run):
    out, stdout = quick_run
    assert "linear cross-entropy, forward+backward" in stdout and "median ms" in stdout
    assert "optimizer.step()" in stdout and "GB/s" in stdout
    assert "memory: CPU peak extra memory" in stdout
    for png in ("lce-V-cpu-float32.png", "lce-N-cpu-float32.png", "optim-adam-params-cpu-float32.png",
                "optim-adam-tensors-cpu-float32.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png


# ---------------------------------------------------------------------------------- unit tests
def test_time_fn_stops_at_max_time():
    t = C.time_fn(lambda: time.sleep(0.02), "cpu", warmup=0, repeats=100, max_time=0.05)
    assert 3 <= len(t.samples) <= 5
    assert t.median >= 15 and t.min <= t.median <= t.max
    slow = C.time_fn(lambda: time.sleep(0.06), "cpu", warmup=0, repeats=100, max_time=0.05)
    assert len(slow.samples) == 1  # one sample already longer than max_time is enough


def test_rel_err():
    ref = torch.tensor([3.0, 4.0])
    assert C.rel_err(ref, ref) == 0
    assert C.rel_err(torch.tensor([3.0, 5.0]), ref) == pytest.approx(0.2)
    assert C.rel_err(torch.tensor([float("nan"), 4.0]), ref) == math.inf


def test_append_csv_moves_a_different_header_aside(tmp_path):
    path = str(tmp_path / "x.csv")
    C.append_csv(path, [{"a": 1, "b": 2.5}], ["a", "b"])
    C.append_csv(path, [{"a": 3, "b": None}], ["a", "b"])
    assert read_csv(path) == [{"a": "1", "b": "2.5"}, {"a": "3", "b": ""}]
    C.append_csv(path, [{"a": 4, "c": 5}], ["a", "c"])
    assert read_csv(path) == [{"a": "4", "c": "5"}]
    assert len(list(tmp_path.glob("x.old-*.csv"))) == 1


def test_cli_rejects_bad_arguments():
    for argv in (["--providers", "nope"], ["--sizes", "12x"], ["--sweep", "Q"], ["--optimizers", "rmsprop"]):
        with pytest.raises(SystemExit) as e:
            bench_main(argv)
        assert e.value.code == 2


def test_reference_matches_eager_in_float64():
    cfg = lce.LCEConfig(16, 8, 40, torch.float64, "sum", bias=True)
    inp = lce.make_inputs(cfg, "cpu")
    inp.t[3] = lce.IGNORE_INDEX
    ref = lce.reference(inp, cfg, "cpu")
    res = lce.check(lce.PROVIDERS["eager"].build(cfg, "cpu"), inp, ref, cfg)
    assert res["status"] == "OK" and res["err_db"] < 1e-12
    assert lce.check(lce.PROVIDERS["wrong"].build(cfg, "cpu"), inp, ref, cfg)["status"] == "WRONG"


def _lce_rows(fastreg_ms=1.0, eager_ms=2.0, native_ms=1.5, floor_ms=0.9, mem=(30, 100), native_status="OK"):
    return [
        {"provider": "fastreg", "status": "OK", "median_ms": fastreg_ms, "peak_extra_bytes": mem[0]},
        {"provider": "eager", "status": "OK", "median_ms": eager_ms, "peak_extra_bytes": mem[1]},
        {"provider": "native", "status": native_status, "median_ms": native_ms if native_status == "OK" else None,
         "note": "no native" if native_status != "OK" else ""},
        {"provider": "floor", "status": "floor", "median_ms": floor_ms},
    ]


def test_bars_criteria_cpu_loss():
    crit = bars.Criteria()
    bars._lce_bars(crit, _lce_rows(), "cpu")
    got = {r["metric"]: r["result"] for r in crit.rows}
    assert got == {"fastreg agrees with float64 reference": "PASS", "time / 3-matmul floor": "PASS",
                   "speedup vs eager": "PASS", "speedup vs torch native": "PASS",
                   "peak extra memory / eager's": "FAIL"}  # 0.30 > 0.25
    assert not crit.ok
    crit = bars.Criteria()
    bars._lce_bars(crit, _lce_rows(mem=(20, 100), native_status="n/a"), "cpu")
    assert {r["metric"]: r["result"] for r in crit.rows}["speedup vs torch native"] == "n/a"
    assert crit.ok


def test_bars_fail_when_fastreg_is_wrong():
    rows = _lce_rows()
    rows[0] = {"provider": "fastreg", "status": "WRONG", "note": "dx err 1 > 1e-4"}
    crit = bars.Criteria()
    bars._lce_bars(crit, rows, "cpu")
    assert all(r["result"] == "FAIL" for r in crit.rows)


def test_bars_criteria_optimizers():
    rows = [{"provider": "fastreg", "status": "OK", "median_ms": 1.0},
            {"provider": "forloop", "status": "OK", "median_ms": 3.5},
            {"provider": "fused", "status": "OK", "median_ms": 0.97}]
    optim.add_ratios(rows)
    crit = bars.Criteria()
    bars._optim_bars(crit, rows, optim.OptimConfig("adam", 100, 400_000), "cpu")
    assert [r["result"] for r in crit.rows] == ["PASS", "PASS", "PASS"]  # 0.97 >= 0.95, 3.5 >= 3
    crit = bars.Criteria()
    bars._optim_bars(crit, rows, optim.OptimConfig("adam", 5000, 1000), "cpu")
    assert [r["result"] for r in crit.rows] == ["PASS", "FAIL"]  # needs 4x over fused
