"""The code paths of fastreg.linear_cross_entropy that only CUDA runs differently, as device tests:
each runs on the CPU here and on CUDA when a GPU and fastreg's CUDA kernels are present (the
`device` fixture of conftest.py), against the float64 reference:

  probability targets      chunks of probs whose rows start at another address mod 16 than the
                           logits' rows (fp32 V = 1001, chunk_size 3) and a user's probs[1:] view:
                           the CUDA row pass must not read them with 16-byte loads
  grad_filter_eps          the kept-block map (block_keep of the row pass), its host read per chunk,
                           the gathered rows of non-consecutive tiles (at::tensor(row_ids) +
                           index_select) and the target rows added by index_add_
  vocab-parallel passes    the ATen-op passes that are the CUDA kernels of _lce_vp_stats /
                           _lce_vp_rows (FASTREG_VP_GENERIC=1 selects them on the CPU: the CPU case
                           runs them in a child process), over two emulated shards
  bf16 multi-chunk GEMMs   grad_W accumulated in float32 over several chunks of bfloat16 products
"""
import os
import subprocess
import sys

import pytest
import torch

import fastreg
from fastreg.reference import linear_cross_entropy_reference as reference
from test_lce import make, run

HERE = os.path.dirname(os.path.abspath(__file__))


def _max_err(got, want):
    return max((a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(got, want))


# ---- probability targets ---------------------------------------------------------------------------
def _probs(N, V, dtype, device, offset):
    """Row-normalised probabilities as a (N, V) view `offset` elements into a larger buffer."""
    g = torch.Generator().manual_seed(N + V)
    q = torch.rand(N, V, generator=g, dtype=torch.float64) ** 3
    q = (q / q.sum(1, keepdim=True)).to(dtype)
    buf = torch.empty(N * V + offset, dtype=dtype, device=device)
    view = buf[offset:].view(N, V)
    view.copy_(q)
    return view


def _run_keeping_target(fn, case, **opts):
    """run() of test_lce, but with the target tensor itself (a clone would be a fresh, aligned copy)."""
    target = case["target"]
    out = run(lambda x, w, t, **kw: fn(x, w, target, **kw), case, **opts)
    assert case["target"] is target
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset,chunk_size", [(0, 3), (1, None), (1, 5)], ids=["chunks", "view", "view_chunks"])
def test_probability_targets_at_any_alignment(device, dtype, offset, chunk_size):
    N, D, V = 11, 16, 1001  # fp32 rows of 4004 bytes: chunk c0 of the probs starts at c0 * 4004
    case = make(N, D, V, device=device, bias=True)
    case = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in case.items()}
    case["target"] = _probs(N, V, dtype, device, offset)
    if offset:
        assert case["target"].data_ptr() % 16 != 0
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    ours = _run_keeping_target(fastreg.linear_cross_entropy, case, chunk_size=chunk_size, **opts)
    exact = run(reference, {k: (v.double() if v is not None and v.is_floating_point() else v)
                            for k, v in case.items()}, **opts)
    if dtype == torch.float32:
        for o, e in zip(ours, exact):
            torch.testing.assert_close(o.double().cpu(), e.cpu(), rtol=1e-4, atol=1e-5)
    else:  # at most 2x torch's own bfloat16 error (plus one ulp of the output's scale)
        torchs = run(reference, case, **opts)
        for i, (o, t, e) in enumerate(zip(ours, torchs, exact)):
            err, err_torch = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
            floor = torch.finfo(dtype).eps * e.abs().max().item()
            assert err <= 2 * err_torch + floor, f"output {i}: {err} vs torch {err_torch}"


# ---- gradient filtering ----------------------------------------------------------------------------
def _peaked_case(device, dtype):
    """768 rows in three groups of targets (0, 300, 600: three tiles of 256 rows once grouped by
    target) over V = 1024 classes, logits = input (the weight is the identity), peaked at the target
    and, in the first and last group, at class 1000 too: class block 3 is kept by tiles 0 and 2 but
    not 1 (non-consecutive tiles: the gathered rows), blocks without a peak are dropped."""
    N, V = 768, 1024
    g = torch.Generator().manual_seed(5)
    target = torch.cat([torch.full((256,), 0), torch.full((256,), 300), torch.full((256,), 600)])
    target = target[torch.randperm(N, generator=g)]  # the op groups them by target
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 0.01
    x[torch.arange(N), target] += 14.0
    second = target != 300
    x[second, 1000] += 13.0
    w = torch.eye(V, dtype=torch.float64)
    return dict(input=x.to(device, dtype), linear_weight=w.to(device, dtype), target=target.to(device),
                linear_bias=None, weight=None)


@pytest.mark.parametrize("dtype,chunk_size", [(torch.float32, None), (torch.float32, 384), (torch.bfloat16, 384)],
                         ids=str)
def test_grad_filter_eps(device, dtype, chunk_size):
    case = _peaked_case(device, dtype)
    filtered = run(fastreg.linear_cross_entropy, case, chunk_size=chunk_size, grad_filter_eps=1e-4)
    full = run(fastreg.linear_cross_entropy, case, chunk_size=chunk_size)
    exact = run(reference, {k: (v.double() if v is not None and v.is_floating_point() else v)
                            for k, v in case.items()})
    assert torch.equal(filtered[0], full[0]), "filtering must not change the loss"
    # each skipped gradient term is <= eps (times the reduction's 1/N and the upstream gradient)
    # and the weight is the identity: within the dtype's tolerance of the exact gradients
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for i, (f, e) in enumerate(zip(filtered, exact)):
        scale = max(e.abs().max().item(), 1e-30)
        assert (f.double().cpu() - e.cpu()).abs().max().item() <= tol * scale, f"output {i}"
    assert _max_err(filtered[1:], full[1:]) <= tol * max(e.abs().max().item() for e in exact[1:])


# ---- vocabulary-parallel row passes -------------------------------------------------------------------
def vp_passes_against_single(device, dtype):
    """The two row passes of fastreg.distributed over two emulated shards (the all-reduce of the
    statistics a sum), against the single-process row pass on the CPU."""
    rows, V = 9, 301
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(rows, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, V, (rows,), generator=g)
    target[2] = -100
    cw = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(acc)
    eps, softcap, zloss = 0.1, 20.0, 1e-3
    shards = [(0, 150), (150, V)]
    width = len(shards) + 1 + 1 + 1  # lse per shard, z_t, w_t, sum w z
    stats = torch.zeros(rows + 1, width, dtype=acc, device=device)
    local = []
    for rank, (a, b) in enumerate(shards):
        lg = logits[:, a:b].contiguous().to(device)
        st = torch.empty(rows + 1, width, dtype=acc, device=device)
        torch.ops.fastreg._lce_vp_stats(lg, target.to(device), cw[a:b].to(device), a, V, -100, softcap, True, rank,
                                        len(shards), st)
        stats += st
        local.append(lg)
    assert stats[rows, 0].item() == 0
    losses = []
    for rank, (a, b) in enumerate(shards):
        loss = torch.empty(rows, dtype=acc, device=device)
        torch.ops.fastreg._lce_vp_rows(local[rank], target.to(device), cw[a:b].to(device), stats[:rows],
                                       torch.ones(1, dtype=acc, device=device), cw.sum().to(device), a, V, -100, eps,
                                       softcap, zloss, True, True, len(shards), loss)
        losses.append(loss.cpu())
    grad = torch.cat([lg.cpu() for lg in local], 1)
    want_grad = logits.clone()
    want_loss = torch.empty(rows, dtype=acc)
    torch.ops.fastreg._lce_rows(want_grad, target, cw, torch.ones(1, dtype=acc), -100, eps, softcap, zloss, True,
                                want_loss)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for loss in losses:
        torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=rtol)
    torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_vocab_parallel_generic_passes(device, dtype):
    if device == "cuda":  # the ATen-op passes are the CUDA kernels of these ops
        vp_passes_against_single(device, dtype)
        return
    env = dict(os.environ, FASTREG_VP_GENERIC="1")  # read when fastreg loads: a fresh interpreter
    code = (f"import sys, torch; sys.path.insert(0, {HERE!r}); import fastreg\n"
            f"from test_cuda_paths import vp_passes_against_single\n"
            f"vp_passes_against_single('cpu', {dtype})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---- bfloat16 GEMMs over several chunks -----------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [16, 7])
def test_bf16_weight_gradient_over_several_chunks(device, chunk_size):
    """grad_W of bfloat16 operands summed over 4-10 chunks in float32 (on CUDA without a
    mixed-dtype addmm): at most 2x torch's own bfloat16 error against float64."""
    case = make(64, 48, 300, device=device, bias=True, class_weight=True, ignore=3, scale=3.0)
    exact = run(reference, case, label_smoothing=0.1)
    low = {k: (v.to(torch.bfloat16) if v is not None and v.is_floating_point() else v) for k, v in case.items()}
    ours = run(fastreg.linear_cross_entropy, low, chunk_size=chunk_size, label_smoothing=0.1)
    torchs = run(reference, low, label_smoothing=0.1)
    for i, (o, t, e) in enumerate(zip(ours, torchs, exact)):
        assert o.dtype == torch.bfloat16
        err, err_torch = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        floor = torch.finfo(torch.bfloat16).eps * e.abs().max().item()
        assert err <= 2 * err_torch + floor, f"output {i}: {err} vs torch {err_torch}"
