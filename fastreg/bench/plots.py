"""PNG plots of a sweep: one panel per metric, one line per provider, log-log axes."""
from __future__ import annotations

from typing import Sequence


def plot_sweep(rows: Sequence[dict], x_key: str, title: str, path: str,
               metrics: Sequence[tuple], x_label: str | None = None) -> None:
    """``metrics``: (row key, axis label, scale factor). Rows without a value for a metric are skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], metrics):
        drawn = False
        for name in providers:
            pts = sorted((float(r[x_key]), float(r[key]) * scale) for r in rows
                         if r["provider"] == name and r.get(key) not in (None, "") and float(r[key]) > 0)
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "--" if name == "floor" else "-"
            ax.plot(xs, ys, style, marker="o", label=name)
            drawn = True
        ax.set_xscale("log")
        if drawn:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        ax.set_xlabel(x_label or x_key)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
