"""Each example runs in fast mode as a fresh process and says what it should."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), "--fast", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_linear_regression_crop_yields():
    out = run_example("linear_regression.py")
    losses = [float(m) for m in re.findall(r"^epoch\s+\d+/\d+\s+loss\s+([\d.]+)", out, re.M)]
    assert len(losses) == 40
    # SGD on the crop-yield data: the epoch loss falls by an order of magnitude and keeps falling
    assert losses[-1] < 0.2 * losses[0]
    assert min(losses[-5:]) < min(losses[:5])
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 0.7 * (len(losses) - 1)
    full = float(re.search(r"mean squared error on all 15 regions: ([\d.]+)", out).group(1))
    assert full < 0.2 * losses[0]
    rows = re.findall(r"^\s+(apples|oranges)\s+([-+\d.\s]+)$", out, re.M)
    assert [r[0] for r in rows] == ["apples", "oranges"]
    assert all(len(r[1].split()) == 3 for r in rows)
    # the fitted model predicts sensible yields for the new region (actual data: ~56 apples, ~70 oranges)
    apples, oranges = map(float, re.search(r"([\d.]+) t/ha apples, ([\d.]+) t/ha oranges", out).groups())
    assert 30 < apples < 90 and 40 < oranges < 110
    # LinearRegression.score and the same training through fit() (the loop in C++)
    r2 = float(re.search(r"R\^2 on all 15 regions: ([-\d.]+)", out).group(1))
    assert 0.5 < r2 <= 1
    epochs, last, r2_fit = re.search(r"fit\(\): (\d+) epochs, last epoch loss ([\d.]+), R\^2 ([-\d.]+)", out).groups()
    assert int(epochs) == 40 and float(last) < 0.2 * losses[0]
    assert abs(float(r2_fit) - r2) < 0.15


def test_logistic_regression_digits():
    out = run_example("logistic_regression_digits.py")
    acc = float(re.search(r"test accuracy: ([\d.]+)", out).group(1))
    assert acc >= 0.95, out[-2000:]
    assert "parameter weight shape (10, 64)" in out and "parameter bias   shape (10,)" in out
    assert "trainable parameters: 650" in out and "trainable parameters now 640" in out
    assert "bias unchanged while frozen: True" in out
    val = [float(v) for v in re.findall(r"val loss ([\d.]+)", out)]
    assert len(val) >= 10  # fit() reported every epoch through its callback
    best = float(re.search(r"best validation loss ([\d.]+)", out).group(1))
    assert best == pytest.approx(min(val), abs=2e-4)  # early stopping restored the best epoch
    assert val[-1] < val[0]


def test_lm_head_memory():
    out = run_example("lm_head_memory.py", "--device", "cpu")
    diff = float(re.search(r"difference ([\d.e+-]+)", out).group(1))
    assert diff < 1e-4
    grad = float(re.search(r"largest relative gradient difference over all parameters: ([\d.e+-]+)", out).group(1))
    assert grad < 1e-4
    eager, fused = map(float, re.search(r"eager ([\d.]+) MiB, fastreg ([\d.]+) MiB", out).groups())
    logits = float(re.search(r"the logits alone take ([\d.]+) MiB", out).group(1))
    # the eager step holds at least the logits; fastreg saves most of one logits-sized buffer (at
    # 128 tokens its one chunk of logits is all of them; measured: 0.9 of the logits' size)
    assert eager > logits
    assert eager - fused > 0.75 * logits, out
    # the tied embedding's two gradients, the head's (from fastreg's op) and the embedding's, are
    # alive together before autograd sums them: a measurement that lets fastreg's cache of freed
    # buffers keep the head's out of sight reads about half this
    embedding_grad = 50_257 * 256 * 4 / 2**20
    assert fused >= 2 * embedding_grad, out
