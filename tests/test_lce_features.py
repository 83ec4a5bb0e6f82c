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


def auto_eps(dtype):
    """grad_filter_eps="auto": a quarter of the dtype's unit roundoff (finfo.eps / 8)."""
    return torch.finfo(dtype).eps / 8


TILE, BLOCK = 256, 256  # rows of a filter tile, (at most) classes of a vocabulary block


def filter_bounds(g, t, x, w):
    """The quantities of the bounded rule (docs/gradient-filtering.md) for one chunk whose rows are
    already grouped by target: g the (rows, V) logit gradient as written (fp64, row scale included).
    Returns U (rows, blocks), the per-(tile, block) bounds and the four scales."""
    N, V = g.shape
    blocks = -(-V // BLOCK)
    bw = -(-V // blocks)
    rows = torch.arange(N)
    own = g.clone()
    val = g[rows, t].clone()
    own[rows, t] = 0
    pad = torch.zeros(N, blocks * bw, dtype=torch.float64)
    pad[:, :V] = own.abs()
    m = pad.view(N, blocks, bw).amax(2)
    # the row pass's code bound 2^(e + 1) for |g| in [2^e, 2^(e+1)); the target's block: its exact max
    _, e = torch.frexp(m.float())
    U = torch.where(m > 0, torch.pow(2.0, e.double()), 0.0)
    tb = t // bw
    U[rows, tb] = m[rows, tb]
    xi, x2 = x.abs().amax(1), x.norm(dim=1)
    wt = w[t]
    gt = val.abs()
    scales = [(gt * xi).max(), (gt * x2).norm(), (gt * wt.abs().amax(1)).max(), (gt * wt.norm(dim=1)).norm()]
    tiles = -(-N // TILE)
    Up = torch.zeros(tiles * TILE, blocks, dtype=torch.float64)
    Up[:N] = U
    Ut = Up.view(tiles, TILE, blocks)

    def per_row(v):
        vp = torch.zeros(tiles * TILE, dtype=torch.float64)
        vp[:N] = v
        return vp.view(tiles, TILE, 1)

    dw_inf, dw_2 = (Ut * per_row(xi)).sum(1), (Ut * per_row(x2)).sum(1)
    dx_inf, dx_2 = Ut.amax(1), Ut.norm(dim=1)
    wpad = torch.zeros(blocks * bw, w.shape[1], dtype=torch.float64)
    wpad[:V] = w.abs()
    a = wpad.view(blocks, bw, -1).sum(1)
    return dict(dw_inf=dw_inf, dw_2=dw_2, dx_inf=dx_inf * a.amax(1), dx_2=dx_2 * a.norm(dim=1),
                scales=[float(v) for v in scales], bw=bw, V=V)


def filter_rule(b, eps):
    """The greedy skip rule of csrc/lce/lce.cpp (bounded_tile_keep), in fp64: (dX keep, dW keep), each
    (tiles, blocks) bool."""
    tiles, blocks = b["dw_inf"].shape
    sw_inf, sw_2, sx_inf, sx_2 = (eps * v for v in b["scales"])
    keep_dw = torch.ones(tiles, blocks, dtype=torch.bool)
    cum_inf, cum_2, q = [0.0] * blocks, [0.0] * blocks, 0.0
    for j in torch.argsort(b["dw_2"].flatten(), stable=True).tolist():
        tt, bb = divmod(j, blocks)
        width = min(b["bw"], b["V"] - bb * b["bw"])
        ni, n2 = cum_inf[bb] + b["dw_inf"][tt, bb].item(), cum_2[bb] + b["dw_2"][tt, bb].item()
        nq = q + width * (n2 * n2 - cum_2[bb] ** 2)
        if ni <= sw_inf and nq <= sw_2 * sw_2:
            cum_inf[bb], cum_2[bb], q = ni, n2, nq
            keep_dw[tt, bb] = False
    keep_dx = torch.ones(tiles, blocks, dtype=torch.bool)
    cum_inf, cum_2, q = [0.0] * tiles, [0.0] * tiles, 0.0
    for j in torch.argsort(b["dx_2"].flatten(), stable=True).tolist():
        tt, bb = divmod(j, blocks)
        ni, n2 = cum_inf[tt] + b["dx_inf"][tt, bb].item(), cum_2[tt] + b["dx_2"][tt, bb].item()
        nq = q + (n2 * n2 - cum_2[tt] ** 2)
        if ni <= sx_inf and nq <= sx_2 * sx_2:
            cum_inf[tt], cum_2[tt], q = ni, n2, nq
            keep_dx[tt, bb] = False
    return keep_dx, keep_dw


def errors(got, exact):
    """(largest entry error, Frobenius error) of got against exact."""
    d = got.double() - exact
    return d.abs().max().item(), d.norm().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_filter_loss_unchanged_and_error_bounded(dtype, reduction):
    case = peaked(300, 32, 2000, dtype)
    ref_case = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in case.items()}
    exact = run(reference, ref_case, reduction=reduction)  # fp64 of the rounded inputs
    eager = run(reference, case, reduction=reduction)
    off = run(fastreg.linear_cross_entropy, case, reduction=reduction)
    # the documented bound: what the filter leaves out is within eps times the gradient's scale, per
    # entry and in norm; the scales from the target entries g_it (upstream scale included)
    x, w, t = ref_case["input"], ref_case["linear_weight"], case["target"]
    up = torch.randn((300,) if reduction == "none" else (), generator=torch.Generator().manual_seed(7),
                     dtype=torch.float64).to(dtype).double()  # run()'s upstream gradient
    s = up / 300 if reduction == "mean" else up
    gt = (torch.softmax(x @ w.t(), 1)[torch.arange(300), t] - 1).abs() * s.abs()
    scale = {1: ((gt * w[t].abs().amax(1)).max(), (gt * w[t].norm(dim=1)).norm()),
             2: ((gt * x.abs().amax(1)).max(), (gt * x.norm(dim=1)).norm())}
    for eps in ("auto", 1e-3):
        on = run(fastreg.linear_cross_entropy, case, reduction=reduction, grad_filter_eps=eps)
        assert torch.equal(on[0], off[0])  # the loss is unchanged
        e = auto_eps(dtype) if eps == "auto" else eps
        for i in (1, 2):
            if eps == "auto":  # as accurate as eager (2x), largest entry and norm
                for ours, theirs in zip(errors(on[i], exact[i]), errors(eager[i], exact[i])):
                    assert ours <= 2 * theirs + 1e-12
            left_out = on[i].double() - off[i].double()
            # the two runs' own rounding: their errors, and one ulp of the output's scale (a sum that
            # straddles a rounding boundary differently)
            ulp = torch.finfo(dtype).eps
            slack = [2 * v for v in errors(off[i], exact[i])]
            assert left_out.abs().max() <= e * scale[i][0] + slack[0] + ulp * exact[i].abs().max()
            assert left_out.norm() <= e * scale[i][1] + slack[1] + ulp * exact[i].norm()


def peaked_lm(N, D, V, p_target, seed=0, zipf=1.1, common=0.5):
    """The issue's kind of input, scaled down: Zipf targets (class id = frequency rank) and hidden
    states aligned with their target's weight row, x = alpha W_t / |W_t| + noise, alpha tuned (in
    fp64, bisection) so the mean target probability is p_target; the rest of each row's mass is
    spread over a long flat tail of tiny entries; `common` is a component shared by every hidden
    state, along which a class's tail entries add up over the rows in dW."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    rank = torch.arange(1, V + 1, dtype=torch.float64).pow(-zipf)
    t = torch.multinomial(rank / rank.sum(), N, replacement=True, generator=g)
    u = w[t] / w[t].norm(dim=1, keepdim=True)
    noise = 0.5 * torch.randn(N, D, generator=g, dtype=torch.float64) / D ** 0.5 + common / D ** 0.5
    wb, tb = w.to(torch.bfloat16).double(), t

    def mean_p(alpha):
        x = (alpha * u + noise).to(torch.bfloat16).double()
        return torch.softmax(x @ wb.t(), 1)[torch.arange(N), tb].mean().item()

    lo, hi = 0.0, 1.0
    while mean_p(hi) < p_target:
        lo, hi = hi, 2 * hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_p(mid) < p_target else (lo, mid)
    return dict(input=hi * u + noise, linear_weight=w, target=t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(512, 128, 4096, 0.8), (384, 64, 6000, 0.9), (700, 96, 3000, 0.6)],
                         ids=lambda s: "N{}-D{}-V{}-p{}".format(*s))
def test_grad_filter_auto_within_2x_eager_on_peaked_inputs(dtype, shape):
    """'auto' keeps the bf16/fp16 contract by construction: dX, dW (and db) errors against fp64 of
    the rounded inputs are at most 2x eager's, largest entry and Frobenius norm, on peaked inputs
    whose long tail of tiny probabilities adds up over the rows of a tile."""
    N, D, V, p_target = shape
    base = peaked_lm(N, D, V, p_target, seed=N + V)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1
    case = dict(input=base["input"].to(dtype), linear_weight=base["linear_weight"].to(dtype),
                target=base["target"], linear_bias=bias.to(dtype) if N == 384 else None, weight=None)
    exact = run(reference, {k: (v.double() if v is not None and v.is_floating_point() else v)
                            for k, v in case.items()})
    eager = run(reference, case)
    on = run(fastreg.linear_cross_entropy, case, grad_filter_eps="auto")
    off = run(fastreg.linear_cross_entropy, case)
    assert torch.equal(on[0], off[0])
    names = ["loss", "dX", "dW", "db"]
    for i in range(1, len(on)):
        for what, ours, theirs in zip(("largest entry", "norm"), errors(on[i], exact[i]), errors(eager[i], exact[i])):
            assert ours <= 2 * theirs, f"{names[i]} {what} error {ours:.3g} > 2x eager's {theirs:.3g}"
    assert not torch.equal(on[2], off[2])  # the filter did skip products here


@pytest.mark.parametrize("chunk_size", [None, 512])
def test_grad_filter_skips_exactly_the_blocks_the_rule_allows(chunk_size):
    """The documented rule, per 256-row tile: the rows are grouped by target (stable sort); a (tile,
    ~256-class block) product is left out of dX / dW as the greedy budget of filter_rule allows (the
    bounds from each row's block codes, the scales from the target entries); the target entries
    are added exactly. The rows come shuffled (tiles in input order would mix every kind of row),
    the classes of a block share a direction so a row's probability mass stays in few blocks."""
    N, D, V, eps = 1100, 64, 2000, 2.0 ** -9
    bw = -(-V // -(-V // 256))  # V split evenly into ceil(V / 256) blocks: 250 classes each
    g = torch.Generator().manual_seed(5)
    centers = torch.randn((V + bw - 1) // bw, D, generator=g, dtype=torch.float64)
    w = centers.repeat_interleave(bw, 0)[:V] + 0.3 * torch.randn(V, D, generator=g, dtype=torch.float64)
    groups = ((1, 256), (3, 256), (7, N - 512))  # (block of the targets, rows)
    t = torch.cat([bw * b + torch.randint(0, min(bw, V - bw * b), (n,), generator=g) for b, n in groups])
    x = 2.0 * w[t] / w[t].norm(dim=1, keepdim=True) + 0.05 * torch.randn(N, D, generator=g, dtype=torch.float64)
    side = t // bw != 3
    x[side] += 1.5 * centers[5] / centers[5].norm()
    shuffle = torch.randperm(N, generator=g)
    t, x = t[shuffle], x[shuffle]
    grad = torch.softmax(x @ w.t(), 1)
    grad[torch.arange(N), t] -= 1.0
    order = torch.argsort(t, stable=True)
    rows_per = N if chunk_size is None else chunk_size
    keep_dx = torch.empty(N, V, dtype=torch.bool)
    keep_dw = torch.empty(N, V, dtype=torch.bool)
    for c0 in range(0, N, rows_per):  # each chunk of grouped rows decides on its own
        o = order[c0:c0 + rows_per]
        kx, kw = filter_rule(filter_bounds(grad[o], t[o], x[o], w), eps)
        n = len(o)
        keep_dx[o] = kx.repeat_interleave(TILE, 0)[:n].repeat_interleave(bw, 1)[:, :V]
        keep_dw[o] = kw.repeat_interleave(TILE, 0)[:n].repeat_interleave(bw, 1)[:, :V]
    assert 0.05 < keep_dx.double().mean() < 0.95 and 0.05 < keep_dw.double().mean() < 0.95  # a mixed case
    rows = torch.arange(N)
    fx = torch.where(keep_dx, grad, 0.0)
    fx[rows, t] = grad[rows, t]
    fw = torch.where(keep_dw, grad, 0.0)
    fw[rows, t] = grad[rows, t]
    want_dx, want_dw = fx @ w, fw.t() @ x
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
        assert (full - want).abs().max() > 1e-9  # the rule does leave products out
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
