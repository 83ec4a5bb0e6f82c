"""Tests of the issue-11 options of fastreg.linear_cross_entropy: skip_ignored (compaction of the
non-ignored rows), the z-loss 'mean' over the non-ignored count, shift=True, class-probability
targets, return_stats and grad_filter_eps, against the eager composition in
fastreg/reference.py (fp64: 1e-12), under torch.compile and opcheck/gradcheck."""
import pytest
import torch
from torch.nn import functional as F

import fastreg
from fastreg.reference import linear_cross_entropy_reference as reference

from test_lce import assert_close_all, make, run

OPS = torch.ops.fastreg
TIGHT = dict(rtol=1e-12, atol=1e-12)


def probs_case(N, D, V, *, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    c = make(N, D, V, dtype=dtype, device=device, bias=True, class_weight=True)
    c["target"] = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1).to(device, dtype)
    return c


# ------------------------------------------------------------------------------- skip_ignored
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("ignored", [0, 9, 23, 40])  # none, some, most, all of 40 rows
def test_skip_ignored_matches_full_gemms_and_eager(reduction, chunk, ignored):
    case = make(40, 12, 90, bias=True, class_weight=True, ignore=ignored)
    opts = dict(reduction=reduction, label_smoothing=0.1, softcap=4.0, z_loss=1e-2, chunk_size=chunk)
    want = run(reference, case, **opts)
    for skip in (None, True, False):
        got = run(fastreg.linear_cross_entropy, case, skip_ignored=skip, **opts)
        if ignored == 40 and reduction == "mean":  # nan loss (0/0, as torch); eager's gradients are 0 * inf = nan,
            assert torch.isnan(got[0]) and all(torch.all(g == 0) for g in got[1:])  # fastreg's exact zeros
            continue
        assert_close_all(got, want, **TIGHT)
    if ignored:  # ignored rows get exactly zero gradient
        gi = run(fastreg.linear_cross_entropy, case, **opts)[1]
        assert torch.all(gi[case["target"] == -100] == 0)


def test_skip_ignored_three_dims_and_strided_input():
    case = make(24, 10, 70, ignore=11, lead=(4, 6), noncontig=False)
    case["input"] = torch.cat([case["input"], case["input"]], -1)[..., ::2]  # strided rows
    assert_close_all(run(fastreg.linear_cross_entropy, case, chunk_size=4), run(reference, case), **TIGHT)


# ------------------------------------------------------------------------------- z-loss 'mean'
@pytest.mark.parametrize("V", [10, 300])  # the small one-pass path and the chunked driver
def test_zloss_mean_is_over_the_non_ignored_count(V):
    case = make(30, 8, V, class_weight=True, ignore=7)
    opts = dict(z_loss=0.05, label_smoothing=0.1)
    assert_close_all(run(fastreg.linear_cross_entropy, case, **opts), run(reference, case, **opts), **TIGHT)
    # the z-loss part is invariant to scaling the class weights (the weighted CE is too)
    doubled = dict(case, weight=case["weight"] * 2)
    assert_close_all(run(fastreg.linear_cross_entropy, doubled, **opts),
                     run(fastreg.linear_cross_entropy, case, **opts), rtol=1e-13, atol=1e-13)
    # and equals the plain per-row z-loss averaged over the non-ignored rows
    zl = run(fastreg.linear_cross_entropy, case, **opts)[0] - run(fastreg.linear_cross_entropy, case,
                                                                  label_smoothing=0.1)[0]
    lse = torch.logsumexp(case["input"] @ case["linear_weight"].t(), -1)
    active = case["target"] != -100
    torch.testing.assert_close(zl, 0.05 * (lse[active] ** 2).mean(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- shift
@pytest.mark.parametrize("lead", [(3, 9), (11,)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift_matches_shifted_labels(lead, reduction):
    n = 1
    for s in lead:
        n *= s
    case = make(n, 7, 40, bias=True, ignore=4, lead=lead)
    opts = dict(reduction=reduction, z_loss=1e-3, chunk_size=4)
    got = run(fastreg.linear_cross_entropy, case, shift=True, **opts)
    assert_close_all(got, run(reference, case, shift=True, **opts), **TIGHT)
    labels = case["target"]
    shifted = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], -100)], -1)
    assert_close_all(got, run(fastreg.linear_cross_entropy, dict(case, target=shifted), **opts), rtol=0, atol=0)
    if reduction == "none":
        assert got[0].shape == lead and torch.all(got[0][..., -1] == 0)


def test_shift_bad_input():
    case = make(12, 4, 9, lead=(3, 4))
    with pytest.raises(ValueError, match="shift=True needs input"):
        fastreg.linear_cross_entropy(case["input"].reshape(1, 3, 4, 4), case["linear_weight"],
                                     case["target"].reshape(1, 3, 4), shift=True)
    with pytest.raises(ValueError, match="class-index targets"):
        fastreg.linear_cross_entropy(case["input"], case["linear_weight"], torch.rand(3, 4, 9, dtype=torch.float64),
                                     shift=True)


# ------------------------------------------------------------------------------- probabilities
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0)])
def test_probability_targets_match_eager(reduction, opts):
    case = probs_case(26, 9, 80)
    case_noweight = dict(case, weight=None)
    for c in (case, case_noweight):
        assert_close_all(run(fastreg.linear_cross_entropy, c, reduction=reduction, chunk_size=7, **opts),
                         run(reference, c, reduction=reduction, **opts), **TIGHT)


def test_probability_targets_small_classes_and_one_hot():
    # V <= 64 would take the one-pass path for indices; probabilities go through the driver. One-hot
    # probabilities give the index loss.
    case = make(20, 6, 12, class_weight=True)
    one_hot = F.one_hot(case["target"], 12).double()
    got = run(fastreg.linear_cross_entropy, dict(case, target=one_hot, weight=None), label_smoothing=0.1)
    assert_close_all(got, run(fastreg.linear_cross_entropy, dict(case, weight=None), label_smoothing=0.1), **TIGHT)


# ------------------------------------------------------------------------------- return_stats
@pytest.mark.parametrize("kind", ["indices", "shift", "probs", "small"])
def test_return_stats_match_eager(kind):
    if kind == "probs":
        case, opts = probs_case(18, 7, 70), dict(softcap=5.0)
    elif kind == "shift":
        case, opts = make(20, 7, 70, ignore=5, lead=(4, 5)), dict(shift=True, chunk_size=6)
    else:
        case, opts = make(20, 7, 70 if kind == "indices" else 9, ignore=5), dict(softcap=5.0, chunk_size=6)
    args = (case["input"], case["linear_weight"], case["target"])
    kw = dict(linear_bias=case["linear_bias"], weight=case["weight"], **opts)
    loss, stats = fastreg.linear_cross_entropy(*args, return_stats=True, **kw)
    want_loss, (lse, pred, acc) = reference(*args, return_stats=True, **kw)
    assert isinstance(stats, fastreg.LinearCrossEntropyStats)
    torch.testing.assert_close(loss, want_loss, **TIGHT)
    torch.testing.assert_close(stats.lse, lse, **TIGHT)
    assert stats.lse.dtype == torch.float64 and not stats.lse.requires_grad
    assert torch.equal(stats.predictions, pred)
    torch.testing.assert_close(stats.accuracy, acc.float())
    assert stats.accuracy.dtype == torch.float32 and stats.accuracy.dim() == 0


def test_return_stats_all_ignored_and_float32():
    case = make(6, 4, 30, dtype=torch.float32, ignore=6)
    loss, stats = fastreg.linear_cross_entropy(case["input"], case["linear_weight"], case["target"], return_stats=True)
    assert torch.isnan(loss) and torch.isnan(stats.accuracy)
    assert torch.all(stats.lse == 0) and torch.all(stats.predictions == -1) and stats.lse.dtype == torch.float32


# ------------------------------------------------------------------------------- grad_filter_eps
def peaked(N, D, V, dtype, seed=0):
    """A trained-LM-like input: each row's hidden state aligned with its target's weight row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    t = torch.randint(0, V, (N,), generator=g)
    x = 6.0 * w[t] / w[t].norm(dim=1, keepdim=True) * D ** 0.5 / 4 + 0.3 * torch.randn(N, D, generator=g,
                                                                                      dtype=torch.float64)
    return dict(input=x.to(dtype), linear_weight=w.to(dtype), target=t, linear_bias=None, weight=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_filter_loss_unchanged_and_error_bounded(dtype, reduction):
    case = peaked(300, 32, 2000, dtype)
    exact = run(reference, {k: (v.double() if v is not None and v.is_floating_point() else v)
                            for k, v in case.items()}, reduction=reduction)
    eager = run(reference, case, reduction=reduction)
    off = run(fastreg.linear_cross_entropy, case, reduction=reduction)
    for eps in ("auto", 1e-3):
        on = run(fastreg.linear_cross_entropy, case, reduction=reduction, grad_filter_eps=eps)
        assert torch.equal(on[0], off[0])  # the loss is unchanged
        for i in (1, 2):
            err = (on[i].double() - exact[i]).abs().max()
            if eps == "auto":  # below the dtype's resolution: as accurate as eager (2x)
                assert err <= 2 * (eager[i].double() - exact[i]).abs().max() + 1e-12
            # the documented bound: each entry moves by at most eps * scale * sum of the skipped |other factor|
            scale = (1 / 300 if reduction == "mean" else 1.0) * float(eps if eps != "auto" else
                                                                       torch.finfo(dtype).eps / 32)
            other = case["linear_weight"] if i == 1 else case["input"]
            up = 1.0 if reduction == "mean" else 4.0  # |upstream| of run()'s random normal gradient
            bound = scale * up * other.double().abs().sum(0).max() * (case["input"].shape[0] if i == 2 else 1)
            assert (on[i].double() - off[i].double()).abs().max() <= bound + 2 * (off[i].double() - exact[i]).abs().max()


@pytest.mark.parametrize("chunk_size", [None, 512])
def test_grad_filter_skips_exactly_the_blocks_no_row_of_a_tile_needs(chunk_size):
    """The documented rule, per 256-row tile for dX and dW: the rows are grouped by target (stable
    sort), and a (tile, ~256-class block) product is left out iff every row of the tile has all its
    non-target |d loss_i / d z_ic| <= eps there; the target entries are added exactly. The rows come
    shuffled (tiles in input order would mix every kind of row). Grouped, tile 0 holds the block-1
    targets, tile 1 the block-3 ones, tiles 2-4 the block-7 ones; block-1 and block-7 rows also put
    mass on block 5, so block 5 is kept by the non-consecutive tiles 0, 2, 3, 4 (the gathered dW path)."""
    N, D, V, eps, tile = 1100, 64, 2000, 1e-3, 256
    bw = -(-V // -(-V // 256))  # V split evenly into ceil(V / 256) blocks: 250 classes each
    g = torch.Generator().manual_seed(5)
    # the classes of a block share a direction, so a row's probability mass stays in its target's block
    centers = torch.randn((V + bw - 1) // bw, D, generator=g, dtype=torch.float64)
    w = centers.repeat_interleave(bw, 0)[:V] + 0.3 * torch.randn(V, D, generator=g, dtype=torch.float64)
    groups = ((1, 256), (3, 256), (7, N - 512))  # (block of the targets, rows)
    t = torch.cat([bw * b + torch.randint(0, min(bw, V - bw * b), (n,), generator=g) for b, n in groups])
    x = 2.0 * w[t] / w[t].norm(dim=1, keepdim=True) + 0.05 * torch.randn(N, D, generator=g, dtype=torch.float64)
    side = t // bw != 3
    x[side] += 1.5 * centers[5] / centers[5].norm()
    shuffle = torch.randperm(N, generator=g)
    t, x = t[shuffle], x[shuffle]
    # the expected filtered gradients, from the rule (fp64 throughout, so rounding cannot hide a product)
    grad = torch.softmax(x @ w.t(), 1)
    own = grad.clone()
    own[torch.arange(N), t] = 0  # the target entries never decide a block
    blocks = (V + bw - 1) // bw
    pad = torch.zeros(N, blocks * bw, dtype=torch.float64)
    pad[:, :V] = own.abs()
    row_keep = pad.view(N, blocks, bw).amax(2) > eps
    order = torch.argsort(t, stable=True)
    tiles = (N + tile - 1) // tile
    tile_keep = torch.stack([row_keep[order[k * tile:(k + 1) * tile]].any(0) for k in range(tiles)])
    assert tile_keep[:, 5].tolist() == [True, False, True, True, True]  # the input does what it says
    keep = torch.empty(N, blocks, dtype=torch.bool)
    keep[order] = tile_keep.repeat_interleave(tile, 0)[:N]
    in_input_order = torch.stack([row_keep[k * tile:(k + 1) * tile].any(0) for k in range(tiles)])
    assert in_input_order.sum() > 1.5 * tile_keep.sum()  # grouping is what makes tiles sparse here
    keep = keep.repeat_interleave(bw, 1)[:, :V]
    grad[torch.arange(N), t] -= 1.0
    filtered = torch.where(keep, grad, 0.0)
    filtered[torch.arange(N), t] = grad[torch.arange(N), t]
    want_dx, want_dw = filtered @ w, filtered.t() @ x
    full_dx, full_dw = grad @ w, grad.t() @ x

    def grads(filter_eps):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        fastreg.linear_cross_entropy(xg, wg, t, reduction="sum", grad_filter_eps=filter_eps,
                                     chunk_size=chunk_size).backward()
        return xg.grad, wg.grad

    (dx, dw), (dx_off, dw_off) = grads(eps), grads(None)
    torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, want_dw, rtol=1e-12, atol=1e-12)
    # what the filter left out is exactly the rule's products (sharper than the totals above)
    for got, off, want, full in ((dx, dx_off, want_dx, full_dx), (dw, dw_off, want_dw, full_dw)):
        assert (full - want).abs().max() > 1e-6  # the rule does leave products out
        torch.testing.assert_close(off - got, full - want, rtol=0, atol=1e-12)


def test_grad_filter_bad_values():
    case = make(4, 3, 70)
    for bad in (-1.0, "fast", float("inf"), True):
        with pytest.raises(ValueError, match="grad_filter_eps"):
            fastreg.linear_cross_entropy(case["input"], case["linear_weight"], case["target"], grad_filter_eps=bad)


# ------------------------------------------------------------------------------- compile, opcheck, gradcheck
def test_torch_compile_fullgraph_new_options():
    torch._dynamo.reset()
    case = make(24, 8, 50, dtype=torch.float32, ignore=5, lead=(3, 8))

    def step(x, w, t):
        loss, stats = fastreg.linear_cross_entropy(x, w, t, shift=True, return_stats=True, z_loss=1e-3,
                                                   grad_filter_eps="auto", chunk_size=8)
        return loss, stats.lse, stats.predictions, stats.accuracy

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        x, w = (case[k].detach().clone().requires_grad_() for k in ("input", "linear_weight"))
        loss, lse, pred, acc = fn(x, w, case["target"])
        loss.backward()
        outs.append([loss.detach(), x.grad, w.grad, lse, pred.double(), acc])
    assert_close_all(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_opcheck_new_options():
    c = make(13, 6, 21, dtype=torch.float32, bias=True, ignore=3)
    p = probs_case(9, 6, 21, dtype=torch.float32)
    for x, w, t, b in ((c["input"], c["linear_weight"], c["target"], c["linear_bias"]),
                       (p["input"], p["linear_weight"], p["target"], p["linear_bias"])):
        for red in (0, 1):
            torch.library.opcheck(OPS.linear_cross_entropy.default,
                                  (x, w, t, b, None, red, -100, 0.1, 0.0, 1e-3, 4, [True, True, True], 1e-4, 1, True))
        torch.library.opcheck(OPS.linear_cross_entropy_backward.default,
                              (torch.randn(x.shape[0]), x, w, t, b, None, -100, 0.1, 0.0, 1e-3, 4, [True, True, True],
                               1e-4, 1))
        torch.library.opcheck(OPS._lce_loss_stats.default, (x, w, t, b, None, 1, -100, 0.0, 0.0, 0.0, 4))


@pytest.mark.parametrize("kind", ["skip", "shift", "probs"])
def test_gradcheck(kind):
    if kind == "probs":
        case, opts = probs_case(6, 3, 11), dict(label_smoothing=0.1, z_loss=0.01)
    else:
        case = make(8, 3, 30, bias=True, class_weight=True, ignore=3, lead=(2, 4))
        opts = dict(shift=True) if kind == "shift" else dict(z_loss=0.01, chunk_size=3)
    for reduction in ("mean", "none"):
        def f(x, w, b):
            return fastreg.linear_cross_entropy(x, w, case["target"], linear_bias=b, weight=case["weight"],
                                                reduction=reduction, **opts)

        leaves = [case[k].detach().requires_grad_() for k in ("input", "linear_weight", "linear_bias")]
        assert torch.autograd.gradcheck(f, leaves)


# ------------------------------------------------------------------------------- module
def test_module_options():
    case = make(24, 8, 50, ignore=4, lead=(3, 8))
    mod = fastreg.nn.LinearCrossEntropyLoss(z_loss=1e-3, shift=True, return_stats=True, grad_filter_eps=None,
                                            skip_ignored=True)
    loss, stats = mod(case["input"], case["linear_weight"], case["target"])
    want, (lse, pred, acc) = reference(case["input"], case["linear_weight"], case["target"], z_loss=1e-3, shift=True,
                                       return_stats=True)
    torch.testing.assert_close(loss, want, **TIGHT)
    torch.testing.assert_close(stats.lse, lse, **TIGHT)
    assert "shift=True" in repr(mod)


# ------------------------------------------------------------------------------- both devices
@pytest.mark.parametrize("skip", [None, True, False])
def test_options_on_device_match_cpu_float64(device, skip):
    """The driver's options on each device (CUDA: skip_ignored=True opts into the one-sync
    compaction, None keeps the full GEMMs) against the float64 eager composition."""
    case = make(40, 16, 300, dtype=torch.float32, device=device, bias=True, class_weight=True, ignore=17,
                lead=(4, 10))
    exact = {k: (v.double().cpu() if v is not None and v.is_floating_point() else v.cpu() if v is not None else None)
             for k, v in case.items()}
    opts = dict(z_loss=1e-2, label_smoothing=0.1, chunk_size=16, shift=True)
    args = [case[k] for k in ("input", "linear_weight", "target")]
    loss, stats = fastreg.linear_cross_entropy(*args, linear_bias=case["linear_bias"], weight=case["weight"],
                                               skip_ignored=skip, return_stats=True, **opts)
    want, (lse, pred, acc) = reference(*[exact[k] for k in ("input", "linear_weight", "target")],
                                       linear_bias=exact["linear_bias"], weight=exact["weight"], return_stats=True,
                                       **opts)
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.lse.double().cpu(), lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.predictions.cpu(), pred)
    got = run(fastreg.linear_cross_entropy, case, skip_ignored=skip, **opts)
    assert_close_all(got, run(reference, exact, **opts), rtol=1e-4, atol=1e-5)
