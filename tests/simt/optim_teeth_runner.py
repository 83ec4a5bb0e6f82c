"""Runs the fused-optimizer kernels of a SIMT kernel library (tests/simt/simt_build.py
build_kernel_library with harness="optim_simt.cpp") through ctypes: float32 Adam (amsgrad, weight
decay) and SGD with momentum, two steps each, over tensors of several chunks, a one-element tensor
and a misaligned view (the scalar path) in one launch, every schedule, launched by the real
launcher, against fastreg's CPU kernels and across schedules (bit-identical). Used by the optimizer
teeth test of tests/test_simt.py on mutated copies of the kernel source, in a subprocess.

Exit status: 0 all agree; 1 a result differs (MISMATCH lines); 2 the runtime reported an error
(SIMT ERROR lines: a misaligned vector access, a barrier that cannot complete, ...).
usage: python optim_teeth_runner.py LIBRARY
"""
import ctypes
import sys

import torch

import fastreg  # noqa: F401  (the CPU kernels)

SCHEDULES = ("forward", "reverse", "shuffle")


class SimtOptimCall(ctypes.Structure):  # simt_harness.h
    _fields_ = [
        ("adam", ctypes.c_int32), ("n", ctypes.c_int32), ("lists", ctypes.c_int32),
        ("ptrs", ctypes.POINTER(ctypes.c_void_p)), ("numel", ctypes.POINTER(ctypes.c_int64)),
        ("counters", ctypes.POINTER(ctypes.c_void_p)), ("dtype", ctypes.c_int32),
        ("lr", ctypes.c_double), ("momentum", ctypes.c_double), ("dampening", ctypes.c_double),
        ("weight_decay", ctypes.c_double), ("beta1", ctypes.c_double), ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double), ("nesterov", ctypes.c_int32), ("maximize", ctypes.c_int32),
        ("amsgrad", ctypes.c_int32), ("decoupled", ctypes.c_int32),
        ("lr_tensor", ctypes.c_void_p), ("lr_f64", ctypes.c_int32),
        ("grad_scale", ctypes.c_void_p), ("grad_scale_f64", ctypes.c_int32),
        ("found_inf", ctypes.c_void_p), ("found_inf_f64", ctypes.c_int32),
        ("schedule", ctypes.c_char_p), ("seed", ctypes.c_uint64),
    ]


def tensors(seed, positive=False):
    """40000 (three 16384-element chunks), 7, a (20001,) view one element into its buffer, 1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (40000, 7, 20002, 1):
        t = torch.randn(n, generator=g) * 0.1
        out.append(t.abs() if positive else t)
    out[2] = out[2][1:]
    return out


def copy(t):
    """A copy at the same address mod 16 (a plain clone would be a fresh, aligned allocation)."""
    off = (t.data_ptr() % 16) // t.element_size()
    out = torch.empty(t.numel() + off, dtype=t.dtype)[off:]
    out.copy_(t)
    assert out.data_ptr() % 16 == t.data_ptr() % 16
    return out


def simt_step(lib, adam, lists, counters, schedule, **hyper):
    n = len(lists[0])
    ptrs = (ctypes.c_void_p * (len(lists) * n))(*[t.data_ptr() for lst in lists for t in lst])
    numel = (ctypes.c_int64 * n)(*[t.numel() for t in lists[0]])
    cptr = (ctypes.c_void_p * n)(*[c.data_ptr() for c in counters])
    c = SimtOptimCall(adam=adam, n=n, lists=len(lists), ptrs=ptrs, numel=numel, counters=cptr, dtype=0,
                      schedule=schedule.encode(), seed=11, **hyper)
    msg = ctypes.create_string_buffer(4096)
    if lib.simt_fused_optim(ctypes.byref(c), msg, 4096) != 0:
        print("SIMT ERROR:", msg.value.decode(), flush=True)
        sys.exit(2)


def main():
    lib = ctypes.CDLL(sys.argv[1])
    failures = 0
    adam_h = dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.05, eps=1e-8, amsgrad=1)
    sgd_h = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=1)
    for name, adam in (("adam", 1), ("sgd", 0)):
        if adam:
            state = [tensors(0), tensors(1), tensors(2), tensors(3, True), tensors(4, True)]
            counters = [torch.tensor(float(i + 1)) for i in range(4)]
        else:
            state = [tensors(5), tensors(6), tensors(7)]
            counters = [torch.zeros((), dtype=torch.uint8) for _ in range(4)]
        cpu = ([[copy(t) for t in lst] for lst in state], [c.clone() for c in counters])
        sims = {s: ([[copy(t) for t in lst] for lst in state], [c.clone() for c in counters]) for s in SCHEDULES}
        for step in range(2):
            lists, ctr = cpu
            if adam:
                torch.ops.fastreg._fused_adam_(lists[0], lists[1], lists[2], lists[3], lists[4], ctr, 0.01, None, 0.9,
                                               0.999, 0.05, 1e-8, True, False, False, None, None)
            else:
                torch.ops.fastreg._fused_sgd_(lists[0], lists[1], lists[2], ctr, 0.05, None, 0.9, 0.0, 0.01, True,
                                              False, None, None)
            for s in SCHEDULES:
                simt_step(lib, adam, *sims[s], s, **(adam_h if adam else sgd_h))
        first = sims[SCHEDULES[0]]
        for s in SCHEDULES:
            lists, ctr = sims[s]
            for li, (a, b) in enumerate(zip(lists, cpu[0])):
                for i, (x, y) in enumerate(zip(a, b)):
                    if not torch.allclose(x, y, rtol=1e-6, atol=1e-7):
                        print(f"MISMATCH {name} {s}: list {li} tensor {i}, max diff {(x - y).abs().max():.3g} "
                              "against the CPU kernel", flush=True)
                        failures += 1
                    if not torch.equal(x, first[0][li][i]):
                        print(f"MISMATCH {name} {s}: list {li} tensor {i} differs from the forward schedule",
                              flush=True)
                        failures += 1
            if not all(torch.equal(x, y) for x, y in zip(ctr, cpu[1])):
                print(f"MISMATCH {name} {s}: counters {ctr} != {cpu[1]}", flush=True)
                failures += 1
    print("OK" if failures == 0 else f"{failures} mismatch(es)", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
