"""Runs a test body in `world` freshly spawned processes joined by a gloo process group.

Rendezvous through a file in a temporary directory (never the network beyond 127.0.0.1); the
process group has a short timeout and the parent kills every child at a hard deadline, so an error
on one rank can never leave the others (or pytest) waiting. A child's exception is re-raised in
the parent with the rank's traceback.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import torch.multiprocessing as mp

PG_TIMEOUT_S = 45


def _child(rank, world, init_file, fn, args, errq):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        fn(rank, world, *args)
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


_CTX = None


def _context():
    """A forkserver that imported torch and fastreg once: each test's processes fork from it
    instead of importing torch again (seconds per process on a loaded CI machine), and nothing
    is forked from the pytest process itself (its OpenMP/thread state is not fork-safe)."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor", "fastreg",
                                     "fastreg.optim", "fastreg.distributed", "tests.distributed.launch"])
    return _CTX


def run_distributed(fn, world: int, *args, timeout: float = 60.0):
    """fn(rank, world, *args) in `world` processes; fn must be a module-level function."""
    ctx = _context()
    errq = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "rendezvous")
        procs = [ctx.Process(target=_child, args=(r, world, init_file, fn, args, errq), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(5)
        errors = []
        while not errq.empty():
            errors.append(errq.get())
        if errors:
            rank, tb = sorted(errors)[0]
            raise AssertionError(f"rank {rank} of {world} failed ({len(errors)} rank(s) failed):\n{tb}")
        if alive:
            raise AssertionError(f"{len(alive)} of {world} ranks still running after {timeout} s (hang?)")
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"ranks exited abnormally: {bad}")
