"""The CPU row pass torch.ops.fastreg._lce_rows, called directly, against a float64 reference built
from torch itself (F.cross_entropy per row + the z-loss, gradients by autograd): every argument of
the schema (csrc/fastreg.cpp), every logits dtype, V with and without a 16-lane tail, NaN/-inf
logits, ignored and out-of-range targets, class weights with label smoothing, softcap, probability
targets, lse/argmax outputs and the gradient-filter block map."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastreg  # noqa: F401  (registers torch.ops.fastreg)

OP = torch.ops.fastreg._lce_rows
IGNORE = -100
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run(logits, target, *, weight=None, scale=None, eps=0.0, softcap=0.0, zloss=0.0, write_grad=True, probs=None,
        zloss_scale=None, want_stats=True, filter_eps=0.0, keep_shape=None):
    """The op on copies; returns (loss, grad or None, lse, argmax, keep)."""
    rows = logits.shape[0]
    acc = acc_of(logits.dtype)
    lg = logits.clone()
    loss = torch.full((rows,), float("nan"), dtype=acc)
    lse = torch.full((rows,), float("nan"), dtype=acc) if want_stats else None
    am = torch.full((rows,), -7, dtype=torch.int64) if want_stats else None
    keep = torch.zeros(keep_shape, dtype=torch.uint8) if keep_shape else None
    if scale is None:
        scale = torch.tensor([0.37], dtype=acc)
    if probs is not None:
        target = torch.empty(0, dtype=torch.int64)
    OP(lg, target, weight, scale, IGNORE, eps, softcap, zloss, write_grad, loss, probs, zloss_scale, lse, am,
       filter_eps, keep)
    return loss, (lg if write_grad else None), lse, am, keep


def reference(logits, target, *, weight=None, scale=None, eps=0.0, softcap=0.0, zloss=0.0, probs=None, zloss_scale=1.0):
    """float64: (loss_rows, grad w.r.t. the raw logits of sum_r s_r loss_r, lse, active mask)."""
    a = logits.double().clone().requires_grad_(True)
    rows, V = a.shape
    z = softcap * torch.tanh(a / softcap) if softcap > 0 else a
    w = weight.double() if weight is not None else None
    lse = torch.logsumexp(z, dim=1)
    if probs is not None:
        active = torch.ones(rows, dtype=torch.bool)
        ce = F.cross_entropy(z, probs.double(), weight=w, label_smoothing=eps, reduction="none")
    else:
        active = (target != IGNORE) & (target >= 0) & (target < V)
        t = torch.where(active, target, torch.full_like(target, IGNORE))
        ce = F.cross_entropy(z, t, weight=w, ignore_index=IGNORE, label_smoothing=eps, reduction="none")
    loss = torch.where(active, ce + zloss * zloss_scale * lse * lse, torch.zeros_like(ce))
    s = torch.full((rows,), 0.37, dtype=torch.float64) if scale is None else scale.double().expand(rows)
    (grad,) = torch.autograd.grad((loss * s).sum(), a)
    return loss.detach(), grad, torch.where(active, lse, torch.zeros_like(lse)).detach(), active


def rel(x, ref, floor=0.0):
    """Norm-wise relative error; `floor` bounds the denominator from below (a gradient that
    cancels to ~0, e.g. V == 1, is measured against the size of its terms)."""
    x, ref = x.double(), ref.double()
    d = max(ref.norm().item(), floor)
    return (x - ref).norm().item() / (d if d > 0 else 1.0)


def eager_grad_err(logits, target, ref_grad, *, weight=None, eps=0.0, softcap=0.0, probs=None):
    """torch eager's own error in logits.dtype (what fastreg's bf16/fp16/fp32 error is held to)."""
    a = logits.clone().requires_grad_(True)
    z = softcap * torch.tanh(a / softcap) if softcap > 0 else a
    w = weight.to(logits.dtype) if weight is not None else None
    if probs is not None:
        ce = F.cross_entropy(z, probs, weight=w, label_smoothing=eps, reduction="none")
    else:
        ce = F.cross_entropy(z, target, weight=w, ignore_index=IGNORE, label_smoothing=eps, reduction="none")
    (g,) = torch.autograd.grad((ce * 0.37).sum(), a)
    return rel(g, ref_grad)


def case(rows, V, dtype, seed=0, scale=3.0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, V, (rows,), generator=g)
    target[torch.rand(rows, generator=g) < ignore_frac] = IGNORE
    return logits, target


GRAD_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
LOSS_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def check(dtype, logits, target, **kw):
    """Loss, gradient, lse and argmax against the reference; 16-bit gradients also against eager's error."""
    loss, grad, lse, am, _ = run(logits, target, **{k: v for k, v in kw.items() if k != "zloss_scale_value"},
                                 zloss_scale=None if "zloss_scale_value" not in kw else
                                 torch.tensor([kw["zloss_scale_value"]], dtype=acc_of(dtype)))
    ref_kw = {k: v for k, v in kw.items() if k in ("weight", "scale", "eps", "softcap", "zloss", "probs")}
    rloss, rgrad, rlse, active = reference(logits, target, zloss_scale=kw.get("zloss_scale_value", 1.0), **ref_kw)
    assert rel(loss, rloss) <= LOSS_TOL[dtype], (rel(loss, rloss), dtype)
    assert rel(lse, rlse) <= LOSS_TOL[dtype]
    assert (lse[~active] == 0).all()
    err = rel(grad, rgrad, floor=0.1 * math.sqrt(grad.shape[0]))
    assert err <= GRAD_TOL[dtype], (err, dtype)
    if dtype in (torch.bfloat16, torch.float16):
        eager = eager_grad_err(logits, target, rgrad, weight=kw.get("weight"), eps=kw.get("eps", 0.0),
                               softcap=kw.get("softcap", 0.0), probs=kw.get("probs"))
        assert err <= 2 * eager, (err, eager)
    # argmax: of the (softcapped) logits the softmax saw; -1 for ignored rows
    z = logits.double()
    if kw.get("softcap", 0.0) > 0:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    assert torch.equal(am[active], z.argmax(1)[active])
    assert (am[~active] == -1).all()
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 15, 32, 257, 1000])
def test_hard_targets_all_options(dtype, V):
    logits, target = case(24, V, dtype, seed=V)
    check(dtype, logits, target)
    w = (torch.rand(V, dtype=torch.float64) * 2 + 0.1).to(acc_of(dtype))
    per_row = (torch.rand(24, dtype=torch.float64) + 0.5).to(acc_of(dtype))
    check(dtype, logits, target, weight=w, eps=0.1, zloss=1e-3, scale=per_row)
    check(dtype, logits, target, weight=w, softcap=5.0, zloss=1e-2, zloss_scale_value=0.25)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 48, 301])
@pytest.mark.parametrize("normalised", [True, False])
def test_probability_targets(dtype, V, normalised):
    logits, _ = case(20, V, dtype, seed=3 * V)
    g = torch.Generator().manual_seed(V)
    q = torch.rand(20, V, generator=g, dtype=torch.float64) ** 4
    q = q / q.sum(1, keepdim=True) if normalised else q * 0.7  # torch does not require sum 1
    probs = q.to(dtype)
    check(dtype, logits, None, probs=probs)
    w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(acc_of(dtype))
    check(dtype, logits, None, probs=probs, weight=w, eps=0.2, zloss=1e-3, zloss_scale_value=3.0)
    check(dtype, logits, None, probs=probs, weight=w, softcap=4.0)


def test_probability_targets_forward_only_and_every_row_active():
    logits, _ = case(6, 40, torch.float32, seed=1)
    q = torch.softmax(torch.randn(6, 40), 1)
    loss, grad, lse, am, _ = run(logits, None, probs=q, write_grad=False)
    rloss, _, rlse, _ = reference(logits, None, probs=q)
    assert grad is None and rel(loss, rloss) < 2e-6 and (am >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_zloss_scale_multiplies_only_the_zloss(dtype):
    logits, target = case(16, 100, dtype, seed=5)
    acc = acc_of(dtype)
    base, gbase, *_ = run(logits, target, zloss=0.0)
    one, g1, *_ = run(logits, target, zloss=0.01, zloss_scale=torch.tensor([1.0], dtype=acc))
    three, g3, *_ = run(logits, target, zloss=0.01, zloss_scale=torch.tensor([3.0], dtype=acc))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(three - base, 3 * (one - base), rtol=tol * 10, atol=tol)
    zero, g0, *_ = run(logits, target, zloss=0.01, zloss_scale=torch.tensor([0.0], dtype=acc))
    assert torch.equal(zero, base) and torch.equal(g0, gbase)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_logits(dtype):
    logits, target = case(6, 40, dtype, ignore_frac=0.0)
    logits[0, 5] = float("nan")
    logits[0, 9] = float("nan")
    logits[1, :] = float("-inf")
    logits[1, 3] = 2.0  # one finite class, masked others
    logits[2, 7] = float("-inf")
    target[1] = 3
    target[2] = 1
    loss, grad, lse, am, _ = run(logits, target)
    assert torch.isnan(loss[0]) and torch.isnan(grad[0]).all()
    assert am[0] == 5  # the first NaN, as torch.argmax
    assert loss[1].item() == 0.0 and am[1] == 3 and lse[1].item() == 2.0
    assert (grad[1] == 0).all()
    rloss, rgrad, _, _ = reference(logits[2:], target[2:])
    assert torch.isfinite(loss[2:]).all() and rel(loss[2:], rloss) <= LOSS_TOL[dtype]
    assert rel(grad[2:], rgrad) <= GRAD_TOL[dtype] and grad[2, 7] == 0
    # an all -inf row: first maximum at 0, like torch.argmax
    allinf = torch.full((1, 20), float("-inf"), dtype=dtype)
    _, _, _, am, _ = run(allinf, torch.tensor([IGNORE]))
    assert am[0] == -1
    _, _, lse, am, _ = run(allinf, torch.tensor([2]), write_grad=False)
    assert am[0] == 0 and lse[0] == float("-inf")


def test_ignored_and_out_of_range_rows():
    logits, target = case(8, 33, torch.float32, ignore_frac=0.0)
    target[1] = IGNORE
    target[3] = 33
    target[5] = -4
    loss, grad, lse, am, _ = run(logits, target)
    for r in (1, 3, 5):
        assert loss[r] == 0 and lse[r] == 0 and am[r] == -1 and (grad[r] == 0).all()


def test_argmax_first_of_ties_and_16_lane_positions():
    V = 70
    logits = torch.zeros(4, V)
    logits[0, [20, 4, 36]] = 5.0  # same lane (4 mod 16) thrice: first is 4
    logits[1, [50, 19]] = 5.0     # different lanes: first is 19
    logits[2, [69, 68]] = 1.0     # in the tail vector
    logits[3, :] = 1.0
    _, _, _, am, _ = run(logits, torch.zeros(4, dtype=torch.int64))
    assert am.tolist() == [4, 19, 68, 0]


def block_codes(g, eps, acc):
    """lce_math.h's lce_block_code of each entry of the written gradient g: 0 where |g| <= eps (compared
    in the accumulate dtype), else the biased fp32 exponent field of |g| (at least 1; 255 for inf/NaN)."""
    a = g.double().abs()
    over = (a > torch.tensor(eps, dtype=acc).double()) | torch.isnan(a)
    _, e = torch.frexp(a.float())  # |g| = m 2^e, m in [0.5, 1): the exponent field is e + 126
    code = (e.long() + 126).clamp(1, 254)
    code = torch.where(torch.isfinite(a.float()), code, 255)
    return torch.where(over, code, 0)


def keep_map(g, eps, acc, tiles, blocks):
    """The expected block_keep: per (row tile, block), the largest code of its entries."""
    rows, V = g.shape
    th, bw = math.ceil(rows / tiles), math.ceil(V / blocks)
    pad = torch.zeros(tiles * th, blocks * bw, dtype=torch.long)
    pad[:rows, :V] = block_codes(g, eps, acc)
    return pad.view(tiles, th, blocks, bw).amax(dim=(1, 3)).to(torch.uint8)


def test_block_code_bounds_its_entries():
    # the bound of a code (2^(code - 126)) is above every entry with that code and below twice it
    g = torch.tensor([1.0, 0.75, 2.0 ** -30, 3e-39, 1e-45, 65504.0, 2.0 ** 100, -5.0])
    code = block_codes(g, 0.0, torch.float32)
    assert code.tolist()[:2] == [127, 126] and code[5] == 142 and code[3] == 1 and code[4] == 1
    bound = torch.pow(2.0, code.double() - 126)
    assert torch.all(g.double().abs() < bound)
    normal = g.abs() >= 2.0 ** -126
    assert torch.all(bound[normal] <= 2 * g.double().abs()[normal])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 70, 3, 4), (33, 1000, 4, 7), (8, 64, 8, 4), (3, 16, 5, 20)])
def test_block_keep_holds_the_largest_code_of_each_block(dtype, shape):
    rows, V, tiles, blocks = shape
    logits, target = case(rows, V, dtype, seed=rows + V)
    logits[0, 1] = 30.0  # peaked rows: most entries tiny
    loss0, grad0, *_ = run(logits, target)
    th, bw = math.ceil(rows / tiles), math.ceil(V / blocks)
    # eps: the median of the (tile, block) maxima of |g|, so about half of the blocks are kept
    pad = torch.zeros(tiles * th, blocks * bw, dtype=torch.float64)
    pad[:rows, :V] = grad0.double().abs()
    block_max = pad.view(tiles, th, blocks, bw).amax(dim=(1, 3))
    levels = block_max.flatten().unique()  # (16-bit gradients repeat values)
    eps = levels[len(levels) // 2].item()
    loss, grad, _, _, keep = run(logits, target, filter_eps=eps, keep_shape=(tiles, blocks))
    assert torch.equal(grad, grad0) and torch.equal(loss, loss0)  # the map changes nothing else
    want = keep_map(grad, eps, acc_of(dtype), tiles, blocks)
    assert torch.equal(keep, want)
    assert 0 < int((want > 0).sum()) < tiles * blocks
    _, _, _, _, keep = run(logits, target, filter_eps=0.0, keep_shape=(tiles, blocks))  # every nonzero entry coded
    assert torch.equal(keep, keep_map(grad, 0.0, acc_of(dtype), tiles, blocks))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_block_keep_threshold_equality(dtype):
    # |g| == eps does not keep a block; one ulp below keeps it
    logits, target = case(4, 64, dtype, seed=11, ignore_frac=0.0)
    _, grad, *_ = run(logits, target)
    blk = grad.double().abs().view(4, 4, 16)  # one tile per row, 4 blocks of 16
    top = blk[2, 1].max()
    others = blk.clone()
    others[2, 1] = 0
    eps = top.item()
    if dtype != torch.float64:
        eps = float(torch.tensor(eps, dtype=torch.float32))
    _, _, _, _, keep = run(logits, target, filter_eps=eps, keep_shape=(4, 4))
    assert keep[2, 1] == 0
    assert torch.equal(keep > 0, (blk > eps).any(-1))
    below = math.nextafter(eps, 0.0) if dtype == torch.float64 else float(
        torch.nextafter(torch.tensor(eps, dtype=torch.float32), torch.tensor(0.0)))
    _, _, _, _, keep = run(logits, target, filter_eps=below, keep_shape=(4, 4))
    assert keep[2, 1] > 0


def test_block_keep_nan_gradient_keeps_its_block():
    logits, target = case(2, 32, torch.float32, ignore_frac=0.0)
    logits[1, 20] = float("nan")
    _, _, _, _, keep = run(logits, target, filter_eps=1e30, keep_shape=(2, 2))
    assert keep.tolist() == [[0, 0], [255, 255]]  # the largest code: an entry with no bound


@pytest.mark.parametrize("regime", ["small", "large"])
def test_softcap_fp32_gradient_no_less_accurate_than_eager(regime):
    # small: |a / cap| <~ 0.3 (the usual softcap regime); large: saturating
    cap, sc = (30.0, 3.0) if regime == "small" else (2.0, 6.0)
    logits, target = case(64, 500, torch.float32, seed=2, scale=sc, ignore_frac=0.0)
    loss, grad, *_ = run(logits, target, softcap=cap)
    rloss, rgrad, _, _ = reference(logits, target, softcap=cap)
    ours = rel(grad, rgrad)
    eager = eager_grad_err(logits, target, rgrad, softcap=cap)
    assert ours <= eager * 1.05 + 1e-9, (ours, eager)
    a = logits.clone().requires_grad_(True)
    eager_loss = F.cross_entropy(cap * torch.tanh(a / cap), target, reduction="none")
    assert rel(loss, rloss) <= max(1.05 * rel(eager_loss.detach(), rloss), 1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_loads_and_stores_are_exact_like_torch_casts(dtype):
    # loads: the lse of a one-class row is its logit, widened exactly, for every finite bit pattern
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x.float()) & ((x.float().abs() >= 2.0**-126) | (x.float() == 0))]  # the pass flushes fp32 denormals
    _, _, lse, _, _ = run(x[:, None], torch.zeros(len(x), dtype=torch.int64), write_grad=False)
    assert torch.equal(lse, x.float())
    # stores: a one-class row with probability target 0, logit 1 and z-loss 1/2 has gradient exactly
    # its row scale (fp32), so the stored gradient is the op's fp32 -> 16-bit rounding of the scale
    f = x.float()
    f = f[(f != 0) & (f.abs() < 1e37)]
    probe = torch.cat([f, f * (1 + 2.0**-9), f * (1 - 2.0**-12), f * (1 + 2.0**-11), f * (1 + 3 * 2.0**-12),
                       torch.tensor([1e-9, 3e-8, 6e-8, 9e-8, 1e5, 7e4, 65519.0, 65520.0, 3.3e38, -3.3e38, 0.0])])
    probe = probe[torch.isfinite(probe) & ((probe.abs() >= 2.0**-126) | (probe == 0))]  # fp32 denormals flush
    n = len(probe)
    ones = torch.ones(n, 1, dtype=dtype)
    _, grad, *_ = run(ones, None, probs=torch.zeros(n, 1, dtype=dtype), zloss=0.5, scale=probe.float(),
                      want_stats=False)
    want = probe.float().to(dtype)
    assert torch.equal(grad[:, 0].view(torch.int16), want.view(torch.int16))


def test_bad_arguments_raise_clear_errors():
    logits, target = case(4, 10, torch.float32)
    loss = torch.empty(4)
    sc = torch.tensor([1.0])
    with pytest.raises(RuntimeError, match="target_probs"):
        OP(logits.clone(), target, None, sc, IGNORE, 0.0, 0.0, 0.0, True, loss, torch.rand(4, 9))
    with pytest.raises(RuntimeError, match="zloss_scale"):
        OP(logits.clone(), target, None, sc, IGNORE, 0.0, 0.0, 0.0, True, loss, None, torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="lse_rows"):
        OP(logits.clone(), target, None, sc, IGNORE, 0.0, 0.0, 0.0, True, loss, None, None, torch.empty(3))
    with pytest.raises(RuntimeError, match="argmax_rows"):
        OP(logits.clone(), target, None, sc, IGNORE, 0.0, 0.0, 0.0, True, loss, None, None, None, torch.empty(4))
    with pytest.raises(RuntimeError, match="block_keep"):
        OP(logits.clone(), target, None, sc, IGNORE, 0.0, 0.0, 0.0, True, loss, None, None, None, None, 0.1,
           torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="write_grad"):
        OP(logits.clone(), target, None, sc, IGNORE, 0.0, 0.0, 0.0, False, loss, None, None, None, None, 0.1,
           torch.zeros(2, 2, dtype=torch.uint8))
