"""Benchmark of the fused linear + cross-entropy loss (forward + backward).

Every provider computes ``F.cross_entropy(F.linear(x, W, b), target, reduction=...)`` and its
gradients w.r.t. x, W (and b). Each one is first checked against a float64 reference; only the
ones that agree are timed. The "floor" is the three matmuls every implementation has to do
(x·Wᵀ, dlogits·W, dlogitsᵀ·x), timed as plain ``torch.mm`` calls into preallocated outputs.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import common as C

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LCEConfig:
    N: int
    D: int
    V: int
    dtype: torch.dtype = torch.float32
    reduction: str = "mean"
    bias: bool = False

    @property
    def flops(self) -> int:
        """Forward + backward of the three matmuls: 3 × 2·N·D·V."""
        return 6 * self.N * self.D * self.V

    @property
    def label(self) -> str:
        return f"N={self.N} D={self.D} V={self.V}"

    def spec(self) -> dict:
        return {"N": self.N, "D": self.D, "V": self.V, "dtype": C.dtype_name(self.dtype),
                "reduction": self.reduction, "bias": self.bias}

    @classmethod
    def from_spec(cls, s: dict) -> "LCEConfig":
        return cls(int(s["N"]), int(s["D"]), int(s["V"]), C.parse_dtype(s["dtype"]), s["reduction"], bool(s["bias"]))


# ----------------------------------------------------------------------------------------------
# inputs and reference
# ----------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    x: torch.Tensor
    W: torch.Tensor
    t: torch.Tensor
    b: Optional[torch.Tensor]

    def leaves(self):
        return [p for p in (self.x, self.W, self.b) if p is not None]

    def zero_grad(self) -> None:
        for p in self.leaves():
            p.grad = None


def make_inputs(cfg: LCEConfig, device: str, seed: int = 0) -> Inputs:
    """Hidden states ~ N(0, 1), W ~ N(0, 1/D) (logits of unit scale), uniform random targets."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(cfg.N, cfg.D, device=device, generator=g).to(cfg.dtype).requires_grad_()
    W = (torch.randn(cfg.V, cfg.D, device=device, generator=g) / math.sqrt(cfg.D)).to(cfg.dtype).requires_grad_()
    t = torch.randint(0, cfg.V, (cfg.N,), device=device, generator=g)
    b = None
    if cfg.bias:
        b = (0.1 * torch.randn(cfg.V, device=device, generator=g)).to(cfg.dtype).requires_grad_()
    return Inputs(x, W, t, b)


def reference(inp: Inputs, cfg: LCEConfig, device: str) -> dict:
    """Loss and gradients in float64, computed in row chunks so the N×V logits never exist at once."""
    x = inp.x.detach().double().requires_grad_()
    W = inp.W.detach().double().requires_grad_()
    b = inp.b.detach().double().requires_grad_() if inp.b is not None else None
    n_valid = int((inp.t != IGNORE_INDEX).sum())
    scale = 1.0 / max(n_valid, 1) if cfg.reduction == "mean" else 1.0
    budget = (4 << 30) if device == "cuda" else (256 << 20)
    rows = max(1, min(cfg.N, budget // (3 * 8 * cfg.V)))
    total = 0.0
    for i in range(0, cfg.N, rows):
        logits = F.linear(x[i:i + rows], W, b)
        part = F.cross_entropy(logits, inp.t[i:i + rows], reduction="sum", ignore_index=IGNORE_INDEX) * scale
        part.backward()
        total += part.item()
        del logits, part
    return {"loss": torch.tensor(total, dtype=torch.float64), "dx": x.grad, "dw": W.grad,
            "db": b.grad if b is not None else None}


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class Provider:
    name: str
    doc: str
    build: Callable[[LCEConfig, str], LossFn]
    unavailable: Callable[[LCEConfig, str], Optional[str]] = lambda cfg, device: None
    default: bool = True


def _eager_fn(reduction: str) -> LossFn:
    def loss(x, W, t, b):
        return F.cross_entropy(F.linear(x, W, b), t, reduction=reduction, ignore_index=IGNORE_INDEX)
    return loss


def _build_fastreg(cfg, device):
    import fastreg
    f = fastreg.linear_cross_entropy
    return lambda x, W, t, b: f(x, W, t, linear_bias=b, reduction=cfg.reduction, ignore_index=IGNORE_INDEX)


def _fastreg_missing(cfg, device):
    try:
        import fastreg
        fastreg.linear_cross_entropy  # noqa: B018
    except Exception as e:  # not built / being rebuilt
        return "fastreg not importable: " + C.describe_exception(e)
    if device == "cuda" and not fastreg.has_cuda_kernels():
        return "fastreg built without CUDA kernels"
    return None


def _build_compile(cfg, device):
    import torch._dynamo
    torch._dynamo.reset()  # one specialised graph per size; no recompile limit surprises
    return torch.compile(_eager_fn(cfg.reduction), dynamic=False)


def _build_native(cfg, device):
    opts = torch.nn.LinearCrossEntropyOptions()
    return lambda x, W, t, b: F.linear_cross_entropy(
        x, W, t, linear_bias=b, reduction=cfg.reduction, ignore_index=IGNORE_INDEX, options=opts)


def _native_missing(cfg, device):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    return None


def _cuda_only_import(module: str):
    def missing(cfg, device):
        if device != "cuda":
            return "CUDA only"
        try:
            __import__(module)
        except Exception as e:
            return f"{module} not importable ({type(e).__name__})"
        return None
    return missing


def _build_liger(cfg, device):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as f

        def loss(x, W, t, b):
            out = f(x, W, t, b, ignore_index=IGNORE_INDEX, reduction=cfg.reduction)
            return out[0] if isinstance(out, tuple) else out
        return loss
    except ImportError:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        mod = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction=cfg.reduction)

        def loss(x, W, t, b):
            out = mod(W, x, t, b)
            return out[0] if isinstance(out, tuple) else out
        return loss


def _build_cce(cfg, device):
    from cut_cross_entropy import linear_cross_entropy as f
    return lambda x, W, t, b: f(x, W, t, bias=b, ignore_index=IGNORE_INDEX, reduction=cfg.reduction)


def _build_wrong(cfg, device):
    """Self-test canary: the eager loss with targets shifted by one row (the classic label-shift bug)."""
    eager = _eager_fn(cfg.reduction)
    return lambda x, W, t, b: eager(x, W, torch.roll(t, 1), b)


PROVIDERS = {p.name: p for p in [
    Provider("fastreg", "fastreg.linear_cross_entropy (fused, chunked)", _build_fastreg, _fastreg_missing),
    Provider("eager", "F.cross_entropy(F.linear(x, W, b), t)", lambda cfg, d: _eager_fn(cfg.reduction)),
    Provider("compile", "torch.compile of the eager code (dynamic=False)", _build_compile),
    Provider("native", "F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())", _build_native,
             _native_missing),
    Provider("liger", "Liger-Kernel liger_fused_linear_cross_entropy", _build_liger,
             _cuda_only_import("liger_kernel")),
    Provider("cce", "cut_cross_entropy.linear_cross_entropy", _build_cce, _cuda_only_import("cut_cross_entropy")),
    Provider("wrong", "self-test canary: eager with targets shifted by one (must be flagged WRONG)", _build_wrong,
             default=False),
]}
FLOOR = "floor"
FLOOR_DOC = "the 3 matmuls alone (x·Wᵀ, dlogits·W, dlogitsᵀ·x) as torch.mm into preallocated outputs"
ALL_NAMES = list(PROVIDERS) + [FLOOR]


def default_providers() -> list:
    return [n for n, p in PROVIDERS.items() if p.default] + [FLOOR]


def make_step(fn: LossFn, inp: Inputs) -> Callable[[], torch.Tensor]:
    """One training-style forward + backward: fresh gradients, loss, backward."""
    def step():
        inp.zero_grad()
        loss = fn(inp.x, inp.W, inp.t, inp.b)
        loss.backward()
        return loss
    return step


def floor_step(cfg: LCEConfig, device: str) -> Callable[[], None]:
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(cfg.N, cfg.D, device=device, generator=g).to(cfg.dtype)
    W = torch.randn(cfg.V, cfg.D, device=device, generator=g).to(cfg.dtype)
    dlogits = torch.randn(cfg.N, cfg.V, device=device, generator=g).to(cfg.dtype)
    logits, dx, dw = torch.empty_like(dlogits), torch.empty_like(x), torch.empty_like(W)

    def step():
        torch.mm(x, W.t(), out=logits)
        torch.mm(dlogits, W, out=dx)
        torch.mm(dlogits.t(), x, out=dw)
    return step


# ----------------------------------------------------------------------------------------------
# one size
# ----------------------------------------------------------------------------------------------
def _errors(fn: LossFn, inp: Inputs, ref: dict) -> tuple:
    """One forward + backward of ``fn`` -> ({err_loss, err_dx, err_dw[, err_db]} against the float64
    reference, seconds taken, warnings raised)."""
    inp.zero_grad()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = fn(inp.x, inp.W, inp.t, inp.b)
        loss.backward()
    C.synchronize(inp.x.device.type)
    seconds = time.perf_counter() - t0
    errs = {"err_loss": C.rel_err(loss.detach(), ref["loss"]),
            "err_dx": C.rel_err(inp.x.grad, ref["dx"]) if inp.x.grad is not None else math.inf,
            "err_dw": C.rel_err(inp.W.grad, ref["dw"]) if inp.W.grad is not None else math.inf}
    if inp.b is not None:
        errs["err_db"] = C.rel_err(inp.b.grad, ref["db"]) if inp.b.grad is not None else math.inf
    inp.zero_grad()
    return errs, seconds, caught


def gates(inp: Inputs, ref: dict, cfg: LCEConfig) -> dict:
    """{err key: the largest error a correct provider may have}: GATE_FACTOR x eager's own error in
    ``cfg.dtype`` on these inputs (run here, once), at least the dtype's rounding floor for sums
    as long as the longest of the problem (max(N, D, V) terms)."""
    errs, _, _ = _errors(_eager_fn(cfg.reduction), inp, ref)
    floor = C.rounding_floor(cfg.dtype, max(cfg.N, cfg.D, cfg.V))
    return {k: C.error_gate(e, floor) for k, e in errs.items()}


def gradient_bytes(cfg: LCEConfig) -> int:
    """Bytes of the gradients a step returns (dX, dW[, db]): the least peak extra memory of any
    provider, whatever it does with the logits."""
    size = torch.empty((), dtype=cfg.dtype).element_size()
    return (cfg.N * cfg.D + cfg.V * cfg.D + (cfg.V if cfg.bias else 0)) * size


TOL_COLUMNS = {"err_loss": "tol_loss", "err_dx": "tol_dx", "err_dw": "tol_dw", "err_db": "tol_db"}


def check(fn: LossFn, inp: Inputs, ref: dict, cfg: LCEConfig, gate: Optional[dict] = None) -> dict:
    """Run once and compare loss and gradients with the float64 reference, each against its gate
    (``gates()``; computed here when not given)."""
    if gate is None:
        gate = gates(inp, ref, cfg)
    errs, first, caught = _errors(fn, inp, ref)
    bad = [f"{k[4:]} err {v:.2g} > {gate[k]:.2g}" for k, v in errs.items() if not v <= gate[k]]
    notes = [str(w.message).splitlines()[0][:80] for w in caught if "fall" in str(w.message).lower()]
    return {**errs, **{TOL_COLUMNS[k]: gate[k] for k in errs}, "first_call_s": first,
            "status": C.WRONG if bad else C.OK, "note": "; ".join(bad + notes)}


def bench_size(cfg: LCEConfig, device: str, names: list, warmup: int, repeats: int, memory: bool,
               tick: Callable[[], None] = lambda: None, max_time: Optional[float] = None,
               timed: bool = True) -> list:
    """All providers at one size -> result rows (dicts; the caller adds provenance). ``timed=False``:
    check and measure memory only (memory figures do not depend on the machine's load)."""
    base = {**cfg.spec(), "device": device, "flops": cfg.flops}
    rows = []
    inp = make_inputs(cfg, device)
    ref = gate = gate_error = None
    if any(n != FLOOR for n in names):
        ref = reference(inp, cfg, device)
        try:
            gate = gates(inp, ref, cfg)
        except Exception as e:  # eager itself failed here: nothing can be checked
            gate_error = "correctness gate: " + C.describe_exception(e)
    for name in names:
        row = {**base, "provider": name}
        rows.append(row)
        try:
            if name == FLOOR:
                row["status"] = C.REFERENCE
                if not timed:
                    continue
                step = floor_step(cfg, device)
                _timed(row, step, device, warmup, repeats, cfg, max_time)
                del step
                continue
            prov = PROVIDERS[name]
            reason = prov.unavailable(cfg, device)
            if reason:
                row.update(status=C.UNAVAILABLE, note=reason)
                continue
            if gate_error:
                row.update(status=C.ERROR, note=gate_error)
                continue
            fn = prov.build(cfg, device)
            row.update(check(fn, inp, ref, cfg, gate))
            if row["status"] != C.OK:
                continue  # a provider that disagrees with the reference is not timed
            step = make_step(fn, inp)
            if timed:
                _timed(row, step, device, warmup, repeats, cfg, max_time)
            if memory:
                _memory(row, step, inp, cfg, device)
            del step, fn
        except Exception as e:  # a crash is a result too, never the end of the sweep
            row.update(status=C.ERROR, note=C.describe_exception(e))
        finally:
            inp.zero_grad()
            C.free_memory(device)
            tick()
    add_ratios(rows)
    return rows


def _timed(row, step, device, warmup, repeats, cfg, max_time):
    if max_time is not None and row.get("first_call_s", 0) > max_time:
        warmup = 0  # a provider this slow is past any warm-up effect after its correctness run
    t = C.time_fn(step, device, warmup, repeats, max_time)
    row.update(median_ms=t.median, min_ms=t.min, max_ms=t.max, spread=t.spread, repeats=len(t.samples),
               tflops=cfg.flops / (t.median * 1e-3) / 1e12)


def _memory(row, step, inp, cfg, device):
    if device == "cuda":
        row["peak_extra_bytes"] = C.cuda_peak_extra_bytes(step, inp.zero_grad)
        row["memory_method"] = "cuda-max-allocated"
        return
    res = C.run_memory_child({"op": "lce", "provider": row["provider"], "device": device, **cfg.spec()})
    if "error" in res:
        row["note"] = "; ".join(n for n in (row.get("note"), res["error"]) if n)
        return
    row["peak_extra_bytes"] = res["peak_extra_bytes"]
    row["memory_method"] = "rss-hwm-subprocess" + ("" if res.get("hwm_reset") else "(no-hwm-reset)")


def child_memory(spec: dict) -> dict:
    """Runs in the fresh interpreter of ``common.run_memory_child``."""
    cfg = LCEConfig.from_spec(spec)
    inp = make_inputs(cfg, spec["device"])
    step = make_step(PROVIDERS[spec["provider"]].build(cfg, spec["device"]), inp)
    return C.rss_peak_extra_bytes(step, inp.zero_grad)


def add_ratios(rows: list) -> None:
    """time ÷ floor time, eager time ÷ time (speedup), memory ÷ eager memory."""
    by = {r["provider"]: r for r in rows}
    floor_ms = by.get(FLOOR, {}).get("median_ms")
    eager = by.get("eager", {})
    for r in rows:
        if r["provider"] == FLOOR:
            continue
        if eager.get("peak_extra_bytes") and r.get("peak_extra_bytes") is not None:
            r["mem_vs_eager"] = r["peak_extra_bytes"] / eager["peak_extra_bytes"]
        ms = r.get("median_ms")
        if ms is None:
            continue
        if floor_ms:
            r["x_floor"] = ms / floor_ms
        if eager.get("median_ms"):
            r["speedup_vs_eager"] = eager["median_ms"] / ms


# ----------------------------------------------------------------------------------------------
# sweeps
# ----------------------------------------------------------------------------------------------
def default_sweeps(device: str, quick: bool) -> dict:
    """{sweep name: [(N, D, V), ...]}; sizes scale to the device."""
    if quick:
        return {"V": [(64, 32, v) for v in (512, 2048)], "N": [(n, 32, 2048) for n in (16, 64)]}
    if device == "cuda":
        return {"V": [(8192, 4096, v) for v in (8192, 32768, 65536, 128256, 262144)],
                "N": [(n, 4096, 128256) for n in (1024, 4096, 8192, 16384)]}
    return {"V": [(256, 256, v) for v in (8192, 32768, 131072)],
            "N": [(n, 256, 8192) for n in (64, 256, 1024)]}


CSV_COLUMNS = [
    "date", "device", "device_name", "torch", "cuda", "fastreg_commit", "fastreg_build", "python", "platform", "loadavg",
    "sweep", "N", "D", "V", "dtype", "reduction", "bias", "provider", "status", "note",
    "median_ms", "min_ms", "max_ms", "spread", "repeats", "tflops", "x_floor", "speedup_vs_eager",
    "peak_extra_bytes", "mem_vs_eager", "memory_method", "err_loss", "err_dx", "err_dw", "err_db",
    "tol_loss", "tol_dx", "tol_dw", "tol_db", "first_call_s",
]

TABLE_COLUMNS = [
    ("size", lambda r: f"{r['N']}x{r['D']}x{r['V']}"),
    ("provider", "provider"),
    ("status", "status"),
    ("median ms", lambda r: C.fmt(r.get("median_ms"), ".2f")),
    ("spread", lambda r: C.fmt(r.get("spread") * 100 if r.get("spread") is not None else None, ".0f") + "%"
     if r.get("spread") is not None else "-"),
    ("TFLOP/s", lambda r: C.fmt(r.get("tflops"), ".3f")),
    ("x floor", lambda r: C.fmt(r.get("x_floor"), ".2f")),
    ("vs eager", lambda r: C.fmt(r.get("speedup_vs_eager"), ".2f") + "x" if r.get("speedup_vs_eager") else "-"),
    ("peak extra", lambda r: C.human_bytes(r.get("peak_extra_bytes"))),
    ("mem/eager", lambda r: C.fmt(r.get("mem_vs_eager"), ".2f")),
    ("max err", lambda r: C.fmt(max([r[k] for k in ("err_loss", "err_dx", "err_dw", "err_db") if r.get(k) is not None],
                                    default=None), ".1e")),
    ("note", lambda r: (r.get("note") or "")[:60]),
]


def run(args, prov: dict, out_dir: str, show_progress: bool = True) -> list:
    """The loss part of ``python -m fastreg.bench``: sweeps (or --sizes), CSV, plots, table."""
    from . import plots

    dtype = C.parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    sizes = C.sizes_to_run(args.lce_sizes, default_sweeps(args.device, args.quick), args.sweep)
    sweeps = list(dict.fromkeys(s for names in sizes.values() for s in names))
    names = args.lce_providers
    if not sizes:
        return []
    bar = C.Progress(len(sizes) * len(names), "lce", show_progress)
    rows = []
    for (N, D, V), tags in sizes.items():
        cfg = LCEConfig(N, D, V, dtype, args.reduction, args.bias)
        for r in bench_size(cfg, args.device, names, args.warmup, args.repeats, args.memory,
                            tick=bar.tick, max_time=args.max_time,
                            timed=not getattr(args, "memory_only", False)):
            r.update(prov, sweep=",".join(tags))
            rows.append(r)
    bar.close()
    C.append_csv(f"{out_dir}/lce.csv", rows, CSV_COLUMNS)
    print(f"\n== linear cross-entropy, forward+backward, {C.dtype_name(dtype)}, reduction={args.reduction}"
          f", {prov['device_name']} ==")
    print(C.render_table(rows, TABLE_COLUMNS))
    if args.memory:
        print("memory: " + C.memory_method(args.device))
    if args.plots:
        for sweep in sweeps:
            x_key = {"V": "V", "N": "N"}.get(sweep)
            if x_key is None:
                continue
            sub = [r for r in rows if sweep in r["sweep"].split(",")]
            path = f"{out_dir}/lce-{sweep}-{args.device}-{C.dtype_name(dtype)}.png"
            fixed = "N" if x_key == "V" else "V"
            panels = [] if getattr(args, "memory_only", False) else [("median_ms", "time (ms)", 1.0)]
            if args.memory:
                panels.append(("peak_extra_bytes", "peak extra memory (MiB)", 1 / 2**20))
            plots.plot_sweep(sub, x_key, f"linear cross-entropy fwd+bwd vs {x_key} "
                             f"({fixed}={sub[0][fixed]}, D={sub[0]['D']}, {C.dtype_name(dtype)}, {args.device})",
                             path, panels)
            print(f"plot: {path}")
    return rows
