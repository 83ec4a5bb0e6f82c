"""Runs the row-pass kernel of a SIMT kernel library (tests/simt/simt_build.py build_kernel_library)
through ctypes on a few float32 cases (CASES: shapes, launch strategies, probability targets), every
schedule, launched by the real launcher, against fastreg's CPU kernel and across schedules
(bit-identical). Used by the teeth test of
tests/test_simt.py on mutated copies of the kernel source, in a subprocess (an out-of-bounds
access ends it with SIGSEGV and a message naming the buffer).

Exit status: 0 all agree; 1 a result differs (MISMATCH lines); 2 the runtime reported an error
(SIMT ERROR lines: a barrier that cannot complete, an out-of-bounds write into a canary, ...).
usage: python teeth_runner.py LIBRARY
"""
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import fastreg  # noqa: E402,F401  (the CPU kernel)
from lce_cases import IGNORE, make_case, rel_err  # noqa: E402


class SimtLceCall(ctypes.Structure):  # simt_harness.h
    _fields_ = [
        ("logits", ctypes.c_void_p), ("target", ctypes.c_void_p), ("weight", ctypes.c_void_p),
        ("scale", ctypes.c_void_p), ("loss", ctypes.c_void_p),
        ("rows", ctypes.c_int64), ("V", ctypes.c_int64), ("ignore_index", ctypes.c_int64),
        ("label_smoothing", ctypes.c_double), ("softcap", ctypes.c_double), ("z_loss", ctypes.c_double),
        ("dtype", ctypes.c_int32), ("target_i32", ctypes.c_int32), ("weight_f64", ctypes.c_int32),
        ("scale_f64", ctypes.c_int32), ("scale_per_row", ctypes.c_int32), ("loss_f64", ctypes.c_int32),
        ("write_grad", ctypes.c_int32),
        ("device", ctypes.c_char_p), ("strategy", ctypes.c_char_p), ("schedule", ctypes.c_char_p),
        ("seed", ctypes.c_uint64),
        ("probs", ctypes.c_void_p), ("zloss_scale", ctypes.c_void_p), ("lse", ctypes.c_void_p),
        ("argmax", ctypes.c_void_p), ("keep", ctypes.c_void_p), ("row_tiles", ctypes.c_int64),
        ("num_blocks", ctypes.c_int64), ("keep_eps", ctypes.c_double), ("zscale_f64", ctypes.c_int32),
        ("lse_f64", ctypes.c_int32),
    ]


def run(lib, logits, target, weight, scale, eps, strategy, schedule, probs=None, device="h100"):
    """(loss, gradient, what the harness reports: the strategy executed and any warnings)."""
    lg = logits.clone()
    loss = torch.full((lg.shape[0],), float("nan"))
    c = SimtLceCall(lg.data_ptr(), target.data_ptr() if target.numel() else None,
                    weight.data_ptr() if weight is not None else None,
                    scale.data_ptr(), loss.data_ptr(), lg.shape[0], lg.shape[1], IGNORE, eps, 0.0, 0.0,
                    0, 0, 0, 0, int(scale.numel() != 1), 0, 1, device.encode(), strategy.encode(), schedule.encode(), 7,
                    probs.data_ptr() if probs is not None else None)
    msg = ctypes.create_string_buffer(1024)
    if lib.simt_lce_rows(ctypes.byref(c), msg, 1024) != 0:
        print("SIMT ERROR:", msg.value.decode(), flush=True)
        sys.exit(2)
    return loss, lg, msg.value.decode()


def misaligned(q, elems):
    """q in a (rows, V) view `elems` elements into a larger buffer (a chunk of a probs tensor)."""
    buf = torch.empty(q.numel() + elems, dtype=q.dtype)
    view = buf[elems:].view(q.shape)
    view.copy_(q)
    return view


# (rows, V, strategies, probability targets): rows * V * 4 bytes is a multiple of 16, so the staged
# logits end exactly at a guard page. V = 12288 fp32 on one CTA caches exactly 48 KiB, which with
# the kernel's static shared memory needs the raised limit; the probabilities of the last case start
# 4 bytes off the logits' alignment.
CASES = [
    (4, 4096 + 4, ("single-cached", "single-streaming", "cluster2-cached"), False),
    (3, 96 + 4, ("single-cached", "single-streaming", "cluster2-cached"), False),
    (2, 12288, ("single-cached",), False),
    (4, 1000 + 4, ("single-streaming", "cluster2-cached"), True),
]


def main():
    lib = ctypes.CDLL(sys.argv[1])
    failures = 0
    for seed, (rows, V, strategies, soft) in enumerate(CASES):
        logits, target, weight, scale = make_case(rows, V, torch.float32, weights=True, seed=seed)
        target[-1] = V - 1  # the last row is active
        eps = 0.1
        probs = None
        if soft:
            q = torch.rand(rows, V) ** 2
            probs = misaligned(q / q.sum(1, keepdim=True), 1)
            target = torch.empty(0, dtype=torch.int64)
        loss_cpu = torch.empty(rows)
        grad_cpu = logits.clone()
        torch.ops.fastreg._lce_rows(grad_cpu, target, weight, scale, IGNORE, eps, 0.0, 0.0, True, loss_cpu, probs)
        for strategy in strategies:
            first = None
            for schedule in ("forward", "reverse", "shuffle"):
                loss, grad, executed = run(lib, logits, target, weight, scale, eps, strategy, schedule, probs)
                what = f"V={V} {strategy} {schedule}"
                if executed != strategy:
                    print(f"STRATEGY {what}: the launcher ran {executed!r}", flush=True)
                    failures += 1
                if not (torch.isfinite(loss).all() and torch.isfinite(grad).all()):
                    print(f"MISMATCH {what}: non-finite results", flush=True)
                    failures += 1
                    continue
                if rel_err(loss, loss_cpu) > 1e-5 or rel_err(grad, grad_cpu) > 1e-4:
                    print(f"MISMATCH {what}: loss err {rel_err(loss, loss_cpu):.3g}, grad err "
                          f"{rel_err(grad, grad_cpu):.3g} against the CPU kernel", flush=True)
                    failures += 1
                if failures:
                    print(f"{failures} mismatch(es)", flush=True)
                    sys.exit(1)
                if first is None:
                    first = (loss, grad)
                elif not (torch.equal(first[0], loss) and torch.equal(first[1], grad)):
                    print(f"MISMATCH {what}: differs from the forward schedule (order-dependent)", flush=True)
                    failures += 1
    # a cluster-occupancy query that fails with an error ("h100-flaky": the first one in the
    # process) is no answer: that launch falls back with a warning, the next one runs the cluster
    logits, target, weight, scale = make_case(2, 4096 + 4, torch.float32, weights=True, seed=9)
    runs = [run(lib, logits, target, weight, scale, 0.0, "cluster2-cached", "forward", device="h100-flaky")[2]
            for _ in range(2)]
    if not (runs[0].startswith("single-cached\nwarning:") and runs[1] == "cluster2-cached"):
        print(f"STRATEGY after a failed occupancy query: {runs!r}", flush=True)
        failures += 1
    print("OK" if failures == 0 else f"{failures} mismatch(es)", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
