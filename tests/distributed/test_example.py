"""examples/tensor_parallel_lm_head.py under torchrun (2 CPU processes, --standalone: a free local port)."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tensor_parallel_lm_head_example():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(ROOT, "examples", "tensor_parallel_lm_head.py"), "--fast"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert "lm_head.weight (1001, 32) as DTensor (Shard(dim=0),), local shard (501, 32)" in out
    losses = [float(v) for v in re.findall(r"^step\s+\d+\s+loss ([\d.]+)", out, re.M)]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert float(re.search(r"largest loss difference over 10 steps: ([\d.e+-]+)", out).group(1)) < 1e-4
    assert float(re.search(r"weight difference after training: ([\d.e+-]+)", out).group(1)) < 1e-3
    assert "exp_avg is a DTensor (Shard(dim=0),)" in out


def test_distributed_bench_smoke():
    """python -m fastreg.bench --distributed at a small size: every provider correct, the ratios printed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "fastreg.bench", "--distributed", "--sizes", "128x32x501", "--repeats", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-3000:]}\n{proc.stderr[-3000:]}"
    rows = re.findall(r"^\s+(\d)\s+\|\s+128\s+\|\s+32\s+\|\s+501\s+\|\s+(\d+)\s+\|\s+(\w+)\s+\|.*\|\s+([\d.e+-]+)$", out, re.M)
    assert sorted({(r[0], r[2]) for r in rows}) == sorted(
        (rank, p) for rank in "01" for p in ("fastreg", "loss_parallel", "gather_weight", "gather_logits"))
    assert {r[1] for r in rows if r[0] == "0"} == {"251"} and {r[1] for r in rows if r[0] == "1"} == {"250"}
    assert all(float(r[3]) < 1e-5 for r in rows), rows  # every provider checked against the single-process op
    ratio = [float(v) for v in re.findall(r"loss comm / loss_parallel's ([\d.]+)", out)]
    assert len(ratio) == 2 and all(r <= 2 for r in ratio)
