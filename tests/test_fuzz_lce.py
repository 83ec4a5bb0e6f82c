"""Property-based tests of fastreg.linear_cross_entropy against the eager composition
``F.cross_entropy(F.linear(...))`` (fastreg.reference, which adds softcap and z-loss by hand).

hypothesis draws the shapes (N including 0 and 1 through leading dimensions of any size, D from
1, V from 1, primes), memory layouts (transposed, strided, expanded views of the leaves), every
option and combination, int32/int64 targets and which leaves require grad, then compares the loss
and every gradient with the eager result:
  * float64: to ~1e-10;
  * bfloat16, float16: the error against the float64 eager result on the same (rounded) inputs
    is at most 2x eager's own error in that dtype, plus two units of rounding of the terms summed
    (natural_scales; eager sometimes gets an output exactly right by luck);
  * float32: the README's contract, 1e-5 relative to the terms summed (plus 2x eager's error);
  * gradcheck on small float64 draws;
  * bad input drawn at random raises the documented exception (IndexError / ValueError /
    TypeError, naming the problem) or, for NaN/inf values, gives eager's NaN/inf pattern.
Example counts: conftest.examples (the "ci" profile in `make test`, "fuzz" in `make fuzz`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import assume, example, given, note, strategies as st

import fastreg
from conftest import FUZZ_COUNTS, examples
from fastreg.reference import linear_cross_entropy_reference as reference

PRIMES = [2, 3, 5, 7, 11, 13, 17, 31, 61, 127, 257, 509, 1021, 2053]
LOW = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Views of a leaf ("base" tensor, the one that requires grad) that the public function receives.
# Each maps the wanted shape to (base shape, base -> view).
def _input_layout(kind, lead, D):
    if kind == "transposed":   # features first in memory: stride(-1) != 1
        return (D,) + lead, lambda b: b.movedim(0, -1)
    if kind == "strided":      # every other feature of a wider tensor
        return lead + (2 * D,), lambda b: b[..., ::2]
    if kind == "expanded" and lead:  # one row broadcast to all rows (stride 0)
        return (1,) * len(lead) + (D,), lambda b: b.expand(lead + (D,))
    return lead + (D,), lambda b: b


def _weight_layout(kind, V, D):
    if kind == "transposed":   # e.g. a tied embedding stored (D, V)
        return (D, V), lambda b: b.t()
    if kind == "strided":
        return (V, 2 * D), lambda b: b[:, ::2]
    if kind == "row-strided":
        return (2 * V, D), lambda b: b[::2]
    return (V, D), lambda b: b


def _vector_layout(kind, V):
    if kind == "strided":
        return (2 * V,), lambda b: b[::2]
    return (V,), lambda b: b


@dataclass
class Case:
    lead: tuple
    D: int
    V: int
    seed: int
    x_layout: str
    w_layout: str
    bias: Optional[str]          # None or a layout
    class_weight: Optional[str]  # None, or "positive"/"with-zeros" + ":" + layout
    target_dtype: torch.dtype
    target_strided: bool
    ignore_index: Optional[int]
    ignore_frac: float
    reduction: str
    label_smoothing: float
    softcap: Optional[float]
    z_loss: float
    chunk_size: Optional[int]
    x_scale: float
    w_scale: float
    grad_of: tuple                # which of ("input", "weight", "bias") require grad

    @property
    def N(self):
        return math.prod(self.lead)

    def opts(self):
        return dict(reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                    softcap=self.softcap, z_loss=self.z_loss, chunk_size=self.chunk_size)


@st.composite
def cases(draw, max_rows=40, max_d=33, max_v=300, small=False):
    ndim = draw(st.integers(0, 3))
    lead = tuple(draw(st.lists(st.integers(0, 3 if small else 6), min_size=ndim, max_size=ndim)))
    assume(math.prod(lead) <= max_rows)
    D = draw(st.one_of(st.just(1), st.integers(1, max_d)))
    V = draw(st.one_of(st.just(1), st.sampled_from([p for p in PRIMES if p <= max_v * 8]), st.integers(1, max_v)))
    N = math.prod(lead)
    target_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    ignore_index = draw(st.one_of(st.just(-100), st.none(), st.integers(0, V - 1), st.integers(V, V + 1000),
                                  st.integers(-2 ** 40, -1)))
    fits = ignore_index is None or target_dtype == torch.int64 or -2 ** 31 <= ignore_index < 2 ** 31
    ignore_frac = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])) if fits else 0.0
    cw = draw(st.sampled_from([None, None, "positive", "with-zeros"]))
    if cw is not None:
        cw += ":" + draw(st.sampled_from(["contig", "strided"]))
    return Case(
        lead=lead, D=D, V=V, seed=draw(st.integers(0, 2 ** 31 - 1)),
        x_layout=draw(st.sampled_from(["contig", "contig", "transposed", "strided", "expanded"])),
        w_layout=draw(st.sampled_from(["contig", "contig", "transposed", "strided", "row-strided"])),
        bias=draw(st.sampled_from([None, "contig", "strided"])),
        class_weight=cw,
        target_dtype=target_dtype,
        target_strided=draw(st.booleans()),
        ignore_index=ignore_index,
        ignore_frac=ignore_frac,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))),
        softcap=draw(st.one_of(st.none(), st.floats(0.05, 60.0))),
        z_loss=draw(st.one_of(st.just(0.0), st.floats(-0.05, 0.5))),
        chunk_size=draw(st.one_of(st.none(), st.integers(1, N + 3))),
        x_scale=draw(st.sampled_from([0.1, 1.0, 4.0])),
        w_scale=draw(st.sampled_from([0.1, 1.0, 4.0])),
        grad_of=tuple(k for k in ("input", "weight", "bias") if draw(st.booleans()) or (k == "input" and small)),
    )


def materialise(case: Case, dtype: torch.dtype):
    """The leaves (float64 values rounded to `dtype`, stored as `dtype`) and the non-leaf inputs."""
    g = torch.Generator().manual_seed(case.seed)
    lead, D, V = case.lead, case.D, case.V
    xs, xview = _input_layout(case.x_layout, lead, D)
    ws, wview = _weight_layout(case.w_layout, V, D)
    leaves = {"input": torch.randn(xs, generator=g, dtype=torch.float64) * case.x_scale,
              "weight": torch.randn(ws, generator=g, dtype=torch.float64) * case.w_scale / math.sqrt(D)}
    views = {"input": xview, "weight": wview}
    if case.bias is not None:
        bs, views["bias"] = _vector_layout(case.bias, V)
        leaves["bias"] = torch.randn(bs, generator=g, dtype=torch.float64)
    leaves = {k: v.to(dtype) for k, v in leaves.items()}

    cw = None
    if case.class_weight is not None:
        kind, layout = case.class_weight.split(":")
        cs, cview = _vector_layout(layout, V)
        cw = torch.rand(cs, generator=g, dtype=torch.float64) * 2 + 0.05
        if kind == "with-zeros":
            cw = cw * (torch.rand(cs, generator=g) < 0.6)
        cw = cview(cw.to(dtype))

    t = torch.randint(0, V, lead + (2,), generator=g)
    if case.ignore_frac:
        ignored = torch.rand(lead + (2,), generator=g) < case.ignore_frac
        t[ignored] = -100 if case.ignore_index is None else case.ignore_index
    t = t.to(case.target_dtype)
    t = t[..., 0] if case.target_strided else t[..., 0].contiguous()
    up = torch.randn(lead if case.reduction == "none" else (), generator=g, dtype=torch.float64).to(dtype)
    return leaves, views, t, cw, up


def run(fn, case: Case, leaves, views, target, cw, up, dtype):
    """Loss and the gradients of the leaves in case.grad_of (upstream gradient `up`)."""
    leaves = {k: v.to(dtype).requires_grad_(k in case.grad_of) for k, v in leaves.items()}
    x, w = views["input"](leaves["input"]), views["weight"](leaves["weight"])
    b = views["bias"](leaves["bias"]) if "bias" in leaves else None
    opts = case.opts()
    if fn is reference:
        target = target.long()  # eager nll_loss takes int64 targets only
        opts.pop("chunk_size")
        if opts["ignore_index"] is None:
            opts["ignore_index"] = -100
    loss = fn(x, w, target, linear_bias=b, weight=None if cw is None else cw.to(dtype), **opts)
    wanted = [leaves[k] for k in ("input", "weight", "bias") if k in leaves and k in case.grad_of]
    grads = list(torch.autograd.grad(loss, wanted, up.to(dtype))) if wanted else []
    return [loss.detach()] + grads


def _max_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    d = (a.double() - exact)[exact.isfinite()]
    return d.abs().nan_to_num(nan=math.inf).max().item() if d.numel() else 0.0


def natural_scales(case: Case, leaves, views, t, cw, up):
    """For each output (loss, then the gradients in run's order), the magnitude of the terms it
    sums: float arithmetic owes an error of a few units of rounding of *that*, not of the result
    (e.g. with V=1 the softmax gradient p - 1 cancels to 0, but p itself is computed to ~1 ulp).
    Per row n: |dloss/dlogit| <= s_n (2 max(class weight) + 2 |z_loss| |lse_n|), where s_n is the
    row's reduction scale times its upstream gradient."""
    x = views["input"](leaves["input"].double()).reshape(-1, case.D)
    w = views["weight"](leaves["weight"].double())
    z = torch.nn.functional.linear(x, w, views["bias"](leaves["bias"].double()) if "bias" in leaves else None)
    if case.softcap is not None:
        z = case.softcap * torch.tanh(z / case.softcap)
    lse = torch.logsumexp(z, -1) if z.numel() else z.new_zeros(z.shape[0])
    cw_max = cw.double().max().item() if cw is not None else 1.0
    active = (t.reshape(-1).long() != (-100 if case.ignore_index is None else case.ignore_index)).double()
    if case.reduction == "mean":
        denom = ((cw.double()[t.reshape(-1).long().clamp(0, case.V - 1)] if cw is not None else 1.0) * active).sum()
        s = active / denom if denom > 0 else torch.where(active > 0, math.inf, 0.0)
    else:
        s = active
    s = s * up.double().abs().reshape(-1) if case.reduction == "none" else s * abs(float(up))
    # a softcapped logit is computed to a few ulp of the cap (tanh), not of itself
    zmag = (z.abs().amax(-1) if z.numel() else lse * 0) + (case.softcap or 0.0)
    row_loss = cw_max * (lse.abs() + zmag) + abs(case.z_loss) * (lse.abs() + zmag) ** 2
    m = s * (2 * cw_max + 2 * abs(case.z_loss) * (lse.abs() + zmag))
    sum_or_max = (lambda v: v.max().item() if v.numel() else 0.0) if case.reduction == "none" else (
        lambda v: v.sum().item())
    scales = [sum_or_max(row_loss * active * (1 if case.reduction == "none" else s / max(abs(float(up)), 1e-300)))]
    big = lambda v: v.abs().max().item() if v.numel() else 0.0  # noqa: E731
    for k in ("input", "weight", "bias"):
        if k in leaves and k in case.grad_of:
            # expanded/strided views sum several view elements into one leaf element: x2 margin
            scales.append(2 * {"input": (m.max().item() if m.numel() else 0.0) * big(w),
                               "weight": m.sum().item() * big(x), "bias": m.sum().item()}[k])
    return scales


def assert_matches(ours, exact, eager_low=None, dtype=torch.float64, zero_for_nan_grads=False, natural=None):
    """ours == exact up to the dtype's bound, with NaN/inf at the same places. zero_for_nan_grads:
    a gradient may be 0 where eager's is nan (see check_against_eager). natural: natural_scales."""
    names = ["loss", "grad 1", "grad 2", "grad 3"]
    assert len(ours) == len(exact)
    for i, (o, e) in enumerate(zip(ours, exact)):
        what = names[i]
        if i and zero_for_nan_grads:
            e = torch.where(e.isnan() & (o == 0), 0.0, e)
        assert o.dtype == dtype, f"{what}: dtype {o.dtype}"
        assert o.shape == e.shape, f"{what}: shape {tuple(o.shape)} != {tuple(e.shape)}"
        # NaN/inf exactly where eager has them (e.g. 'mean' over no rows is nan, like torch)
        assert torch.equal(o.isnan(), e.isnan()), f"{what}: NaN pattern differs:\n{o}\n{e}"
        inf = e.isinf()
        assert torch.equal(o.isinf(), inf) and torch.equal(o[inf], e[inf].to(o.dtype)), f"{what}: inf pattern differs"
        scale = e[e.isfinite()].abs().max().item() if e.isfinite().any() else 0.0
        err = _max_err(o, e)
        if dtype == torch.float64:
            bound = 1e-9 * (1.0 + scale)
        else:
            err_eager = _max_err(eager_low[i], e)
            if dtype == torch.float32:  # the README's contract: ~1e-5 relative (at the natural scale)
                bound = 2 * err_eager + 1e-5 * max(scale, natural[i])
            else:  # bf16/fp16: the project's rule, 2x eager's error (+ 2 units of rounding)
                bound = 2 * err_eager + 2 * torch.finfo(dtype).eps * max(scale, natural[i])
        assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (output scale {scale:.3g})"


def check_against_eager(case: Case, dtype: torch.dtype):
    note(repr(case))
    leaves, views, t, cw, up = materialise(case, dtype)
    ours = run(fastreg.linear_cross_entropy, case, leaves, views, t, cw, up, dtype)
    exact = run(reference, case, {k: v.double() for k, v in leaves.items()}, views, t,
                None if cw is None else cw.double(), up.double(), torch.float64)
    eager_low = None if dtype == torch.float64 else run(reference, case, leaves, views, t, cw, up, dtype)
    # A 'mean' over zero total weight is nan (torch's convention; checked on the loss). Eager's
    # composition then also spreads nan into the gradients of ignored rows through its z-loss
    # term (0 * (1/0)); fastreg leaves those rows' gradients 0, which is what they are.
    degenerate = case.reduction == "mean" and bool(exact[0].isnan())
    natural = None if dtype == torch.float64 else natural_scales(case, leaves, views, t, cw, up)
    assert_matches(ours, exact, eager_low, dtype, zero_for_nan_grads=degenerate, natural=natural)


def test_zero_weight_mean_with_z_loss_is_nan():
    """Found by test_float64_matches_eager: 'mean' whose kept rows all have class weight 0 gave
    +inf (z-loss sum / 0) instead of torch's nan (0 / 0); label smoothing did the same."""
    x, w = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t, cw = torch.tensor([0, 1, -100]), torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    for opts in (dict(z_loss=0.5), dict(label_smoothing=0.3), dict()):
        assert reference(x, w, t, weight=cw, **opts).isnan()
        assert fastreg.linear_cross_entropy(x, w, t, weight=cw, **opts).isnan(), opts


def test_ignore_index_beyond_classes_with_class_weights():
    """Found by test_half_precision_within_2x_of_eager_error: an ignore_index >= V (a valid
    choice) made the eager reference index the class weights out of range for 'mean' + z-loss."""
    x, w = torch.randn(2, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    t, cw = torch.tensor([1, 0]), torch.tensor([0.7], dtype=torch.float64)
    kw = dict(weight=cw, ignore_index=1, z_loss=0.5)
    torch.testing.assert_close(fastreg.linear_cross_entropy(x, w, t, **kw), reference(x, w, t, **kw))


@examples(120)
@given(case=cases())
def test_float64_matches_eager(case):
    check_against_eager(case, torch.float64)
    FUZZ_COUNTS["loss vs eager, float64"] += 1


# found by a long run: z-loss of a softcapped logit near 0 (its error is relative to the cap)
SOFTCAP_NEAR_ZERO = Case(lead=(), D=1, V=1, seed=248, x_layout="contig", w_layout="contig", bias=None,
                         class_weight="with-zeros:contig", target_dtype=torch.int64, target_strided=False,
                         ignore_index=-100, ignore_frac=0.0, reduction="sum", label_smoothing=0.0, softcap=1.0,
                         z_loss=0.5, chunk_size=None, x_scale=0.1, w_scale=0.1, grad_of=("input", "weight"))


@examples(120)
@given(case=cases())
@example(case=SOFTCAP_NEAR_ZERO)
def test_float32_within_2x_of_eager_error(case):
    check_against_eager(case, torch.float32)
    FUZZ_COUNTS["loss vs eager, float32"] += 1


@examples(60)
@given(case=cases(max_v=200), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_precision_within_2x_of_eager_error(case, dtype):
    check_against_eager(case, dtype)
    FUZZ_COUNTS["loss vs eager, bf16/fp16"] += 1


@examples(30)
@given(case=cases(max_rows=6, max_d=3, max_v=5, small=True))
def test_gradcheck(case):
    """float64 gradcheck of input/weight/bias (finite differences through the public function)."""
    note(repr(case))
    leaves, views, t, cw, _ = materialise(case, torch.float64)
    if cw is not None:
        cw = cw.clamp(min=0.05)  # a zero denominator makes 'mean' nan
    if case.reduction == "mean":  # some row must count, or the mean is nan (0 / 0)
        assume(bool((t.reshape(-1).long() != (-100 if case.ignore_index is None else case.ignore_index)).any()))
    names = [k for k in ("input", "weight", "bias") if k in leaves and k in case.grad_of]
    # gradcheck refuses 0-element leaves (their clone has stride 0); N = 0 is covered above
    assume(names and case.N > 0)

    def f(*args):
        d = dict(leaves, **dict(zip(names, args)))
        b = views["bias"](d["bias"]) if "bias" in d else None
        return fastreg.linear_cross_entropy(views["input"](d["input"]), views["weight"](d["weight"]), t,
                                            linear_bias=b, weight=cw, **case.opts())

    assert torch.autograd.gradcheck(f, [leaves[k].clone().requires_grad_() for k in names], eps=1e-6, atol=1e-6)
    FUZZ_COUNTS["loss gradcheck, float64"] += 1


# ------------------------------------------------------------------------------------ bad input
def _set(t, index, value):
    t = t.clone()
    t.view(-1)[index % t.numel()] = value
    return t


# (name, expected exception, message pattern, mutation(kwargs, data) -> kwargs). A mutation may
# draw what it needs (a position, a value) from hypothesis' `data`.
BAD = [
    ("target above range", IndexError, "out of range",
     lambda k, d: dict(k, target=_set(k["target"], d.draw(st.integers(0, 99)), k["linear_weight"].shape[0] +
                                      d.draw(st.integers(0, 10 ** 6))))),
    ("negative target", IndexError, "out of range",
     lambda k, d: dict(k, target=_set(k["target"], d.draw(st.integers(0, 99)), d.draw(st.integers(-10 ** 6, -101))))),
    ("float target", TypeError, "class indices",
     lambda k, d: dict(k, target=k["target"].to(d.draw(st.sampled_from([torch.float32, torch.float64]))))),
    ("small-int target", TypeError, "int64 or int32",
     lambda k, d: dict(k, target=k["target"].to(d.draw(st.sampled_from([torch.int16, torch.uint8, torch.bool]))))),
    ("target shape", ValueError, "target has shape",
     lambda k, d: dict(k, target=d.draw(st.sampled_from([k["target"][:-1], k["target"].unsqueeze(0),
                                                          torch.cat([k["target"], k["target"][:1]])])))),
    ("weight not 2-D", ValueError, "2-D",
     lambda k, d: dict(k, linear_weight=d.draw(st.sampled_from([k["linear_weight"][0],
                                                                k["linear_weight"].unsqueeze(0)])))),
    ("feature mismatch", ValueError, "features",
     lambda k, d: dict(k, linear_weight=torch.randn(k["linear_weight"].shape[0],
                                                    k["input"].shape[-1] + d.draw(st.integers(1, 3))))),
    ("no classes", ValueError, "at least one class",
     lambda k, d: dict(k, linear_weight=k["linear_weight"][:0], linear_bias=None, weight=None,
                       target=torch.full_like(k["target"], -100))),
    ("weight dtype", TypeError, "does not match",
     lambda k, d: dict(k, linear_weight=k["linear_weight"].to(d.draw(st.sampled_from([torch.float64, torch.bfloat16]))))),
    ("integer input", TypeError, "float32, float64",
     lambda k, d: dict(k, input=k["input"].long(), linear_weight=k["linear_weight"].long(), linear_bias=None)),
    ("bias shape", ValueError, "linear_bias has shape",
     lambda k, d: dict(k, linear_bias=d.draw(st.sampled_from([torch.randn(k["linear_weight"].shape[0] + 1),
                                                              torch.randn(1, k["linear_weight"].shape[0])])))),
    ("bias dtype", TypeError, "does not match",
     lambda k, d: dict(k, linear_bias=torch.randn(k["linear_weight"].shape[0], dtype=torch.float64))),
    ("class weight shape", ValueError, "class weights",
     lambda k, d: dict(k, weight=torch.rand(k["linear_weight"].shape[0] + d.draw(st.integers(1, 3))))),
    ("class weight dtype", TypeError, "floating point",
     lambda k, d: dict(k, weight=torch.ones(k["linear_weight"].shape[0], dtype=torch.int64))),
    ("mixed devices", ValueError, "one device",
     lambda k, d: dict(k, **{(name := d.draw(st.sampled_from(["input", "linear_weight", "target"]))):
                             k[name].to("meta")})),
    ("0-d input", ValueError, "input must be",
     lambda k, d: dict(k, input=torch.tensor(1.0), target=torch.tensor(0))),
    ("reduction", ValueError, "reduction",
     lambda k, d: dict(k, reduction=d.draw(st.sampled_from(["avg", "elementwise_mean", "", "MEAN"])))),
    ("label_smoothing", ValueError, "label_smoothing",
     lambda k, d: dict(k, label_smoothing=d.draw(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1 + 1e-9),
                                                           st.just(math.nan))))),
    ("softcap", ValueError, "softcap",
     lambda k, d: dict(k, softcap=d.draw(st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf))))),
    ("z_loss", ValueError, "z_loss",
     lambda k, d: dict(k, z_loss=d.draw(st.sampled_from([math.nan, math.inf, -math.inf])))),
    ("chunk_size", ValueError, "chunk_size",
     lambda k, d: dict(k, chunk_size=d.draw(st.one_of(st.integers(max_value=0), st.just(1.5), st.just(True))))),
]


@st.composite
def valid_kwargs(draw):
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2)))
    D, V = draw(st.integers(1, 9)), draw(st.integers(1, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    return dict(input=torch.randn(lead + (D,), generator=g), linear_weight=torch.randn(V, D, generator=g),
                target=torch.randint(0, V, lead, generator=g),
                linear_bias=torch.randn(V, generator=g) if draw(st.booleans()) else None,
                weight=torch.rand(V, generator=g) + 0.1 if draw(st.booleans()) else None,
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                label_smoothing=draw(st.sampled_from([0.0, 0.2])),
                softcap=draw(st.sampled_from([None, 3.0])), z_loss=draw(st.sampled_from([0.0, 1e-2])),
                chunk_size=draw(st.sampled_from([None, 1, 2])))


@examples(150)
@given(kwargs=valid_kwargs(), bad=st.sampled_from(BAD), data=st.data())
def test_bad_input_raises_documented_error(kwargs, bad, data):
    name, exc, match, mutate = bad
    kwargs = mutate(kwargs, data)
    with pytest.raises(exc, match=match):
        fastreg.linear_cross_entropy(**kwargs)
    FUZZ_COUNTS["loss bad input -> exception"] += 1


@examples(100)
@given(kwargs=valid_kwargs(), data=st.data())
def test_nonfinite_values_propagate_like_eager(kwargs, data):
    """NaN/inf in input, weight, bias or class weights: loss and gradients have eager's NaN/inf
    pattern and its finite values (float64, so the comparison is tight)."""
    kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    present = [k for k in ("input", "linear_weight", "linear_bias") if kwargs[k] is not None]
    if kwargs["weight"] is not None:
        present.append("weight")
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(present))
        # class weights: NaN only. An infinite class weight with label smoothing gives nan where
        # eager gives inf (the row formula's W lse - sum_c w_c z_c is inf - inf); both non-finite.
        value = data.draw(st.sampled_from([math.nan] if name == "weight" else [math.nan, math.inf, -math.inf]))
        kwargs[name] = _set(kwargs[name], data.draw(st.integers(0, 999)), value)
    note({k: v for k, v in kwargs.items()})

    def go(fn):
        kw = {k: (v.clone().requires_grad_(k in ("input", "linear_weight", "linear_bias")) if torch.is_tensor(v)
                  and v.is_floating_point() else v) for k, v in kwargs.items()}
        if fn is reference:
            kw.pop("chunk_size")
        loss = fn(**kw)
        leaves = [kw[k] for k in ("input", "linear_weight", "linear_bias") if kw[k] is not None]
        return [loss.detach()] + list(torch.autograd.grad(loss, leaves, torch.ones_like(loss)))

    assert_matches(go(fastreg.linear_cross_entropy), go(reference))
    FUZZ_COUNTS["loss NaN/inf inputs vs eager"] += 1


def test_nan_weight_of_unused_class():
    """Found by test_nonfinite_values_propagate_like_eager: without label smoothing torch reads only
    weight[target], so a NaN/inf weight of a class that no row targets changes nothing."""
    x = torch.tensor([[1.5410]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[-0.2934], [-2.1788]], dtype=torch.float64, requires_grad=True)
    t, cw = torch.tensor([1]), torch.tensor([math.nan, 0.3939], dtype=torch.float64)
    ours = fastreg.linear_cross_entropy(x, w, t, weight=cw)
    want = reference(x, w, t, weight=cw)
    assert want.isfinite()
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(torch.autograd.grad(ours, (x, w)), torch.autograd.grad(want, (x, w)))
