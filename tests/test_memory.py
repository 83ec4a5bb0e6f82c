"""The large-CPU-buffer cache (csrc/mem/cpu_buffers.h, fastreg/memory.py): blocks are reused
across steps, bounded by the limit, released on request; tensors from it behave like any CPU
tensor; bad settings fail with a clear message."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import fastreg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = (1024, 1024)  # 4 MiB of fp32: above the 2 MiB threshold of the cache


@pytest.fixture(autouse=True)
def fresh_cache():
    fastreg.set_cpu_cache_limit(1 << 30)
    fastreg.empty_cpu_cache()
    yield
    fastreg.set_cpu_cache_limit(1 << 30)
    fastreg.empty_cpu_cache()


def _step(N=256, D=512, V=4096, seed=0):
    """A loss step whose chunk buffer (256 x 4096 fp32 = 4 MiB) and grad_weight (8 MiB) are cached."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    w = (torch.randn(V, D, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    loss = fastreg.linear_cross_entropy(x, w, t)
    loss.backward()
    return loss.detach(), x.grad, w.grad, (x, w, t)


def test_second_step_reuses_the_blocks_and_gives_the_same_results():
    loss1, gx1, gw1, (x, w, t) = _step()
    gx1, gw1 = gx1.clone(), gw1.clone()  # the next step may reuse nothing of these
    before = fastreg.cpu_cache_info()
    assert before["misses"] > 0 and before["cached_bytes"] > 0  # the chunk buffer went back to the cache
    loss2, gx2, gw2, _ = _step()
    after = fastreg.cpu_cache_info()
    assert after["hits"] > before["hits"]
    assert torch.equal(loss1, loss2) and torch.equal(gx1, gx2) and torch.equal(gw1, gw2)
    ref_x, ref_w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(ref_x @ ref_w.t(), t).backward()
    torch.testing.assert_close(gw2.double(), ref_w.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gx2.double(), ref_x.grad, rtol=1e-4, atol=1e-7)


def test_limit_bounds_what_is_kept_and_release_empties_it():
    fastreg.set_cpu_cache_limit(0)
    _step()
    info = fastreg.cpu_cache_info()
    assert info["cached_bytes"] == 0 and info["limit_bytes"] == 0
    fastreg.set_cpu_cache_limit(6 << 20)  # room for the 4 MiB chunk buffer, not for grad_weight too
    _, _, gw, _ = _step()
    assert 0 < fastreg.cpu_cache_info()["cached_bytes"] <= 6 << 20
    live = fastreg.cpu_cache_info()["live_bytes"]
    assert live >= gw.numel() * 4
    del gw
    assert fastreg.cpu_cache_info()["cached_bytes"] <= 6 << 20
    fastreg.empty_cpu_cache()
    assert fastreg.cpu_cache_info()["cached_bytes"] == 0


def test_gradients_from_the_cache_are_ordinary_tensors():
    _, gx, gw, _ = _step()
    assert gw.is_contiguous() and gw.device.type == "cpu" and not gw.is_pinned()
    copy = gw.clone()
    gw.resize_(2 * gw.shape[0], gw.shape[1])  # grows through the allocator, keeps the data
    assert torch.equal(gw[: copy.shape[0]], copy)
    gw[copy.shape[0]:] = 1.0  # the grown half is uninitialised (may hold NaN bit patterns)
    buf = io.BytesIO()
    torch.save(gw, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), gw)
    gx.share_memory_()  # moves the storage out of the cache
    assert gx.is_shared()
    gw.add_(1.0)
    assert torch.equal(gw[: copy.shape[0]], copy + 1.0)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_limit_is_refused(bad, error):
    with pytest.raises(error, match="limit_bytes"):
        fastreg.set_cpu_cache_limit(bad)


def test_bad_environment_setting_is_a_clear_error():
    code = ("import torch, fastreg\n"
            "x = torch.randn(256, 512, requires_grad=True); w = torch.randn(4096, 512, requires_grad=True)\n"
            "fastreg.linear_cross_entropy(x, w, torch.zeros(256, dtype=torch.long))\n")
    env = dict(os.environ, FASTREG_CPU_CACHE_MB="lots", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "FASTREG_CPU_CACHE_MB must be a non-negative integer" in r.stderr
    env["FASTREG_CPU_CACHE_MB"] = "0"
    r = subprocess.run([sys.executable, "-c", code + "print(fastreg.cpu_cache_info()['limit_bytes'])"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr


def test_concurrent_steps_share_the_cache_safely():
    """Threads allocating and freeing cached blocks at once get exactly the sequential results."""
    import threading

    live_before = fastreg.cpu_cache_info()["live_bytes"]  # tensors other tests may still hold
    want = [[v.clone() for v in _step(seed=s)[:3]] for s in range(4)]
    got = [None] * 4

    def work(s):
        for _ in range(3):
            got[s] = [v.clone() for v in _step(seed=s)[:3]]

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in range(4):
        for a, b in zip(got[s], want[s]):
            assert torch.equal(a, b)
    assert fastreg.cpu_cache_info()["live_bytes"] == live_before  # every block came back


def test_fork_while_cache_is_used():
    """A child forked from a process using the cache can allocate from it (no inherited lock).

    The child runs single-threaded, as DataLoader workers do: GNU OpenMP's thread pool does not
    survive fork(), whatever the cache does."""
    import multiprocessing as mp

    _step()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_step, args=(q,))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("the forked child did not finish within 120 s")
    assert p.exitcode == 0 and q.get(timeout=5) is True


def _child_step(q):
    torch.set_num_threads(1)
    loss, _, gw, _ = _step()
    q.put(bool(torch.isfinite(loss)) and gw.abs().sum().item() > 0)
