"""Tests of fastreg.linear_mse_loss (CPU, and CUDA when present via the `device` fixture).

Both drivers are covered: the one-pass small path (CPU, float/double, few outputs) and the chunked
GEMM path (many outputs, reduced precision, CUDA)."""
import pytest
import torch
from torch.nn import functional as F

import fastreg

OPS = torch.ops.fastreg


def reference(input, linear_weight, target, *, linear_bias=None, reduction="mean"):
    return F.mse_loss(F.linear(input, linear_weight, linear_bias), target, reduction=reduction)


def make(N, D, V, *, dtype=torch.float64, device="cpu", bias=True, lead=None, noncontig=False):
    g = torch.Generator().manual_seed(N * 1000003 + D * 1009 + V)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / max(D, 1) ** 0.5
    y = torch.randn(N, V, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    if noncontig:  # strided views of bigger tensors
        x = torch.cat([x, x], dim=1)[:, ::2]
        w = torch.randn(D, V, generator=g, dtype=torch.float64).t() / max(D, 1) ** 0.5
        y = torch.cat([y, y], dim=1)[:, 1::2]
    if lead is not None:
        x, y = x.reshape(*lead, D), y.reshape(*lead, V)
    cast = lambda a: None if a is None else a.to(device=device, dtype=dtype)  # noqa: E731
    return dict(input=cast(x), linear_weight=cast(w), target=cast(y), linear_bias=cast(b))


def run(fn, case, **opts):
    """Loss and gradients (w.r.t. input, weight, bias) for a random upstream gradient."""
    case = {k: (v.detach().clone().requires_grad_(k != "target") if v is not None else None) for k, v in case.items()}
    loss = fn(case["input"], case["linear_weight"], case["target"], linear_bias=case["linear_bias"], **opts)
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(loss)
    leaves = [case[k] for k in ("input", "linear_weight", "linear_bias") if case[k] is not None]
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves, up))


def assert_close_all(got, want, rtol, atol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"output {i}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"output {i} (0 loss, 1 input, 2 weight, 3 bias): {m}")


SHAPES = [(1, 1, 1), (16, 3, 2), (64, 64, 10), (37, 19, 64), (50, 7, 65), (300, 40, 200), (0, 4, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-V{}".format(*s))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(device, shape, reduction, bias):
    case = make(*shape, device=device, bias=bias)
    want = run(reference, case, reduction=reduction)
    got = run(fastreg.linear_mse_loss, case, reduction=reduction)
    assert_close_all(got, want, rtol=1e-9, atol=1e-10)
    case32 = {k: (v.float() if v is not None else v) for k, v in case.items()}
    got32 = run(fastreg.linear_mse_loss, case32, reduction=reduction)
    assert got32[0].dtype == torch.float32
    assert_close_all(got32, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("layout", ["3d", "noncontig"])
@pytest.mark.parametrize("V", [3, 100], ids=["small", "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_layouts(device, layout, V, reduction):
    if layout == "3d":
        case = make(6, 9, V, device=device, lead=(2, 3))
    else:
        case = make(23, 12, V, device=device, noncontig=True)
        assert not case["input"].is_contiguous() and not case["target"].is_contiguous()
    got = run(fastreg.linear_mse_loss, case, reduction=reduction)
    assert_close_all(got, run(reference, case, reduction=reduction), rtol=1e-9, atol=1e-10)
    if reduction == "none":
        assert got[0].shape == case["target"].shape


def test_large_work_runs_in_parallel_blocks_and_chunks():
    """Enough rows for the small path's parallel blocks, and for the chunk path with V > 64."""
    for V in (8, 80):
        case = make(6000, 48, V, dtype=torch.float64)
        assert_close_all(run(fastreg.linear_mse_loss, case), run(reference, case), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("V", [4, 70], ids=["small", "chunked"])
def test_gradcheck(device, reduction, V):
    case = make(5, 3, V, device=device)
    x, w, b = (case[k].detach().requires_grad_() for k in ("input", "linear_weight", "linear_bias"))

    def f(x, w, b):
        return fastreg.linear_mse_loss(x, w, case["target"], linear_bias=b, reduction=reduction)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_low_precision_error_within_2x_of_torch(device, dtype, reduction):
    """bf16/fp16: the error against an fp64 reference is at most 2x torch eager's same-dtype error."""
    case = make(96, 128, 20, device=device)
    exact = run(reference, case, reduction=reduction)
    low = {k: (v.to(dtype) if v is not None else v) for k, v in case.items()}
    ours = run(fastreg.linear_mse_loss, low, reduction=reduction)
    torchs = run(reference, low, reduction=reduction)
    for i, (o, t, e) in enumerate(zip(ours, torchs, exact)):
        assert o.dtype == dtype
        err_ours = (o.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        floor = torch.finfo(dtype).eps * e.abs().max().item()
        assert err_ours <= 2 * err_torch + floor, f"output {i}: fastreg error {err_ours} vs torch {err_torch}"


def test_opcheck(device):
    for red, mask, bias, V in [(1, [True, True, True], True, 5), (2, [True, False, False], False, 70),
                               (0, [False, False, False], True, 5), (1, [False, True, True], True, 70)]:
        c = make(13, 6, V, dtype=torch.float32, device=device, bias=bias)
        args = (c["input"], c["linear_weight"], c["target"], c["linear_bias"], red, mask)
        torch.library.opcheck(OPS.linear_mse_loss.default, args)
        torch.library.opcheck(OPS.linear_mse_loss_backward.default,
                              (torch.randn(13, V, device=device),) + args[:4] + ([True, True, bias],))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(device, reduction):
    torch._dynamo.reset()
    case = make(24, 16, 5, dtype=torch.float32, device=device)

    def step(x, w, b, y):
        loss = fastreg.linear_mse_loss(torch.relu(x), w, y, linear_bias=b, reduction=reduction)
        return loss.sum() if reduction == "none" else loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        x, w, b = (case[k].detach().clone().requires_grad_() for k in ("input", "linear_weight", "linear_bias"))
        loss = fn(x, w, b, case["target"])
        loss.backward()
        outs.append([loss.detach(), x.grad, w.grad, b.grad])
    assert_close_all(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_backward_twice_and_double_backward_refused():
    case = make(6, 3, 2)
    x = case["input"].requires_grad_()
    loss = fastreg.linear_mse_loss(x, case["linear_weight"], case["target"])
    (g1,) = torch.autograd.grad(loss, x, torch.tensor(2.0, dtype=torch.float64), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(3.0, dtype=torch.float64), retain_graph=True)
    torch.testing.assert_close(g2, g1 * 1.5)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    # a unit upstream gradient is handed on unscaled: .grad must not alias the saved gradient
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad.mul_(5.0)
    loss.backward()
    torch.testing.assert_close(x.grad, 6.0 * first)


def test_no_grad_computes_no_gradients():
    case = make(8, 4, 3)
    for k in ("input", "linear_weight", "linear_bias"):
        case[k].requires_grad_()
    with torch.no_grad():
        out = OPS.linear_mse_loss(case["input"], case["linear_weight"], case["target"], case["linear_bias"], 1,
                                  [False] * 3)
    assert all(t.numel() == 0 for t in out[1:])
    torch.testing.assert_close(out[0], reference(**case).detach())


BAD = [
    ("feature mismatch", ValueError, "features", lambda c: dict(c, linear_weight=torch.randn(3, 5))),
    ("target shape", ValueError, "target has shape", lambda c: dict(c, target=c["target"][:, 0])),
    ("target broadcast", ValueError, "target has shape", lambda c: dict(c, target=c["target"][:1])),
    ("bias shape", ValueError, "linear_bias has shape", lambda c: dict(c, linear_bias=torch.randn(4))),
    ("weight 1-D", ValueError, "linear_weight must be 2-D", lambda c: dict(c, linear_weight=torch.randn(4))),
    ("int target", TypeError, "target dtype", lambda c: dict(c, target=c["target"].long())),
    ("mixed dtypes", TypeError, "does not match input dtype", lambda c: dict(c, linear_weight=c["linear_weight"].double())),
    ("mixed devices", ValueError, "one device", lambda c: dict(c, linear_weight=c["linear_weight"].to("meta"))),
    ("int input", TypeError, "float32, float64", lambda c: dict(c, input=c["input"].long(),
                                                                 linear_weight=c["linear_weight"].long(),
                                                                 target=c["target"].long(),
                                                                 linear_bias=c["linear_bias"].long())),
    ("scalar input", ValueError, "input must be a tensor of shape", lambda c: dict(c, input=torch.tensor(1.0))),
]


@pytest.mark.parametrize("name,exc,match,mutate", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, exc, match, mutate):
    case = mutate(make(8, 4, 3, dtype=torch.float32))
    with pytest.raises(exc, match=match):
        fastreg.linear_mse_loss(**case)


def test_bad_reduction_and_target_requiring_grad():
    case = make(8, 4, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fastreg.linear_mse_loss(**case, reduction="avg")
    case["target"].requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'target'"):
        fastreg.linear_mse_loss(**case)


@pytest.mark.parametrize("V", [4, 300])  # small one-pass path and chunked GEMM path
def test_strided_bias(V):
    # regression: the one-pass path read a strided bias view as if it were dense
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2 * V, dtype=torch.float64)[::2].requires_grad_()
    y = torch.randn(6, V, dtype=torch.float64)
    got = fastreg.linear_mse_loss(x, w, y, linear_bias=b)
    ref = F.mse_loss(F.linear(x, w, b), y)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    g_got = torch.autograd.grad(got, (x, w, b))
    g_ref = torch.autograd.grad(ref, (x, w, b))
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
