"""Benchmark of one whole ``optimizer.step()``: fastreg.optim against torch.optim's three paths.

torch.optim runs an optimizer as a Python for-loop over tensors (``foreach=False``), as
multi-tensor "foreach" kernels, or as one fused kernel per device/dtype (``fused=True``).
Each provider is checked first: K steps on the benchmark's own parameters must match torch's
for-loop optimizer run in float64 on the same starting values and gradients, to within twice the
update error of torch's for-loop optimizer run in the parameters' dtype on the same values, and
never less than twice the rounding floor of that dtype (``update_gate``).

bf16 training modes (bfloat16 params only, ``--optim-dtype bfloat16``): ``fastreg-sr``
(stochastic rounding) and ``fastreg-master`` (fp32 master weights) run beside the plain fused
step. Their rows count their own bytes per parameter (master weights: the fp32 copy is read and
written, the bf16 parameter only written). Their checks: master weights, the master copies'
update against the float64 reference (with the gate of float32, the master copies' dtype);
stochastic rounding, every element within 3 bf16 spacings of the reference update, and no bias:
the error projected on the sign of the reference update, summed, is under 5 % of the summed
reference update (round-to-nearest of updates below half a spacing fails this with -100 %).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import common as C

CHECK_STEPS = 3


@dataclass(frozen=True)
class OptimSpec:
    torch_cls: type
    hyper: dict
    bytes_per_param: int  # element reads + writes per parameter per step, in units of the dtype size
    doc: str


OPTIMIZERS = {
    # Adam with (coupled, L2) weight decay is the headline configuration.
    "adam": OptimSpec(torch.optim.Adam, {"lr": 1e-3, "weight_decay": 1e-2}, 7,
                      "Adam, weight_decay=0.01: reads p, g, m, v; writes p, m, v"),
    "adamw": OptimSpec(torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}, 7,
                       "AdamW, weight_decay=0.01: reads p, g, m, v; writes p, m, v"),
    "sgd": OptimSpec(torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}, 5,
                     "SGD, momentum=0.9: reads p, g, buf; writes p, buf"),
}


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str
    n_tensors: int
    numel: int
    dtype: torch.dtype = torch.float32

    @property
    def params(self) -> int:
        return self.n_tensors * self.numel

    @property
    def bytes_moved(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return OPTIMIZERS[self.optimizer].bytes_per_param * itemsize * self.params


@dataclass
class Provider:
    name: str
    doc: str
    build: Callable[[str, list], torch.optim.Optimizer]
    unavailable: Callable[[str], Optional[str]] = lambda device: None
    default: bool = True
    mode: Optional[str] = None  # fastreg's bf16 modes: "sr" / "master" (bfloat16 params only)


def bytes_moved(cfg: OptimConfig, mode: Optional[str]) -> int:
    """Bytes a step reads and writes; with master weights the bf16 parameter is written but not
    read, the fp32 copy read and written: 4 + 4 - 2 bytes per parameter more."""
    return cfg.bytes_moved + (6 * cfg.params if mode == "master" else 0)


def _fastreg_missing(device):
    try:
        import fastreg.optim as fo
        for spec in OPTIMIZERS.values():
            getattr(fo, spec.torch_cls.__name__)
    except Exception as e:
        return "fastreg.optim not importable: " + C.describe_exception(e)
    return None


def _build_fastreg(opt, params, **modes):
    import fastreg.optim as fo
    spec = OPTIMIZERS[opt]
    return getattr(fo, spec.torch_cls.__name__)(params, **spec.hyper, **modes)


def _torch(**flags):
    def build(opt, params):
        spec = OPTIMIZERS[opt]
        return spec.torch_cls(params, **spec.hyper, **flags)
    return build


def _build_wrong(opt, params):
    """Self-test canary: torch's for-loop optimizer with a 5% learning-rate error."""
    spec = OPTIMIZERS[opt]
    return spec.torch_cls(params, **{**spec.hyper, "lr": spec.hyper["lr"] * 1.05}, foreach=False)


PROVIDERS = {p.name: p for p in [
    Provider("fastreg", "fastreg.optim (one fused kernel call per dtype group)", _build_fastreg, _fastreg_missing),
    Provider("fastreg-sr", "fastreg.optim, stochastic_rounding=True (bfloat16 params)",
             lambda opt, params: _build_fastreg(opt, params, stochastic_rounding=True), _fastreg_missing, mode="sr"),
    Provider("fastreg-master", "fastreg.optim, master_weights=True (bfloat16 params)",
             lambda opt, params: _build_fastreg(opt, params, master_weights=True), _fastreg_missing, mode="master"),
    Provider("forloop", "torch.optim, foreach=False", _torch(foreach=False)),
    Provider("foreach", "torch.optim, foreach=True", _torch(foreach=True)),
    Provider("fused", "torch.optim, fused=True", _torch(fused=True)),
    Provider("wrong", "self-test canary: torch for-loop with lr off by 5% (must be flagged WRONG)", _build_wrong,
             default=False),
]}
TORCH_PROVIDERS = ("forloop", "foreach", "fused")


def default_providers() -> list:
    return [n for n, p in PROVIDERS.items() if p.default]


def make_params(cfg: OptimConfig, device: str, seed: int = 0) -> list:
    """``n_tensors`` separately allocated parameters (as in a model), each with its own gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _ in range(cfg.n_tensors):
        p = torch.randn(cfg.numel, device=device, generator=g).to(cfg.dtype)
        p.grad = torch.randn(cfg.numel, device=device, generator=g).to(cfg.dtype)
        params.append(p)
    return params


def _groups(tensors: list, max_elements: int):
    """Consecutive runs of tensors with at most ``max_elements`` elements in all (at least one each)."""
    group, n = [], 0
    for t in tensors:
        if group and n + t.numel() > max_elements:
            yield group
            group, n = [], 0
        group.append(t)
        n += t.numel()
    if group:
        yield group


def reference_updates(cfg: OptimConfig, device: str) -> list:
    """The update p_K - p_0 of CHECK_STEPS steps of torch's for-loop optimizer run in float64 on the
    parameters and gradients of ``make_params(cfg)``, one per tensor, stored in float32 (float64 for
    float64 parameters; float32 is ~500x below the rounding floor of float32 updates). Computed on
    groups of <= 2**26 elements, so a float64 copy of a huge model is never needed at once;
    computed once per size and shared by all providers."""
    spec = OPTIMIZERS[cfg.optimizer]
    store = torch.float64 if cfg.dtype == torch.float64 else torch.float32
    updates = []
    for group in _groups(make_params(cfg, device), 1 << 26):
        ref = [p.detach().to(torch.float64, copy=True) for p in group]  # a copy for float64 params too
        for r, p in zip(ref, group):
            r.grad = p.grad.to(torch.float64, copy=True)
        opt = spec.torch_cls(ref, **spec.hyper, foreach=False)
        for _ in range(CHECK_STEPS):
            opt.step()
        updates += [(r - p.double()).to(store) for r, p in zip(ref, group)]
        del ref, opt
    return updates


def update_gate(cfg: OptimConfig, device: str, ref_updates: list, dtype: Optional[torch.dtype] = None) -> dict:
    """The correctness gate of an update computed in ``dtype`` (default: the parameters' dtype; the
    master weights of a bf16 model are float32): GATE_FACTOR x the update error of torch's own
    for-loop optimizer run in that dtype on the same starting values and gradients, at least the
    rounding floor u * ||p|| / ||p_K - p_0||: the update is the difference of two parameters
    rounded to the dtype, each off by up to u relative to the parameter, not to the (much smaller)
    update. -> {"tol", "torch_err", "floor"}."""
    dtype = dtype or cfg.dtype
    spec = OPTIMIZERS[cfg.optimizer]
    params = []
    for p in make_params(cfg, device):
        q = p.to(dtype)
        q.grad = p.grad.to(dtype)
        params.append(q)
    p_sq = sum(p.double().pow(2).sum().item() for p in params)
    ref_sq = sum(r.double().pow(2).sum().item() for r in ref_updates)
    floor = C.UNIT_ROUNDOFF[dtype] * math.sqrt(p_sq / ref_sq) if ref_sq > 0 else C.UNIT_ROUNDOFF[dtype]
    torch_err = update_error(spec.torch_cls(params, **spec.hyper, foreach=False), params, ref_updates)
    del params
    return {"tol": C.error_gate(torch_err, floor), "torch_err": torch_err, "floor": floor}


def update_error(opt: torch.optim.Optimizer, params: list, ref_updates: list, mode: Optional[str] = None) -> float:
    """CHECK_STEPS steps of ``opt`` on ``params`` (fresh from ``make_params``), then the relative L2
    error of the updates p_K - p_0 over all tensors against the float64 reference (the update, not
    the parameters, so the error is relative to what the optimizer changed). ``mode="master"``:
    the update of the fp32 master copies."""
    start = [p.detach().clone() for p in params]
    for _ in range(CHECK_STEPS):
        opt.step()
    num = den = 0.0
    for p, s, r in zip(params, start, ref_updates):
        final = opt.state[p]["master_param"] if mode == "master" else p.detach()
        d = final.double() - s.double()
        num += (d - r.double()).pow(2).sum().item()
        den += r.double().pow(2).sum().item()
    del start
    err = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    return err if math.isfinite(err) else math.inf


def check(opt: torch.optim.Optimizer, params: list, ref_updates: list, tol: float,
          mode: Optional[str] = None) -> dict:
    """CHECK_STEPS steps of ``opt`` against the float64 reference: the update error within ``tol``
    (``update_gate``). Stochastic rounding has its own check (the module docstring)."""
    if mode == "sr":
        start = [p.detach().clone() for p in params]
        for _ in range(CHECK_STEPS):
            opt.step()
        return _check_stochastic(params, start, ref_updates)
    err = update_error(opt, params, ref_updates, mode)
    ok = err <= tol
    return {"err_update": err, "tol": tol, "status": C.OK if ok else C.WRONG,
            "note": "" if ok else f"update err {err:.2g} > {tol:.2g}"}


def _check_stochastic(params: list, start: list, ref_updates: list) -> dict:
    worst = bias = scale = 0.0
    for p, s, r in zip(params, start, ref_updates):
        d = p.detach().double() - s.double()
        r = r.double()
        spacing = torch.maximum(p.detach().double().abs(), s.double().abs()).clamp_min(1e-30) * 2.0 ** -7
        worst = max(worst, ((d - r).abs() / spacing).max().item())
        bias += ((d - r) * r.sign()).sum().item()
        scale += r.abs().sum().item()
    rel_bias = bias / scale if scale > 0 else 0.0
    ok = worst <= 3 and abs(rel_bias) <= 0.05
    return {"err_update": abs(rel_bias), "tol": 0.05, "status": C.OK if ok else C.WRONG,
            "note": "" if ok else f"max error {worst:.2g} spacings, bias {rel_bias:+.2%}"}


def bench_size(cfg: OptimConfig, device: str, names: list, warmup: int, repeats: int, copy_gbs: float,
               tick: Callable[[], None] = lambda: None, max_time: Optional[float] = None) -> list:
    base = {"optimizer": cfg.optimizer, "n_tensors": cfg.n_tensors, "numel": cfg.numel, "params": cfg.params,
            "dtype": C.dtype_name(cfg.dtype), "device": device, "bytes_per_step": cfg.bytes_moved,
            "copy_gbs": copy_gbs}
    rows = []
    ref = reference_updates(cfg, device)
    tol = {None: update_gate(cfg, device, ref)["tol"]}
    if cfg.dtype == torch.bfloat16 and any(PROVIDERS[n].mode == "master" for n in names):
        tol["master"] = update_gate(cfg, device, ref, torch.float32)["tol"]  # the fp32 master copies
    for name in names:
        row = {**base, "provider": name}
        rows.append(row)
        params = opt = None
        try:
            prov = PROVIDERS[name]
            reason = prov.unavailable(device)
            if reason:
                row.update(status=C.UNAVAILABLE, note=reason)
                continue
            if prov.mode and cfg.dtype != torch.bfloat16:
                row.update(status=C.UNAVAILABLE, note="bf16 mode: needs --optim-dtype bfloat16")
                continue
            params = make_params(cfg, device)
            opt = prov.build(cfg.optimizer, params)
            row.update(check(opt, params, ref, tol.get(prov.mode), prov.mode))
            if row["status"] != C.OK:
                continue
            t = C.time_fn(opt.step, device, warmup, repeats, max_time)
            moved = bytes_moved(cfg, prov.mode)
            row.update(median_ms=t.median, min_ms=t.min, max_ms=t.max, spread=t.spread, repeats=len(t.samples),
                       bytes_per_step=moved, gbs=moved / (t.median * 1e-3) / 1e9)
            if copy_gbs:
                row["frac_copy_bw"] = row["gbs"] / copy_gbs
        except Exception as e:
            row.update(status=C.ERROR, note=C.describe_exception(e))
        finally:
            del params, opt
            C.free_memory(device)
            tick()
    del ref
    C.free_memory(device)
    add_ratios(rows)
    return rows


def add_ratios(rows: list) -> None:
    by = {r["provider"]: r.get("median_ms") for r in rows}
    torch_ms = [by[n] for n in TORCH_PROVIDERS if by.get(n)]
    best = min(torch_ms) if torch_ms else None
    for r in rows:
        ms = r.get("median_ms")
        if not ms:
            continue
        mode = PROVIDERS[r["provider"]].mode if r["provider"] in PROVIDERS else None
        if mode and by.get("fastreg"):
            r["vs_plain_fused"] = ms / by["fastreg"]
            if mode == "master" and r.get("copy_gbs"):
                # the bar's yardstick: the plain step plus its extra 8 bytes/param at copy bandwidth
                extra_ms = 8 * r["params"] / (r["copy_gbs"] * 1e9) * 1e3
                r["vs_plain_plus_8B"] = ms / (by["fastreg"] + extra_ms)
        if best:
            r["speedup_vs_best_torch"] = best / ms
        for n in ("forloop", "fused"):
            if by.get(n):
                r[f"speedup_vs_{n}"] = by[n] / ms


def default_sweeps(device: str, quick: bool) -> dict:
    """{sweep: [(n_tensors, numel), ...]}: total size at 100 tensors, and tensor count at fixed total."""
    if quick:
        return {"params": [(4, 1000), (4, 20000)], "tensors": [(4, 20000), (400, 200)]}
    if device == "cuda":
        return {"params": [(100, n) for n in (10_000, 100_000, 1_000_000, 10_000_000)],
                "tensors": [(t, 5_000_000 // t) for t in (10, 100, 1000, 5000, 20000)]}
    return {"params": [(100, n) for n in (1000, 10_000, 100_000, 400_000)],
            "tensors": [(t, 5_000_000 // t) for t in (10, 100, 1000, 5000)]}


def copy_bytes(device: str, quick: bool) -> int:
    if quick:
        return 16 << 20
    return (1 << 30) if device == "cuda" else (256 << 20)


CSV_COLUMNS = [
    "date", "device", "device_name", "torch", "cuda", "fastreg_commit", "fastreg_build", "python", "platform", "loadavg",
    "sweep", "optimizer", "n_tensors", "numel", "params", "dtype", "provider", "status", "note",
    "median_ms", "min_ms", "max_ms", "spread", "repeats", "bytes_per_step", "gbs", "copy_gbs", "frac_copy_bw",
    "speedup_vs_best_torch", "speedup_vs_forloop", "speedup_vs_fused", "err_update", "tol",
    "vs_plain_fused", "vs_plain_plus_8B",
]

TABLE_COLUMNS = [
    ("opt", "optimizer"),
    ("tensors x numel", lambda r: f"{r['n_tensors']}x{r['numel']}"),
    ("provider", "provider"),
    ("status", "status"),
    ("median ms", lambda r: C.fmt(r.get("median_ms"), ".3f")),
    ("spread", lambda r: C.fmt(r["spread"] * 100, ".0f") + "%" if r.get("spread") is not None else "-"),
    ("GB/s", lambda r: C.fmt(r.get("gbs"), ".1f")),
    ("of copy", lambda r: C.fmt(r["frac_copy_bw"] * 100, ".0f") + "%" if r.get("frac_copy_bw") else "-"),
    ("vs best torch", lambda r: C.fmt(r.get("speedup_vs_best_torch"), ".2f") + "x"
     if r.get("speedup_vs_best_torch") else "-"),
    ("update err", lambda r: C.fmt(r.get("err_update"), ".1e")),
    ("vs plain fused", lambda r: C.fmt(r.get("vs_plain_fused"), ".2f") + "x" if r.get("vs_plain_fused") else "-"),
    ("note", lambda r: (r.get("note") or "")[:60]),
]


def run(args, prov: dict, out_dir: str, show_progress: bool = True) -> list:
    """The optimizer part of ``python -m fastreg.bench``."""
    from . import plots

    dtype = C.parse_dtype(args.optim_dtype)
    sizes = C.sizes_to_run(args.optim_sizes, default_sweeps(args.device, args.quick), args.sweep)
    sweeps = list(dict.fromkeys(s for names in sizes.values() for s in names))
    names = args.optim_providers
    if not sizes:
        return []
    copy_gbs = C.copy_bandwidth_gbs(args.device, copy_bytes(args.device, args.quick))
    bar = C.Progress(len(args.optimizers) * len(sizes) * len(names), "optim", show_progress)
    rows = []
    for opt in args.optimizers:
        for (n_tensors, numel), tags in sizes.items():
            cfg = OptimConfig(opt, n_tensors, numel, dtype)
            for r in bench_size(cfg, args.device, names, args.warmup, args.repeats, copy_gbs,
                                tick=bar.tick, max_time=args.max_time):
                r.update(prov, sweep=",".join(tags))
                rows.append(r)
    bar.close()
    C.append_csv(f"{out_dir}/optim.csv", rows, CSV_COLUMNS)
    print(f"\n== optimizer.step(), {C.dtype_name(dtype)} params, {prov['device_name']}; "
          f"copy bandwidth {copy_gbs:.1f} GB/s ==")
    print(C.render_table(rows, TABLE_COLUMNS))
    print("GB/s counts " + "; ".join(f"{k}: {s.bytes_per_param} x dtype size per param ({s.doc})"
                                      for k, s in OPTIMIZERS.items()))
    if args.plots:
        for sweep, x_key, x_label in (("params", "params", "parameters (100 tensors)"),
                                      ("tensors", "n_tensors", "tensor count (fixed total size)")):
            if sweep not in sweeps:
                continue
            for opt in args.optimizers:
                sub = [r for r in rows if r["optimizer"] == opt and sweep in r["sweep"].split(",")]
                path = f"{out_dir}/optim-{opt}-{sweep}-{args.device}-{C.dtype_name(dtype)}.png"
                plots.plot_sweep(sub, x_key, f"{opt}.step() vs {x_label} ({C.dtype_name(dtype)}, {args.device})",
                                 path, [("median_ms", "time per step (ms)", 1.0), ("gbs", "GB/s", 1.0)],
                                 x_label=x_label)
                print(f"plot: {path}")
    return rows


def bf16_mode_bars(n_tensors: int = 100, numel: int = 400_000, rounds: int = 11, device: str = "cpu") -> dict:
    """The bars of the bf16 modes, timed interleaved (plain, SR, master, plain, ...; medians) so that
    a loaded machine slows all three alike: bf16 Adam, stochastic-rounding step <= 1.15x the plain
    fused step; master-weights step <= 1.15x (plain step + its extra 8 bytes/param at the measured
    copy bandwidth)."""
    import statistics

    import fastreg.optim as fo

    cfg = OptimConfig("adam", n_tensors, numel, torch.bfloat16)
    spec = OPTIMIZERS["adam"]
    opts = {}
    for name, modes in (("plain", {}), ("sr", {"stochastic_rounding": True}), ("master", {"master_weights": True})):
        opts[name] = fo.Adam(make_params(cfg, device), **spec.hyper, **modes)
        opts[name].step()  # allocates the state
    samples: dict = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            samples[name].append(C.time_fn(opt.step, device, warmup=0, repeats=1).median)
    copy_gbs = C.copy_bandwidth_gbs(device, copy_bytes(device, quick=False))
    ms = {name: statistics.median(v) for name, v in samples.items()}
    extra_ms = 8 * cfg.params / (copy_gbs * 1e9) * 1e3
    return {"ms": ms, "copy_gbs": copy_gbs, "sr_vs_plain": ms["sr"] / ms["plain"],
            "master_vs_plain_plus_8B": ms["master"] / (ms["plain"] + extra_ms), "extra_8B_ms": extra_ms}


if __name__ == "__main__":  # python -m fastreg.bench.optim: the bf16-mode bars
    r = bf16_mode_bars()
    print(f"bf16 Adam 100 x 400k, interleaved medians: plain {r['ms']['plain']:.1f} ms, stochastic rounding "
          f"{r['ms']['sr']:.1f} ms, master weights {r['ms']['master']:.1f} ms; copy bandwidth {r['copy_gbs']:.1f} GB/s")
    print(f"stochastic rounding / plain = {r['sr_vs_plain']:.3f} (bar <= 1.15)")
    print(f"master / (plain + 8 B/param = {r['extra_8B_ms']:.1f} ms) = {r['master_vs_plain_plus_8B']:.3f} (bar <= 1.15)")
    print(f"load average {open('/proc/loadavg').read().split()[0]}")
