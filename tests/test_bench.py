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
from fastreg.bench import lce, optim, workloads
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
            assert r["fastreg_commit"] == C.git_commit() != "unknown"
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
            assert float(r["err_dx"]) > float(r["tol_dx"])
        elif r["provider"] == "floor":
            assert r["status"] == "floor" and float(r["median_ms"]) > 0
        else:
            assert r["status"] == "OK", r
            for q in ("loss", "dx", "dw"):
                assert float(r["err_" + q]) <= float(r["tol_" + q])
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


def _memory(provider, N, D, V):
    res = C.run_memory_child({"op": "lce", "provider": provider, "device": "cpu",
                              **lce.LCEConfig(N, D, V).spec()})
    assert "error" not in res, res
    assert res["hwm_reset"]
    return res["peak_extra_bytes"]


def test_cpu_peak_memory_counts_buffers_a_cache_kept():
    """A step's buffers of >= 2 MiB come from fastreg's CPU buffer cache, which keeps the warm-up's
    freed blocks; measured after the warm-up they must still count (the baseline is read with the
    cache emptied), so a step measures at least the gradients it returns (8.4 MB here; the old
    measurement read 0.5 MB), and eager at least its N x V logits. (Sizes of MBs: the kernel
    batches its RSS counters, so a reading can be short by a few hundred KiB.)"""
    N, D, V = 64, 256, 8192  # dW 8 MiB, logits 2 MiB: both through the cache
    grads = lce.gradient_bytes(lce.LCEConfig(N, D, V))
    assert grads == (V * D + N * D) * 4
    fused, eager = _memory("fastreg", N, D, V), _memory("eager", N, D, V)
    assert fused >= grads, (fused, grads)
    assert eager >= grads and eager >= N * V * 4, (eager, grads)


def test_memory_only_run(tmp_path):
    # MBs of gradients: a reading of a few hundred KiB is within the kernel's RSS batching
    assert bench_main(["--ops", "lce", "--memory-only", "--sizes", "64x256x8192", "--providers", "fastreg,eager,floor",
                       "--out", str(tmp_path), "--no-plots", "--no-progress"]) == 0
    rows = {r["provider"]: r for r in read_csv(tmp_path / "lce.csv")}
    for name in ("fastreg", "eager"):
        assert rows[name]["status"] == "OK" and rows[name]["median_ms"] == ""
        assert int(rows[name]["peak_extra_bytes"]) >= (8192 * 256 + 64 * 256) * 4
    assert rows["floor"]["median_ms"] == ""


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


def test_git_commit_sources(tmp_path, monkeypatch):
    """git in a checkout; FASTREG_GIT_REV wins everywhere; a copy without .git (a GPU machine's)
    reads .fastreg-git-rev (`make gpu-rev`), else says "unknown"."""
    monkeypatch.delenv("FASTREG_GIT_REV", raising=False)
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert C.git_commit().split("-")[0] == head.stdout.strip()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above the copy
    monkeypatch.setattr(C, "REPO_ROOT", str(tmp_path))
    assert C.git_commit() == "unknown"
    (tmp_path / C.GIT_REV_FILE).write_text("0123456789ab-dirty\n")
    assert C.git_commit() == "0123456789ab-dirty"
    monkeypatch.setenv("FASTREG_GIT_REV", "feedc0ffee12")
    assert C.git_commit() == "feedc0ffee12"


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
    for argv in (["--providers", "nope"], ["--sizes", "12x"], ["--sweep", "Q"], ["--optimizers", "rmsprop"],
                 ["--workloads", "sft,nope"], ["--memory-only", "--bars"], ["--memory-only", "--no-memory"],
                 ["--memory-only", "--ops", "optim"]):
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


# ------------------------------------------------------------------------ correctness gates
# The fixed per-dtype tolerances the gates replaced: a provider this far off passed them.
OLD_LCE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
OLD_OPTIM_TOLERANCE_FP32 = 1e-3


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward adds ``rel`` x |grad| of fixed random noise (a real, small error)."""

    @staticmethod
    def forward(ctx, x, rel):
        ctx.rel = rel
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        noise = torch.randn(g.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        noise *= ctx.rel * g.double().norm() / noise.norm()
        return (g.double() + noise).to(g.dtype), None


def _perturbed_eager(quantity: str, rel: float):
    eager = lce._eager_fn("mean")

    def loss(x, W, t, b):
        if quantity == "dx":
            x = _ScaleGrad.apply(x, rel)
        if quantity == "dw":
            W = _ScaleGrad.apply(W, rel)
        out = eager(x, W, t, b)
        if quantity == "loss":
            out = out + (out.detach().double() * rel).to(out.dtype)
        return out
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d)[6:])
def test_lce_gate_catches_ten_times_the_expected_error(dtype):
    """Each gate is twice the dtype's expected error (eager's own, at least the rounding floor): an
    error of 10x that expected error, in the loss or either gradient, is WRONG -- and would have
    passed the fixed tolerances of before -- while fastreg passes and the canary fails."""
    cfg = lce.LCEConfig(64, 32, 2048, dtype)
    inp = lce.make_inputs(cfg, "cpu")
    ref = lce.reference(inp, cfg, "cpu")
    gate = lce.gates(inp, ref, cfg)
    assert lce.check(lce.PROVIDERS["fastreg"].build(cfg, "cpu"), inp, ref, cfg, gate)["status"] == "OK"
    assert lce.check(lce.PROVIDERS["eager"].build(cfg, "cpu"), inp, ref, cfg, gate)["status"] == "OK"
    assert lce.check(lce.PROVIDERS["wrong"].build(cfg, "cpu"), inp, ref, cfg, gate)["status"] == "WRONG"
    for q in ("loss", "dx", "dw"):
        expected = gate["err_" + q] / C.GATE_FACTOR
        res = lce.check(_perturbed_eager(q, 10 * expected), inp, ref, cfg, gate)
        assert res["status"] == "WRONG" and f"{q} err" in res["note"], (q, res)
        assert res["err_" + q] <= OLD_LCE_TOLERANCE[dtype], (q, res)  # the old gate let it through


def test_lce_gate_is_twice_eagers_error_or_the_rounding_floor():
    cfg = lce.LCEConfig(64, 32, 2048, torch.bfloat16)
    inp = lce.make_inputs(cfg, "cpu")
    ref = lce.reference(inp, cfg, "cpu")
    gate = lce.gates(inp, ref, cfg)
    eager = lce.check(lce.PROVIDERS["eager"].build(cfg, "cpu"), inp, ref, cfg, gate)
    floor = C.rounding_floor(torch.bfloat16, 2048)
    for q in ("loss", "dx", "dw"):
        assert gate["err_" + q] == pytest.approx(2 * max(eager["err_" + q], floor))
        assert eager["tol_" + q] == gate["err_" + q]
    u = 2.0 ** -24  # rounding to the dtype (u/2) + sums of 4 terms in it (u sqrt 4); half types sum in float32
    assert C.rounding_floor(torch.float32, 4) == u / 2 + 2 * u
    assert C.rounding_floor(torch.bfloat16, 4) == 2.0 ** -9 + 2 * u
    with pytest.raises(ValueError, match="no gate"):
        C.error_gate(math.inf, 1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_optimizer_gate_catches_ten_times_the_expected_error(dtype):
    cfg = optim.OptimConfig("adam", 4, 5000, dtype)
    ref = optim.reference_updates(cfg, "cpu")
    g = optim.update_gate(cfg, "cpu", ref)
    assert g["tol"] == pytest.approx(2 * max(g["torch_err"], g["floor"]))
    if dtype == torch.float32:  # torch's own fp32 error is the rounding of the parameters
        assert 0.3 < g["torch_err"] / g["floor"] < 3

    def run(build):
        params = optim.make_params(cfg, "cpu")
        return optim.check(build(params), params, ref, g["tol"])
    spec = optim.OPTIMIZERS["adam"]
    assert run(lambda p: optim._build_fastreg("adam", p))["status"] == "OK"
    assert run(lambda p: optim._build_wrong("adam", p))["status"] == "WRONG"
    # an lr off by 5 x the gate makes an update error of 10 x the expected one (Adam's update is ~ lr)
    off = run(lambda p: spec.torch_cls(p, **{**spec.hyper, "lr": spec.hyper["lr"] * (1 + 5 * g["tol"])},
                                       foreach=False))
    assert off["status"] == "WRONG" and off["err_update"] > g["tol"]
    assert off["err_update"] <= OLD_OPTIM_TOLERANCE_FP32  # the old gate let it through


def _lce_rows(fastreg_ms=1.0, eager_ms=2.0, native_ms=1.5, floor_ms=0.9, mem=(300e6, 1000e6), native_status="OK"):
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
    bars._lce_bars(crit, _lce_rows(mem=(200e6, 1000e6), native_status="n/a"), "cpu")
    assert {r["metric"]: r["result"] for r in crit.rows}["speedup vs torch native"] == "n/a"
    assert crit.ok
    # a peak below the gradients the step returns (148 MB here) is a broken measurement, not a pass
    crit = bars.Criteria()
    bars._lce_bars(crit, _lce_rows(mem=(1e6, 1000e6)), "cpu")
    mem = next(r for r in crit.rows if r["metric"] == "peak extra memory / eager's")
    assert mem["result"] == "FAIL" and "measurement is broken" in mem["note"]
    assert lce.gradient_bytes(bars.CPU_LCE) == (4096 * 1024 + 32000 * 1024) * 4


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


# ------------------------------------------------------------- issue 11: the loss workloads
def test_sft_mask_ignores_the_first_half_of_every_sequence():
    t = torch.arange(4 * 32)
    workloads.sft_mask_(t, 4, 32)
    seqs = t.view(4, 32)
    assert (seqs[:, :16] == lce.IGNORE_INDEX).all() and (seqs[:, 16:] != lce.IGNORE_INDEX).all()
    assert float((t == lce.IGNORE_INDEX).float().mean()) == 0.5


def test_zipf_targets_follow_the_power_law():
    g = torch.Generator().manual_seed(0)
    t = workloads.zipf_targets(200_000, 1000, 1.1, g)
    assert t.min() >= 0 and t.max() < 1000
    counts = torch.bincount(t, minlength=1000).double()
    assert counts[0] / counts[1] == pytest.approx(2 ** 1.1, rel=0.05)
    assert counts[0] / counts[9] == pytest.approx(10 ** 1.1, rel=0.1)


def test_peaked_input_has_the_target_entropy():
    cfg = lce.LCEConfig(256, 32, 2048, torch.bfloat16)
    pk = workloads.peaked_inputs(cfg, "cpu")
    assert pk.entropy == pytest.approx(workloads.PEAKED_ENTROPY, abs=0.1)
    x, W = pk.inputs.x.detach(), pk.inputs.W.detach()
    assert x.dtype == W.dtype == torch.bfloat16 and x.requires_grad is False and pk.inputs.x.requires_grad
    assert workloads.mean_entropy(x.double() @ W.double().T) == pytest.approx(pk.entropy, rel=1e-9)
    logits = x.double() @ W.double().T  # aligned: the target is near the top, most often first
    t = pk.inputs.t
    rank = (logits > logits.gather(1, t[:, None])).sum(1)
    assert (rank < 10).double().mean() > 0.7 and (rank == 0).double().mean() > 0.2  # chance: 0.005, 0.0005
    assert 0.3 < pk.p_target < 0.95
    # the unigram prior: the mass off the target sits on the frequent (small-id) classes
    p = torch.softmax(logits, 1).scatter(1, t[:, None], 0.0)
    assert p[:, :256].sum(1).mean() > 3 * p[:, 1024:].sum(1).mean()
    assert 0.0 <= pk.skippable <= 1.0
    # a different target entropy calibrates a different alpha
    hot = workloads.peaked_inputs(cfg, "cpu", entropy=4.0)
    assert hot.entropy == pytest.approx(4.0, abs=0.15) and hot.alpha < pk.alpha


def test_time_interleaved_round_robin():
    order = []
    steps = {"a": lambda: order.append("a"), "b": lambda: (order.append("b"), time.sleep(0.01))}
    t = C.time_interleaved(steps, "cpu", warmup=1, repeats=4)
    assert order == ["a", "b"] + ["a", "b"] * 4
    assert len(t["a"].samples) == len(t["b"].samples) == 4 and t["b"].median > t["a"].median


def test_workloads_run_at_tiny_size():
    """The whole harness on tiny shapes: every case checked, timed, grouped, bar lines computed."""
    crit = bars.Criteria()
    rows, notes = workloads.run_workloads(list(workloads.DEFAULT), "cpu", workloads.Shapes.quick(), warmup=0,
                                          repeats=1, max_time=None, crit=crit,
                                          lce_providers=["fastreg", "eager", "floor"], show_progress=False)
    by = {(r["workload"], r["group"], r["provider"]): r for r in rows}
    masked = by[("sft", "masked 50%", "fastreg")]
    assert masked["ignored_fraction"] == 0.5 and masked["N"] == 4 * 32
    assert by[("sft", "masked 50%", "floor-active")]["N"] == 64
    assert by[("sft", "unmasked", "fastreg")]["ignored_fraction"] == 0.0
    for key in [("sft", "masked 50%", "eager"), ("dtype", "bfloat16", "fastreg"), ("dtype", "bfloat16", "eager"),
                ("dtype", "float32", "fastreg"), ("peaked", "peaked", "fastreg"), ("peaked", "peaked", "eager")]:
        r = by[key]
        assert r["status"] == "OK" and r["median_ms"] > 0 and r["err_dw"] <= r["tol_dw"], r
        assert r["x_floor"] > 0 and r["speedup_vs_eager"] > 0
    assert by[("dtype", "bfloat16", "fastreg")]["dtype"] == "bfloat16"
    peaked = by[("peaked", "peaked", "fastreg")]
    assert peaked["entropy"] == pytest.approx(2.0, abs=0.1)
    assert any("mean softmax entropy" in n for n in notes)
    metrics = {(r["bar"].split()[0], r["metric"]) for r in crit.rows}
    assert ("SFT", "fastreg masked / fastreg unmasked time") in metrics
    assert ("loss", "dW error vs fp64 / eager's") in metrics and ("loss", "time / 3-matmul floor") in metrics
    assert ("peaked", "speedup of filtering (off / auto)") in metrics
    masked_ratio = next(r for r in crit.rows if r["metric"] == "fastreg masked / fastreg unmasked time")["value"]
    assert masked_ratio == pytest.approx(masked["median_ms"] / by[("sft", "unmasked", "fastreg")]["median_ms"])


def _row(group, provider, ms, **kw):
    return {"group": group, "provider": provider, "status": kw.pop("status", "OK"), "median_ms": ms,
            "N": 8, "D": 4, "V": 16, **kw}


def test_workload_bar_lines():
    crit = bars.Criteria()
    workloads.sft_bars(crit, [_row("masked 50%", "fastreg", 1.0), _row("masked 50%", "eager", 1.9),
                              _row("unmasked", "fastreg", 1.7)])
    assert [(r["metric"], r["result"]) for r in crit.rows] == [
        ("fastreg agrees with float64 reference", "PASS"),
        ("fastreg masked / fastreg unmasked time", "PASS"),  # 1/1.7 = 0.59 <= 0.6
        ("speedup vs eager (masked)", "PASS")]  # 1.9 >= 1.8
    crit = bars.Criteria()
    workloads.dtype_bars(crit, [
        _row("bfloat16", "fastreg", 1.0, err_loss=1e-3, err_dx=2e-3, err_dw=5e-3),
        _row("bfloat16", "eager", 1.1, err_loss=1e-3, err_dx=2e-3, err_dw=2e-3),
        _row("bfloat16", "floor", 0.95, status="floor"),
        _row("float32", "fastreg", 1.0), _row("float32", "eager", 1.2), _row("float32", "floor", 0.9, status="floor")])
    got = {(r["bar"].split()[1], r["metric"]): (r["result"], r["value"]) for r in crit.rows}
    assert got[("bfloat16", "time / 3 bfloat16 GEMMs floor")] == ("PASS", pytest.approx(1 / 0.95))
    assert got[("bfloat16", "speedup vs eager")] == ("FAIL", pytest.approx(1.1))  # needs >= 1.15
    assert got[("bfloat16", "dX error vs fp64 / eager's")][0] == "PASS"
    assert got[("bfloat16", "dW error vs fp64 / eager's")] == ("FAIL", pytest.approx(2.5))
    assert got[("float32", "time / 3-matmul floor")] == ("FAIL", pytest.approx(1 / 0.9))  # 1.11 > 1.08
    crit = bars.Criteria()
    auto = workloads.filter_provider("auto").name
    workloads.peaked_bars(crit, [_row("peaked", "fastreg", 1.4, loss=2.5, err_dx=1e-2, err_dw=1e-2),
                                 _row("peaked", auto, 1.0, loss=2.5, err_dx=1.5e-2, err_dw=2.1e-2),
                                 _row("peaked", "eager", 1.5, loss=2.5, err_dx=1e-2, err_dw=1e-2)])
    assert [r["result"] for r in crit.rows] == ["PASS", "PASS", "PASS", "PASS", "FAIL"]  # dW 2.1x eager's
    crit = bars.Criteria()
    workloads.peaked_bars(crit, [_row("peaked", "fastreg", 1.4, loss=2.5),
                                 _row("peaked", auto, 1.0, loss=2.5000001),
                                 _row("peaked", "eager", 1.5)])
    assert crit.rows[2]["metric"].startswith("loss identical") and crit.rows[2]["result"] == "FAIL"
    crit = bars.Criteria()  # a fastreg without the option: every filtering bar FAILs, saying why
    workloads.peaked_bars(crit, [_row("peaked", "fastreg", 1.4, loss=2.5),
                                 _row("peaked", auto, None, status="n/a", note="no grad_filter_eps= option"),
                                 _row("peaked", "eager", 1.5)])
    assert all(r["result"] == "FAIL" and "grad_filter_eps" in r["note"] for r in crit.rows)


def test_bars_md_carries_the_workloads(tmp_path, monkeypatch):
    """--bars with the workloads, shrunk: their table, input notes and bar lines land in bars-cpu.md."""
    import argparse
    monkeypatch.setattr(bars, "CPU_LCE", lce.LCEConfig(64, 32, 512))
    monkeypatch.setattr(bars, "CPU_OPTIM", [optim.OptimConfig("adam", 100, 1000)])
    monkeypatch.setattr(workloads, "Shapes", workloads.Shapes.quick)
    monkeypatch.setattr(C, "copy_bandwidth_gbs", lambda *a, **k: 10.0)
    real_bench_size = lce.bench_size
    monkeypatch.setattr(lce, "bench_size", lambda *a, **k: real_bench_size(*a, **{**k, "memory": False}))
    args = argparse.Namespace(device="cpu", warmup=0, repeats=1, max_time=None, workloads=["sft"])
    prov = C.provenance("cpu")
    bars.run(args, prov, str(tmp_path), show_progress=False)
    md = (tmp_path / "bars-cpu.md").read_text()
    assert "## Loss workloads (issue 11" in md and "| masked 50%" in md and "| unmasked" in md
    assert "fastreg masked / fastreg unmasked time" in md and "speedup vs eager (masked)" in md
    rows = read_csv(tmp_path / "workloads.csv")
    assert {r["workload"] for r in rows} == {"sft"} and all(r["fastreg_commit"] for r in rows)
    assert {r["provider"] for r in rows if r["workload"] == "sft"} >= {"fastreg", "eager", "native", "floor"}


def test_fp16_workload_is_default_only_where_its_gemms_are_fast(monkeypatch):
    monkeypatch.setattr(workloads, "slow_fp16_gemm", lambda: True)
    assert workloads.default_workloads("cpu") == list(workloads.DEFAULT)
    assert "fp16" in workloads.default_workloads("cuda")
    monkeypatch.setattr(workloads, "slow_fp16_gemm", lambda: False)
    assert workloads.default_workloads("cpu") == list(workloads.DEFAULT) + ["fp16"]
