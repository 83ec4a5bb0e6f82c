"""``python -m fastreg.bench --bars``: the fixed configurations and pass/fail targets of the
performance issues, measured with the same code as the sweeps, written to
``bars-<device>.md`` / ``bars-<device>.csv``.
"""
from __future__ import annotations

import operator

import torch

from . import common as C
from . import lce, optim, workloads

PASS, FAIL, NA = "PASS", "FAIL", "n/a"

# (bar, lce config, lce providers) and (bar, optimizer config, optim providers) per device
CPU_LCE = lce.LCEConfig(4096, 1024, 32000, torch.float32, "mean")
CUDA_LCE = lce.LCEConfig(8192, 4096, 128256, torch.bfloat16, "mean")
CPU_OPTIM = [optim.OptimConfig("adam", 100, 400_000), optim.OptimConfig("adam", 5000, 1000)]
CUDA_OPTIM = [optim.OptimConfig("adam", 100, 10_000_000), optim.OptimConfig("adam", 5000, 1000)]


class Criteria:
    """Collects (bar, metric, value, comparison, threshold) -> PASS / FAIL / n/a rows."""

    OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt}

    def __init__(self):
        self.rows = []

    def add(self, bar: str, metric: str, value, op: str, threshold: float, na_reason: str = "",
            note: str = "") -> None:
        """``na_reason``: the bar cannot apply here (n/a); ``note``: why a value is missing (FAIL)."""
        if na_reason:
            result, value = NA, None
        elif value is None:
            result = FAIL  # fastreg missing, WRONG or crashed: the bar is not met
        else:
            result = PASS if self.OPS[op](value, threshold) else FAIL
        self.rows.append({"bar": bar, "metric": metric, "value": value, "target": f"{op} {threshold:g}",
                          "result": result, "note": na_reason or (note if value is None else "")})

    @property
    def ok(self) -> bool:
        return all(r["result"] != FAIL for r in self.rows)


def _lce_bars(crit: Criteria, rows: list, device: str) -> None:
    by = {r["provider"]: r for r in rows}
    f, eager = by["fastreg"], by["eager"]
    cfg = CPU_LCE if device == "cpu" else CUDA_LCE
    bar = f"loss {C.dtype_name(cfg.dtype)} {cfg.reduction} {cfg.label}"
    crit.add(bar, "fastreg agrees with float64 reference", 1.0 if f.get("status") == C.OK else None, ">=", 1)
    fms = f.get("median_ms")
    crit.add(bar, "time / 3-matmul floor", C.ratio(fms, by[lce.FLOOR].get("median_ms")), "<=", 1.15)
    if device == "cpu":
        crit.add(bar, "speedup vs eager", C.ratio(eager.get("median_ms"), fms), ">=", 1.25)
        native = by["native"]
        crit.add(bar, "speedup vs torch native", C.ratio(native.get("median_ms"), fms), ">=", 1.25,
                 native.get("note") if native.get("status") == C.UNAVAILABLE else "")
        peak = f.get("peak_extra_bytes")
        broken = peak is not None and peak < lce.gradient_bytes(cfg)
        crit.add(bar, "peak extra memory / eager's",
                 None if broken else C.ratio(peak, eager.get("peak_extra_bytes")), "<=", 0.25,
                 note=f"measured {C.human_bytes(peak)}, less than the gradients the step returns: "
                      "the measurement is broken" if broken else "")
    else:
        crit.add(bar, "speedup vs eager", C.ratio(eager.get("median_ms"), fms), ">", 1.0)
        liger = by["liger"]
        crit.add(bar, "speedup vs Liger", C.ratio(liger.get("median_ms"), fms), ">", 1.0,
                 liger.get("note") if liger.get("status") == C.UNAVAILABLE else "")
        peak = f.get("peak_extra_bytes")
        crit.add(bar, "peak extra memory (GiB)", peak / 2**30 if peak is not None else None, "<=", 2.0)
        for key, what in (("err_loss", "loss"), ("err_dw", "dW")):
            crit.add(bar, f"{what} error vs fp64 / eager's", C.ratio(f.get(key), eager.get(key)), "<=", 2.0)


def _optim_bars(crit: Criteria, rows: list, cfg: optim.OptimConfig, device: str) -> None:
    by = {r["provider"]: r for r in rows}
    f = by["fastreg"]
    bar = f"Adam wd fp32 {cfg.n_tensors} x {cfg.numel}"
    crit.add(bar, "fastreg agrees with float64 reference", 1.0 if f.get("status") == C.OK else None, ">=", 1)
    vs_fused = f.get("speedup_vs_fused")
    if device == "cpu":
        if cfg.n_tensors == 100:
            crit.add(bar, "speed vs torch fused", vs_fused, ">=", 0.95)
            crit.add(bar, "speedup vs torch for-loop", f.get("speedup_vs_forloop"), ">=", 3.0)
        else:
            crit.add(bar, "speedup vs torch fused", vs_fused, ">=", 4.0)
    else:
        if cfg.n_tensors == 100:
            crit.add(bar, "fraction of copy bandwidth", f.get("frac_copy_bw"), ">=", 0.85)
            crit.add(bar, "speed vs torch fused (no slower)", vs_fused, ">=", 1.0)
        else:
            crit.add(bar, "speedup vs torch fused", vs_fused, ">=", 2.0)


CRIT_COLUMNS = [("bar", "bar"), ("metric", "metric"), ("value", lambda r: C.fmt(r.get("value"), ".3f")),
                ("target", "target"), ("result", "result"), ("note", lambda r: (r.get("note") or "")[:50])]
CSV_COLUMNS = ["date", "device", "device_name", "torch", "cuda", "fastreg_commit", "fastreg_build", "python", "platform",
               "loadavg", "bar", "metric", "value", "target", "result", "note"]


def run(args, prov: dict, out_dir: str, show_progress: bool = True) -> bool:
    device = args.device
    crit = Criteria()
    lce_cfg = CPU_LCE if device == "cpu" else CUDA_LCE
    lce_names = ["fastreg", "eager", "native", lce.FLOOR] if device == "cpu" else \
        ["fastreg", "eager", "liger", "cce", "native", lce.FLOOR]
    optim_cfgs = CPU_OPTIM if device == "cpu" else CUDA_OPTIM
    optim_names = ["fastreg", "forloop", "foreach", "fused"]
    bar = C.Progress(len(lce_names) + len(optim_cfgs) * len(optim_names), "bars", show_progress)
    tick = bar.tick
    work_rows, work_notes = [], []

    lce_rows = lce.bench_size(lce_cfg, device, lce_names, args.warmup, args.repeats, memory=True, tick=tick,
                              max_time=args.max_time)
    for r in lce_rows:
        r.update(prov, sweep="bars")
    _lce_bars(crit, lce_rows, device)
    if device == "cpu" and getattr(args, "workloads", None):  # issue 11's workloads (CPU bars; fixed shapes)
        work_rows, work_notes = workloads.run_workloads(args.workloads, device, workloads.Shapes(), args.warmup,
                                                        args.repeats, args.max_time, crit, lce_names,
                                                        show_progress=False)
        for r in work_rows:
            r.update(prov)

    copy_gbs = C.copy_bandwidth_gbs(device, optim.copy_bytes(device, quick=False))
    optim_rows = []
    for cfg in optim_cfgs:
        rows = optim.bench_size(cfg, device, optim_names, args.warmup, args.repeats, copy_gbs, tick=tick,
                                max_time=args.max_time)
        for r in rows:
            r.update(prov, sweep="bars")
        _optim_bars(crit, rows, cfg, device)
        optim_rows += rows

    bar.close()
    C.append_csv(f"{out_dir}/lce.csv", lce_rows, lce.CSV_COLUMNS)
    C.append_csv(f"{out_dir}/optim.csv", optim_rows, optim.CSV_COLUMNS)
    if work_rows:
        C.append_csv(f"{out_dir}/workloads.csv", work_rows, workloads.CSV_COLUMNS)
    C.append_csv(f"{out_dir}/bars-{device}.csv", [{**prov, "device": device, **r} for r in crit.rows], CSV_COLUMNS)

    n_pass = sum(r["result"] == PASS for r in crit.rows)
    n_fail = sum(r["result"] == FAIL for r in crit.rows)
    summary = f"{n_pass} PASS, {n_fail} FAIL, {len(crit.rows) - n_pass - n_fail} n/a"
    md = [
        f"# fastreg performance bars, {device}",
        "",
        f"- date: {prov['date']}",
        f"- device: {prov['device_name']}",
        f"- torch {prov['torch']}" + (f", CUDA {prov['cuda']}" if prov["cuda"] else "") + f", Python {prov['python']}",
        f"- fastreg commit: {prov['fastreg_commit']}",
        f"- platform (architecture / CPU code path): {prov['platform']}",
        f"- load average at start: {prov['loadavg']} (timings are meaningful only on a quiet machine)",
        f"- timing: median of {args.repeats} iterations after {args.warmup} warm-up; forward+backward for the loss,"
        " one whole `opt.step()` for the optimizers",
        f"- memory: {C.memory_method(device)}",
        f"- copy bandwidth (`dst.copy_(src)`, read+write): {copy_gbs:.1f} GB/s",
        "",
        f"## Result: {summary}",
        "",
        C.render_table(crit.rows, CRIT_COLUMNS, markdown=True),
        "",
        "## Loss measurements",
        "",
        C.render_table(lce_rows, lce.TABLE_COLUMNS, markdown=True),
        "",
        *(["## Loss workloads (issue 11; timed interleaved within each workload)", "",
           C.render_table(work_rows, workloads.TABLE_COLUMNS, markdown=True), "",
           *[f"- {n}" for n in work_notes], ""] if work_rows else []),
        "## Optimizer measurements",
        "",
        C.render_table(optim_rows, optim.TABLE_COLUMNS, markdown=True),
        "",
    ]
    path = f"{out_dir}/bars-{device}.md"
    with open(path, "w") as fh:
        fh.write("\n".join(md))
    print("\n" + "\n".join(md))
    print(f"bars: {summary}  ->  {path}")
    return crit.ok
