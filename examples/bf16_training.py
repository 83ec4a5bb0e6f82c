"""Training in pure bf16 with a small learning rate: plain updates stall, stochastic rounding and
fp32 master weights do not.

A bf16 number keeps 8 significant bits, so a parameter w cannot take an update smaller than half
its spacing (about |w| / 512): with a small learning rate most updates round back to w and
training stalls, although the gradients are fine. Two fixes, both inside fastreg's fused optimizer
step:

* ``stochastic_rounding=True``: the updated fp32 value is rounded up or down at random with
  probabilities proportional to its distance from each bf16 neighbour, so tiny updates move the
  parameter *on average* (no extra memory; reproducible random bits from a counter-based
  generator);
* ``master_weights=True``: an fp32 copy of every parameter lives in the optimizer state, takes
  the update and is rounded to bf16 for the model (+4 bytes per parameter).

The model is a multinomial logistic regression on scikit-learn's 8x8 digits (1797 images, 64
standardised pixels, 10 classes), started from random weights of unit scale -- as when
fine-tuning -- and trained with full-batch SGD (lr 0.02) in four ways: fp32 throughout
(reference), bf16 parameters with plain (round-to-nearest) updates, bf16 with stochastic
rounding, bf16 with master weights. The forward pass runs in the parameters' dtype; the printed
training loss is always evaluated in fp32 on the current weights, so the curves compare what
each run has learned.

    python examples/bf16_training.py            # 2000 steps, saves bf16_training.png
    python examples/bf16_training.py --fast     # 1000 steps (used by the tests)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fastreg.optim

MODES = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16 + stochastic rounding": (torch.bfloat16, {"stochastic_rounding": True}),
    "bf16 + master weights": (torch.bfloat16, {"master_weights": True}),
}
TOLERANCE = 0.02  # stochastic rounding and master weights end within 2 % of the fp32 run's loss


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-3)  # some border pixels are always 0
    return X, torch.tensor(digits.target, dtype=torch.int64)


def train(mode: str, X: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.02,
          points: int = 10) -> list[tuple[int, float]]:
    """Trains one model; returns (step, fp32 training loss) at `points` + 1 evenly spaced steps."""
    dtype, options = MODES[mode]
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(10, X.shape[1], generator=g)).to(dtype))
    bias = torch.nn.Parameter(torch.zeros(10, dtype=dtype))
    torch.manual_seed(0)  # the stochastic-rounding seed is drawn from torch's default generator
    opt = fastreg.optim.SGD([weight, bias], lr=lr, **options)
    X_model = X.to(dtype)
    every = max(steps // points, 1)
    curve = []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            with torch.no_grad():
                curve.append((step, F.cross_entropy(X @ weight.float().t() + bias.float(), y).item()))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        F.cross_entropy((X_model @ weight.t() + bias).float(), y).backward()
        opt.step()
    return curve


def plot(curves: dict[str, list[tuple[int, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (mode, curve), style in zip(curves.items(), ("-", "--", "-.", ":")):
        ax.plot([s for s, _ in curve], [v for _, v in curve], style, label=mode, linewidth=2)
    ax.set_xlabel("SGD step (full batch, lr 0.02)")
    ax.set_ylabel("training loss (evaluated in fp32)")
    ax.set_yscale("log")
    ax.set_title("Digits logistic regression with bf16 parameters")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="1000 steps instead of 2000 (for the tests)")
    parser.add_argument("--png", default="bf16_training.png", help="where to save the plot ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    steps = 1000 if args.fast else 2000
    X, y = load_data()
    curves = {mode: train(mode, X, y, steps) for mode in MODES}

    print(f"training loss (fp32 evaluation) every {curves['fp32'][1][0]} steps:")
    print(f"{'step':>6} " + " ".join(f"{m:>27}" for m in MODES))
    for i, (step, _) in enumerate(curves["fp32"]):
        print(f"{step:>6} " + " ".join(f"{curves[m][i][1]:>27.4f}" for m in MODES))
    reference = curves["fp32"][-1][1]
    print()
    for mode in MODES:
        final = curves[mode][-1][1]
        print(f"final loss {mode:<27} {final:.4f}  ({(final - reference) / reference:+.1%} vs fp32)")
    for mode in ("bf16 + stochastic rounding", "bf16 + master weights"):
        final = curves[mode][-1][1]
        ok = abs(final - reference) <= TOLERANCE * reference
        print(f"{mode}: {'within' if ok else 'NOT within'} {TOLERANCE:.0%} of fp32")
    stalled = curves["bf16"][-1][1] > (1 + TOLERANCE) * reference
    print(f"plain bf16: {'stalls' if stalled else 'does not stall'} "
          f"({curves['bf16'][-1][1] / reference:.2f}x the fp32 loss)")
    if args.png:
        plot(curves, args.png)
        print(f"plot saved to {args.png}")


if __name__ == "__main__":
    main()
