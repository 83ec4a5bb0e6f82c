"""fastreg's CUDA kernels executed on the CPU: the unchanged source of csrc/cuda/*_kernels.cuh run
by the SIMT runtime of tests/simt (every CUDA thread a fiber; barriers, warp shuffles, clusters
and DSMEM emulated; out-of-bounds accesses and misaligned vector accesses trapped), launched by the
real host launch code (csrc/cuda/*_launch.h) over a CUDA-runtime layer with H100 and A100
descriptions that applies the hardware's launch rules, with the automatic or a forced strategy,
against fastreg's CPU kernels and a float64 reference. Every run executes under the forward,
reversed and shuffled schedules and must give bit-identical results.

What this proves and what it cannot: docs/cuda.md. The harness extension is built on first use
(tests/simt/simt_build.py, cached in build/simt).
"""
import collections
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import fastreg  # noqa: F401  (the CPU kernels)
from lce_cases import GRAD_TOL, IGNORE, LOSS_TOL, make_case, reference, rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "simt"))
import simt_build  # noqa: E402

CPU = torch.ops.fastreg
STRATEGIES = ["single-cached", "single-streaming"] + [
    f"cluster{k}-{m}" for k in (2, 4, 8) for m in ("cached", "streaming")
]
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SCHEDULES = ("forward", "reverse", "shuffle")
EXECUTED = collections.Counter()  # strategy -> harness launches, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def simt(request):
    simt_build.load()
    yield torch.ops.fastreg_simt
    if EXECUTED:  # printed past pytest's output capture, so that every run shows it
        line = "SIMT harness: launch strategies executed (row pass launches): " + ", ".join(
            f"{k} x{v}" for k, v in sorted(EXECUTED.items()))
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if capture is not None and reporter is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("")
                reporter.write_line(line)
        else:
            print(line)


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


# ---- row pass ------------------------------------------------------------------------------------
def simt_rows(logits, target, weight, scale, eps=0.0, softcap=0.0, zloss=0.0, write_grad=True, *,
              device="h100", strategy="auto", schedule="forward", seed=0):
    lg = logits.clone()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.full((logits.shape[0],), float("nan"), dtype=acc)
    name = _executed(torch.ops.fastreg_simt._lce_rows(lg, target, weight, scale, IGNORE, eps, softcap, zloss,
                                                     write_grad, loss, device, strategy, schedule, seed))
    return loss, lg, name


WARNINGS = []  # the launcher's warnings, as the harness reported them


def _executed(msg):
    """The strategy a harness call executed (counted); its warnings go to WARNINGS."""
    name, *warnings = msg.split("\n")
    WARNINGS.extend(w.removeprefix("warning: ") for w in warnings)
    if name != "none":  # zero rows launch nothing
        EXECUTED[name] += 1
    return name


def cpu_rows(logits, target, weight, scale, eps=0.0, softcap=0.0, zloss=0.0, write_grad=True):
    lg = logits.clone()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.full((logits.shape[0],), float("nan"), dtype=acc)
    CPU._lce_rows(lg, target, weight, scale, IGNORE, eps, softcap, zloss, write_grad, loss)
    return loss, lg


def check_rows(logits, target, weight, scale, eps=0.0, softcap=0.0, zloss=0.0, write_grad=True, *,
               device="h100", strategy="auto", schedules=SCHEDULES, seed=0):
    """The harness result under each schedule: bit-identical across schedules, within the
    tolerances of tests/test_lce_cuda.py of the float64 reference and of the CPU kernel."""
    dtype = logits.dtype
    args = (target, weight, scale, eps, softcap, zloss, write_grad)
    results = [simt_rows(logits, *args, device=device, strategy=strategy, schedule=s, seed=seed + i)
               for i, s in enumerate(schedules)]
    loss, out, name = results[0]
    for (l2, o2, n2), s in zip(results[1:], schedules[1:]):
        assert n2 == name
        assert torch.equal(_bits(l2), _bits(loss)) and torch.equal(_bits(o2), _bits(out)), \
            f"{name}: the {s} schedule gives other bits than {schedules[0]} (order-dependent kernel)"
    ref_loss, ref_grad = reference(logits, target, weight, scale, IGNORE, eps, softcap, zloss, write_grad)
    assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype], (name, rel_err(loss, ref_loss))
    ignored = ~((target != IGNORE) & (target >= 0) & (target < logits.shape[1]))
    assert (loss[ignored] == 0).all(), "ignored rows must have loss 0"
    loss_cpu, out_cpu = cpu_rows(logits, *args)
    # relative to the loss scale: a row whose loss is 0 up to rounding (V = 1) is no failure
    diff = (loss.double() - loss_cpu.double()).norm().item()
    assert diff <= LOSS_TOL[dtype] * max(loss_cpu.double().norm().item(), 1.0), (name, loss, loss_cpu)
    if write_grad:
        err = rel_err(out, ref_grad)
        assert err <= GRAD_TOL[dtype], f"{name}: gradient rel. error {err:.3g} > {GRAD_TOL[dtype]:.1g}"
        assert (out[ignored] == 0).all(), "ignored rows must have an all-zero gradient"
        assert rel_err(out, out_cpu) <= GRAD_TOL[dtype]
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(out, out_cpu, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(out.float(), out_cpu.float(), rtol=2e-2,
                                       atol=1e-3 * out_cpu.float().abs().max().item() + 1e-6)
    else:
        assert torch.equal(out, logits), "write_grad=False must leave the logits untouched"
    return name


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 4096 + 3])
@pytest.mark.parametrize("options", ["plain", "all", "no_grad"])
def test_rows_match_reference(dtype, V, options):
    if options == "plain":
        logits, target, weight, scale = make_case(9, V, dtype)
        check_rows(logits, target, weight, scale)
    else:
        logits, target, weight, scale = make_case(9, V, dtype, weights=True, ignore_frac=0.2, oob=True,
                                                  per_row_scale=True, seed=1)
        check_rows(logits, target, weight, scale, eps=0.1, softcap=15.0, zloss=1e-3, write_grad=options == "all")


OPTIONS = {
    "class_weight": dict(case=dict(weights=True), op=dict()),
    "class_weight_smoothing": dict(case=dict(weights=True), op=dict(eps=0.2)),
    "label_smoothing": dict(case=dict(), op=dict(eps=0.1)),
    "ignore_index": dict(case=dict(ignore_frac=0.3), op=dict()),
    "out_of_range_targets": dict(case=dict(oob=True), op=dict()),
    "softcap": dict(case=dict(), op=dict(softcap=5.0)),
    "z_loss": dict(case=dict(), op=dict(zloss=1e-2)),
    "per_row_scale": dict(case=dict(per_row_scale=True), op=dict()),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option(name, dtype):
    spec = OPTIONS[name]
    logits, target, weight, scale = make_case(7, 1000 + 5, dtype, seed=2, **spec["case"])
    check_rows(logits, target, weight, scale, **spec["op"])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V", [7, 4096 + 3])
def test_every_strategy(strategy, dtype, V):
    logits, target, weight, scale = make_case(5, V, dtype, weights=True, ignore_frac=0.1, oob=True, seed=3)
    name = check_rows(logits, target, weight, scale, eps=0.05, softcap=20.0, zloss=1e-4, strategy=strategy)
    assert name == strategy


@pytest.mark.parametrize("dtype,V", [(torch.float32, 16384 + 5), (torch.bfloat16, 32768 + 3)], ids=str)
def test_rows_over_48k_shared_memory(dtype, V):
    logits, target, weight, scale = make_case(2, V, dtype, weights=True, seed=4)
    plan = torch.ops.fastreg_simt._lce_plan("a100", 2, V, dtype, True, "auto")
    assert plan.startswith("single-cached") and int(plan.split("smem=")[1]) > 48 * 1024, plan
    assert check_rows(logits, target, weight, scale, eps=0.1, device="a100") == "single-cached"
    assert check_rows(logits, target, weight, scale, eps=0.1, strategy="single-cached") == "single-cached"


@pytest.mark.parametrize("dtype,V", [(torch.float32, 12288), (torch.bfloat16, 24576), (torch.float64, 6000),
                                     (torch.float32, 12012)], ids=str)
@pytest.mark.parametrize("device,strategy", [("a100", "auto"), ("h100", "single-cached")])
def test_shared_memory_just_under_48k(dtype, V, device, strategy):
    """A row cache of (48 KiB - the kernel's static shared memory, 48 KiB] bytes: with the static
    ~1.1 KiB (fp32) / ~2 KiB (fp64) the block needs more than 48 KiB, so the launcher must raise
    cudaFuncAttributeMaxDynamicSharedMemorySize although the dynamic part alone fits 48 KiB."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stats = 56 if acc == torch.float64 else 32  # sizeof(Stats<acc>): the kernel's static smem is 35 of them
    plan_text = torch.ops.fastreg_simt._lce_plan(device, 3, V, dtype, True, strategy)
    smem = int(plan_text.split("smem=")[1])
    assert plan_text.startswith("single-cached") and 48 * 1024 - 35 * stats < smem <= 48 * 1024, plan_text
    logits, target, weight, scale = make_case(3, V, dtype, weights=True, seed=25)
    assert check_rows(logits, target, weight, scale, eps=0.1, device=device, strategy=strategy) == "single-cached"


def test_cluster_shared_memory_just_under_48k():
    """The same window for a cluster: cudaOccupancyMaxActiveClusters rejects the configuration
    unless the attribute was raised, which must not pass for "cannot be placed" (a silent fallback
    to one CTA per row)."""
    V = 24576  # fp32: a cluster of 2 caches 3072 vectors = 48 KiB per CTA
    assert plan("h100", 4096, V, strategy="cluster2-cached") == "cluster2-cached"
    logits, target, weight, scale = make_case(3, V, torch.float32, seed=26)
    assert check_rows(logits, target, weight, scale, strategy="cluster2-cached") == "cluster2-cached"


def test_failed_occupancy_query_is_not_an_answer():
    """A cluster-occupancy query that fails with an error (device "h100-flaky": its first query in
    the process) makes that launch fall back to one CTA per row, with one warning, and is asked
    again next time: the second launch runs the cluster. Only answers are cached."""
    V = 16384 + 5
    assert plan("h100", 1, V) == "cluster8-cached"
    logits, target, weight, scale = make_case(1, V, torch.float32, weights=True, seed=27)
    WARNINGS.clear()
    first = simt_rows(logits, target, weight, scale, device="h100-flaky")[2]
    assert first == "single-cached"
    assert len(WARNINGS) == 1 and "cudaOccupancyMaxActiveClusters failed" in WARNINGS[0], WARNINGS
    assert check_rows(logits, target, weight, scale, device="h100-flaky") == "cluster8-cached"
    assert len(WARNINGS) == 1, "warned more than once"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_misaligned_rows(dtype):
    # a contiguous (rows, V) view one element past a 16-byte boundary: scalar heads and tails
    rows, V = 6, 4096 + 8
    logits, target, weight, scale = make_case(rows, V, dtype, seed=7)
    buf = torch.empty(rows * V + 1, dtype=dtype)
    view = buf[1:].view(rows, V)
    view.copy_(logits)
    assert view.data_ptr() % 16 != 0
    ref_loss, ref_grad = reference(logits, target, None, scale, IGNORE, 0.0, 0.0, 0.0, True)
    for strategy in ("auto", "cluster4-cached", "single-streaming"):
        first = None
        for schedule in SCHEDULES:
            loss = torch.empty(rows)
            view.copy_(logits)
            _executed(torch.ops.fastreg_simt._lce_rows(view, target, None, scale, IGNORE, 0.0, 0.0, 0.0, True, loss,
                                                       "h100", strategy, schedule, 5))
            assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype]
            assert rel_err(view, ref_grad) <= GRAD_TOL[dtype]
            if first is None:
                first = (loss, view.clone())
            else:
                assert torch.equal(_bits(first[0]), _bits(loss)) and torch.equal(_bits(first[1]), _bits(view)), schedule


def test_ignored_rows_never_read():
    # Ignored and out-of-range rows full of NaN: loss 0 and a zero gradient (their logits are not read).
    logits, target, weight, scale = make_case(8, 4096 + 3, torch.float32, seed=8)
    target[::2] = IGNORE
    target[1] = 10**9
    logits[::2] = float("nan")
    logits[1] = float("nan")
    bad = torch.zeros(8, dtype=torch.bool)
    bad[::2] = True
    bad[1] = True
    for strategy in ("auto", "cluster2-streaming", "single-cached"):
        for schedule in SCHEDULES:
            loss, out, _ = simt_rows(logits, target, weight, scale, 0.1, strategy=strategy, schedule=schedule)
            assert (loss[bad] == 0).all() and (out[bad] == 0).all()
            assert torch.isfinite(loss).all() and torch.isfinite(out).all()


def test_int32_target_and_zero_rows():
    logits, target, weight, scale = make_case(17, 1000, torch.float32, ignore_frac=0.2, seed=6)
    for schedule in SCHEDULES:
        l64, o64, _ = simt_rows(logits, target, weight, scale, 0.1, schedule=schedule)
        l32, o32, _ = simt_rows(logits, target.int(), weight, scale, 0.1, schedule=schedule)
        assert torch.equal(l32, l64) and torch.equal(o32, o64)
    empty = torch.empty(0, 5)
    assert simt_rows(empty, torch.empty(0, dtype=torch.int64), None, torch.ones(1))[2] == "none"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("strategy", ["single-cached", "cluster4-cached", "cluster2-streaming"])
def test_nan_logits_propagate(strategy, dtype):
    """A 16-byte pack of NaN (or NaN after -inf) at the start of a thread's slice makes the row's
    loss and gradient NaN, as in the CPU kernel (the running max propagates NaN)."""
    rows, V = 4, 4096 + 8
    logits, target, weight, scale = make_case(rows, V, dtype, seed=11)
    vec = 16 // dtype.itemsize
    target[:] = 5
    logits[0, 0:vec] = float("nan")                    # the first pack of the row (thread 0's first)
    logits[1, 2048:2048 + vec] = float("nan")          # the first pack of another CTA's / thread's slice
    logits[2, 512:512 + vec] = float("-inf")
    logits[2, 512 + vec] = float("nan")
    runs = [simt_rows(logits, target, weight, scale, strategy=strategy, schedule=s) for s in SCHEDULES]
    loss, out, _ = runs[0]
    for l2, o2, _ in runs[1:]:
        assert torch.equal(_bits(l2), _bits(loss)) and torch.equal(_bits(o2), _bits(out))
    loss_cpu, out_cpu = cpu_rows(logits, target, weight, scale)
    assert torch.isnan(loss[:3]).all() and torch.isnan(loss_cpu[:3]).all(), (loss, loss_cpu)
    assert torch.isnan(out[:3]).all() and torch.isnan(out_cpu[:3]).all()
    assert torch.isfinite(loss[3]) and torch.isfinite(out[3]).all()
    torch.testing.assert_close(out[3].double(), out_cpu[3].double(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                               atol=1e-6)


# ---- the optional arguments of _lce_rows (issue 11): against the CPU kernel ------------------------
def both_rows(logits, target, weight, scale, *, eps=0.0, softcap=0.0, zloss=0.0, write_grad=True, probs=None,
              zloss_scale=None, keep_shape=None, filter_eps=0.0, strategy="auto", device="h100"):
    """(simt, cpu) results of the op with every optional output: (loss, logits/grad, lse, argmax, keep).
    The harness runs under every schedule, with bit-identical results (checked)."""
    out = []
    for schedule in (*SCHEDULES, None):  # None: the CPU kernel
        simt = schedule is not None
        rows = logits.shape[0]
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lg = logits.clone()
        loss = torch.full((rows,), float("nan"), dtype=acc)
        lse = torch.full((rows,), float("nan"), dtype=acc)
        am = torch.full((rows,), -7, dtype=torch.int64)
        keep = torch.zeros(keep_shape, dtype=torch.uint8) if keep_shape else None
        tgt = torch.empty(0, dtype=torch.int64) if probs is not None else target
        opt = (probs, zloss_scale, lse, am, filter_eps, keep)
        if simt:
            _executed(torch.ops.fastreg_simt._lce_rows(lg, tgt, weight, scale, IGNORE, eps, softcap, zloss,
                                                       write_grad, loss, device, strategy, schedule, 3, *opt))
        else:
            CPU._lce_rows(lg, tgt, weight, scale, IGNORE, eps, softcap, zloss, write_grad, loss, *opt)
        out.append((loss, lg, lse, am, keep))
    for other, schedule in zip(out[1:len(SCHEDULES)], SCHEDULES[1:]):
        for a, b in zip(out[0], other):
            assert a is None or torch.equal(_bits(a), _bits(b)), f"the {schedule} schedule gives other bits"
    return out[0], out[-1]


def close(a, b, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    elif dtype == torch.float32 or a.dtype == torch.float32:
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-5, atol=2e-6 * max(b.float().abs().max().item(), 1))
    else:  # 16-bit gradients: one rounding step apart at most
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3 * b.float().abs().max().item() + 1e-6)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy,V", [("auto", 7), ("cluster2-cached", 1000 + 5), ("single-streaming", 1000 + 5)])
def test_stats_zloss_scale_and_softcap_match_cpu(dtype, strategy, V):
    logits, target, weight, scale = make_case(6, V, dtype, weights=True, ignore_frac=0.2, seed=21)
    logits[1, 3] = logits[1].max()  # a tie: the first maximum wins
    logits[1, V - 1] = logits[1, 3]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    zs = torch.tensor([2.5], dtype=acc)
    (l1, g1, lse1, am1, _), (l0, g0, lse0, am0, _) = both_rows(
        logits, target, weight, scale, eps=0.1, softcap=4.0, zloss=1e-2, zloss_scale=zs, strategy=strategy)
    close(l1, l0, acc)
    close(lse1, lse0, acc)
    assert torch.equal(am1, am0)
    close(g1, g0, dtype)
    ignored = target == IGNORE
    assert (am1[ignored] == -1).all() and (lse1[ignored] == 0).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["auto", "cluster4-cached", "single-streaming"])
@pytest.mark.parametrize("offset", [0, 1, 3 * 1003], ids=["aligned", "view", "chunk"])
def test_probability_targets_match_cpu(dtype, strategy, offset):
    """offset > 0: the probabilities in a (rows, V) view `offset` elements into a larger buffer
    (a user's probs[1:], or the chunk c0 = 3 of a probs tensor), so their rows start at another
    address mod 16 than the logits' rows: a 16-byte load there faults on a GPU
    (cudaErrorMisalignedAddress); the kernel reads those rows column by column."""
    rows, V = 5, 1000 + 3
    logits, _, weight, scale = make_case(rows, V, dtype, weights=True, seed=22)
    q = torch.rand(rows, V, dtype=torch.float64) ** 3
    q[:3] /= q[:3].sum(1, keepdim=True)  # rows 3, 4 do not sum to 1
    buf = torch.empty(rows * V + offset, dtype=dtype)
    probs = buf[offset:].view(rows, V)
    probs.copy_(q.to(dtype))
    assert ((probs.data_ptr() - logits.data_ptr()) % 16 != 0) == (offset > 0)
    (l1, g1, lse1, am1, _), (l0, g0, lse0, am0, _) = both_rows(
        logits, None, weight, scale, eps=0.2, zloss=1e-3, probs=probs, strategy=strategy)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    close(l1, l0, acc)
    close(lse1, lse0, acc)
    assert torch.equal(am1, am0)
    close(g1, g0, dtype)


@pytest.mark.parametrize("dtype,strategy", [(torch.float32, "cluster2-streaming"), (torch.bfloat16, "auto"),
                                            (torch.float64, "auto")], ids=str)
def test_block_keep_matches_cpu_exactly(dtype, strategy):
    rows, V = 6, 1000 + 5
    logits, target, weight, scale = make_case(rows, V, dtype, seed=23)
    logits[2, 11] = 40.0  # a peaked row
    (_, g1, _, _, _), _ = both_rows(logits, target, weight, scale)
    eps = 1.001 * g1.double().abs().flatten().kthvalue(int(0.98 * rows * V)).values.item()  # off any value
    (_, g1, _, _, k1), (_, g0, _, _, k0) = both_rows(logits, target, weight, scale, keep_shape=(3, 9),
                                                     filter_eps=eps, strategy=strategy)
    # the map is exact for the kernel's own written gradient: per (tile, block) the largest block code
    # (lce_math.h lce_block_code: 0 where |g| <= eps, else the biased fp32 exponent of |g|)
    th, bw = 2, -(-V // 9)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a = g1.double().abs()
    over = (a > torch.tensor(eps, dtype=acc).double()) | torch.isnan(a)
    code = torch.where(over, (torch.frexp(a.float())[1].long() + 126).clamp(1, 254), 0)
    pad = torch.zeros(3 * th, 9 * bw, dtype=torch.long)
    pad[:rows, :V] = code
    want = pad.view(3, th, 9, bw).amax(dim=(1, 3)).to(torch.uint8)
    assert torch.equal(k1, want)
    assert 0 < int((k1 > 0).sum()) < 27
    if dtype != torch.bfloat16:  # and the CPU kernel's (no gradient within rounding of eps here)
        assert torch.equal(k1, k0)


# ---- the planner ---------------------------------------------------------------------------------
def plan(device, rows, V, dtype=torch.float32, write_grad=True, strategy="auto"):
    return torch.ops.fastreg_simt._lce_plan(device, rows, V, dtype, write_grad, strategy).split()[0]


def test_h100_and_a100_plans():
    # many rows: one CTA per row, cached while its row slice fits 96 KiB (H100: then a cluster
    # splits the row) or, on an A100 (no clusters), the opt-in maximum of ~163 KiB
    assert plan("h100", 4096, 16000) == "single-cached"
    assert plan("a100", 4096, 16000) == "single-cached"
    assert plan("h100", 4096, 32000, torch.bfloat16) == "single-cached"
    assert plan("h100", 4096, 32000) == "cluster2-cached"   # 125 KiB fp32 row: 2 x 62.5 KiB
    assert plan("a100", 4096, 32000) == "single-cached"     # 125 KiB on one CTA
    # a 512 KiB fp32 row: a cluster of 8 (64 KiB each) on an H100; an A100 streams it
    assert plan("h100", 4096, 131072) == "cluster8-cached"
    assert plan("a100", 4096, 131072) == "single-streaming"
    # few long rows: the cluster grows so that the whole H100 (132 SMs) takes part
    assert plan("h100", 2, 16384) == "cluster8-cached"
    assert plan("h100", 100, 16384) == "cluster4-cached"
    assert plan("a100", 2, 16384) == "single-cached"
    # no gradient: nothing to cache
    assert plan("h100", 4096, 32000, write_grad=False) == "single-streaming"
    assert plan("h100", 1, 65536, write_grad=False) == "cluster8-streaming"
    assert plan("a100", 1, 65536, write_grad=False) == "single-streaming"
    # forced strategies
    assert plan("h100", 4096, 32000, strategy="cluster4-streaming") == "cluster4-streaming"
    assert plan("a100", 4096, 131072, strategy="single-cached").startswith("single-cached")


@pytest.mark.parametrize("V,fallback", [(16384 + 5, "single-cached"), (262144 + 5, "single-streaming")])
def test_cluster_that_cannot_be_placed_falls_back(V, fallback):
    """The launcher's fallback when cudaOccupancyMaxActiveClusters says no: one CTA per row, cached
    only if the whole row fits."""
    logits, target, weight, scale = make_case(1, V, torch.float32, weights=True, seed=13)
    assert plan("h100", 1, V) == "cluster8-cached"
    assert check_rows(logits, target, weight, scale, eps=0.1, device="h100-unplaceable") == fallback


def _reachable_strategies():
    """Every strategy the planner picks over a sweep of shapes, with its smallest example."""
    found = {}
    for device in ("h100", "a100"):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for write_grad in (True, False):
                for rows in (1, 2, 8, 64, 300, 4096):
                    for V in (1, 7, 1000, 4099, 16389, 40000, 70000, 131073, 262149):
                        name = plan(device, rows, V, dtype, write_grad)
                        ex = (rows * V * dtype.itemsize, device, rows, V, dtype, write_grad)
                        if name not in found or ex < found[name]:
                            found[name] = ex
    return found


def test_every_planned_strategy_executed():
    """Runs the smallest example of every strategy the planner can choose, with the planner's own
    choice ("auto"); together with the forced strategies, every one has been executed."""
    reachable = _reachable_strategies()
    assert set(reachable) <= set(STRATEGIES), reachable
    assert {"single-cached", "single-streaming", "cluster8-cached", "cluster8-streaming"} <= set(reachable)
    for name, (_, device, rows, V, dtype, write_grad) in sorted(reachable.items()):
        logits, target, weight, scale = make_case(rows, V, dtype, weights=True, seed=12)
        got = check_rows(logits, target, weight, scale, eps=0.1, write_grad=write_grad, device=device)
        assert got == name
    missing = set(reachable) - set(EXECUTED)
    assert not missing, f"planned but never executed: {missing}"


# ---- optimizers ----------------------------------------------------------------------------------
SHAPES = [(40000,), (7,), (0,), (33, 65), (1,)]  # 40000: three 16384-element chunks; (0,): empty


def _tensors(shapes, dtype, seed, scale=1.0, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g, dtype=torch.float64) * scale
        out.append((t.abs() if positive else t).to(dtype))
    return out


def _close(a, b, dtype):
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=1e-7)
    else:  # the same fp32 maths on both sides: at most one rounding of the storage type apart
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-5)


def _adam_args(dtype, amsgrad, shapes=SHAPES, seed=0, **over):
    ps = _tensors(shapes, dtype, seed)
    args = dict(params=ps, grads=_tensors(shapes, dtype, seed + 1),
                exp_avgs=_tensors(shapes, dtype, seed + 2, 0.1),
                exp_avg_sqs=_tensors(shapes, dtype, seed + 3, 0.01, positive=True),
                max_exp_avg_sqs=_tensors(shapes, dtype, seed + 4, 0.01, positive=True) if amsgrad else [],
                state_steps=[torch.tensor(float(i + 2)) for i in range(len(shapes))], lr=0.01, lr_tensor=None,
                beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=amsgrad, maximize=False,
                decoupled_weight_decay=False, grad_scale=None, found_inf=None)
    args.update(over)
    return args


def _sgd_args(dtype, momentum, shapes=SHAPES, seed=0, started=False, **over):
    n = len(shapes)
    args = dict(params=_tensors(shapes, dtype, seed), grads=_tensors(shapes, dtype, seed + 1),
                momentum_buffers=_tensors(shapes, dtype, seed + 2) if momentum else [],
                momentum_started=[torch.tensor(started, dtype=torch.uint8) for _ in range(n)] if momentum else [],
                lr=0.05, lr_tensor=None, momentum=momentum, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False, grad_scale=None, found_inf=None)
    args.update(over)
    return args


def _clone(args):
    return {k: ([t.clone() for t in v] if isinstance(v, list) else (v.clone() if torch.is_tensor(v) else v))
            for k, v in args.items()}


def _run_both(op_name, args, seed=0):
    """The same step through the CPU kernel and the harness (under every schedule, with
    bit-identical results), on copies; returns (cpu, simt, msg)."""
    cpu = _clone(args)
    getattr(CPU, op_name)(**cpu)
    runs = []
    for schedule in SCHEDULES:
        sim = _clone(args)
        msg = getattr(torch.ops.fastreg_simt, op_name)(**sim, schedule=schedule, seed=seed)
        runs.append((sim, msg))
    sim, msg = runs[0]
    for (other, msg2), schedule in zip(runs[1:], SCHEDULES[1:]):
        assert msg2 == msg
        for key, v in sim.items():
            if isinstance(v, list):
                assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(v, other[key])), \
                    f"{key}: the {schedule} schedule gives other bits"
    return cpu, sim, msg


def _compare(cpu, sim, dtype, lists):
    for name in lists:
        for i, (a, b) in enumerate(zip(cpu[name], sim[name])):
            if name in ("state_steps", "momentum_started"):
                assert torch.equal(a, b), f"{name}[{i}]: {a} != {b}"
            else:
                _close(b, a, dtype)


ADAM_CFGS = {
    "adam": dict(),
    "adam_wd": dict(weight_decay=0.1),
    "amsgrad": dict(amsgrad=True, weight_decay=0.05),
    "adamw": dict(decoupled_weight_decay=True, weight_decay=0.1),
    "maximize_scaled": dict(maximize=True, grad_scale=torch.tensor(4.0)),
    "tensor_lr": dict(lr_tensor=torch.tensor(0.003, dtype=torch.float64), decoupled_weight_decay=True,
                      weight_decay=0.01),
}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cfg", list(ADAM_CFGS))
def test_adam_matches_cpu_kernel(dtype, cfg):
    over = dict(ADAM_CFGS[cfg])
    amsgrad = over.pop("amsgrad", False)
    args = _adam_args(dtype, amsgrad, **over)
    for step in range(2):  # two steps: the state written by the first is read by the second
        cpu, sim, msg = _run_both("_fused_adam_", args, seed=step)
        assert msg == "launches=1 batches=5"
        _compare(cpu, sim, dtype, ["params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"])
        args = sim


SGD_CFGS = {
    "plain": dict(momentum=0.0),
    "weight_decay_maximize": dict(momentum=0.0, weight_decay=0.1, maximize=True),
    "momentum": dict(momentum=0.9),
    "dampening": dict(momentum=0.9, dampening=0.3),
    "nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    "scaled_tensor_lr": dict(momentum=0.8, grad_scale=torch.tensor(8.0), lr_tensor=torch.tensor(0.02)),
}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cfg", list(SGD_CFGS))
def test_sgd_matches_cpu_kernel(dtype, cfg):
    over = dict(SGD_CFGS[cfg])
    momentum = over.pop("momentum")
    args = _sgd_args(dtype, momentum, **over)
    for step in range(2):  # the first step copies the gradient into the buffer, the second blends
        cpu, sim, msg = _run_both("_fused_sgd_", args, seed=step)
        assert msg == "launches=1 batches=5"
        _compare(cpu, sim, dtype, ["params", "momentum_buffers", "momentum_started"])
        if momentum:
            assert all(int(f) == 1 for f in sim["momentum_started"])
        args = sim


def test_more_tensors_than_one_launch():
    cap4 = torch.ops.fastreg_simt._optim_batch_cap(4)
    cap3 = torch.ops.fastreg_simt._optim_batch_cap(3)
    assert cap4 > 300 and cap3 > cap4
    shapes = [(i % 5 + 1,) for i in range(cap4 + 75)]
    args = _adam_args(torch.float32, False, shapes=shapes, seed=3)
    args["state_steps"] = [torch.arange(len(shapes), dtype=torch.float32)]  # packed counters
    cpu, sim, msg = _run_both("_fused_adam_", args)
    assert msg == f"launches=2 batches={cap4},75"
    _compare(cpu, sim, torch.float32, ["params", "exp_avgs", "exp_avg_sqs", "state_steps"])
    shapes = [(3,)] * (2 * cap3 + 1)
    args = _sgd_args(torch.bfloat16, 0.9, shapes=shapes, seed=4)
    cpu, sim, msg = _run_both("_fused_sgd_", args)
    assert msg == f"launches=3 batches={cap3},{cap3},1"
    _compare(cpu, sim, torch.bfloat16, ["params", "momentum_buffers", "momentum_started"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_misaligned_views(dtype):
    """big[1:] views: not 16-byte aligned, so the kernels take the scalar path; a mix of aligned
    and misaligned tensors in one launch."""
    n = 40001
    def views(seed, positive=False):
        out = []
        for k, t in enumerate(_tensors([(n + 1,), (100,)], dtype, seed, 0.1, positive)):
            out.append(t[1:] if k == 0 else t)
        return out
    args = _adam_args(dtype, True, shapes=[(n,), (100,)])
    for key, seed, pos in (("params", 0, False), ("grads", 1, False), ("exp_avgs", 2, False),
                           ("exp_avg_sqs", 3, True), ("max_exp_avg_sqs", 4, True)):
        args[key] = views(seed, pos)
    assert args["params"][0].data_ptr() % 16 != 0
    cpu, sim, _ = _run_both("_fused_adam_", args)
    _compare(cpu, sim, dtype, ["params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"])


@pytest.mark.parametrize("found", [torch.tensor(1.0), torch.tensor(float("inf"), dtype=torch.float64)], ids=str)
def test_found_inf_skips_everything(found):
    args = _adam_args(torch.float32, True, found_inf=found, grad_scale=torch.tensor(2.0))
    _, sim, _ = _run_both("_fused_adam_", args)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"):
        assert all(torch.equal(a, b) for a, b in zip(args[key], sim[key])), f"{key} changed on a skipped step"
    sgd = _sgd_args(torch.float32, 0.9, found_inf=found)
    _, sim, _ = _run_both("_fused_sgd_", sgd)
    for key in ("params", "momentum_buffers", "momentum_started"):
        assert all(torch.equal(a, b) for a, b in zip(sgd[key], sim[key])), f"{key} changed on a skipped step"
    # found_inf == 0: a normal step
    args = _adam_args(torch.float32, False, found_inf=torch.tensor(0.0))
    cpu, sim, _ = _run_both("_fused_adam_", args)
    _compare(cpu, sim, torch.float32, ["params", "exp_avgs", "exp_avg_sqs", "state_steps"])
    assert float(sim["state_steps"][0]) == float(args["state_steps"][0]) + 1


# ---- teeth: the harness catches broken kernels and launchers --------------------------------------
# name -> (file under csrc/cuda, original text, mutated text, expected in the runner's output)
ROW_MUTATIONS = {
    # the barrier between the per-warp partials and their reduction by warp 0
    "removed_syncthreads": ("lce_rows_kernels.cuh", "  if (lane == 0) scratch[warp] = v;\n  __syncthreads();\n",
                            "  if (lane == 0) scratch[warp] = v;\n", "MISMATCH"),
    # pass 1 reads one logit past the row's tail
    "tail_off_by_one": ("lce_rows_kernels.cuh",
                        "    if (last && tid < V - sp.tail_start) scalar_element(sp.tail_start + tid);",
                        "    if (last && tid <= V - sp.tail_start) scalar_element(sp.tail_start + tid);",
                        "out-of-bounds access 0 byte(s) past the end of buffer"),
    # the sum-exp partial exchanged with the wrong lane
    "wrong_shuffle_offset": ("lce_rows_kernels.cuh", "o.s = __shfl_xor_sync(0xffffffffu, v.s, off);",
                             "o.s = __shfl_xor_sync(0xffffffffu, v.s, off >> 1);", "MISMATCH"),
    # probabilities read as 16-byte packs although their rows are not aligned like the logits'
    "misaligned_probs_pack_load": ("lce_rows_kernels.cuh", "            if (q_vectors) {",
                                   "            if (soft) {",
                                   "misaligned 16-byte vector load at byte offset"),
    # the shared-memory limit raised only for dynamic sizes over 48 KiB (ignoring the static part)
    "smem_attribute_only_over_48k": ("lce_rows_launch.h", "    if (smem > granted[dev]) {",
                                     "    if (smem > 48 * 1024 && smem > granted[dev]) {",
                                     "exceed the 48 KiB default"),
    # a failed cluster-occupancy query remembered as "cannot be placed"
    "occupancy_error_cached": ("lce_rows_launch.h", "          warn_failed_occupancy_query_once(why, a.K);\n",
                               "          warn_failed_occupancy_query_once(why, a.K);\n"
                               "          placeable.emplace(key, false);\n", "STRATEGY after a failed occupancy query"),
}
OPTIM_MUTATIONS = {
    # 128-bit accesses whatever the alignment (a misaligned view in the batch)
    "vector_path_ignores_alignment": ("optim_kernels.cuh", "  int64_t done = 0;\n  if (bits % 16 == 0) {\n"
                                      "    const int64_t nvec = len / kVec;\n    for (int64_t v = threadIdx.x; v < nvec;"
                                      " v += blockDim.x) {\n      uint4 raw[kLists];",
                                      "  int64_t done = 0;\n  if (true) {\n    const int64_t nvec = len / kVec;\n"
                                      "    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {\n"
                                      "      uint4 raw[kLists];", "misaligned 16-byte vector"),
    # a CTA finds the wrong tensor for its chunk
    "locate_off_by_one": ("optim_kernels.cuh", "    if (b.chunk_end[mid] > block) {",
                          "    if (b.chunk_end[mid] >= block) {", "MISMATCH"),
    # Adam's bias correction with the step before this one
    "adam_stale_step": ("optim_kernels.cuh", "a.batch.counter[t]) + 1.0f;  // epilogue stores it",
                        "a.batch.counter[t]) + 0.0f;  // epilogue stores it", "MISMATCH"),
    # the scalar path skips every other element of a thread's stride
    "scalar_path_stride": ("optim_kernels.cuh",
                           "  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {\n    M x[kLists];",
                           "  for (int64_t i = done + threadIdx.x; i < len; i += 2 * blockDim.x) {\n    M x[kLists];",
                           "MISMATCH"),
}
MUTATIONS = {**ROW_MUTATIONS, **OPTIM_MUTATIONS}


def _kernel_tree(tmp, mutation=None):
    import shutil
    root = os.path.dirname(HERE)
    csrc = os.path.join(tmp, "csrc")
    shutil.copytree(os.path.join(root, "csrc"), csrc)
    if mutation is not None:
        file, old, new, _ = MUTATIONS[mutation]
        path = os.path.join(csrc, "cuda", file)
        src = open(path).read()
        assert src.count(old) == 1, f"mutation {mutation}: the source changed, update the test"
        open(path, "w").write(src.replace(old, new))
    return csrc


def _run_teeth(lib, runner):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, os.path.join(HERE, "simt", runner), lib], env=env,
                          capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize("kind", ["rows", "optim"])
def test_teeth(kind):
    """Each mutation of a copy of the kernel/launcher source is caught by the runner (the row pass:
    teeth_runner.py; the optimizers: optim_teeth_runner.py); the unchanged copy passes."""
    from concurrent.futures import ThreadPoolExecutor
    mutations = ROW_MUTATIONS if kind == "rows" else OPTIM_MUTATIONS
    harness, runner = (("lce_rows_simt.cpp", "teeth_runner.py") if kind == "rows"
                       else ("optim_simt.cpp", "optim_teeth_runner.py"))
    with tempfile.TemporaryDirectory(prefix="fastreg-simt-teeth-") as tmp:
        names = [None] + list(mutations)
        runtime = simt_build.build_runtime_object(tmp)

        def build_and_run(name):
            d = os.path.join(tmp, name or "control")
            os.makedirs(d)
            lib = simt_build.build_kernel_library(_kernel_tree(d, name), d, runtime, harness=harness)
            return _run_teeth(lib, runner)

        with ThreadPoolExecutor(max_workers=2) as pool:
            runs = dict(zip(names, pool.map(build_and_run, names)))
        control = runs[None]
        assert control.returncode == 0 and "OK" in control.stdout, control.stdout + control.stderr
        for name in mutations:
            r = runs[name]
            expected = mutations[name][3]
            assert r.returncode != 0, f"{name}: the harness passed a broken kernel\n{r.stdout}{r.stderr}"
            assert expected in r.stdout + r.stderr, f"{name}: {r.returncode}\n{r.stdout}{r.stderr}"


# ---- the runtime itself -----------------------------------------------------------------------------
ERRORS = {
    "divergent_syncthreads": "__syncthreads() is not reached by every thread",
    "shuffle_with_exited_lane": "which has exited",
    "shuffle_outside_mask": "outside the mask",
    "cluster_block_exits": "cluster.sync() is not reached by every block",
    "traps": "__trap() called by thread (3,0,0)",
    "dynamic_smem_overrun": "out-of-bounds write 0 byte(s) past the end of buffer 'dynamic shared memory'",
    "misaligned_vector_load": "misaligned 16-byte vector load at byte offset 4 of buffer 'vector_buffer'",
}


LAUNCH_RULES = {  # case -> the error the SIMT CUDA runtime must give (None: the launch runs)
    "smem_default_limit": "exceed the 48 KiB default",
    "smem_default_fits": None,
    "smem_raised": None,
    "smem_raised_too_little": "exceed the raised cudaFuncAttributeMaxDynamicSharedMemorySize of 50000",
    "smem_over_optin": "exceeds the opt-in maximum of 166912",
    "raised_on_other_device": "exceed the 48 KiB default",
    "block_over_launch_bounds": "exceeds its __launch_bounds__ of 128",
    "block_over_1024": "a block of 2048 threads",
    "grid_y_over_limit": "outside the limits",
    "cluster_of_16": "(non-portable sizes not allowed)",
    "cluster_of_16_non_portable": None,
    "cluster_on_a100": "thread-block clusters need sm_90",
    "grid_not_cluster_multiple": "is not a multiple of the cluster size 4",
    "stream_of_other_device": "the stream belongs to device 1",
}


@pytest.mark.parametrize("case", list(LAUNCH_RULES))
def test_runtime_applies_the_launch_rules(case):
    msg = torch.ops.fastreg_simt._launch_rule(case)
    want = LAUNCH_RULES[case]
    if want is None:
        assert msg.startswith("out="), msg
    else:
        assert msg.startswith("error:") and want in msg, msg


@pytest.mark.parametrize("name", list(ERRORS))
def test_runtime_reports_errors_instead_of_hanging(name):
    for schedule in ("forward", "reverse", "shuffle"):
        msg = torch.ops.fastreg_simt._selftest(name, schedule)
        assert msg.startswith("error:") and ERRORS[name] in msg, msg


def _out(name, schedule="forward"):
    msg = torch.ops.fastreg_simt._selftest(name, schedule)
    assert msg.startswith("out="), msg
    return [int(x) for x in msg[4:].split(",")]


def test_runtime_warp_collectives_clusters_and_schedules():
    for schedule in ("forward", "reverse", "shuffle"):
        assert _out("half_warps", schedule) == [120] * 16 + [376] * 16   # 0+..+15, 16+..+31
        assert _out("ballot_odd", schedule) == [int(0xAAAAAAAA) - 2**32] * 32
        assert _out("cluster_ring", schedule)[:8] == [101, 102, 103, 100, 105, 106, 107, 104]
    # an unsynchronised read of another thread's write: the schedules disagree, as a GPU may
    assert _out("missing_barrier", "forward")[0] == 1 and _out("missing_barrier", "reverse")[0] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_runtime_conversions_round_to_nearest_even(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(100000, generator=g) * torch.logspace(-30, 30, 100000).float(),
        torch.randn(20000, generator=g) * 1e-6,   # fp16 subnormals
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.0, 65520.0, 1 + 2**-8, 1 + 3 * 2**-8,
                      1 + 2**-11, 1 + 3 * 2**-11, 2**-24, 2**-25, 3 * 2**-25, 3.4e38]),
    ])
    bits, back = torch.ops.fastreg_simt._convert(x, dtype)
    want = x.to(dtype)
    assert torch.equal(bits, want.view(torch.int16)), "bits differ from torch's round-to-nearest-even"
    assert torch.equal(back, want.float())
    nan_bits, nan_back = torch.ops.fastreg_simt._convert(torch.tensor([float("nan")]), dtype)
    assert torch.isnan(nan_back).all()
