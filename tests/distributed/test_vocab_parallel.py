"""fastreg.distributed.linear_cross_entropy against the single-process op, in 2 and 4 gloo processes."""
from __future__ import annotations

import pytest
import torch

from .launch import run_distributed

pytestmark = pytest.mark.distributed

# every option of the single-process op; the class-weight entries get the shard of `cw`
CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(weight="cw"),
    dict(weight="cw", label_smoothing=0.2),
    dict(weight="cw", reduction="none", label_smoothing=0.1),
    dict(softcap=2.5),
    dict(z_loss=1e-2, softcap=4.0, label_smoothing=0.05, weight="cw"),
    dict(ignore_index=5, chunk_size=7),
    dict(bias=False, reduction="sum", chunk_size=3),
]


def _shard_sizes(V: int, world: int) -> list[int]:
    # torch.chunk's split (what Shard(0) does): uneven when world does not divide V
    per = -(-V // world)
    return [max(0, min(per, V - r * per)) for r in range(world)]


def _compare(rank, world, dtype, use_dtensor, rtol):
    import torch.distributed as dist
    import fastreg
    from fastreg.distributed import linear_cross_entropy as vp_lce

    torch.manual_seed(0)
    N, D, V = 29, 12, 43  # V prime: uneven shards for every world size
    x = torch.randn(N, D, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, D, dtype=torch.float64) * 0.7).to(dtype)
    b = torch.randn(V, dtype=torch.float64).to(dtype)
    cw = torch.rand(V, dtype=torch.float64).to(dtype) + 0.1
    target = torch.randint(0, V, (N,))
    target[::6] = -100
    target[1::9] = 5  # ignored when ignore_index=5
    sizes = _shard_sizes(V, world)
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    if use_dtensor:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))

    for i, case in enumerate(CASES):
        kw = dict(case)
        has_bias = kw.pop("bias", True)
        red = kw.get("reduction", "mean")
        tgt = target.clone()
        if "ignore_index" in kw:
            tgt[tgt == -100] = kw["ignore_index"]
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        br = b.clone().requires_grad_() if has_bias else None
        ref_kw = dict(kw, weight=cw) if kw.get("weight") == "cw" else kw
        ref = fastreg.linear_cross_entropy(xr, wr, tgt, linear_bias=br, **ref_kw)
        (ref.sum() if red == "none" else ref).backward()

        xs = x.clone().requires_grad_()
        dt_input = use_dtensor and i % 2 == 1  # every other case: the input a Replicate() DTensor too
        if dt_input:
            from torch.distributed.tensor import Replicate

            xs = distribute_tensor(x.clone(), mesh, [Replicate()]).requires_grad_()
        if use_dtensor:
            ws = distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_()
            bs = distribute_tensor(b.clone(), mesh, [Shard(0)]).requires_grad_() if has_bias else None
            cws = distribute_tensor(cw.clone(), mesh, [Shard(0)])
            extra = {}
        else:
            ws = w[sl].clone().requires_grad_()
            bs = b[sl].clone().requires_grad_() if has_bias else None
            cws = cw[sl].clone()
            extra = dict(process_group=dist.group.WORLD)
        vp_kw = dict(kw, weight=cws) if kw.get("weight") == "cw" else kw
        out = vp_lce(xs, ws, tgt, linear_bias=bs, **vp_kw, **extra)
        (out.sum() if red == "none" else out).backward()
        if use_dtensor:
            assert type(out).__name__ == "DTensor" and out.placements[0].is_replicate()
            assert type(ws.grad).__name__ == "DTensor" and ws.grad.placements == ws.placements
            assert ws.grad.to_local().shape == (sizes[rank], D)
            out, gw = out.to_local(), ws.grad.full_tensor()
            gb = bs.grad.full_tensor() if has_bias else None
        else:
            gathered = [None] * world  # (gloo's all_gather wants equal sizes; the shards are not)
            dist.all_gather_object(gathered, (ws.grad, bs.grad if has_bias else None))
            gw = torch.cat([g for g, _ in gathered])
            gb = torch.cat([g for _, g in gathered]) if has_bias else None
        if dt_input:
            assert type(xs.grad).__name__ == "DTensor" and xs.grad.placements[0].is_replicate()
            gx = xs.grad.to_local()
        else:
            assert type(xs.grad) is torch.Tensor
            gx = xs.grad
        pairs = [("loss", out, ref), ("dX", gx, xr.grad), ("dW", gw, wr.grad)]
        if has_bias:
            pairs.append(("db", gb, br.grad))
        for name, got, want in pairs:
            scale = want.abs().max().clamp_min(1e-30)
            err = ((got.double() - want.double()).abs().max() / scale).item()
            assert err <= rtol, f"rank {rank} case {case} {name}: relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("world", [2, 4])
def test_plain_shards_fp64_match_single_process(world):
    run_distributed(_compare, world, torch.float64, False, 1e-12)


def test_dtensor_fp64_match_single_process():
    run_distributed(_compare, 2, torch.float64, True, 1e-12)


def test_dtensor_fp32_match_single_process_4_ranks():
    run_distributed(_compare, 4, torch.float32, True, 1e-5)


def _tp_times_dp(rank, world):
    """4 ranks as a (dp=2, tp=2) mesh: the LM head split over tp, the batch over dp."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fastreg
    from fastreg.distributed import linear_cross_entropy as vp_lce

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    torch.manual_seed(0)
    N, D, V = 20, 8, 31
    x = torch.randn(N, D, dtype=torch.float64)
    w = torch.randn(V, D, dtype=torch.float64)
    target = torch.randint(0, V, (N,))
    rows = slice(dp_rank * N // 2, (dp_rank + 1) * N // 2)
    ws = distribute_tensor(w.clone(), mesh["tp"], [Shard(0)]).requires_grad_()
    xs = x[rows].clone().requires_grad_()
    loss = vp_lce(xs, ws, target[rows], softcap=5.0, label_smoothing=0.1)
    loss.backward()
    wr, xr = w.clone().requires_grad_(), x.clone().requires_grad_()
    ref_half = fastreg.linear_cross_entropy(xr[rows].detach(), w, target[rows], softcap=5.0, label_smoothing=0.1)
    assert abs(loss.to_local().item() - ref_half.item()) <= 1e-12 * abs(ref_half.item())
    # data parallel: the mean over dp of the per-replica gradients is the full batch's gradient
    gw = ws.grad.to_local().clone()
    dist.all_reduce(gw, group=mesh.get_group("dp"))
    gw = distribute_tensor(torch.zeros_like(w), mesh["tp"], [Shard(0)]).to_local() + gw / 2
    fastreg.linear_cross_entropy(xr, wr, target, softcap=5.0, label_smoothing=0.1).backward()
    start = 16 * mesh.get_local_rank("tp")  # 31 classes over 2 ranks: 16 + 15
    want = wr.grad[start:start + gw.shape[0]]
    assert torch.allclose(gw, want, rtol=1e-12, atol=1e-14), (gw - want).abs().max()
    assert torch.allclose(xs.grad, xr.grad[rows] * 2, rtol=1e-12, atol=1e-14)


def test_tensor_parallel_head_times_data_parallel():
    run_distributed(_tp_times_dp, 4)


def _expect_error(exc_type, match, fn):
    import re

    try:
        fn()
    except exc_type as e:
        assert re.search(match, str(e)), f"wrong message: {e}"
        return
    raise AssertionError(f"no {exc_type.__name__} matching {match!r}")


def _bad_input(rank, world):
    """Each mistake raises a clear error on every rank (the launcher fails on a hang), and the
    group stays usable afterwards."""
    import torch.distributed as dist

    from fastreg.distributed import linear_cross_entropy as vp_lce

    g = dist.group.WORLD
    N, D = 6, 4
    x = torch.randn(N, D)
    w = torch.randn(5, D)  # 5 classes per rank
    ok_target = torch.tensor([0, 1, 2, 3, 4, 9])
    # shards that do not tile the vocabulary: a gap, an overlap, a wrong total
    _expect_error(ValueError, "do not tile", lambda: vp_lce(x, w, ok_target, process_group=g,
                                                           vocab_start=[0, 7][rank], num_classes=12))
    _expect_error(ValueError, "do not tile", lambda: vp_lce(x, w, ok_target, process_group=g,
                                                           vocab_start=[0, 3][rank], num_classes=8))
    _expect_error(ValueError, "num_classes is 11", lambda: vp_lce(x, w, ok_target, process_group=g,
                                                                 vocab_start=[0, 5][rank], num_classes=11))
    # a target out of range on one rank only, and on every rank
    bad = ok_target.clone()
    if rank == 1:
        bad[2] = 10
    _expect_error(RuntimeError, "out of range", lambda: vp_lce(x, w, bad, process_group=g))
    _expect_error(RuntimeError, "out of range", lambda: vp_lce(x, w, torch.full((N,), -1), process_group=g))
    # mismatched dtypes / row counts across ranks
    xd = x.double() if rank == 1 else x
    wd = w.double() if rank == 1 else w
    _expect_error(ValueError, "disagree", lambda: vp_lce(xd, wd, ok_target, process_group=g))
    _expect_error(ValueError, "disagree", lambda: vp_lce(x[: N - rank], w, ok_target[: N - rank], process_group=g))
    # local mistakes: dtype mismatch between input and weight, DTensor bias with a plain weight
    _expect_error(TypeError, "does not match", lambda: vp_lce(x, w.double(), ok_target, process_group=g))
    _expect_error(ValueError, "process_group", lambda: vp_lce(x, w, ok_target))
    # and the group still works
    loss = vp_lce(x, w, ok_target, process_group=g)
    assert torch.isfinite(loss)


def test_bad_input_errors_on_every_rank():
    run_distributed(_bad_input, 2)


def _compiled(rank, world):
    """torch.compile(fullgraph=True) traces the loss, its collectives and its backward."""
    import torch.distributed as dist

    import fastreg
    from fastreg.distributed import linear_cross_entropy as vp_lce

    torch.manual_seed(0)
    N, D, V = 16, 8, 21
    x, w = torch.randn(N, D, dtype=torch.float64), torch.randn(V, D, dtype=torch.float64)
    target = torch.randint(0, V, (N,))
    target[2] = -100
    start, size = [(0, 11), (11, 10)][rank]

    def step(x, w, t):
        return vp_lce(x, w, t, process_group=dist.group.WORLD, vocab_start=start, num_classes=V, softcap=3.0,
                      label_smoothing=0.1)

    xs, ws = x.clone().requires_grad_(), w[start:start + size].clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(xs, ws, target)
    loss.backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = fastreg.linear_cross_entropy(xr, wr, target, softcap=3.0, label_smoothing=0.1)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0)
    assert torch.allclose(xs.grad, xr.grad, rtol=1e-12, atol=1e-15)
    assert torch.allclose(ws.grad, wr.grad[start:start + size], rtol=1e-12, atol=1e-15)


def test_torch_compile_fullgraph():
    run_distributed(_compiled, 2)


def _second_backward(rank, world):
    import torch.distributed as dist

    from fastreg.distributed import linear_cross_entropy as vp_lce

    import fastreg

    torch.manual_seed(0)
    x, w_full = torch.randn(4, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 9])
    xs, ws = x.clone().requires_grad_(), w_full[5 * rank:5 * rank + 5].clone().requires_grad_()
    loss = vp_lce(xs, ws, target, process_group=dist.group.WORLD)
    (2.5 * loss).backward(retain_graph=True)  # the upstream gradient scales the handed-over grads
    xr, wr = x.clone().requires_grad_(), w_full.clone().requires_grad_()
    (2.5 * fastreg.linear_cross_entropy(xr, wr, target)).backward()
    assert torch.allclose(xs.grad, xr.grad, rtol=1e-12, atol=0)
    assert torch.allclose(ws.grad, wr.grad[5 * rank:5 * rank + 5], rtol=1e-12, atol=0)
    _expect_error(RuntimeError, "backward ran twice", lambda: loss.backward())
    # every row ignored: nan loss (0/0, like torch), zero gradients (like the single-process op)
    xs, ws = x.clone().requires_grad_(), w_full[5 * rank:5 * rank + 5].clone().requires_grad_()
    loss = vp_lce(xs, ws, torch.full((4,), -100), process_group=dist.group.WORLD)
    loss.backward()
    xr, wr = x.clone().requires_grad_(), w_full.clone().requires_grad_()
    ref = fastreg.linear_cross_entropy(xr, wr, torch.full((4,), -100))
    ref.backward()
    assert loss.isnan() and ref.isnan()
    assert torch.equal(xs.grad, xr.grad) and torch.equal(ws.grad, wr.grad[5 * rank:5 * rank + 5])


def test_upstream_scale_second_backward_all_ignored():
    run_distributed(_second_backward, 2)


def test_device_generic_passes_match_single_process():
    """The ATen-op passes (the CUDA kernels of _lce_vp_stats/_lce_vp_rows) selected on CPU with
    FASTREG_VP_GENERIC=1 in a fresh interpreter: every option, uneven shards, fp64 and fp32."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, FASTREG_VP_GENERIC="1")
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    code = ("import torch\n"
            "from tests.distributed.launch import run_distributed\n"
            "from tests.distributed.test_vocab_parallel import _compare\n"
            "if __name__ == '__main__':\n"
            "    run_distributed(_compare, 2, torch.float64, False, 1e-12)\n"
            "    run_distributed(_compare, 2, torch.float32, True, 1e-5)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _routed_and_shifted(rank, world):
    """fastreg.linear_cross_entropy given a Shard(0) DTensor weight runs the vocab-parallel op (what a
    ColwiseParallel LM head leaves behind); shift=True works there as in the single-process op; the
    options the vocab-parallel op does not take, and other DTensor layouts, are refused by name."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastreg
    from fastreg.distributed import linear_cross_entropy as vp_lce

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    B, T, D, V = 3, 7, 8, 23
    x = torch.randn(B, T, D, dtype=torch.float64)
    w = torch.randn(V, D, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[0, 2] = -100
    for kw in (dict(shift=True), dict(shift=True, reduction="none", label_smoothing=0.1), dict(z_loss=1e-3)):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = fastreg.linear_cross_entropy(xr, wr, labels, **kw)
        ref.sum().backward()
        xs = x.clone().requires_grad_()
        ws = distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_()
        out = fastreg.linear_cross_entropy(xs, ws, labels, **kw)
        assert type(out).__name__ == "DTensor", "the Shard(0) weight did not take the vocab-parallel path"
        out.to_local().sum().backward() if kw.get("reduction") == "none" else out.backward()
        assert torch.allclose(out.to_local(), ref, rtol=1e-12, atol=1e-14), kw
        assert torch.allclose(xs.grad, xr.grad, rtol=1e-12, atol=1e-14), kw
        assert torch.allclose(ws.grad.full_tensor(), wr.grad, rtol=1e-12, atol=1e-14), kw
    # plain shards: shift on the vocab-parallel entry point itself
    per = -(-V // world)
    sl = slice(rank * per, min(V, (rank + 1) * per))
    ws = w[sl].clone().requires_grad_()
    out = vp_lce(x, ws, labels, shift=True, process_group=dist.group.WORLD)
    ref = fastreg.linear_cross_entropy(x, w, labels, shift=True)
    assert torch.allclose(out, ref, rtol=1e-12, atol=0)
    ws = distribute_tensor(w.clone(), mesh, [Shard(0)])
    for bad in (dict(return_stats=True), dict(grad_filter_eps="auto"), dict(skip_ignored=True)):
        _expect_error(ValueError, r"fastreg\.distributed\.linear_cross_entropy, which does not take",
                      lambda: fastreg.linear_cross_entropy(x, ws, labels, **bad))
    wrep = distribute_tensor(w.clone(), mesh, [Replicate()])
    _expect_error(ValueError, r"Replicate.*fastreg\.distributed\.linear_cross_entropy",
                  lambda: fastreg.linear_cross_entropy(x, wrep, labels))
    xrep = distribute_tensor(x.clone(), mesh, [Replicate()])
    _expect_error(ValueError, r"plain tensor.*fastreg\.distributed\.linear_cross_entropy",
                  lambda: fastreg.linear_cross_entropy(xrep, w, labels))


def test_dtensor_weight_routed_shift_and_refusals():
    run_distributed(_routed_and_shifted, 2)
