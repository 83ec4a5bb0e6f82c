"""CUDA row pass of the fused linear cross-entropy: torch.ops.fastreg._lce_rows on CUDA
(csrc/cuda/lce_rows.cu, kernel in lce_rows_kernels.cuh) against the CPU implementation (csrc/lce/lce_cpu.cpp) on the same inputs,
and against a float64 PyTorch reference of the formulas in csrc/lce/lce_math.h.

Skipped cleanly without a GPU or without fastreg's CUDA kernels.
"""
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import fastreg

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fastreg.has_cuda_kernels()),
    reason="needs a CUDA device and fastreg built with its CUDA kernels",
)

from lce_cases import GRAD_TOL, IGNORE, LOSS_TOL, make_case, reference, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [1, 7, 4096 + 3, 131072 + 1]
ROWS = [0, 1, 33]


def _op():
    return torch.ops.fastreg._lce_rows


def cpu_kernel_available() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastreg::_lce_rows", "CPU")


_MODE_CHILD = r"""
import sys, torch
import fastreg  # noqa: F401
sys.path.insert(0, sys.argv[2])
from test_lce_cuda import run_op
cases = torch.load(sys.argv[1])
torch.save([run_op("cuda", *args) for args in cases], sys.argv[1])
"""


def run_ops_in_mode(mode, cases):
    """run_op on CUDA for each argument tuple of `cases` with FASTREG_LCE_ROWS_MODE=mode (stream |
    nocluster | single), which the kernel reads once per process: in one child process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "io.pt")
        torch.save(cases, path)
        env = dict(os.environ, FASTREG_LCE_ROWS_MODE=mode)
        subprocess.run([sys.executable, "-c", _MODE_CHILD, path, os.path.dirname(os.path.abspath(__file__))],
                       env=env, check=True)
        return torch.load(path)


def run_op(device, logits, target, weight, scale, ignore_index, eps, softcap, zloss, write_grad):
    """Run _lce_rows on `device` on copies of the inputs; returns (loss_rows, logits-after) on CPU.

    Side inputs follow the driver's convention (csrc/lce/lce.cpp): class_weight, row_scale and
    loss_rows in the accumulate dtype (float32, or float64 for float64 logits)."""
    lg = logits.clone().to(device)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32  # the accumulate dtype
    loss = torch.full((logits.shape[0],), float("nan"), dtype=acc, device=device)  # poisoned
    _op()(
        lg,
        target.to(device),
        None if weight is None else weight.to(device),
        scale.to(device),
        ignore_index,
        eps,
        softcap,
        zloss,
        write_grad,
        loss,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return loss.cpu(), lg.cpu()


def check_case(logits, target, weight, scale, eps=0.0, softcap=0.0, zloss=0.0, write_grad=True, result=None):
    """result: the CUDA (loss, logits-after) computed elsewhere (run_ops_in_mode), else run here."""
    dtype = logits.dtype
    args = (target, weight, scale, IGNORE, eps, softcap, zloss, write_grad)
    loss_cu, out_cu = result if result is not None else run_op("cuda", logits, *args)
    ref_loss, ref_grad = reference(logits, *args)
    assert rel_err(loss_cu, ref_loss) <= LOSS_TOL[dtype], (rel_err(loss_cu, ref_loss), loss_cu[:8], ref_loss[:8])
    ignored = ~((target != IGNORE) & (target >= 0) & (target < logits.shape[1]))
    assert (loss_cu[ignored] == 0).all(), "ignored rows must have loss 0"
    if write_grad:
        assert out_cu.dtype == dtype
        err = rel_err(out_cu, ref_grad)
        assert err <= GRAD_TOL[dtype], f"gradient rel. error {err:.3g} > {GRAD_TOL[dtype]:.1g}"
        assert (out_cu[ignored] == 0).all(), "ignored rows must have an all-zero gradient"
    else:
        assert torch.equal(out_cu, logits), "write_grad=False must leave the logits untouched"
    if cpu_kernel_available():
        loss_cpu, out_cpu = run_op("cpu", logits, *args)
        assert rel_err(loss_cu, loss_cpu) <= LOSS_TOL[dtype]
        if write_grad:
            # same inputs, fp32 maths on both sides: at most ~1 rounding of the output dtype apart
            assert rel_err(out_cu, out_cpu) <= GRAD_TOL[dtype]
            if dtype == torch.float32:
                torch.testing.assert_close(out_cu, out_cpu, rtol=1e-4, atol=1e-6)
            else:
                torch.testing.assert_close(out_cu.float(), out_cpu.float(), rtol=2e-2, atol=1e-3 * out_cpu.float().abs().max().item() + 1e-6)
        else:
            assert torch.equal(out_cpu, logits)


# ---- every dtype x vocabulary x rows, plain and with every option at once -----------------------
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", ["plain", "all"])
def test_rows_match_reference(rows, V, dtype, options):
    if options == "plain":
        logits, target, weight, scale = make_case(rows, V, dtype)
        check_case(logits, target, weight, scale)
    else:
        logits, target, weight, scale = make_case(
            rows, V, dtype, weights=True, ignore_frac=0.2, oob=True, per_row_scale=True, seed=1
        )
        check_case(logits, target, weight, scale, eps=0.1, softcap=15.0, zloss=1e-3)


# ---- each option on its own ---------------------------------------------------------------------
OPTIONS = {
    "class_weight": dict(case=dict(weights=True), op=dict()),
    "class_weight_smoothing": dict(case=dict(weights=True), op=dict(eps=0.2)),
    "ignore_index": dict(case=dict(ignore_frac=0.3), op=dict()),
    "out_of_range_targets": dict(case=dict(oob=True), op=dict()),
    "label_smoothing": dict(case=dict(), op=dict(eps=0.1)),
    "softcap": dict(case=dict(), op=dict(softcap=5.0)),
    "z_loss": dict(case=dict(), op=dict(zloss=1e-2)),
    "per_row_scale": dict(case=dict(per_row_scale=True), op=dict()),
    "scalar_scale": dict(case=dict(per_row_scale=False), op=dict()),
    "no_grad": dict(case=dict(weights=True, ignore_frac=0.2), op=dict(eps=0.1, softcap=10.0, write_grad=False)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [7, 4096 + 3])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option(name, V, dtype):
    spec = OPTIONS[name]
    logits, target, weight, scale = make_case(33, V, dtype, seed=2, **spec["case"])
    check_case(logits, target, weight, scale, **spec["op"])


# ---- every launch strategy of the kernel (cached/streaming x cluster/single CTA) -------------------
@pytest.mark.parametrize("mode", [None, "stream", "nocluster", "single"])
def test_launch_modes(mode):
    cases = [make_case(33, V, dtype, weights=True, ignore_frac=0.1, oob=True, seed=3)
             for V in (7, 4096 + 3, 32000, 131072 + 1) for dtype in (torch.float32, torch.bfloat16)]
    opts = dict(eps=0.05, softcap=20.0, zloss=1e-4)
    results = [None] * len(cases)
    if mode:  # one child process runs every case in this mode
        results = run_ops_in_mode(mode, [(lg, t, w, s, IGNORE, opts["eps"], opts["softcap"], opts["zloss"], True)
                                         for lg, t, w, s in cases])
    for case, result in zip(cases, results):
        check_case(*case, **opts, result=result)


@pytest.mark.parametrize("rows", [1, 5])
def test_very_long_rows_stream(rows):
    # fp32 V=262144+5: a 1 MiB row, split over a cluster of 8 (cached) or streamed from L2.
    logits, target, weight, scale = make_case(rows, 262144 + 5, torch.float32, seed=4)
    check_case(logits, target, weight, scale, eps=0.1)
    (single,) = run_ops_in_mode("single", [(logits, target, weight, scale, IGNORE, 0.1, 0.0, 0.0, True)])
    check_case(logits, target, weight, scale, eps=0.1, result=single)


def test_float64():
    logits, target, weight, scale = make_case(9, 4096 + 3, torch.float64, weights=True, oob=True, seed=5)
    check_case(logits, target, weight, scale, eps=0.1, softcap=30.0, zloss=1e-3)


def test_int32_target():
    logits, target, weight, scale = make_case(17, 1000, torch.float32, ignore_frac=0.2, seed=6)
    loss64, out64 = run_op("cuda", logits, target, weight, scale, IGNORE, 0.1, 0.0, 0.0, True)
    loss32, out32 = run_op("cuda", logits, target.int(), weight, scale, IGNORE, 0.1, 0.0, 0.0, True)
    torch.testing.assert_close(loss32, loss64, rtol=0, atol=0)
    torch.testing.assert_close(out32, out64, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_rows(dtype):
    # A contiguous (rows, V) view that starts one element past a 16-byte boundary.
    rows, V = 6, 4096 + 8
    logits, target, weight, scale = make_case(rows, V, dtype, seed=7)
    buf = torch.empty(rows * V + 1, dtype=dtype, device="cuda")
    view = buf[1:].view(rows, V)
    view.copy_(logits.cuda())
    assert view.data_ptr() % 16 != 0 and view.is_contiguous()
    loss = torch.empty(rows, device="cuda")
    _op()(view, target.cuda(), None, scale.cuda(), IGNORE, 0.0, 0.0, 0.0, True, loss)
    ref_loss, ref_grad = reference(logits, target, None, scale, IGNORE, 0.0, 0.0, 0.0, True)
    assert rel_err(loss.cpu(), ref_loss) <= LOSS_TOL[dtype]
    assert rel_err(view.cpu(), ref_grad) <= GRAD_TOL[dtype]


def test_ignored_rows_never_read():
    # Ignored rows full of NaN must still give loss 0 and a zero gradient (their logits are not read).
    logits, target, weight, scale = make_case(8, 4096 + 3, torch.float32, seed=8)
    target[::2] = IGNORE
    target[1] = 10**9  # out of range: ignored too
    logits[::2] = float("nan")
    logits[1] = float("nan")
    loss, out = run_op("cuda", logits, target, weight, scale, IGNORE, 0.1, 0.0, 0.0, True)
    bad = torch.zeros(8, dtype=torch.bool)
    bad[::2] = True
    bad[1] = True
    assert (loss[bad] == 0).all() and (out[bad] == 0).all()
    assert torch.isfinite(loss).all() and torch.isfinite(out).all()


def test_zero_rows_and_single_class():
    for V in (1, 5):
        logits = torch.empty(0, V, device="cuda")
        loss = torch.empty(0, device="cuda")
        _op()(logits, torch.empty(0, dtype=torch.int64, device="cuda"), None, torch.ones(1, device="cuda"),
              IGNORE, 0.0, 0.0, 0.0, True, loss)
    # V == 1: loss is exactly z-loss only, gradient A p - C with p == 1
    logits, target, weight, scale = make_case(4, 1, torch.float32, seed=9)
    check_case(logits, target, weight, scale, zloss=0.1)


def test_cuda_graph_capture():
    _capture_and_replay(33, 4096 + 3, torch.bfloat16, seed=10)


def test_bad_inputs_raise():
    logits = torch.randn(4, 10, device="cuda")
    loss = torch.empty(4, device="cuda")
    tgt = torch.zeros(4, dtype=torch.int64, device="cuda")
    one = torch.ones(1, device="cuda")
    with pytest.raises(RuntimeError):
        _op()(logits.t().contiguous().t(), tgt, None, one, IGNORE, 0.0, 0.0, 0.0, True, loss)  # non-contiguous
    with pytest.raises(RuntimeError):
        _op()(logits, tgt[:3], None, one, IGNORE, 0.0, 0.0, 0.0, True, loss)  # wrong target length
    with pytest.raises(RuntimeError):
        _op()(logits, tgt, torch.ones(9, device="cuda"), one, IGNORE, 0.0, 0.0, 0.0, True, loss)  # weight size


def _capture_and_replay(rows, V, dtype, seed):
    """Captures one _lce_rows call in a CUDA graph and replays it on new logits and scales."""
    logits, target, weight, scale = make_case(rows, V, dtype, weights=True, ignore_frac=0.2, seed=seed)
    st_logits, st_target, st_weight = logits.cuda(), target.cuda(), weight.cuda()
    st_scale = torch.full((rows,), 0.5, device="cuda")
    st_loss = torch.empty(rows, device="cuda")
    src = torch.empty_like(st_logits)

    def step():
        st_logits.copy_(src)
        _op()(st_logits, st_target, st_weight, st_scale, IGNORE, 0.1, 10.0, 1e-3, True, st_loss)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (plan and attribute caches)
        src.copy_(st_logits)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for k in range(2):
        new_logits, _, _, _ = make_case(rows, V, dtype, seed=200 + k)
        src.copy_(new_logits.cuda())
        st_scale.fill_(0.25 * (k + 1))
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, ref_grad = reference(new_logits, target, weight, st_scale.cpu(), IGNORE, 0.1, 10.0, 1e-3, True)
        assert rel_err(st_loss.cpu(), ref_loss) <= LOSS_TOL[dtype]
        assert rel_err(st_logits.cpu(), ref_grad) <= GRAD_TOL[dtype]


def test_cuda_graph_capture_cluster_launch():
    # 2 rows of 16384 fp32 logits: on an H100 the planner splits each row over a cluster of 8
    # (csrc/cuda/lce_rows_plan.h); elsewhere this is a single-CTA launch, captured just the same.
    _capture_and_replay(2, 16384, torch.float32, seed=20)


def test_cuda_graph_capture_large_shared_memory():
    # 300 rows of 32771 bf16 logits: one CTA per row caching a 64 KiB slice (> the 48 KiB default)
    _capture_and_replay(300, 32768 + 3, torch.bfloat16, seed=21)


@pytest.mark.slow
def test_rows_times_vocab_over_2_pow_31():
    """One direct call whose logits have more than 2^31 elements: 64-bit indexing everywhere."""
    rows, V = 16385, 131072  # 2^31 + 131072 bf16 elements (4 GiB)
    assert rows * V > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs ~12 GiB of GPU memory")
    g = torch.Generator(device="cuda").manual_seed(22)
    logits = (torch.randn(rows, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    target = torch.randint(0, V, (rows,), device="cuda", generator=g)
    check = [0, rows // 2, rows - 1]
    before = logits[check].cpu()
    loss = torch.empty(rows, device="cuda")
    _op()(logits, target, None, torch.ones(1, device="cuda"), IGNORE, 0.0, 0.0, 0.0, True, loss)
    ref_loss, ref_grad = reference(before, target[check].cpu(), None, torch.ones(1), IGNORE, 0.0, 0.0, 0.0, True)
    assert rel_err(loss[check].cpu(), ref_loss) <= LOSS_TOL[torch.bfloat16]
    assert rel_err(logits[check].cpu(), ref_grad) <= GRAD_TOL[torch.bfloat16]
