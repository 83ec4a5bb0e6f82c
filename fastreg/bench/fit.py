"""Whole-fit benchmark of the small models (``python -m fastreg.bench --ops fit``).

Three problems, each fitted from scratch by every provider, side by side in one run (repeats
interleaved, median time), with the model's quality next to its time:
  digits     load_digits, 75/25 split, standardised; multinomial logistic regression; test accuracy
  crops      the crop-yield toy set of examples/linear_regression.py (15 x 3 -> 2), standardised
             inputs; R^2 on the 15 rows (there is nothing to hold out)
  synthetic  100,000 x 100 -> 10 outputs, y = X W^T + b + noise (sigma 0.5); R^2 on 20,000 held-out rows
Providers: ``fit`` (fastreg's C++ fit() with fastreg.optim.Adam), ``torch`` (the same mini-batch
loop in Python: nn.Linear + F.cross_entropy / F.mse_loss + torch.optim.Adam(fused=True), same
epochs, batch size, lr and shuffling), and scikit-learn's LogisticRegression / SGDClassifier
(log-loss) or LinearRegression / SGDRegressor (one per output, as many epochs as the others).
Before any timing, fit() is checked against the same loop written in Python with fastreg's ops and
the same generator. Results: <out>/fit.csv (with provenance), a table with each provider's time
relative to fit(), the issue's bars, and <out>/fit-cpu.png.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import common as C

CSV_COLUMNS = ["problem", "provider", "doc", "epochs", "batch_size", "lr", "n_train", "features", "outputs",
               "median_ms", "min_ms", "cpu_ms", "repeats", "metric", "value", "time_vs_fit", "date", "device_name", "torch",
               "fastreg_commit", "python", "loadavg"]
TABLE_COLUMNS = [("problem", "problem"), ("provider", "provider"), ("time ms", lambda r: C.fmt(r["median_ms"], ".4g")),
                 ("x fit's time", lambda r: C.fmt(r["time_vs_fit"], ".3g")),
                 ("cpu ms", lambda r: C.fmt(r["cpu_ms"], ".4g")), ("metric", "metric"),
                 ("value", lambda r: C.fmt(r["value"], ".4f")), ("what", "doc")]

CROP_X = [[73, 67, 43], [91, 88, 64], [87, 134, 58], [102, 43, 37], [69, 96, 70], [74, 66, 43], [91, 87, 65],
          [88, 134, 59], [101, 44, 37], [68, 96, 71], [73, 66, 44], [92, 87, 64], [87, 135, 57], [103, 43, 36],
          [68, 97, 70]]
CROP_Y = [[56, 70], [81, 101], [119, 133], [22, 37], [103, 119], [57, 69], [80, 102], [118, 132], [21, 38],
          [104, 118], [57, 69], [82, 100], [118, 134], [20, 38], [102, 120]]


@dataclass
class Problem:
    name: str
    kind: str            # "classification" or "regression"
    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    epochs: int
    batch_size: int
    lr: float
    metric: str


def _standardise(X_train, *others):
    mean, std = X_train.mean(0), X_train.std(0).clamp_min(1e-3)
    return [(x - mean) / std for x in (X_train, *others)]


def problems(quick: bool) -> list[Problem]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target),
                                          test_size=0.25, random_state=0)
    Xtr, Xte = _standardise(Xtr, Xte)
    out = [Problem("digits", "classification", Xtr, ytr, Xte, yte, 10 if quick else 100, 64, 1e-2, "test accuracy")]
    Xc = torch.tensor(CROP_X, dtype=torch.float32)
    yc = torch.tensor(CROP_Y, dtype=torch.float32)
    (Xc,) = _standardise(Xc)
    out.append(Problem("crops", "regression", Xc, yc, Xc, yc, 50 if quick else 500, 5, 0.5, "R^2 (train)"))
    n, n_test = (5_000, 1_000) if quick else (100_000, 20_000)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n + n_test, 100, generator=g)
    W = torch.randn(10, 100, generator=g)
    b = torch.randn(10, generator=g)
    y = X @ W.T + b + 0.5 * torch.randn(n + n_test, 10, generator=g)
    out.append(Problem("synthetic", "regression", X[:n], y[:n], X[n:], y[n:], 2 if quick else 10, 1000, 3e-2,
                       "R^2 (test)"))
    return out


# ---- providers: each returns a predict function after fitting ------------------------------------

def _fastreg_fit(p: Problem, seed: int):
    import fastreg
    torch.manual_seed(seed)
    if p.kind == "classification":
        model = fastreg.nn.MultinomialLogisticRegression(p.X.shape[1], int(p.y.max()) + 1)
    else:
        model = fastreg.nn.LinearRegression(p.X.shape[1], p.y.shape[1])
    opt = fastreg.optim.Adam(model.parameters(), lr=p.lr)
    model.fit(p.X, p.y, optimizer=opt, epochs=p.epochs, batch_size=p.batch_size,
              generator=torch.Generator().manual_seed(seed))
    return model.predict


def _torch_loop(p: Problem, seed: int):
    torch.manual_seed(seed)
    out = int(p.y.max()) + 1 if p.kind == "classification" else p.y.shape[1]
    model = nn.Linear(p.X.shape[1], out)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr, fused=True)
    loss_fn = F.cross_entropy if p.kind == "classification" else F.mse_loss
    g = torch.Generator().manual_seed(seed)
    n = len(p.X)
    for _ in range(p.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, p.batch_size):
            idx = perm[i:i + p.batch_size]
            loss = loss_fn(model(p.X[idx]), p.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def predict(X):
        with torch.no_grad():
            z = model(X)
        return z.argmax(1) if p.kind == "classification" else z
    return predict


def _sklearn(make: Callable, multi_output: bool = False):
    def run(p: Problem, seed: int):
        est = make(p, seed)
        X, y = p.X.numpy(), p.y.numpy()
        if multi_output:
            from sklearn.multioutput import MultiOutputRegressor
            est = MultiOutputRegressor(est)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning of the fixed-epoch SGD estimators
            est.fit(X, y)
        return lambda X_: torch.as_tensor(est.predict(X_.numpy()))
    return run


def _providers(kind: str) -> dict:
    from sklearn.linear_model import LinearRegression, LogisticRegression, SGDClassifier, SGDRegressor

    common = {
        "fit": (_fastreg_fit, "fastreg Model.fit(): the loop in C++, fastreg.optim.Adam"),
        "torch": (_torch_loop, "Python loop: nn.Linear + F loss + torch.optim.Adam(fused=True)"),
    }
    if kind == "classification":
        return {**common,
                "sk-logistic": (_sklearn(lambda p, s: LogisticRegression()), "sklearn LogisticRegression() (lbfgs)"),
                "sk-sgd": (_sklearn(lambda p, s: SGDClassifier(loss="log_loss", random_state=s)),
                           "sklearn SGDClassifier(loss='log_loss'), defaults")}
    return {**common,
            "sk-linear": (_sklearn(lambda p, s: LinearRegression()), "sklearn LinearRegression() (exact least squares)"),
            "sk-sgd": (_sklearn(lambda p, s: SGDRegressor(max_iter=p.epochs, tol=None, random_state=s),
                                multi_output=True),
                       "sklearn SGDRegressor(max_iter=epochs), one per output")}


def quality(p: Problem, predict) -> float:
    pred = predict(p.X_test)
    if p.kind == "classification":
        return float((pred == p.y_test).double().mean())
    y = p.y_test.double()
    pred = pred.double().reshape(y.shape)
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return float((1 - ss_res / ss_tot).mean())


FIT_GATE = C.error_gate(0.0, C.rounding_floor(torch.float32, 64))
"""fit() against the same loop in Python, both float32 on the same ops: twice the float32
rounding floor of the check's longest sum (64 rows a batch, 64 features)."""


def check_fit_equals_python_loop() -> float:
    """Largest relative parameter difference between fit() and the same loop in Python with
    fastreg's ops, optimizer and generator (2 epochs of digits-sized data)."""
    import fastreg
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 64, generator=g)
    y = torch.randint(0, 10, (300,), generator=g)
    torch.manual_seed(0)
    a = fastreg.nn.MultinomialLogisticRegression(64, 10)
    b = fastreg.nn.MultinomialLogisticRegression(64, 10)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = fastreg.optim.Adam(a.parameters(), lr=1e-2), fastreg.optim.Adam(b.parameters(), lr=1e-2)
    a.fit(X, y, optimizer=opt_a, epochs=2, batch_size=64, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        perm = torch.randperm(300, generator=gen)
        for i in range(0, 300, 64):
            idx = perm[i:i + 64]
            loss = b.loss(X[idx], y[idx])
            opt_b.zero_grad()
            loss.backward()
            opt_b.step()
    return max(C.rel_err(pa.detach(), pb.detach()) for pa, pb in zip(a.parameters(), b.parameters()))


def bars(rows: list) -> list[tuple[str, bool, str]]:
    """The issue's whole-fit bars, from the rows of one run."""
    by = {(r["problem"], r["provider"]): r for r in rows}
    out = []

    def ratio(problem, other):
        r, f = by.get((problem, other)), by.get((problem, "fit"))
        return r["median_ms"] / f["median_ms"] if r and f else math.nan

    if ("digits", "fit") in by:
        t, s = ratio("digits", "torch"), ratio("digits", "sk-logistic")
        acc = by[("digits", "fit")]["value"]
        out.append(("digits fit() >= 10x faster than the torch loop", t >= 10, f"{t:.1f}x"))
        out.append(("digits fit() >= 5x faster than sklearn LogisticRegression()", s >= 5, f"{s:.1f}x"))
        out.append(("digits fit() test accuracy >= 96 %", acc >= 0.96, f"{100 * acc:.2f} %"))
    if ("synthetic", "fit") in by and ("synthetic", "sk-linear") in by:
        t = ratio("synthetic", "torch")
        gap = abs(by[("synthetic", "fit")]["value"] - by[("synthetic", "sk-linear")]["value"])
        out.append(("synthetic fit() R^2 within 1e-3 of sklearn LinearRegression", gap <= 1e-3, f"gap {gap:.2e}"))
        out.append(("synthetic fit() >= 3x faster than the torch loop", t >= 3, f"{t:.1f}x"))
    return out


def run(args, prov: dict, out_dir: str, show_progress: bool = True) -> list:
    """The whole-fit part of ``python -m fastreg.bench``."""
    err = check_fit_equals_python_loop()
    ok = err <= FIT_GATE
    print(f"\n== whole fits, {prov['device_name']} ==\ncorrectness: fit() vs the same loop in Python with fastreg "
          f"ops and generator: max rel. parameter difference {err:.2e} -> {'ok' if ok else 'WRONG'}")
    if not ok:
        print("fit() is WRONG: not timing it")
        return []
    probs = problems(args.quick)
    repeats = 1 if args.quick else 3
    tasks = [(p, name, fn, doc) for p in probs for name, (fn, doc) in _providers(p.kind).items()]
    # Warm-up, untimed: one-time costs (the first torch.optim optimizer imports ~1 s of modules,
    # sklearn's first fit) are nobody's fit time.
    for p in problems(quick=True):
        for fn, _ in _providers(p.kind).values():
            fn(p, 0)
    bar = C.Progress(len(tasks) * repeats, "fit", show_progress)
    samples = {(p.name, name): [] for p, name, _, _ in tasks}
    cpu = {(p.name, name): [] for p, name, _, _ in tasks}
    values = {}
    for rep in range(repeats):  # interleaved: every provider once per round
        for p, name, fn, _ in tasks:
            c0 = time.process_time()
            t = C.time_fn(lambda: values.__setitem__((p.name, name), fn(p, rep)), "cpu", 0, 1)
            cpu[(p.name, name)].append((time.process_time() - c0) * 1e3)
            samples[(p.name, name)].append(t.samples[0])
            bar.tick()
    bar.close()
    rows = []
    for p, name, _, doc in tasks:
        timing = C.Timing(samples[(p.name, name)])
        rows.append({**prov, "problem": p.name, "provider": name, "doc": doc, "epochs": p.epochs,
                     "batch_size": p.batch_size, "lr": p.lr, "n_train": len(p.X), "features": p.X.shape[1],
                     "outputs": int(p.y.max()) + 1 if p.kind == "classification" else p.y.shape[1],
                     "median_ms": timing.median, "min_ms": timing.min, "repeats": len(timing.samples),
                     "cpu_ms": statistics.median(cpu[(p.name, name)]),
                     "metric": p.metric, "value": quality(p, values[(p.name, name)])})
    for r in rows:
        fit_ms = next(x["median_ms"] for x in rows if x["problem"] == r["problem"] and x["provider"] == "fit")
        r["time_vs_fit"] = r["median_ms"] / fit_ms
    C.append_csv(f"{out_dir}/fit.csv", rows, CSV_COLUMNS)
    print(C.render_table(rows, TABLE_COLUMNS))
    print("(x fit's time: each provider's median wall time divided by fit()'s, same run, interleaved; "
          f"{repeats} repeat(s); torch threads {torch.get_num_threads()}; cpu ms: the process's CPU time, all "
          "threads, which a loaded machine inflates less than wall time)")
    if not args.quick:
        C.print_bars("bars (issue 15):", bars(rows))
    if args.plots:
        path = f"{out_dir}/fit-cpu.png"
        plot(rows, path)
        print(f"plot: {path}")
    return rows


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 4.0), squeeze=False)
    for ax, problem in zip(axes[0], names):
        sub = [r for r in rows if r["problem"] == problem]
        bars_ = ax.bar([r["provider"] for r in sub], [r["median_ms"] for r in sub],
                       color=["tab:green" if r["provider"] == "fit" else "tab:gray" for r in sub])
        for b, r in zip(bars_, sub):
            ax.annotate(f"{r['value']:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("fit time (ms, median)")
        ax.set_title(f"{problem}: {sub[0]['epochs']} epochs, batch {sub[0]['batch_size']}\n(labels: {sub[0]['metric']})",
                     fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
