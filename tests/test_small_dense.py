"""The register-tiled one-pass kernels of the CPU small path (csrc/small/small_dense.h), through
fastreg.linear_cross_entropy and fastreg.linear_mse_loss, against the eager formulas in float64.

The kernel takes rows four at a time (a tile skips ignored rows, a partial last tile is padded),
holds the logits as 16-lane class vectors (V padded up to 16, 32, 48 or 64) and runs grad_W /
grad_x over features in 16-lane blocks with a scalar tail: the shapes below put N, V and D on
both sides of those boundaries."""
import pytest
import torch
from torch.nn import functional as F

import fastreg
from fastreg.reference import linear_cross_entropy_reference

# (N, D, V): N around multiples of the 4-row tile, V around the 16-lane class vectors, D around the
# 16-lane feature blocks; the last two are wide enough (padded W^T > 2^16 elements) for the logits
# as dot products over the features
TILE_SHAPES = [(1, 1, 1), (3, 5, 2), (5, 17, 15), (9, 16, 16), (7, 33, 17), (13, 15, 33), (6, 40, 48), (11, 31, 64),
               (9, 4100, 3), (6, 5001, 17)]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _loss_and_grads(fn, x, w, b, up_seed=3, **kw):
    x, w, b = _leaves(x, w, b)
    loss = fn(x, w, b, **kw)
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(up_seed), dtype=loss.dtype)
    leaves = [a for a in (x, w, b) if a is not None]
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves, up))


def _assert_all_close(got, want, rtol, atol):
    assert len(got) == len(want)
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"output {i} (0 loss, 1 input, 2 weight, 3 bias): {m}")


def _ce_case(N, D, V, dtype=torch.float64, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed * 7919 + N * 101 + D * 13 + V)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[1::3] = -100  # ignored rows in between: tiles are gathered from the active rows
    if strided:
        x = torch.cat([x, x], 1)[:, ::2]  # feature stride 2: made dense before the kernel
    return x.to(dtype), w.to(dtype), b.to(dtype), t


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "N{}-D{}-V{}".format(*s))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{}, {"weight": True, "label_smoothing": 0.2},
                                  {"softcap": 2.5, "z_loss": 1e-2}, {"bias": False, "strided": True}],
                         ids=["plain", "cw-smooth", "softcap-zloss", "nobias-strided"])
def test_ce_tiles_match_eager_fp64(shape, reduction, opts):
    opts = dict(opts)
    bias, strided = opts.pop("bias", True), opts.pop("strided", False)
    x, w, b, t = _ce_case(*shape, strided=strided)
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(shape[2], generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    b = b if bias else None

    def ours(x, w, b, **kw):
        return fastreg.linear_cross_entropy(x, w, t, linear_bias=b, **kw)

    def eager(x, w, b, **kw):
        return linear_cross_entropy_reference(x, w, t, linear_bias=b, **kw)

    kw = dict(opts, reduction=reduction)
    _assert_all_close(_loss_and_grads(ours, x, w, b, **kw), _loss_and_grads(eager, x, w, b, **kw), 1e-10, 1e-12)


@pytest.mark.parametrize("shape", [(13, 15, 33), (11, 31, 64), (257, 100, 10)], ids=lambda s: "N{}-D{}-V{}".format(*s))
def test_ce_tiles_fp32_close_to_fp64(shape):
    """float32 logits from the class vectors and the vectorised exp, against float64 eager."""
    x, w, b, t = _ce_case(*shape)

    def ours(x, w, b):
        return fastreg.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)

    def eager(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), t, label_smoothing=0.1)

    want = _loss_and_grads(eager, x, w, b)
    got = _loss_and_grads(ours, x.float(), w.float(), b.float())
    eager32 = _loss_and_grads(eager, x.float(), w.float(), b.float())
    for i, (a, e, r) in enumerate(zip(got, eager32, want)):
        ours_err = (a.double() - r).abs().max().item()
        torch_err = (e.double() - r).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-6, f"output {i}: error {ours_err:.3g} vs torch float32 {torch_err:.3g}"


def test_ce_all_rows_ignored_and_nan_in_ignored_rows():
    """Ignored rows never enter a tile: an ignored row's NaN features never reach grad_W, and the
    lone active row makes a padded tile (padding rows repeat it with a zero gradient)."""
    x, w, b, t = _ce_case(10, 20, 5)
    t[:] = -100
    t[7] = 2
    x[0] = float("nan")
    got = _loss_and_grads(lambda x, w, b: fastreg.linear_cross_entropy(x, w, t, linear_bias=b), x, w, b)
    want = _loss_and_grads(lambda x, w, b: F.cross_entropy(F.linear(x[7:8], w, b), t[7:8]), x, w, b)
    torch.testing.assert_close(got[0], want[0])
    assert torch.isfinite(got[2]).all() and torch.isfinite(got[3]).all()
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[3], want[3])
    assert (got[1][torch.arange(10) != 7] == 0).all()


def test_ce_wide_layer_routed_to_one_pass_matches_eager():
    """N x D x V beyond the small-work bound but V x D <= 2^16 (the one pass since the tiled kernel;
    several 512-row runs and parallel blocks)."""
    x, w, b, t = _ce_case(1200, 700, 40, seed=5)
    kw = dict(reduction="mean")
    got = _loss_and_grads(lambda x, w, b: fastreg.linear_cross_entropy(x, w, t, linear_bias=b, **kw), x, w, b)
    want = _loss_and_grads(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, **kw), x, w, b)
    _assert_all_close(got, want, 1e-10, 1e-12)


@pytest.mark.parametrize("shape", TILE_SHAPES + [(600, 700, 40)], ids=lambda s: "N{}-D{}-V{}".format(*s))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("variant", ["bias", "nobias-strided"])
def test_mse_tiles_match_eager_fp64(shape, reduction, variant):
    N, D, V = shape
    g = torch.Generator().manual_seed(N * 31 + D * 7 + V)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if variant == "bias" else None
    y = torch.randn(N, V, generator=g, dtype=torch.float64)
    if variant != "bias":
        x, y = torch.cat([x, x], 1)[:, 1::2], torch.cat([y, y], 1)[:, ::2]

    def ours(x, w, b):
        return fastreg.linear_mse_loss(x, w, y, linear_bias=b, reduction=reduction)

    def eager(x, w, b):
        return F.mse_loss(F.linear(x, w, b), y, reduction=reduction)

    _assert_all_close(_loss_and_grads(ours, x, w, b), _loss_and_grads(eager, x, w, b), 1e-10, 1e-12)
