"""Small models: per-call latency where fixed costs, not arithmetic, decide (``--ops small``).

Three sections, each fastreg beside eager PyTorch in one interleaved run:

* ``ce``   fused loss forward+backward, ``fastreg.linear_cross_entropy`` vs
           ``F.cross_entropy(F.linear(...))``, sizes from tiny (16 x 3 x 2) to large;
* ``mse``  the same for ``fastreg.linear_mse_loss`` vs ``F.mse_loss(F.linear(...))``;
* ``step`` a whole training step (``zero_grad``, loss, ``backward``, Adam ``step``):
           ``fastreg.nn.MultinomialLogisticRegression`` (or weight/bias + ``linear_mse_loss``) with
           ``fastreg.optim.Adam`` vs ``nn.Linear`` + the eager loss + ``torch.optim.Adam(fused=True)``.

Every case first checks fastreg against eager in float64 (loss and gradients; a step compares the
updated parameters), then times both alternately: each sample is the mean of ``inner`` calls,
the reported figure the median of the samples. Rows go to <out>/small.csv, a plot to
<out>/small-<device>.png.
"""
from __future__ import annotations

import itertools
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from . import common as C

SIZES = [(16, 3, 2), (128, 3, 2), (64, 64, 10), (256, 100, 10), (1024, 64, 10), (4096, 256, 32), (2048, 512, 1000)]
QUICK_SIZES = [(16, 3, 2), (64, 64, 10), (1024, 64, 10)]
STEP_SIZES = [(64, 64, 10), (128, 3, 2)]
SECTIONS = ("ce", "mse", "step")
CSV_COLUMNS = ["section", "loss", "N", "D", "V", "provider", "status", "us_per_call", "ratio_vs_eager", "rel_err",
               "samples", "inner", "date", "device_name", "torch", "fastreg_commit", "loadavg"]


def _data(N, D, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    w = (torch.randn(V, D, generator=g, dtype=dtype) / D ** 0.5)
    b = torch.randn(V, generator=g, dtype=dtype) * 0.1
    t = torch.randint(0, V, (N,), generator=g)
    y = torch.randn(N, V, generator=g, dtype=dtype)
    return x, w, b, t, y


def loss_fns(loss: str):
    """(fastreg, eager) callables f(x, w, b, target) -> loss."""
    import fastreg
    if loss == "ce":
        return (lambda x, w, b, t: fastreg.linear_cross_entropy(x, w, t, linear_bias=b),
                lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b), t))
    return (lambda x, w, b, y: fastreg.linear_mse_loss(x, w, y, linear_bias=b),
            lambda x, w, b, y: F.mse_loss(F.linear(x, w, b), y))


def loss_case(loss: str, N: int, D: int, V: int, dtype=torch.float32):
    """Providers' fwd+bwd closures and a float64 correctness error of fastreg against eager."""
    ours, eager = loss_fns(loss)
    x, w, b, t, y = _data(N, D, V, torch.float64)
    tgt = t if loss == "ce" else y

    def grads(fn, x, w, b, tgt):
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        out = fn(*leaves, tgt)
        return [out.detach()] + list(torch.autograd.grad(out, leaves))

    err = max(C.rel_err(a, r) for a, r in zip(grads(ours, x, w, b, tgt), grads(eager, x, w, b, tgt)))
    x, w, b = (a.to(dtype).requires_grad_() for a in (x, w, b))
    tgt = tgt if loss == "ce" else tgt.to(dtype)

    def make(fn):
        def call():
            for a in (x, w, b):
                a.grad = None
            fn(x, w, b, tgt).backward()
        return call
    return {"fastreg": make(ours), "eager": make(eager)}, err


def step_case(loss: str, N: int, D: int, V: int, dtype=torch.float32):
    """Training-step closures (fastreg model + optimizer vs torch) and the float64 parameter error
    after three identical steps."""
    import fastreg
    x, w0, b0, t, y = _data(N, D, V, torch.float64)
    tgt = t if loss == "ce" else y

    def build(kind, dt):
        if kind == "fastreg":
            if loss == "ce":
                model = fastreg.nn.MultinomialLogisticRegression(D, V, dtype=dt)
                params = [model.weight, model.bias]
                fwd = lambda xb, tb: model.loss(xb, tb)  # noqa: E731
            else:
                model = nn.Module()
                model.weight, model.bias = nn.Parameter(torch.empty(V, D, dtype=dt)), nn.Parameter(torch.empty(V, dtype=dt))
                params = [model.weight, model.bias]
                fwd = lambda xb, yb: fastreg.linear_mse_loss(xb, model.weight, yb, linear_bias=model.bias)  # noqa: E731
            opt = fastreg.optim.Adam(params, lr=1e-2)
        else:
            model = nn.Linear(D, V, dtype=dt)
            params = [model.weight, model.bias]
            lossf = F.cross_entropy if loss == "ce" else F.mse_loss
            fwd = lambda xb, tb: lossf(model(xb), tb)  # noqa: E731
            opt = torch.optim.Adam(params, lr=1e-2, fused=True)
        with torch.no_grad():
            params[0].copy_(w0), params[1].copy_(b0)
        xb, tb = x.to(dt), (tgt if loss == "ce" else tgt.to(dt))

        def step():
            opt.zero_grad()
            fwd(xb, tb).backward()
            opt.step()
        return step, params

    got, want = build("fastreg", torch.float64), build("eager", torch.float64)
    for _ in range(3):
        got[0](), want[0]()
    err = max(C.rel_err(a.detach(), r.detach()) for a, r in zip(got[1], want[1]))
    return {"fastreg": build("fastreg", dtype)[0], "eager": build("eager", dtype)[0]}, err


def time_interleaved(fns: dict, inner: int, samples: int, warmup: int = 20) -> dict:
    """Median seconds per call of each closure, the providers taking turns sample by sample."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(samples):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def float64_gate(N: int, D: int, V: int) -> float:
    """fastreg against eager, both float64 (eager is the reference here): each is within one
    float64 rounding floor of the exact result, so they may differ by twice that."""
    return C.error_gate(0.0, C.rounding_floor(torch.float64, max(N, D, V)))


def _inner(N, D, V):
    """Calls per sample: ~2 ms of work per sample at an assumed 1 GFLOP/s, at least 1, at most 200."""
    return int(min(200, max(1, 2e6 / (6 * N * D * V + 2e4))))


def run(args, prov: dict, out_dir: str, show_progress: bool = True) -> list:
    """The small-models part of ``python -m fastreg.bench``."""
    sizes = QUICK_SIZES if args.quick else SIZES
    samples = 5 if args.quick else 15
    cases = [("ce", s, "loss") for s in sizes] + [("mse", s, "loss") for s in sizes]
    cases += [(loss, s, "step") for loss, s in itertools.product(("ce", "mse"), STEP_SIZES)]
    bar = C.Progress(len(cases), "small", show_progress)
    rows = []
    for loss, (N, D, V), kind in cases:
        fns, err = (loss_case if kind == "loss" else step_case)(loss, N, D, V)
        ok = err <= float64_gate(N, D, V)
        per_call = time_interleaved(fns, _inner(N, D, V), samples) if ok else {}
        for name in fns:
            rows.append(dict(prov, section=kind if kind == "step" else loss, loss=loss, N=N, D=D, V=V, provider=name,
                             status=C.OK if ok else C.WRONG, rel_err=err if name == "fastreg" else 0.0,
                             us_per_call=per_call[name] * 1e6 if ok else None,
                             ratio_vs_eager=per_call[name] / per_call["eager"] if ok else None,
                             samples=samples, inner=_inner(N, D, V)))
        bar.tick()
    bar.close()
    C.append_csv(f"{out_dir}/small.csv", rows, CSV_COLUMNS)
    print(f"\n== small models: fastreg vs eager, float32, {prov['device_name']}, load {prov['loadavg']} ==")
    table = []
    for r in rows:
        if r["provider"] != "fastreg":
            continue
        e = next(q for q in rows if q["provider"] == "eager" and all(q[k] == r[k] for k in ("section", "loss", "N", "D", "V")))
        table.append(dict(what=("step " if r["section"] == "step" else "fwd+bwd ") + r["loss"],
                          size=f"{r['N']}x{r['D']}x{r['V']}", fastreg=r["us_per_call"], eager=e["us_per_call"],
                          ratio=r["ratio_vs_eager"], status=r["status"], err=r["rel_err"]))
    print(C.render_table(table, [("case", "what"), ("NxDxV", "size"), ("fastreg us", "fastreg"),
                                 ("eager us", "eager"), ("fastreg/eager", "ratio"), ("check", "status"),
                                 ("fp64 rel err", "err")]))
    print("bars (issue 15): CE fwd+bwd 64x64x10 ratio <= 0.6, no loss size > 1.0; step ratio <= 0.67 (>= 1.5x)")
    if args.plots:
        from . import plots
        pts = [dict(r, work=r["N"] * r["D"] * r["V"], provider=f"{r['provider']} {r['loss']}") for r in rows
               if r["section"] != "step" and r["us_per_call"]]
        path = f"{out_dir}/small-{args.device}.png"
        plots.plot_sweep(pts, "work", "fused linear + loss fwd+bwd, small sizes (float32, cpu)", path,
                         [("us_per_call", "time per call (us)", 1.0), ("ratio_vs_eager", "fastreg / eager", 1.0)],
                         x_label="N x D x V")
        print(f"plot: {path}")
    return rows
