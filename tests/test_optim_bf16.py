"""Tests of fastreg.optim's bf16 training modes (stochastic rounding, fp32 master weights) and of
the torch.optim parity paths (complex params, sparse SGD gradients, argument handling).

Stochastic rounding: the random bits follow the documented Philox4x32-10 stream exactly
(checked against a NumPy implementation), rounding is unbiased (statistical bound), bits are
reproducible and independent of thread counts, and the CUDA kernels (executed by the CPU SIMT
runtime of tests/simt) write the same bits as the CPU kernel. Master weights: the fp32 copy
follows torch.optim's fp32 trajectory. state_dict round trips with torch.optim both ways, bad
combinations refused, GradScaler skips. The bf16 training evidence: examples/bf16_training.py."""
import copy
import ctypes
import inspect
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastreg.optim as fo
from conftest import cuda_ready

OPS = torch.ops.fastreg
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(1,), (7,), (1023,), (4099,), (33, 65), (40000,)]  # tails, odd sizes, several CPU pieces


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.view(torch.int32)


def bf16_params(shapes=SHAPES, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(torch.bfloat16) for s in shapes]


# ---- the Philox stream, in NumPy (the definition in csrc/optim/optim_math.h) --------------------

def philox4x32_10(c, k0, k1):
    """c: four uint64 arrays holding 32-bit words; k0, k1: ints. Returns the four output words."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) for x in c)
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1, c2, c3


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (the C++ checks them at compile time)."""
    out = philox4x32_10([[0x243F6A88], [0x85A308D3], [0x13198A2E], [0x03707344]], 0xA4093822, 0x299F31D0)
    assert [int(w[0]) for w in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def random16(seed, step, tensor, n):
    """The 16 random bits of elements 0..n-1 of `tensor` at `step`."""
    e = np.arange(n, dtype=np.uint64)
    block = e // np.uint64(8)
    words = philox4x32_10([block & np.uint64(0xFFFFFFFF), block >> np.uint64(32), np.full(n, step, np.uint64),
                           np.full(n, tensor, np.uint64)], seed & 0xFFFFFFFF, seed >> 32)
    lane = (e % np.uint64(8)).astype(np.int64)
    word = np.choose(lane // 2, words)
    return (word >> (np.uint64(16) * (lane % 2).astype(np.uint64))) & np.uint64(0xFFFF)


def stochastic_bf16_bits(x32: np.ndarray, r16: np.ndarray) -> np.ndarray:
    u = x32.view(np.uint32).astype(np.uint64)
    return ((u + r16) >> np.uint64(16)).astype(np.uint16)


def exact_sgd_case(shapes, seed=0):
    """bf16 params and grads whose SGD update p - 2^-6 * g is exact in fp32 (so that the expected
    bits do not depend on how a kernel rounds its arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    params = [(torch.rand(s, generator=g) + 0.5).to(torch.bfloat16) for s in shapes]  # [0.5, 1.5]
    grads = [((torch.rand(s, generator=g) + 0.25) * torch.randn(s, generator=g).sign()).to(torch.bfloat16)
             for s in shapes]  # |g| in [0.25, 1.25]: the sum spans at most 17 bits
    return params, grads, 2.0 ** -6


@pytest.mark.parametrize("step", [1, 7])
def test_sr_bits_follow_the_documented_stream(step):
    """CPU kernel == NumPy reference: the bits of element e of tensor i at step t come from Philox
    block e // 8 under counter (block, t, i) and key seed, half (e % 8) of the output."""
    seed = 0x1234_5678_9ABC_DEF0 & (2**62 - 1)
    params, grads, lr = exact_sgd_case(SHAPES)
    steps = [torch.tensor(float(step - 1)) for _ in params]
    out = [p.clone() for p in params]
    OPS._fused_sgd_(out, grads, [], [], lr, None, 0.0, 0.0, 0.0, False, False, None, None, seed, steps)
    for i, (p, g, o) in enumerate(zip(params, grads, out)):
        x = (p.double() - lr * g.double()).float()
        assert torch.equal(x.double(), p.double() - lr * g.double()), "the case must be exact in fp32"
        want = stochastic_bf16_bits(x.reshape(-1).numpy(), random16(seed, step, i, p.numel()))
        assert np.array_equal(o.reshape(-1).view(torch.int16).numpy().view(np.uint16), want), f"tensor {i}"
        assert float(steps[i]) == step


# ---- statistics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("base,frac", [(1.0, 19 / 64), (-3.0, 0.75), (2.0 ** -100, 0.125)])
def test_sr_unbiased(base, frac):
    """Rounding x = a + frac * ulp(a) many times: the mean matches x within 5 standard errors of the
    binomial, and every result is one of the two bf16 neighbours. Round-to-nearest is biased there."""
    n = 1 << 18
    a = torch.full((n,), base, dtype=torch.bfloat16)
    ulp = 2.0 ** (np.floor(np.log2(abs(base))) - 7)  # bf16 spacing above |base|
    delta = frac * ulp * np.sign(base)
    grad = torch.full((n,), -delta, dtype=torch.bfloat16)  # lr 1: p - 1 * grad = base + delta, exact
    assert float(grad[0]) == -delta
    ups = []
    for step in range(4):  # different steps draw different bits
        p = a.clone()
        OPS._fused_sgd_([p], [grad], [], [], 1.0, None, 0.0, 0.0, 0.0, False, False, None, None, 99,
                        [torch.tensor(float(step))])
        moved = p.double() != base
        assert torch.all(p.double()[moved] == base + np.sign(base) * ulp)
        ups.append(moved.double().mean().item())
    stderr = (frac * (1 - frac) / n) ** 0.5
    for up in ups:
        assert abs(up - frac) < 5 * stderr, (up, frac, stderr)
    assert len(set(ups)) == len(ups)
    nearest = a.clone()
    OPS._fused_sgd_([nearest], [grad], [], [], 1.0, None, 0.0, 0.0, 0.0, False, False, None, None)
    assert abs((nearest.double() != base).double().mean().item() - frac) > 0.1


# ---- reproducibility ----------------------------------------------------------------------------

def _adam_run(params, grads_per_step, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = fo.AdamW(ps, lr=1e-3, stochastic_rounding=True, **kw)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
    return ps, opt


def test_sr_reproducible_and_thread_independent():
    params = bf16_params()
    grads = [bf16_params(seed=s, scale=0.1) for s in (1, 2, 3)]
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(5)
        a, oa = _adam_run(params, grads)
        torch.set_num_threads(1)
        torch.manual_seed(5)
        b, ob = _adam_run(params, grads)
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(6)
    c, oc = _adam_run(params, grads)
    assert oa.param_groups[0]["sr_seed"] == ob.param_groups[0]["sr_seed"] != oc.param_groups[0]["sr_seed"]
    for x, y in zip(a, b):
        assert torch.equal(bits(x), bits(y))
    differ = sum(int((bits(x) != bits(y)).sum()) for x, y in zip(a, c))
    assert differ > 1000, "another seed must give other roundings"


def test_sr_seed_in_state_dict_resumes_bit_exactly():
    params = bf16_params(shapes=[(513,), (40, 9)])
    grads = [bf16_params(shapes=[(513,), (40, 9)], seed=s, scale=0.1) for s in range(1, 7)]
    torch.manual_seed(9)
    full, _ = _adam_run(params, grads)
    torch.manual_seed(9)
    half, opt = _adam_run(params, grads[:3])
    sd = opt.state_dict()
    assert isinstance(sd["param_groups"][0]["sr_seed"], int)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
    torch.manual_seed(1234)  # another seed drawn at construction: the loaded one must win
    opt2 = fo.AdamW(resumed, lr=1e-3, stochastic_rounding=True)
    opt2.load_state_dict(sd)
    for grads_t in grads[3:]:
        for p, g in zip(resumed, grads_t):
            p.grad = g
        opt2.step()
    for x, y in zip(full, resumed):
        assert torch.equal(bits(x), bits(y))


def test_plain_optimizer_draws_no_random_numbers():
    torch.manual_seed(3)
    fo.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], master_weights=True)
    fo.SGD([torch.nn.Parameter(torch.zeros(3))])
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


# ---- master weights -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,cfg", [("Adam", dict(lr=1e-3, weight_decay=0.01, amsgrad=True)),
                                      ("AdamW", dict(lr=1e-3)),
                                      ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_follow_fp32(name, cfg, dtype):
    """The master copy follows torch.optim's fp32 run on the same (low-precision) gradients, with
    states in the parameter dtype (so within that dtype's error of the fp32 states); the parameter
    is exactly its nearest rounding."""
    init = [p.to(dtype) for p in bf16_params(shapes=[(7,), (1023,), (33, 65)])]
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    ref = [torch.nn.Parameter(p.float()) for p in init]
    oa = getattr(fo, name)(ours, master_weights=True, **cfg)
    ob = getattr(torch.optim, name)(ref, foreach=False, **cfg)
    for s in range(10):
        for a, b, g in zip(ours, ref, bf16_params(shapes=[(7,), (1023,), (33, 65)], seed=10 + s, scale=0.1)):
            a.grad, b.grad = g.to(dtype), g.to(dtype).float()
        oa.step()
        ob.step()
    for a, b in zip(ours, ref):
        master = oa.state[a]["master_param"]
        assert master.dtype == torch.float32
        assert torch.equal(a.detach(), master.to(dtype))
        moved = (b.detach() - init[0].new_zeros(()).float()).abs().max()
        torch.testing.assert_close(master, b.detach(), rtol=0, atol=5e-3 * float(moved))


def test_master_weights_keep_small_updates():
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = fo.SGD([p], lr=1e-4, master_weights=True)
    for _ in range(100):
        p.grad = -torch.ones_like(p)
        opt.step()
    torch.testing.assert_close(opt.state[p]["master_param"], torch.full((64,), 1.01), rtol=1e-5, atol=0)
    assert float(p.detach()[0]) == float(torch.tensor(1.01).to(torch.bfloat16))


# ---- state_dict with torch.optim, both ways -----------------------------------------------------

def _step(opt, params, seed):
    for p, g in zip(params, bf16_params(shapes=[tuple(p.shape) for p in params], seed=seed, scale=0.1)):
        p.grad = g.to(p.dtype)
    opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_master_state_dict_with_torch(name):
    cfg = dict(lr=1e-2, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
    shapes = [(5,), (3, 4)]
    # torch.optim -> fastreg: the master copies start from the parameters
    tp = [torch.nn.Parameter(p) for p in bf16_params(shapes)]
    topt = getattr(torch.optim, name)(tp, **cfg)
    _step(topt, tp, 1)
    fp = [torch.nn.Parameter(p.detach().clone()) for p in tp]
    fopt = getattr(fo, name)(fp, master_weights=True, **cfg)
    fopt.load_state_dict(copy.deepcopy(topt.state_dict()))  # (loads may share tensors with the source)
    _step(fopt, fp, 2)
    ref = [torch.nn.Parameter(p.detach().float()) for p in tp]
    ropt = getattr(torch.optim, name)(ref, foreach=False, **cfg)
    ropt.load_state_dict(copy.deepcopy(topt.state_dict()))
    _step(ropt, ref, 2)
    for p, r in zip(fp, ref):
        # the states stay bf16 here (fp32 in the reference): the step differs by their rounding
        torch.testing.assert_close(fopt.state[p]["master_param"], r.detach(), rtol=0, atol=1e-4)
        assert torch.equal(p.detach(), fopt.state[p]["master_param"].to(torch.bfloat16))
    # fastreg -> fastreg: the saved master copy comes back in fp32, bit for bit
    sd = fopt.state_dict()
    assert all(v["master_param"].dtype == torch.float32 for v in sd["state"].values())
    gp = [torch.nn.Parameter(p.detach().clone()) for p in fp]
    gopt = getattr(fo, name)(gp, master_weights=True, **cfg)
    gopt.load_state_dict(copy.deepcopy(sd))
    for p, q in zip(fp, gp):
        assert torch.equal(gopt.state[q]["master_param"], fopt.state[p]["master_param"])
    _step(fopt, fp, 3)
    _step(gopt, gp, 3)
    for p, q in zip(fp, gp):
        assert torch.equal(p, q)
    # fastreg -> torch.optim: torch loads the checkpoint (it ignores the extra keys) and steps on
    hp = [torch.nn.Parameter(p.detach().clone()) for p in fp]
    hopt = getattr(torch.optim, name)(hp, **cfg)
    hopt.load_state_dict(copy.deepcopy(fopt.state_dict()))
    _step(hopt, hp, 4)
    assert all(torch.isfinite(p).all() for p in hp)


def test_sr_state_dict_with_torch():
    tp = [torch.nn.Parameter(p) for p in bf16_params([(9,), (4, 4)])]
    fopt = fo.SGD(tp, lr=0.1, momentum=0.5, stochastic_rounding=True)
    _step(fopt, tp, 1)
    sd = fopt.state_dict()
    assert sd["param_groups"][0]["stochastic_rounding"] is True
    assert all(float(v["step"]) == 1 for v in sd["state"].values())
    hp = [torch.nn.Parameter(p.detach().clone()) for p in tp]
    hopt = torch.optim.SGD(hp, lr=0.1, momentum=0.5)
    hopt.load_state_dict(copy.deepcopy(sd))
    _step(hopt, hp, 2)
    # and back: a torch.optim checkpoint into an SR optimizer keeps the optimizer's seed and modes
    seed = fopt.param_groups[0]["sr_seed"]
    fopt.load_state_dict(copy.deepcopy(hopt.state_dict()))
    assert fopt.param_groups[0]["stochastic_rounding"] and fopt.param_groups[0]["sr_seed"] == seed
    _step(fopt, tp, 3)
    assert all(float(fopt.state[p]["step"]) == 2 for p in tp)  # torch carried the count along


def test_plain_state_dict_layout_unchanged():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert fo.Adam(p).state_dict()["param_groups"] == torch.optim.Adam(p).state_dict()["param_groups"]


# ---- GradScaler skip ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,mode", [("SGD", "stochastic_rounding"), ("SGD", "master_weights"),
                                       ("Adam", "stochastic_rounding"), ("Adam", "master_weights")])
def test_skipped_step_changes_nothing(name, mode):
    params = [torch.nn.Parameter(p) for p in bf16_params([(5,), (70,)])]
    opt = getattr(fo, name)(params, lr=0.1, **{mode: True})
    _step(opt, params, 1)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    snapshot = [p.detach().clone() for p in params]
    opt.found_inf = torch.ones(())
    opt.grad_scale = torch.full((), 2.0)
    _step(opt, params, 2)
    for p, s in zip(params, snapshot):
        assert torch.equal(p, s)
        for k, v in opt.state[p].items():
            assert torch.equal(v, before[id(p)][k]), k


# ---- refused combinations -----------------------------------------------------------------------

def test_bad_combinations_refused():
    f32 = [torch.nn.Parameter(torch.zeros(3))]
    f16 = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]
    b16 = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="stochastic_rounding=True needs bfloat16 params, got a torch.float32"):
        fo.Adam(f32, stochastic_rounding=True)
    with pytest.raises(ValueError, match="needs bfloat16 params, got a torch.float16"):
        fo.SGD(f16, stochastic_rounding=True)
    with pytest.raises(ValueError, match="master_weights=True needs bfloat16 or float16 params"):
        fo.AdamW(f32, master_weights=True)
    with pytest.raises(ValueError, match="exclusive"):
        fo.SGD(b16, stochastic_rounding=True, master_weights=True)
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        fo.SGD(b16, stochastic_rounding=1)
    opt = fo.Adam(b16, master_weights=True)
    with pytest.raises(ValueError, match="needs bfloat16 or float16"):
        opt.add_param_group({"params": f32})
    assert len(opt.param_groups) == 1
    emb = torch.nn.Embedding(4, 2, sparse=True).to(torch.bfloat16)
    opt = fo.SGD(emb.parameters(), lr=0.1, stochastic_rounding=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients cannot be used with stochastic_rounding"):
        opt.step()


def test_op_refuses_bad_modes():
    p, g = [torch.zeros(4, dtype=torch.float16)], [torch.zeros(4, dtype=torch.float16)]
    with pytest.raises(RuntimeError, match="stochastic rounding needs bfloat16 params"):
        OPS._fused_sgd_(p, g, [], [], 0.1, None, 0.0, 0.0, 0.0, False, False, None, None, 1, [torch.zeros(())])
    b, gb = [torch.zeros(4, dtype=torch.bfloat16)], [torch.zeros(4, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match="master weights must be float32"):
        OPS._fused_sgd_(b, gb, [], [], 0.1, None, 0.0, 0.0, 0.0, False, False, None, None, -1, None,
                        [torch.zeros(4, dtype=torch.bfloat16)])
    with pytest.raises(RuntimeError, match="exclusive"):
        OPS._fused_adam_(b, gb, [torch.zeros_like(b[0])], [torch.zeros_like(b[0])], [], [torch.zeros(())], 0.1, None,
                         0.9, 0.999, 0.0, 1e-8, False, False, False, None, None, 3, [torch.zeros(4)])
    with pytest.raises(RuntimeError, match="master weights need bfloat16 or float16"):
        OPS._fused_sgd_([torch.zeros(4)], [torch.zeros(4)], [], [], 0.1, None, 0.0, 0.0, 0.0, False, False, None,
                        None, -1, None, [torch.zeros(4)])


def test_opcheck_modes():
    b = [torch.randn(5).to(torch.bfloat16), torch.randn(3, 4).to(torch.bfloat16)]
    g = [torch.randn_like(t) for t in b]
    torch.library.opcheck(OPS._fused_sgd_.default, ([t.clone() for t in b], g, [], [], 0.1, None, 0.0, 0.0, 0.0,
                                                    False, False, None, None, 7, [torch.zeros(()) for _ in b]))
    torch.library.opcheck(OPS._fused_adam_.default,
                          ([t.clone() for t in b], g, [torch.zeros_like(t) for t in b], [torch.zeros_like(t) for t in b],
                           [], [torch.zeros(()) for _ in b], 0.1, None, 0.9, 0.999, 0.0, 1e-8, False, False, False,
                           None, None, -1, [t.float() for t in b]))


# ---- torch.optim parity: complex, sparse, arguments ---------------------------------------------

@pytest.mark.parametrize("name,cfg", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
                                      ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
                                      ("AdamW", dict(lr=0.01, maximize=True))])
def test_complex_params_like_torch(name, cfg):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, dtype=torch.complex64, generator=g) for s in [(5,), (17, 3)]] + [torch.randn(4)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    oa, ob = getattr(fo, name)(a, **cfg), getattr(torch.optim, name)(b, foreach=False, **cfg)
    for _ in range(5):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, dtype=x.dtype, generator=g)
            x.grad, y.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        for k, v in ob.state[y].items():
            assert oa.state[x][k].dtype == v.dtype, k
            torch.testing.assert_close(oa.state[x][k], v, rtol=1e-5, atol=1e-6)


# (weight decay with sparse gradients fails in torch itself: add(sparse, dense); here the same)
@pytest.mark.parametrize("cfg", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.1),
                                 dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)])
def test_sparse_sgd_like_torch(cfg):
    """nn.Embedding(sparse=True) next to a dense layer in one group: same trajectory as torch."""
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.ModuleDict({"emb": torch.nn.Embedding(20, 4, sparse=True), "lin": torch.nn.Linear(4, 2)}))
    opts = [fo.SGD(models[0].parameters(), **cfg), torch.optim.SGD(models[1].parameters(), **cfg)]
    for step in range(6):
        idx = torch.randint(0, 20, (8,), generator=torch.Generator().manual_seed(step))
        for m, o in zip(models, opts):
            o.zero_grad()
            m["lin"](m["emb"](idx)).square().sum().backward()
            o.step()
    # Tolerance relative to each tensor's scale: the fused dense step rounds differently from
    # torch's on some CPUs (FMA contraction differs by ISA), and six momentum steps through a
    # quadratic loss grow a 1-ulp difference to ~1e-6 of the values -- also on entries near zero.
    for (n, x), (_, y) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()), msg=n)


def test_sparse_sgd_grad_scaler_skip():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = fo.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    opt.found_inf = torch.ones(())
    opt.step()
    assert torch.equal(before, emb.weight)
    opt.found_inf, opt.grad_scale = torch.zeros(()), torch.full((), 4.0)
    opt.step()
    torch.testing.assert_close(before - emb.weight, 0.1 * emb.weight.grad.to_dense() / 4.0)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_tensor_betas_with_foreach_refused_like_torch(name):
    p = [torch.nn.Parameter(torch.zeros(3))]
    for betas in [(torch.tensor(0.9), torch.tensor(0.99))]:
        with pytest.raises(ValueError) as want:
            getattr(torch.optim, name)(p, betas=betas, foreach=True)
        with pytest.raises(ValueError) as got:
            getattr(fo, name)(p, betas=betas, foreach=True)
        assert str(got.value) == str(want.value)
    getattr(fo, name)(p, betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True, capturable=True)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_every_torch_argument_is_accepted(name):
    """Every constructor argument of torch.optim's class exists, with torch's default, and each of
    foreach/fused/capturable/differentiable is documented in the class docstring."""
    ours, theirs = inspect.signature(getattr(fo, name)), inspect.signature(getattr(torch.optim, name))
    for arg, param in theirs.parameters.items():
        assert arg in ours.parameters, arg
        assert ours.parameters[arg].default == param.default or arg == "params", arg
        if arg in ("foreach", "fused", "capturable", "differentiable"):
            assert f"``{arg}" in getattr(fo, name).__doc__ or f"{arg}=" in getattr(fo, name).__doc__, arg
    with pytest.raises(RuntimeError, match="differentiable"):
        getattr(fo, name)([torch.nn.Parameter(torch.zeros(2))], differentiable=True)


# ---- CUDA kernels (through the SIMT runtime) == CPU kernel --------------------------------------

class SimtModesCall(ctypes.Structure):
    _fields_ = [("adam", ctypes.c_int32), ("amsgrad", ctypes.c_int32), ("mode", ctypes.c_int32),
                ("f16", ctypes.c_int32), ("n", ctypes.c_int32), ("ptrs", ctypes.POINTER(ctypes.c_void_p)),
                ("counters", ctypes.POINTER(ctypes.c_void_p)), ("extra", ctypes.POINTER(ctypes.c_void_p)),
                ("numel", ctypes.POINTER(ctypes.c_int64))] + [
                   (f, ctypes.c_double) for f in ("lr", "momentum", "dampening", "weight_decay", "beta1", "beta2",
                                                  "eps")] + [
                   ("nesterov", ctypes.c_int32), ("maximize", ctypes.c_int32), ("decoupled", ctypes.c_int32),
                   ("sr_seed", ctypes.c_uint64), ("schedule", ctypes.c_char_p), ("seed", ctypes.c_uint64)]


@pytest.fixture(scope="module")
def simt_modes():
    """tests/simt_modes/optim_modes_simt.cpp + the SIMT runtime as a small shared library (no torch
    headers), rebuilt when a source is newer."""
    out_dir = os.path.join(ROOT, "build", "simt_modes")
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, "libsimt_optim_modes.so")
    sources = [os.path.join(ROOT, "tests", "simt", "simt.cpp"),
               os.path.join(ROOT, "tests", "simt_modes", "optim_modes_simt.cpp")]
    headers = [os.path.join(ROOT, "csrc", "cuda", "optim_kernels.cuh"), os.path.join(ROOT, "csrc", "optim",
                                                                                      "optim_math.h")]
    if not os.path.exists(lib) or os.path.getmtime(lib) < max(os.path.getmtime(f) for f in sources + headers):
        sys.path.insert(0, os.path.join(ROOT, "tests", "simt"))
        try:
            import simt_build  # tests/simt/simt_build.py: the flags the harness is built with
        finally:
            sys.path.pop(0)
        cmd = [os.environ.get("CXX", "g++"), "-shared", "-fPIC", *simt_build.CFLAGS,
               f"-I{os.path.join(ROOT, 'tests', 'simt')}", f"-I{os.path.join(ROOT, 'csrc')}", *sources,
               "-o", lib, "-lpthread"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    dll = ctypes.CDLL(lib)
    dll.simt_optim_modes.argtypes = [ctypes.POINTER(SimtModesCall), ctypes.c_char_p, ctypes.c_int]
    return dll


def _simt_step(dll, adam, mode, lists, counters, extra, schedule, **h):
    n = len(lists[0])
    flat = [t for lst in lists for t in lst]
    ptrs = (ctypes.c_void_p * len(flat))(*[t.data_ptr() for t in flat])
    cnt = (ctypes.c_void_p * n)(*[c.data_ptr() if c is not None else None for c in counters])
    ext = (ctypes.c_void_p * n)(*[e.data_ptr() if e is not None else None for e in extra])
    numel = (ctypes.c_int64 * n)(*[t.numel() for t in lists[0]])
    call = SimtModesCall(adam=adam, amsgrad=int(h.get("amsgrad", False)), mode=mode,
                         f16=int(lists[0][0].dtype == torch.float16), n=n, ptrs=ptrs, counters=cnt, extra=ext,
                         numel=numel, lr=h["lr"], momentum=h.get("momentum", 0.0), dampening=0.0,
                         weight_decay=h.get("weight_decay", 0.0), beta1=0.9, beta2=0.999, eps=1e-8, nesterov=0,
                         maximize=0, decoupled=int(h.get("decoupled", False)), sr_seed=h.get("sr_seed", 0),
                         schedule=schedule.encode(), seed=3)
    msg = ctypes.create_string_buffer(256)
    assert dll.simt_optim_modes(ctypes.byref(call), msg, 256) == 0, msg.value.decode()
    return msg.value.decode()


SIMT_SHAPES = [(40000,), (7,), (1023,), (33, 65), (1,)]  # several 16384-element chunks, tails


@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("schedule", ["forward", "shuffle"])
def test_simt_sgd_sr_bits_equal_cpu(simt_modes, momentum, schedule):
    """Exact SGD cases (the fp32 update is exact, so both kernels hold the same fp32 value): the CUDA
    kernel writes the CPU kernel's bits, over several steps, chunks and a misaligned view."""
    params, grads, lr = exact_sgd_case(SIMT_SHAPES)
    params[2] = torch.cat([torch.ones(1, dtype=torch.bfloat16), params[2]])[1:]  # 2-byte misaligned
    grads[2] = torch.cat([torch.ones(1, dtype=torch.bfloat16), grads[2]])[1:]
    seed = 0x5EED_0123_4567
    sides = []
    for _ in range(2):
        ps = [p.clone() for p in params]
        bufs = [torch.zeros_like(p) for p in params] if momentum else []
        flags = [torch.zeros((), dtype=torch.uint8) for _ in params] if momentum else []
        steps = [torch.zeros(()) for _ in params]
        sides.append((ps, bufs, flags, steps))
    (cp, cb, cf, cs), (sp, sb, sf, ss) = sides
    for _ in range(3):
        OPS._fused_sgd_(cp, grads, cb, cf, lr, None, momentum, 0.0, 0.0, False, False, None, None, seed, cs)
        lists = [sp, grads] + ([sb] if momentum else [])
        _simt_step(simt_modes, 0, 1, lists, sf if momentum else [None] * len(sp), ss, schedule, lr=lr,
                   momentum=momentum, sr_seed=seed)
    for i, (a, b) in enumerate(zip(cp, sp)):
        assert torch.equal(bits(a), bits(b)), f"params[{i}]: {int((bits(a) != bits(b)).sum())} elements differ"
    assert all(float(x) == float(y) == 3 for x, y in zip(cs, ss))
    if momentum:
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(cb, sb))
        assert all(int(f) == 1 for f in sf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_simt_sgd_master_equals_cpu(simt_modes, dtype):
    params, grads, lr = exact_sgd_case(SIMT_SHAPES)
    params, grads = [p.to(dtype) for p in params], [g.to(dtype) for g in grads]
    masters = [p.float() + 2.0 ** -20 for p in params]  # between the params' representable values
    cp, sp = [p.clone() for p in params], [p.clone() for p in params]
    cm, sm = [m.clone() for m in masters], [m.clone() for m in masters]
    OPS._fused_sgd_(cp, grads, [], [], lr, None, 0.0, 0.0, 0.0, False, False, None, None, -1, None, cm)
    _simt_step(simt_modes, 0, 2, [sp, grads], [None] * len(sp), sm, "shuffle", lr=lr)
    for a, b, ma, mb in zip(cp, sp, cm, sm):
        assert torch.equal(ma, mb) and torch.equal(bits(a), bits(b))
        assert torch.equal(a, ma.to(dtype))


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_simt_adam_modes_match_cpu(simt_modes, mode, amsgrad):
    """Adam's sqrt/division chain is not exact, and the CPU's AVX-512 loop fuses multiply-adds where
    the SIMT build does not, so the fp32 values may differ in their last bit: stochastic rounding
    then gives the same bits wherever the value agrees -- all but a few elements -- and one bf16
    step at most elsewhere; the master copies agree to fp32 rounding."""
    params = bf16_params(SIMT_SHAPES)
    grads = bf16_params(SIMT_SHAPES, seed=1, scale=0.1)
    seed = 77
    sides = []
    for _ in range(2):
        ps = [p.clone() for p in params]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        vmax = [torch.zeros_like(p) for p in params] if amsgrad else []
        steps = [torch.zeros(()) for _ in params]
        masters = [p.float() for p in params] if mode == 2 else None
        sides.append((ps, m, v, vmax, steps, masters))
    (cp, cm, cv, cx, cs, cma), (sp, sm, sv, sx, ss, sma) = sides
    for _ in range(3):
        OPS._fused_adam_(cp, grads, cm, cv, cx, cs, 1e-3, None, 0.9, 0.999, 0.01, 1e-8, amsgrad, False, True, None,
                         None, seed if mode == 1 else -1, cma)
        lists = [sp, grads, sm, sv] + ([sx] if amsgrad else [])
        _simt_step(simt_modes, 1, mode, lists, ss, sma if mode == 2 else [None] * len(sp), "shuffle", lr=1e-3,
                   weight_decay=0.01, decoupled=True, amsgrad=amsgrad, sr_seed=seed if mode == 1 else 0)
    total = differ = 0
    for a, b in zip(cp, sp):
        step_apart = (a.double() - b.double()).abs() / a.double().abs().clamp_min(1e-30)
        assert (step_apart <= 2.0 ** -7 + 1e-12).all()
        total += a.numel()
        differ += int((bits(a) != bits(b)).sum())
    assert differ <= max(total // 1000, 2), f"{differ} of {total} elements differ"
    assert all(float(x) == float(y) == 3 for x, y in zip(cs, ss))
    if mode == 2:
        for a, b in zip(cma, sma):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ---- the evidence: pure-bf16 training stalls, both modes do not ---------------------------------

def test_bf16_training_example():
    """examples/bf16_training.py --fast: stochastic rounding and master weights end within 2 % of the
    fp32 run's final training loss, plain bf16 updates measurably worse; the PNG is written."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "curves.png")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "bf16_training.py"), "--fast",
                               "--png", png], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert os.path.getsize(png) > 10_000
    out = proc.stdout
    final = {m: float(v) for m, v in re.findall(r"^final loss (.+?)\s+([\d.]+)\s+\(", out, re.M)}
    assert set(final) == {"fp32", "bf16", "bf16 + stochastic rounding", "bf16 + master weights"}
    ref = final["fp32"]
    assert abs(final["bf16 + stochastic rounding"] - ref) <= 0.02 * ref
    assert abs(final["bf16 + master weights"] - ref) <= 0.02 * ref
    assert final["bf16"] > 1.5 * ref, "plain bf16 updates must stall"
    rows = re.findall(r"^\s+(\d+)((?:\s+[\d.]+){4})$", out, re.M)
    assert len(rows) == 11
    assert float(rows[0][1].split()[0]) > 2 * ref  # the curves start far above where fp32 ends


# ---- on a GPU (the GPU box): CUDA == CPU bits, CUDA-graph capture --------------------------------

@pytest.mark.skipif(not cuda_ready(), reason="needs a GPU and fastreg's CUDA kernels (runs on the GPU box)")
@pytest.mark.parametrize("mode", ["stochastic_rounding", "master_weights"])
def test_cuda_bits_equal_cpu_and_graph_capture(mode):
    params, grads, lr = exact_sgd_case(SIMT_SHAPES)
    runs = {}
    for device in ("cpu", "cuda"):
        ps = [torch.nn.Parameter(p.to(device)) for p in params]
        torch.manual_seed(4)
        opt = fo.SGD(ps, lr=lr, **{mode: True})
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.to(device)
            opt.step()
        runs[device] = [p.detach().cpu() for p in ps]
    for a, b in zip(runs["cpu"], runs["cuda"]):
        assert torch.equal(bits(a), bits(b))
    # a captured step replayed (one replay skipped through found_inf) == eager steps
    eager = [torch.nn.Parameter(p.cuda()) for p in params]
    graphed = [torch.nn.Parameter(p.cuda()) for p in params]
    torch.manual_seed(4)
    oe = fo.SGD(eager, lr=lr, momentum=0.5, **{mode: True})
    torch.manual_seed(4)
    og = fo.SGD(graphed, lr=lr, momentum=0.5, **{mode: True})
    for p, g in zip(graphed, grads):
        p.grad = g.cuda()
    found_inf = torch.ones((), device="cuda")
    og.found_inf = found_inf
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        og.step()  # allocates the state; skipped
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og.step()
    for t in range(4):
        found_inf.fill_(1.0 if t == 1 else 0.0)
        graph.replay()
        if t != 1:
            for p, g in zip(eager, grads):
                p.grad = g.cuda()
            oe.step()
    torch.cuda.synchronize()
    for a, b in zip(eager, graphed):
        assert torch.equal(bits(a.detach()), bits(b.detach()))
