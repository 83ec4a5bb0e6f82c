"""Inputs, the float64 reference and tolerances of the row-pass tests, shared by the GPU tests
(tests/test_lce_cuda.py) and the CPU SIMT harness tests (tests/test_simt.py)."""
import math

import torch

IGNORE = -100
# norm-wise relative tolerance of the written gradient / the loss, per logits dtype
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LOSS_TOL = {torch.float64: 1e-6, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def make_case(rows, V, dtype, *, weights=False, ignore_frac=0.0, oob=False, per_row_scale=False, seed=0):
    """Random inputs on the CPU (logits in `dtype`, accumulate-dtype side inputs)."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (torch.randn(rows, V, generator=g, dtype=torch.float64) * 3.0).to(dtype)
    target = torch.randint(0, max(V, 1), (rows,), generator=g, dtype=torch.int64)
    if ignore_frac > 0 and rows > 0:
        mask = torch.rand(rows, generator=g) < ignore_frac
        mask[0] = True
        target[mask] = IGNORE
    if oob and rows > 0:
        target[-1] = V  # just past the end
        if rows > 2:
            target[rows // 2] = -3  # negative, not ignore_index
    weight = (torch.rand(V, generator=g, dtype=torch.float64) * 2.0 + 0.1).to(acc) if weights else None
    if per_row_scale:
        scale = (torch.rand(rows, generator=g, dtype=torch.float64) + 0.5).to(acc)
    else:
        scale = torch.tensor([0.37], dtype=acc)
    return logits, target, weight, scale


def reference(logits, target, weight, scale, ignore_index, eps, softcap, zloss, write_grad):
    """float64 PyTorch version of lce_math.h: returns (loss_rows, grad or None)."""
    a = logits.double()
    rows, V = a.shape
    z = softcap * torch.tanh(a / softcap) if softcap > 0 else a
    active = (target != ignore_index) & (target >= 0) & (target < V)
    t = torch.where(active, target, torch.zeros_like(target))
    w = weight.double() if weight is not None else torch.ones(V, dtype=torch.float64)
    W = w.sum()
    lse = torch.logsumexp(z, dim=1) if V > 0 else torch.full((rows,), -math.inf, dtype=torch.float64)
    z_t = z.gather(1, t[:, None])[:, 0] if V > 0 else torch.zeros(rows, dtype=torch.float64)
    w_t = w[t] if V > 0 else torch.ones(rows, dtype=torch.float64)
    loss = (1 - eps) * w_t * (lse - z_t) + (eps / V) * (W * lse - (w[None, :] * z).sum(1)) + zloss * lse * lse
    loss = torch.where(active, loss, torch.zeros_like(loss))
    if not write_grad:
        return loss.float(), None
    s = scale.double().expand(rows) if scale.numel() == 1 else scale.double()
    p = torch.exp(z - lse[:, None])
    A = s * ((1 - eps) * w_t + eps * W / V + 2 * zloss * lse)
    B = s * eps / V
    C = s * (1 - eps) * w_t
    grad = A[:, None] * p - B[:, None] * w[None, :]
    grad[torch.arange(rows), t] -= C
    if softcap > 0:
        grad = grad * (1 - (z / softcap) ** 2)
    grad = torch.where(active[:, None], grad, torch.zeros_like(grad))
    return loss.float(), grad


def rel_err(x, ref):
    x = x.double()
    ref = ref.double()
    assert torch.isfinite(x).all(), "non-finite values in the result"
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff
