"""fastreg.sklearn against scikit-learn (``python -m fastreg.bench --ops sklearn``).

Whole fits with default settings on both sides, each fit in its own fresh interpreter:
``LogisticRegression()`` of fastreg.sklearn and of scikit-learn on growing class counts (and
``Ridge()`` on a multi-output problem), timed to the end of ``fit``, with the peak resident-memory
growth of the fit and the objective reached.

Data flows: the parent starts one child per (case, provider) with :func:`common.run_child`; the
child imports everything, builds the data (Gaussian class centres + noise, fixed seed; the same
float64 -- or float32 -- numpy array for both sides), records its resident set (VmRSS) as the
baseline, resets the high-water mark (``/proc/self/clear_refs``; without it a thread samples
VmRSS every 5 ms), fits, and reports ``VmHWM - baseline``: everything the fit made resident,
including what stays cached afterwards (fastreg's CPU block cache keeps freed buffers resident;
its size after the fit is reported as ``fastreg_cache_mb`` and is part of the growth, not
subtracted). Only after that measurement does the child evaluate the objective of the fitted
coefficients on scikit-learn's scale (``fastreg.sklearn.objective_value``, float64). The parent
writes <out>/sklearn.csv, prints a side-by-side table with the issue's bars and plots
<out>/sklearn-cpu.png (time and memory against the number of classes).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

from . import common as C

CSV_COLUMNS = ["case", "estimator", "provider", "dtype", "n", "d", "classes", "fit_s", "n_iter", "objective",
               "objective_rel_vs_sklearn", "peak_rss_growth_mb", "fastreg_cache_mb", "speedup_vs_sklearn",
               "rss_vs_sklearn", "memory_method", "threads", "date", "device_name", "torch", "fastreg_commit",
               "python", "loadavg"]

# (case name, estimator, n, d, classes or outputs, dtype); the issue's two sizes, then the sweep
ISSUE_CASES = [("issue-200", "logistic", 50_000, 64, 200, "float64"),
               ("issue-1000", "logistic", 30_000, 64, 1000, "float64")]
SWEEP = [(f"sweep-{v}", "logistic", 30_000, 64, v, "float64") for v in (10, 100)]
EXTRA = [("issue-1000-f32", "logistic", 30_000, 64, 1000, "float32"),
         ("ridge", "ridge", 200_000, 64, 16, "float64")]
QUICK = [("quick-20", "logistic", 3_000, 16, 20, "float64"), ("quick-ridge", "ridge", 5_000, 16, 4, "float64")]
PROVIDERS = ("fastreg", "sklearn")


# --------------------------------------------------------------------------------------- child
def _data(estimator: str, n: int, d: int, k: int, dtype: str):
    import numpy as np
    rng = np.random.RandomState(0)
    if estimator == "logistic":
        centres = rng.randn(k, d)
        y = rng.randint(0, k, size=n)
        X = centres[y] + 2.0 * rng.randn(n, d)
    else:
        X = rng.randn(n, d)
        y = X @ rng.randn(d, k) + 0.5 * rng.randn(n, k)
    return X.astype(dtype), y


_kib = C._proc_status_kib  # KiB of a /proc/self/status field


class _PeakRSS:
    """Peak resident set while the block runs, minus the resident set before it (KiB)."""

    def __enter__(self):
        import gc
        gc.collect()
        self.base = _kib("VmRSS")
        self.peak = self.base
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the high-water mark restarts from the current resident set
            self.method = "VmHWM after clear_refs, minus VmRSS before the fit"
            self.thread = None
        except OSError:
            self.method = "VmRSS sampled every 5 ms, max minus the value before the fit"
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _kib("VmRSS"))
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.thread is None:
            self.peak = _kib("VmHWM")
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, _kib("VmRSS"))
        self.growth_kib = max(0, self.peak - self.base)
        return False


def child(spec: dict) -> dict:
    import numpy as np
    import torch
    import warnings
    from sklearn import linear_model as sk
    from sklearn.exceptions import ConvergenceWarning

    import fastreg
    from fastreg import sklearn as fs

    X, y = _data(spec["estimator"], spec["n"], spec["d"], spec["classes"], spec["dtype"])
    if spec["estimator"] == "logistic":
        est = fs.LogisticRegression() if spec["provider"] == "fastreg" else sk.LogisticRegression()
    else:
        est = fs.Ridge() if spec["provider"] == "fastreg" else sk.Ridge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            est.fit(X, y)
            fit_s = time.perf_counter() - t0
    out = {"fit_s": fit_s, "peak_rss_growth_mb": mem.growth_kib / 1024, "memory_method": mem.method,
           "threads": torch.get_num_threads(),
           "fastreg_cache_mb": fastreg.cpu_cache_info()["cached_bytes"] / 2**20}
    if spec["estimator"] == "logistic":
        out["objective"] = fs.objective_value(est, X, y)
        out["n_iter"] = int(np.asarray(est.n_iter_).max())
    else:
        coef = np.atleast_2d(est.coef_).astype(np.float64)
        resid = y - X.astype(np.float64) @ coef.T - np.asarray(est.intercept_, dtype=np.float64)
        out["objective"] = float((resid ** 2).sum() + est.alpha * (coef ** 2).sum())
        out["n_iter"] = 1
    return out


# --------------------------------------------------------------------------------------- parent
def _cases(args) -> list:
    return QUICK if args.quick else ISSUE_CASES + SWEEP + EXTRA


def bars(rows: list) -> list:
    """The issue's pass/fail targets: (text, passed, value)."""
    by = {(r["case"], r["provider"]): r for r in rows}
    out = []
    for case, _, n, d, v, _ in ISSUE_CASES:
        f, s = by.get((case, "fastreg")), by.get((case, "sklearn"))
        if not (f and s) or "error" in f or "error" in s:
            continue
        speed = s["fit_s"] / f["fit_s"]
        rel = (f["objective"] - s["objective"]) / abs(s["objective"])
        out.append((f"{n}x{d}x{v}: fastreg >= 3x faster than scikit-learn", speed >= 3, f"{speed:.1f}x"))
        out.append((f"{n}x{d}x{v}: objective no worse than scikit-learn's (1e-4 rel.)", rel <= 1e-4, f"{rel:+.2e}"))
        if v >= 1000:
            mem = f["peak_rss_growth_mb"] / max(s["peak_rss_growth_mb"], 1e-9)
            out.append((f"{n}x{d}x{v}: peak RSS growth <= 1/3 of scikit-learn's", mem <= 1 / 3,
                        f"{f['peak_rss_growth_mb']:.0f} MB vs {s['peak_rss_growth_mb']:.0f} MB ({mem:.2f}x)"))
    return out


def run(args, prov: dict, out_dir: str, show_progress: bool = True) -> list:
    cases = _cases(args)
    print(f"\n== fastreg.sklearn vs scikit-learn, default settings, one fresh process per fit "
          f"({prov['device_name']}) ==")
    bar = C.Progress(len(cases) * len(PROVIDERS), "sklearn", show_progress)
    rows = []
    for case, estimator, n, d, k, dtype in cases:
        pair = []
        for provider in PROVIDERS:
            spec = {"case": case, "estimator": estimator, "provider": provider, "n": n, "d": d, "classes": k,
                    "dtype": dtype}
            res = C.run_child(["-m", "fastreg.bench.sklearn_bench", json.dumps(spec)], timeout=1800)
            pair.append({**prov, **spec, **res})
            bar.tick()
        s = pair[-1]
        for r in pair:
            if "error" not in s and "error" not in r:
                r["objective_rel_vs_sklearn"] = (r["objective"] - s["objective"]) / abs(s["objective"])
                r["speedup_vs_sklearn"] = s["fit_s"] / r["fit_s"]
                r["rss_vs_sklearn"] = r["peak_rss_growth_mb"] / max(s["peak_rss_growth_mb"], 1e-9)
        C.append_csv(os.path.join(out_dir, "sklearn.csv"), pair, CSV_COLUMNS)  # case by case: a long run keeps its results
        rows += pair
    bar.close()
    columns = [("case", "case"), ("estimator", "estimator"), ("provider", "provider"), ("dtype", "dtype"),
               ("n x d x k", lambda r: f"{r['n']}x{r['d']}x{r['classes']}"),
               ("fit s", lambda r: C.fmt(r.get("fit_s"), ".3g")), ("iters", "n_iter"),
               ("speedup", lambda r: C.fmt(r.get("speedup_vs_sklearn"), ".3g")),
               ("objective", lambda r: C.fmt(r.get("objective"), ".8g")),
               ("rel. to sklearn", lambda r: C.fmt(r.get("objective_rel_vs_sklearn"), "+.1e")),
               ("peak RSS growth MB", lambda r: C.fmt(r.get("peak_rss_growth_mb"), ".4g")),
               ("x sklearn's", lambda r: C.fmt(r.get("rss_vs_sklearn"), ".3g")),
               ("fastreg cache MB", lambda r: C.fmt(r.get("fastreg_cache_mb"), ".3g")),
               ("error", lambda r: r.get("error", ""))]
    print(C.render_table(rows, columns))
    print("(speedup: scikit-learn's fit time / this one's; objective: C sum log_loss + |W|^2/2 of the fitted "
          "coefficients, float64 (Ridge: sum of squares + alpha |W|^2); peak RSS growth: the fit's high-water "
          "mark above the resident set before it, fastreg's block cache included)")
    if not args.quick:
        C.print_bars("bars (issue: scikit-learn estimators):", bars(rows))
    if args.plots:
        path = os.path.join(out_dir, "sklearn-cpu.png")
        plot(rows, path)
        print(f"plot: {path}")
    return rows


def plot(rows: list, path: str) -> None:
    from .plots import plot_sweep
    sweep = [dict(r, provider=f"{r['provider']} LogisticRegression") for r in rows
             if r["estimator"] == "logistic" and r["dtype"] == "float64" and r["d"] == 64 and r["n"] == 30_000
             and "error" not in r]
    if not sweep:
        return
    plot_sweep(sweep, "classes", f"LogisticRegression() fit, 30,000 x 64, float64, default settings "
               f"({rows[0]['device_name']})", path,
               [("fit_s", "fit time (s)", 1.0), ("peak_rss_growth_mb", "peak RSS growth (MB)", 1.0)],
               x_label="classes")


if __name__ == "__main__":
    C.report_to_parent(child(json.loads(sys.argv[1])))
