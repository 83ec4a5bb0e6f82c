"""CUDA fused optimizers (csrc/cuda/optim.cu, kernels in optim_kernels.cuh) against the CPU kernel
on the same inputs, for the launch shapes the SIMT harness (tests/test_simt.py) also runs: one
tensor of several chunks, more tensors than one launch's argument table, 16-byte-misaligned views.

Skipped cleanly without a GPU or without fastreg's CUDA kernels.
"""
import pytest
import torch

import fastreg

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fastreg.has_cuda_kernels()),
    reason="needs a CUDA device and fastreg built with its CUDA kernels",
)

OPS = torch.ops.fastreg


def _adam_args(params, seed=0, **over):
    g = torch.Generator().manual_seed(seed)
    def like(scale=1.0, positive=False):
        out = []
        for p in params:
            t = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
            out.append((t.abs() if positive else t).to(p.dtype))
        return out
    args = dict(params=params, grads=like(), exp_avgs=like(0.1), exp_avg_sqs=like(0.01, True),
                max_exp_avg_sqs=like(0.01, True), state_steps=[torch.tensor(3.0) for _ in params], lr=0.01,
                lr_tensor=None, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=True, maximize=False,
                decoupled_weight_decay=True, grad_scale=None, found_inf=None)
    args.update(over)
    return args


def _to(args, device, views=False):
    def conv(v):
        if isinstance(v, list):
            return [conv(t) for t in v]
        if torch.is_tensor(v):
            if views and v.dim() > 0 and v.numel() > 1:  # the same values in a big[1:] view
                big = torch.empty(v.numel() + 1, dtype=v.dtype, device=device)
                big[1:].copy_(v.reshape(-1))
                return big[1:].view(v.shape)
            return v.to(device).clone()
        return v
    return {k: conv(v) for k, v in args.items()}


def _compare(cpu, cu):
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"):
        for a, b in zip(cpu[key], cu[key]):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["one_40000_element_tensor", "700_small_tensors", "misaligned_views"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam_launch_shapes(case, dtype):
    if case == "one_40000_element_tensor":
        params = [torch.randn(40000).to(dtype)]
    elif case == "700_small_tensors":
        params = [torch.randn(i % 7 + 1, 3).to(dtype) for i in range(700)]
    else:
        params = [torch.randn(40001).to(dtype), torch.randn(7).to(dtype), torch.randn(33, 65).to(dtype)]
    args = _adam_args(params)
    cpu = _to(args, "cpu")
    cu = _to(args, "cuda", views=case == "misaligned_views")
    if case == "misaligned_views":
        assert cu["params"][0].data_ptr() % 16 != 0
    OPS._fused_adam_(**cpu)
    OPS._fused_adam_(**cu)
    torch.cuda.synchronize()
    if dtype == torch.float32:
        _compare(cpu, cu)
    else:  # the same fp32 maths: at most one bf16 rounding apart
        for key in ("params", "exp_avgs", "exp_avg_sqs"):
            for a, b in zip(cpu[key], cu[key]):
                torch.testing.assert_close(b.cpu().float(), a.float(), rtol=1e-2, atol=1e-5)


def test_sgd_700_small_tensors_and_found_inf():
    params = [torch.randn(i % 5 + 1) for i in range(700)]
    g = [torch.randn_like(p) for p in params]
    def args(device, found_inf=None):
        return dict(params=[p.to(device).clone() for p in params], grads=[x.to(device) for x in g],
                    momentum_buffers=[torch.zeros_like(p, device=device) for p in params],
                    momentum_started=[torch.zeros((), dtype=torch.uint8, device=device) for _ in params],
                    lr=0.1, lr_tensor=None, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
                    maximize=False, grad_scale=None,
                    found_inf=None if found_inf is None else torch.tensor(found_inf, device=device))
    cpu, cu = args("cpu"), args("cuda")
    OPS._fused_sgd_(**cpu)
    OPS._fused_sgd_(**cu)
    for a, b in zip(cpu["params"], cu["params"]):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-7)
    assert all(int(f) == 1 for f in cu["momentum_started"])
    skipped = args("cuda", found_inf=1.0)
    OPS._fused_sgd_(**skipped)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(skipped["params"], params))
    assert all(int(f) == 0 for f in skipped["momentum_started"])
