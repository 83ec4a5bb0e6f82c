"""Tests of fastreg.optim (SGD, Adam, AdamW): trajectories against torch.optim's for-loop
implementation, state_dict compatibility both ways, GradScaler skips, param groups and LR
schedulers, tensor lr, validation, the operators themselves (opcheck, bad input) and CUDA-graph
capture (GPU only). CPU always; CUDA too when present (the `device` fixture)."""
import copy
import itertools

import pytest
import torch

import fastreg.optim as fo
from conftest import cuda_ready

OPS = torch.ops.fastreg

# Odd sizes: 1 element, shorter than a SIMD vector, not a multiple of it, a few 2-D/3-D shapes.
SHAPES = [(1,), (7,), (1023,), (4099,), (33, 65), (3, 5, 7)]
STEPS = 25


def make_params(device, dtype=torch.float32, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def make_grads(params, steps, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p) for p in params]
            for _ in range(steps)]


def leaves(tensors):
    return [torch.nn.Parameter(t.clone()) for t in tensors]


def run_pair(fr_cls, torch_cls, kwargs, init, grads, torch_kwargs=None):
    """Steps a fastreg optimizer and torch's for-loop one on copies of `init` with the same grads."""
    a, b = leaves(init), leaves(init)
    oa = fr_cls(a, **kwargs)
    ob = torch_cls(b, foreach=False, **(torch_kwargs if torch_kwargs is not None else kwargs))
    drive(oa, ob, a, b, grads)
    return a, b, oa, ob


def drive(oa, ob, a, b, grads, schedulers=(), each=None):
    """Steps optimizers oa (over a) and ob (over b) with the same gradients, then the schedulers;
    each(t), if given, runs after step t."""
    for t, step_grads in enumerate(grads):
        for pa, pb, g in zip(a, b, step_grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        for sch in schedulers:
            sch.step()
        if each is not None:
            each(t)


def _close(x, y, rtol, what):
    """x close to y: elementwise rtol, plus an absolute slack of rtol times y's largest magnitude
    (elements that pass through zero cannot be compared relatively)."""
    torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * max(y.abs().max().item(), 1e-30),
                               msg=lambda m: f"{what}: {m}")


def assert_same_state(oa, ob, a, b, rtol=1e-5):
    for pa, pb in zip(a, b):
        sa, sb = oa.state[pa], ob.state[pb]
        assert sorted(sa) == sorted(sb), f"state keys {sorted(sa)} != {sorted(sb)}"
        for k in sb:
            va, vb = sa[k], sb[k]
            if k == "step":
                assert va.dtype == vb.dtype == torch.float32 and va.dim() == 0
                assert float(va) == float(vb), f"step {float(va)} != {float(vb)}"
            else:
                _close(va, vb, rtol, f"state {k}")


def assert_params_close(a, b, rtol=1e-5):
    for i, (pa, pb) in enumerate(zip(a, b)):
        _close(pa.detach(), pb.detach(), rtol, f"param {i} {tuple(pa.shape)}")


# ---- trajectories, fp32, every option combination -----------------------------------------------

SGD_CONFIGS = [
    dict(lr=0.05, momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.05], [False, True])
    if not (n and (m == 0 or d != 0))
]
ADAM_CONFIGS = [
    dict(lr=0.01, betas=(0.9, 0.99), amsgrad=ams, maximize=mx, weight_decay=wd)
    for ams, mx, wd in itertools.product([False, True], [False, True], [0.0, 0.1])
]


@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "lr"))
def test_sgd_trajectory(device, cfg):
    init = make_params(device)
    a, b, oa, ob = run_pair(fo.SGD, torch.optim.SGD, cfg, init, make_grads(init, STEPS))
    assert_params_close(a, b)
    if cfg["momentum"]:
        assert_same_state(oa, ob, a, b)
    else:
        assert all(len(oa.state[p]) == 0 for p in a)
    # the parameters really moved (the comparison is not between two untouched copies)
    assert all((pa - p0).abs().max() > 1e-3 for pa, p0 in zip(a, init))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()
                                                                      if k not in ("lr", "betas")))
def test_adam_trajectory(device, name, cfg):
    init = make_params(device)
    grads = make_grads(init, STEPS)
    a, b, oa, ob = run_pair(getattr(fo, name), getattr(torch.optim, name), cfg, init, grads)
    assert_params_close(a, b)
    assert_same_state(oa, ob, a, b)
    assert all((pa - p0).abs().max() > 1e-3 for pa, p0 in zip(a, init))


def test_adam_vs_adamw_differ(device):
    """Coupled and decoupled weight decay are different algorithms: make sure each is used."""
    init = make_params(device)
    grads = make_grads(init, 5)
    a, _, _, _ = run_pair(fo.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.5), init, grads)
    w, _, _, _ = run_pair(fo.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.5), init, grads)
    assert max((x - y).abs().max().item() for x, y in zip(a, w)) > 1e-4


# ---- other dtypes ---------------------------------------------------------------------------------

DTYPE_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2, maximize=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, maximize=True)),
]


@pytest.mark.parametrize("name,cfg", DTYPE_CASES, ids=[f"{n}{i}" for i, (n, _) in enumerate(DTYPE_CASES)])
def test_float64(device, name, cfg):
    init = make_params(device, torch.float64)
    a, b, oa, ob = run_pair(getattr(fo, name), getattr(torch.optim, name), cfg, init, make_grads(init, STEPS))
    assert all(p.dtype == torch.float64 for p in a)
    assert_params_close(a, b, rtol=1e-12)
    assert_same_state(oa, ob, a, b, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,cfg", DTYPE_CASES, ids=[f"{n}{i}" for i, (n, _) in enumerate(DTYPE_CASES)])
def test_reduced_precision(device, dtype, name, cfg):
    """bf16/fp16 parameters and state: fastreg does the math in fp32 and rounds once per stored
    value, torch.optim rounds after every operation. Both must stay close to each other and to an
    fp64 run from the same start, and fastreg's error must not be worse than torch's."""
    if name != "SGD":  # torch's default eps (1e-8) is 0 in fp16: torch's own fp16 Adam divides by 0
        cfg = dict(cfg, eps=1e-4)
    init = make_params(device, dtype)
    grads = make_grads(init, STEPS)
    a, b, oa, ob = run_pair(getattr(fo, name), getattr(torch.optim, name), cfg, init, grads)
    init64 = [p.double() for p in init]
    grads64 = [[g.double() for g in gs] for gs in grads]
    ref = run_pair(getattr(torch.optim, name), getattr(torch.optim, name), cfg, init64, grads64)[1]
    eps = torch.finfo(dtype).eps
    for pa, pb, pr in zip(a, b, ref):
        assert pa.dtype == dtype
        scale = pr.abs().max().item() + 1.0
        err_fr = (pa.double() - pr).abs().max().item()
        err_torch = (pb.double() - pr).abs().max().item()
        assert err_fr <= 8 * eps * scale, (err_fr, err_torch)
        assert err_fr <= 1.5 * err_torch + 2 * eps * scale, (err_fr, err_torch)
        # elementwise against torch in the same dtype: all but a few elements (those where torch's
        # per-operation rounding flushes a tiny second moment to zero) within a few ulps
        close = ((pa.double() - pb.double()).abs() <= 12 * eps * scale).double().mean().item()
        assert close >= 0.99, f"only {close:.2%} of the elements match torch's {dtype} run"
    for pa in a:
        for k, v in oa.state[pa].items():
            if k not in ("step",) and torch.is_tensor(v) and v.is_floating_point():
                assert v.dtype == dtype, f"state {k} has dtype {v.dtype}"


def test_mixed_dtypes_in_one_group(device):
    """One param group holding fp32 and fp64 tensors: one kernel call per dtype, both correct."""
    init = make_params(device, torch.float32, SHAPES[:3]) + make_params(device, torch.float64, SHAPES[3:])
    a, b, oa, ob = run_pair(fo.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1), init,
                            make_grads(init, 10))
    assert [p.dtype for p in a] == [p.dtype for p in init]
    assert_params_close(a, b)


def test_noncontiguous_params(device):
    """Transposed parameters with contiguous grads, and contiguous parameters with transposed
    grads (each set then goes through contiguous temporaries)."""
    base = make_params(device, torch.float32, [(17, 9), (5, 33), (12, 7)])
    init = [base[0].t(), base[1].t(), base[2]]
    a, b = leaves(init), leaves(init)
    assert not a[0].is_contiguous() and a[2].is_contiguous()
    oa, ob = fo.Adam(a, lr=0.01, amsgrad=True), torch.optim.Adam(b, lr=0.01, amsgrad=True, foreach=False)
    for step_grads in make_grads(init, 10):
        step_grads = [g.contiguous() for g in step_grads[:2]] + [step_grads[2].t().contiguous().t()]
        assert not step_grads[2].is_contiguous()
        for pa, pb, g in zip(a, b, step_grads):
            pa.grad, pb.grad = g.clone(memory_format=torch.preserve_format), g.clone()
        oa.step()
        ob.step()
    assert_params_close(a, b)
    assert_same_state(oa, ob, a, b)


# ---- param groups, schedulers, tensor lr, grads that are None ------------------------------------

def _groups(params):
    return [
        {"params": params[:3]},
        {"params": params[3:], "lr": 0.003, "weight_decay": 0.2, "amsgrad": True, "betas": (0.8, 0.95)},
    ]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_param_groups_and_scheduler(device, name):
    init = make_params(device)
    a, b = leaves(init), leaves(init)
    ga, gb = _groups(a), _groups(b)
    oa, ob = getattr(fo, name)(ga, lr=0.01), getattr(torch.optim, name)(gb, lr=0.01, foreach=False)
    sa = torch.optim.lr_scheduler.OneCycleLR(oa, max_lr=[0.05, 0.01], total_steps=STEPS)
    sb = torch.optim.lr_scheduler.OneCycleLR(ob, max_lr=[0.05, 0.01], total_steps=STEPS)
    lrs = []
    drive(oa, ob, a, b, make_grads(init, STEPS), (sa, sb), lambda t: lrs.append(oa.param_groups[0]["lr"]))
    assert len(set(lrs)) > 10  # the schedule really changed the lr
    assert_params_close(a, b)
    assert_same_state(oa, ob, a, b)
    assert "max_exp_avg_sq" in oa.state[a[4]] and "max_exp_avg_sq" not in oa.state[a[0]]


def test_sgd_param_groups_and_scheduler(device):
    init = make_params(device)
    a, b = leaves(init), leaves(init)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "momentum": 0.5, "dampening": 0.1}]  # noqa: E731
    oa = fo.SGD(groups(a), lr=0.05, momentum=0.9, nesterov=False)
    ob = torch.optim.SGD(groups(b), lr=0.05, momentum=0.9, foreach=False)
    drive(oa, ob, a, b, make_grads(init, STEPS), [torch.optim.lr_scheduler.StepLR(o, 4, 0.5) for o in (oa, ob)])
    assert oa.param_groups[0]["lr"] < 0.05 / 32
    assert_params_close(a, b)
    assert_same_state(oa, ob, a, b)


@pytest.mark.parametrize("name,cfg", [("SGD", dict(momentum=0.9)), ("Adam", dict(weight_decay=0.1)),
                                      ("AdamW", dict(amsgrad=True))])
def test_tensor_lr(device, name, cfg):
    """lr as a tensor (on the parameters' device), changed in place by a scheduler."""
    init = make_params(device)
    a, b = leaves(init), leaves(init)
    oa = getattr(fo, name)(a, lr=torch.tensor(0.02, device=device), **cfg)
    ob = getattr(torch.optim, name)(b, lr=0.02, foreach=False, **cfg)
    drive(oa, ob, a, b, make_grads(init, 12), [torch.optim.lr_scheduler.ExponentialLR(o, 0.8) for o in (oa, ob)])
    assert torch.is_tensor(oa.param_groups[0]["lr"])
    assert abs(float(oa.param_groups[0]["lr"]) - ob.param_groups[0]["lr"]) < 1e-9
    assert_params_close(a, b)


@pytest.mark.parametrize("name,cfg", [("SGD", dict(lr=0.05, momentum=0.9, dampening=0.5)),
                                      ("Adam", dict(lr=0.01, amsgrad=True))])
def test_grad_none_skipped(device, name, cfg):
    """Parameters whose grad is None are left alone (no update, no state) and join later."""
    init = make_params(device)
    a, b = leaves(init), leaves(init)
    oa, ob = getattr(fo, name)(a, **cfg), getattr(torch.optim, name)(b, foreach=False, **cfg)
    grads = make_grads(init, STEPS)
    for t, step_grads in enumerate(grads):
        for i, (pa, pb, g) in enumerate(zip(a, b, step_grads)):
            present = not (i == 2 and t < 10) and not (i == 4 and t % 3 == 1)
            pa.grad = g.clone() if present else None
            pb.grad = g.clone() if present else None
        oa.step()
        ob.step()
        if t == 5:
            assert len(oa.state[a[2]]) == 0
            assert torch.equal(a[2].detach(), init[2])
    assert_params_close(a, b)
    assert_same_state(oa, ob, a, b)


def test_add_param_group_zero_grad_and_hooks(device):
    init = make_params(device)
    a, b = leaves(init), leaves(init)
    oa, ob = fo.Adam(a[:3], lr=0.01), torch.optim.Adam(b[:3], lr=0.01, foreach=False)
    calls = []
    oa.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    oa.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    for t, step_grads in enumerate(make_grads(init, 10)):
        if t == 4:
            oa.add_param_group({"params": a[3:], "lr": 0.002, "amsgrad": True})
            ob.add_param_group({"params": b[3:], "lr": 0.002, "amsgrad": True})
        for pa, pb, g in zip(a, b, step_grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        oa.zero_grad()
        assert all(p.grad is None for g in oa.param_groups for p in g["params"])
    assert calls == ["pre", "post"] * 10
    assert_params_close(a, b)
    assert_same_state(oa, ob, a, b)


def test_closure(device):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], device=device))
    opt = fo.SGD([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    torch.testing.assert_close(p.detach().cpu(), torch.tensor([0.8, -1.6]))


# ---- state_dict compatibility ------------------------------------------------------------------

SD_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.9))),
]


@pytest.mark.parametrize("name,cfg", SD_CASES, ids=[c[0] for c in SD_CASES])
@pytest.mark.parametrize("direction", ["torch_to_fastreg", "fastreg_to_torch"])
def test_state_dict_roundtrip(device, name, cfg, direction):
    """A checkpoint taken after 6 steps of one implementation, loaded into the other, continues
    exactly like the first one would have."""
    fr_cls, torch_cls = getattr(fo, name), getattr(torch.optim, name)
    first, second = (torch_cls, fr_cls) if direction == "torch_to_fastreg" else (fr_cls, torch_cls)
    mk = lambda cls, ps: cls(ps, **cfg) if cls is fr_cls else cls(ps, foreach=False, **cfg)  # noqa: E731
    init = make_params(device)
    grads = make_grads(init, 14)
    a = leaves(init)
    oa = mk(first, a)
    for step_grads in grads[:6]:
        for p, g in zip(a, step_grads):
            p.grad = g.clone()
        oa.step()
    sd = copy.deepcopy(oa.state_dict())
    b = leaves([p.detach() for p in a])
    ob = mk(second, b)
    ob.load_state_dict(sd)
    drive(oa, ob, a, b, grads[6:])
    assert_params_close(a, b)
    if name != "SGD":
        assert_same_state(oa, ob, a, b)
    else:
        for pa, pb in zip(a, b):
            _close(oa.state[pa]["momentum_buffer"], ob.state[pb]["momentum_buffer"], 1e-5, "momentum_buffer")


@pytest.mark.parametrize("name,cfg", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_state_dict_layout_matches_torch(name, cfg):
    """Same param_groups dict and the same state keys, dtypes and devices as torch.optim."""
    init = make_params("cpu")
    a, b = leaves(init), leaves(init)
    oa, ob = getattr(fo, name)(a, **cfg), getattr(torch.optim, name)(b, **cfg)  # torch's defaults: foreach=None
    drive(oa, ob, a, b, make_grads(init, 3))
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sorted(sa["state"]) == sorted(sb["state"])
    for i in sb["state"]:
        assert list(sa["state"][i]) == list(sb["state"][i])
        for k, vb in sb["state"][i].items():
            va = sa["state"][i][k]
            assert (va.dtype, va.device, va.shape) == (vb.dtype, vb.device, vb.shape), k


# ---- GradScaler ----------------------------------------------------------------------------------

def _scaled_run(device, opt_a, opt_b, a, b, grads, inf_steps):
    """Steps both optimizers through their own GradScaler; at inf_steps one gradient holds inf.
    Returns, for fastreg, snapshots (params + state) taken before/after every skipped step."""
    sc_a = torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=3)
    sc_b = torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=3)
    skipped = []
    for t, step_grads in enumerate(grads):
        for opt, sc, ps in ((opt_a, sc_a, a), (opt_b, sc_b, b)):
            opt.zero_grad()
            gs = [g.clone() for g in step_grads]
            if t in inf_steps:
                gs[1][0] = float("inf") if t % 2 else float("nan")
            loss = sum((p * g).sum() for p, g in zip(ps, gs))
            sc.scale(loss).backward()
        before = _snapshot(opt_a, a)
        sc_a.step(opt_a)
        sc_b.step(opt_b)
        if t in inf_steps:
            skipped.append((before, _snapshot(opt_a, a)))
        sc_a.update()
        sc_b.update()
        assert sc_a.get_scale() == sc_b.get_scale()
    return skipped


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params])


@pytest.mark.parametrize("name,cfg", [("SGD", dict(lr=0.05, momentum=0.9, dampening=0.5)),
                                      ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
                                      ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
                                      ("AdamW", dict(lr=0.01))])
def test_grad_scaler_skips(device, name, cfg):
    """GradScaler hands the scale and the inf flag to the kernel (no unscale pass, no sync): a step
    with inf/nan grads changes nothing -- params, state, step counts -- also as the very first step
    (no garbage or zero momentum is left behind), and the run matches torch's own skip logic."""
    init = make_params(device)
    a, b = leaves(init), leaves(init)
    oa, ob = getattr(fo, name)(a, **cfg), getattr(torch.optim, name)(b, foreach=False, **cfg)
    skipped = _scaled_run(device, oa, ob, a, b, make_grads(init, 14), inf_steps={0, 7})
    assert len(skipped) == 2
    for (p0, s0), (p1, s1) in skipped:
        for x, y in zip(p0, p1):
            assert torch.equal(x, y), "a skipped step changed a parameter"
        for d0, d1 in zip(s0, s1):
            for k in d1:
                if k in d0:
                    assert torch.equal(d0[k], d1[k]), f"state {k} changed on a skipped step"
                else:  # created lazily by the (skipped) first step: must hold nothing yet
                    assert not d1[k].any(), f"state {k} created non-zero by a skipped step"
    if name == "SGD":  # skipped first step: torch has no state; fastreg's checkpoint must agree
        c, d = leaves(init), leaves(init)
        oc, od = fo.SGD(c, **cfg), torch.optim.SGD(d, foreach=False, **cfg)
        _scaled_run(device, oc, od, c, d, make_grads(init, 1), inf_steps={0})
        assert oc.state_dict()["state"] == od.state_dict()["state"] == {}
    else:
        assert all(float(oa.state[p]["step"]) == 12 for p in a)
    assert_params_close(a, b)
    assert_same_state(oa, ob, a, b)


def test_grad_scaler_after_explicit_unscale(device):
    """scaler.unscale_ (e.g. to clip) before scaler.step: grads already unscaled, only found_inf used."""
    init = make_params(device)
    a, b = leaves(init), leaves(init)
    oa, ob = fo.AdamW(a, lr=0.01), torch.optim.AdamW(b, lr=0.01, foreach=False)
    sc_a, sc_b = torch.amp.GradScaler(device, init_scale=256.0), torch.amp.GradScaler(device, init_scale=256.0)
    for t, step_grads in enumerate(make_grads(init, 8)):
        for opt, sc, ps in ((oa, sc_a, a), (ob, sc_b, b)):
            opt.zero_grad()
            gs = [g.clone() for g in step_grads]
            if t == 3:
                gs[0][0] = float("inf")
            sc.scale(sum((p * g).sum() for p, g in zip(ps, gs))).backward()
            sc.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ps, 5.0)
            sc.step(opt)
            sc.update()
    assert float(oa.state[a[0]]["step"]) == 7
    assert_params_close(a, b)
    assert_same_state(oa, ob, a, b)


# ---- validation and bad input ------------------------------------------------------------------

BAD_ARGS = [
    ("SGD", dict(lr=-0.1)),
    ("SGD", dict(lr=0.1, momentum=-0.5)),
    ("SGD", dict(lr=0.1, weight_decay=-1.0)),
    ("SGD", dict(lr=0.1, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
    ("SGD", dict(lr=torch.tensor([0.1, 0.2]))),
    ("Adam", dict(lr=-1e-3)),
    ("Adam", dict(eps=-1e-8)),
    ("Adam", dict(betas=(1.0, 0.999))),
    ("Adam", dict(betas=(0.9, -0.1))),
    ("Adam", dict(weight_decay=-0.1)),
    ("Adam", dict(betas=(0.9, torch.tensor(0.99)))),
    ("Adam", dict(lr=torch.tensor([1e-3, 1e-3]))),
    ("AdamW", dict(betas=(0.5, 1.5))),
    ("AdamW", dict(lr=-1.0)),
]


@pytest.mark.parametrize("name,kwargs", BAD_ARGS)
def test_bad_hyperparameters(name, kwargs):
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError) as want:
        getattr(torch.optim, name)(p, **kwargs)
    with pytest.raises(ValueError) as got:
        getattr(fo, name)(p, **kwargs)
    assert str(got.value) == str(want.value)


def test_unsupported_options():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(RuntimeError, match="differentiable"):
        fo.Adam(p, differentiable=True)
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        fo.SGD(p, fused=True, foreach=True)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_sparse_grad_rejected(name):
    """As torch.optim.Adam: sparse gradients are refused, nothing changes (SGD takes them:
    tests/test_optim_bf16.py)."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = getattr(fo, name)(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(before, emb.weight.detach())


def _adam_args(ps, gs, **over):
    n = len(ps)
    args = dict(params=ps, grads=gs, exp_avgs=[torch.zeros_like(p) for p in ps],
                exp_avg_sqs=[torch.zeros_like(p) for p in ps], max_exp_avg_sqs=[],
                state_steps=[torch.zeros(()) for _ in range(n)], lr=0.01, lr_tensor=None, beta1=0.9, beta2=0.999,
                weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=False,
                grad_scale=None, found_inf=None)
    args.update(over)
    return args


@pytest.mark.parametrize("bad,match", [
    (lambda p, g: dict(grads=[g[0].double(), g[1]]), "grads\\[0\\] has dtype Double but params has Float"),
    (lambda p, g: dict(grads=[g[0], g[1][:-1]]), "grads\\[1\\] has shape"),
    (lambda p, g: dict(grads=g[:1]), "grads has 1 tensors but params has 2"),
    (lambda p, g: dict(exp_avgs=[torch.zeros(5, dtype=torch.float16), torch.zeros(6)]), "exp_avgs\\[0\\] has dtype"),
    (lambda p, g: dict(params=[p[0].double(), p[1].double()], grads=[g[0].double(), g[1].double()]),
     "exp_avgs\\[0\\] has dtype Float but params has Double"),
    (lambda p, g: dict(state_steps=[torch.zeros(()), torch.zeros(2)]), "state_steps\\[1\\] must be a one-element"),
    (lambda p, g: dict(state_steps=[torch.zeros(3)]), "one contiguous tensor of 2 elements"),
    (lambda p, g: dict(params=[p[0].long(), p[1].long()], grads=[g[0].long(), g[1].long()]), "params must be float"),
    (lambda p, g: dict(max_exp_avg_sqs=[torch.zeros(5), torch.zeros(6)]), "amsgrad is off"),
    (lambda p, g: dict(amsgrad=True), "max_exp_avg_sqs has 0 tensors"),
    (lambda p, g: dict(lr_tensor=torch.tensor([0.1, 0.2])), "lr_tensor must have one element"),
    (lambda p, g: dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], state_steps=[],
                       grad_scale=torch.ones(())), "params list is empty"),
])
def test_op_bad_input(bad, match):
    params, grads = [torch.randn(5), torch.randn(6)], [torch.randn(5), torch.randn(6)]
    args = _adam_args(params, grads, **bad(params, grads))
    snapshot = [t.clone() for t in args["params"]] + [t.clone() for t in args["exp_avgs"]]
    with pytest.raises(RuntimeError, match=match):
        OPS._fused_adam_(**args)
    after = [t for t in args["params"]] + [t for t in args["exp_avgs"]]
    assert all(torch.equal(x, y) for x, y in zip(snapshot, after)), "bad input must not change anything"


def test_op_packed_counters():
    """Per-param counters may come as one tensor holding all of them (what the optimizers pass:
    state["step"] are views into it); the result equals one counter tensor per param."""
    params, grads = [torch.randn(5), torch.randn(6)], [torch.randn(5), torch.randn(6)]
    separate = _adam_args([p.clone() for p in params], grads, state_steps=[torch.tensor(3.0), torch.tensor(7.0)])
    packed = _adam_args([p.clone() for p in params], grads, state_steps=[torch.tensor([3.0, 7.0])])
    OPS._fused_adam_(**separate)
    OPS._fused_adam_(**packed)
    assert packed["state_steps"][0].tolist() == [4.0, 8.0]
    for x, y in zip(separate["params"], packed["params"]):
        assert torch.equal(x, y)
    opt = fo.Adam(leaves(params), lr=0.1)
    for p, g in zip(opt.param_groups[0]["params"], grads):
        p.grad = g
    opt.step()
    steps = [opt.state[p]["step"] for p in opt.param_groups[0]["params"]]
    assert all(s.dim() == 0 and s.dtype == torch.float32 and float(s) == 1 for s in steps)
    assert steps[0]._base is not None and steps[0]._base is steps[1]._base


def test_grad_mode_refused():
    """Called directly with grad mode on, the op refuses parameters that require grad (like ATen's
    in-place ops on leaves) instead of silently bypassing autograd."""
    p = torch.nn.Parameter(torch.randn(3))
    args = _adam_args([p], [torch.randn(3)])
    with pytest.raises(RuntimeError, match="requires grad and grad mode is on"):
        OPS._fused_adam_(**args)
    with torch.no_grad():
        OPS._fused_adam_(**args)
    assert float(args["state_steps"][0]) == 1


def test_op_bad_input_sgd():
    params, grads = [torch.randn(4)], [torch.randn(4)]
    with pytest.raises(RuntimeError, match="momentum_started has 0 tensors"):
        OPS._fused_sgd_(params, grads, [torch.zeros(4)], [], 0.1, None, 0.9, 0.0, 0.0, False, False, None, None)
    with pytest.raises(RuntimeError, match="momentum is 0"):
        OPS._fused_sgd_(params, grads, [torch.zeros(4)], [], 0.1, None, 0.0, 0.0, 0.0, False, False, None, None)


def test_op_found_inf_and_grad_scale_direct():
    """The operator contract itself: found_inf != 0 changes nothing; grad_scale divides the grads."""
    params, grads = [torch.randn(9)], [torch.randn(9) * 8]
    base = _adam_args([params[0].clone()], [grads[0] / 8])
    scaled = _adam_args([params[0].clone()], grads, grad_scale=torch.tensor(8.0))
    OPS._fused_adam_(**base)
    OPS._fused_adam_(**scaled)
    torch.testing.assert_close(base["params"][0], scaled["params"][0], rtol=0, atol=0)
    skipped = _adam_args([params[0].clone()], grads, found_inf=torch.tensor(1.0), amsgrad=True,
                         max_exp_avg_sqs=[torch.zeros(9)])
    OPS._fused_adam_(**skipped)
    assert torch.equal(skipped["params"][0], params[0]) and float(skipped["state_steps"][0]) == 0
    assert not skipped["exp_avgs"][0].any() and not skipped["max_exp_avg_sqs"][0].any()


# ---- operator checks -----------------------------------------------------------------------------

def test_opcheck_adam(device):
    params = make_params(device, shapes=[(5,), (3, 4)])
    grads = make_grads(params, 1)[0]
    for over in (dict(), dict(amsgrad=True, max_exp_avg_sqs=[torch.zeros_like(p) for p in params],
                              lr_tensor=torch.tensor(0.02, device=device), grad_scale=torch.tensor(4.0, device=device),
                              found_inf=torch.tensor(0.0, device=device), decoupled_weight_decay=True,
                              weight_decay=0.1)):
        args = _adam_args([p.clone() for p in params], grads, **over)
        args["state_steps"] = [s.to(device) for s in args["state_steps"]]
        torch.library.opcheck(torch.ops.fastreg._fused_adam_.default, (), args)


def test_opcheck_sgd(device):
    params = make_params(device, shapes=[(5,), (3, 4)])
    grads = make_grads(params, 1)[0]
    bufs = [torch.zeros_like(p) for p in params]
    flags = [torch.zeros((), dtype=torch.uint8, device=device) for _ in params]
    torch.library.opcheck(torch.ops.fastreg._fused_sgd_.default,
                          ([p.clone() for p in params], grads, bufs, flags, 0.1, None, 0.9, 0.1, 0.01, False, True,
                           torch.tensor(2.0, device=device), None))
    torch.library.opcheck(torch.ops.fastreg._fused_sgd_.default,
                          ([p.clone() for p in params], grads, [], [], 0.1, torch.tensor(0.5, device=device), 0.0,
                           0.0, 0.0, False, False, None, torch.tensor(0.0, device=device)))


def test_step_bumps_version_counter():
    """Autograd must see the in-place update (saved tensors of a stale graph are detected)."""
    p = torch.nn.Parameter(torch.randn(4))
    opt = fo.SGD([p], lr=0.1)
    p.grad = torch.ones(4)
    v = p._version
    opt.step()
    assert p._version > v


# ---- CUDA graphs (GPU box only) ------------------------------------------------------------------

@pytest.mark.skipif(not cuda_ready(), reason="CUDA-graph capture needs a GPU (runs on the GPU box)")
@pytest.mark.parametrize("name,cfg", [("Adam", dict(lr=torch.tensor(0.01, device="cuda") if cuda_ready() else 0.01,
                                                    weight_decay=0.1, amsgrad=True)),
                                      ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2))])
def test_cuda_graph_capture(name, cfg):
    """A captured optimizer step, replayed with new gradients (and a GradScaler-style found_inf),
    matches eager stepping: no host sync in the step, step counters live on the device."""
    init = make_params("cuda")
    grads = make_grads(init, 8)
    a, b = leaves(init), leaves(init)
    for p in a:
        p.grad = torch.zeros_like(p)
    oa, ob = getattr(fo, name)(a, **cfg), getattr(fo, name)(b, **cfg)
    found_inf = torch.zeros((), device="cuda")
    oa.found_inf = found_inf
    # warm up on a side stream (allocates the state), with found_inf set so nothing changes
    found_inf.fill_(1.0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        oa.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        oa.step()
    for t, step_grads in enumerate(grads):
        skip = t == 3
        found_inf.fill_(1.0 if skip else 0.0)
        for pa, pb, g in zip(a, b, step_grads):
            pa.grad.copy_(g)
            pb.grad = g.clone()
        graph.replay()
        if not skip:
            ob.step()
    torch.cuda.synchronize()
    assert_params_close(a, b, rtol=1e-6)
    if name == "Adam":
        assert all(float(oa.state[p]["step"]) == 7 for p in a)


def test_sgd_without_momentum_keeps_no_state():
    """Like torch.optim.SGD(momentum=0): no per-parameter state entry at all."""
    import fastreg as _fr

    p = torch.nn.Parameter(torch.randn(5))
    q = torch.nn.Parameter(p.detach().clone())
    ours, theirs = _fr.optim.SGD([p], lr=0.1), torch.optim.SGD([q], lr=0.1)
    for param, opt in ((p, ours), (q, theirs)):
        param.grad = torch.ones(5)
        opt.step()
    assert ours.state_dict()["state"] == theirs.state_dict()["state"] == {}
    torch.testing.assert_close(p, q)


@pytest.mark.skipif(not cuda_ready(), reason="needs CUDA")
def test_cuda_graph_capture_float_betas_and_tensor_betas_refused():
    """A step with float betas (and a tensor lr) is captured and replayed in a CUDA graph; tensor
    betas, read on the host, are refused by name during capture instead of failing inside it."""
    p = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = fo.Adam([p], lr=torch.tensor(0.01, device="cuda"), capturable=True)
    ref = fo.Adam([torch.nn.Parameter(p.detach().clone())], lr=0.01)
    ref.param_groups[0]["params"][0].grad = p.grad.clone()
    opt.step(), ref.step()  # the state exists before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    torch.testing.assert_close(p.detach(), ref.param_groups[0]["params"][0].detach())
    q = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    q.grad = torch.randn_like(q)
    betas = (torch.tensor(0.9, device="cuda"), torch.tensor(0.999, device="cuda"))
    opt = fo.Adam([q], lr=torch.tensor(0.01, device="cuda"), betas=betas, capturable=True)
    opt.step()
    with pytest.raises(RuntimeError, match=r"betas\[0\] as a CUDA tensor .* CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
