"""Full-batch solvers of the ``fastreg.sklearn`` estimators.

An estimator hands a solver its parameters (leaf tensors, on any device) and ``objective()``, a
closure that evaluates the smooth part of the objective at the parameters' current values and
leaves its gradients in ``.grad`` -- one call of a fused fastreg op (loss and gradients in one pass
over the data, the N x V logits never stored whole). The solvers only ever hold a few copies of
the parameters (V x D), never anything of the data's size.

* :func:`lbfgs`: L-BFGS with a strong-Wolfe line search (``torch.optim.LBFGS``), history 10 as
  scipy's L-BFGS-B that scikit-learn uses. Stops when ``max |gradient| <= tol`` (scikit-learn's
  ``gtol``), when an iteration changes the objective by less than ``16 eps |f|`` (as scipy's ``ftol``:
  no progress left at this precision), or after ``max_iter`` iterations.
* :func:`proximal_gradient`: FISTA (accelerated proximal gradient) with backtracking on the
  step size and adaptive restart, for an L1 term ``sum_p l1_p * |p|_1`` on top of the smooth
  objective. Stops when the smallest subgradient of the whole objective has ``max |.| <= tol``
  (the same measure as L-BFGS's, which it equals when there is no L1 term).

Each iteration reads a few scalars on the host (objective values, gradient maxima): a solver's
loop cannot avoid deciding in Python, so on CUDA there is one synchronisation per evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

HISTORY_SIZE = 10       # L-BFGS pairs kept (scipy's maxcor default)
MAX_LINE_SEARCH = 50    # evaluations per line search (scikit-learn passes maxls=50 to scipy)


@dataclass
class SolveResult:
    n_iter: int
    n_evals: int
    value: float          # the objective at the returned parameters (smooth part + L1 term)
    grad_max: float       # max |(sub)gradient| there
    converged: bool


def _grad_max(params: Sequence[Tensor]) -> float:
    return max(float(p.grad.abs().max()) for p in params if p.grad is not None and p.grad.numel())


def stall_tolerance(value: float, dtype: torch.dtype) -> float:
    """Objective change below which an iteration made no progress at this precision."""
    return 16 * torch.finfo(dtype).eps * max(abs(value), torch.finfo(dtype).tiny)


def lbfgs(objective: Callable[[], Tensor], params: list[Tensor], *, max_iter: int, tol: float,
          verbose: int = 0) -> SolveResult:
    """Minimise ``objective`` over ``params`` (updated in place) with L-BFGS."""
    for p in params:
        p.grad = None
    value = float(objective())
    gmax = _grad_max(params)
    if max_iter == 0 or gmax <= tol:
        return SolveResult(0, 1, value, gmax, gmax <= tol)
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, max_eval=max_iter * MAX_LINE_SEARCH,
                            tolerance_grad=tol, tolerance_change=stall_tolerance(value, params[0].dtype),
                            history_size=HISTORY_SIZE, line_search_fn="strong_wolfe")
    evals = [1]

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = objective()
        evals[0] += 1
        if verbose >= 2:
            print(f"  lbfgs eval {evals[0]}: objective {float(loss):.10g}")
        return loss

    opt.step(closure)
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    # the gradient left in .grad belongs to the line search's last trial point, not necessarily to
    # the returned one: evaluate once more where the solver stopped
    for p in params:
        p.grad = None
    value = float(objective())
    gmax = _grad_max(params)
    converged = gmax <= tol or n_iter < max_iter
    if verbose:
        print(f"lbfgs: {n_iter} iterations, {evals[0] + 1} evaluations, objective {value:.10g}, "
              f"max |gradient| {gmax:.3g} (tol {tol:g})")
    return SolveResult(n_iter, evals[0] + 1, value, gmax, converged)


def _soft_threshold(x: Tensor, thresh: float) -> Tensor:
    return torch.sign(x) * (x.abs() - thresh).clamp_min(0)


def _min_subgradient(p: Tensor, grad: Tensor, l1: float) -> Tensor:
    """The smallest element of the subdifferential of ``f + l1 |p|_1`` at ``p``."""
    if l1 == 0:
        return grad
    return torch.where(p != 0, grad + l1 * torch.sign(p), _soft_threshold(grad, l1))


def proximal_gradient(objective: Callable[[], Tensor], params: list[Tensor], l1: Sequence[float], *, max_iter: int,
                      tol: float, verbose: int = 0) -> SolveResult:
    """Minimise ``objective() + sum_p l1[p] * |p|_1`` over ``params`` (updated in place) with FISTA."""
    dtype = params[0].dtype
    n_evals = 0

    def evaluate(point: Sequence[Tensor]) -> tuple[float, list[Tensor]]:
        nonlocal n_evals
        with torch.no_grad():
            for p, v in zip(params, point):
                p.copy_(v)
                p.grad = None
        value = float(objective())
        n_evals += 1
        return value, [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def l1_term(point: Sequence[Tensor]) -> float:
        return sum(float(lam * v.abs().sum()) for v, lam in zip(point, l1) if lam)

    def stationarity(point, grads) -> float:
        return max(float(_min_subgradient(v, g, lam).abs().max()) for v, g, lam in zip(point, grads, l1) if v.numel())

    x = [p.detach().clone() for p in params]
    fx, gx = evaluate(x)
    Fx = fx + l1_term(x)
    crit = stationarity(x, gx)
    y, fy, gy = x, fx, gx
    t, step_l = 1.0, 1.0
    n_iter = 0
    while crit > tol and n_iter < max_iter:
        n_iter += 1
        while True:  # backtracking: the quadratic model at y must bound f at the new point
            z = [_soft_threshold(v - g / step_l, lam / step_l) if lam else v - g / step_l
                 for v, g, lam in zip(y, gy, l1)]
            fz, gz = evaluate(z)
            diff = [a - b for a, b in zip(z, y)]
            model = fy + sum(float((g * d).sum()) for g, d in zip(gy, diff)) + \
                0.5 * step_l * sum(float((d * d).sum()) for d in diff)
            if fz <= model + stall_tolerance(fy, dtype) or step_l > 1e30:
                break
            step_l *= 2.0
        Fz = fz + l1_term(z)
        if Fz > Fx:  # momentum overshot: restart it and take a plain proximal step from x
            if y is x:
                break  # even the plain step cannot decrease the objective at this precision
            y, fy, gy, t = x, fx, gx, 1.0
            continue
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        momentum = (t - 1.0) / t_next
        x_prev, x, fx, gx, Fx, t = x, z, fz, gz, Fz, t_next
        crit = stationarity(x, gx)
        if verbose >= 2:
            print(f"  proximal iter {n_iter}: objective {Fx:.10g}, max |subgradient| {crit:.3g}, step 1/{step_l:.3g}")
        if momentum > 0:
            y = [a + momentum * (a - b) for a, b in zip(x, x_prev)]
            fy, gy = evaluate(y)
        else:
            y, fy, gy = x, fx, gx
        step_l *= 0.9  # let the step grow back when the curvature allows
    with torch.no_grad():
        for p, v in zip(params, x):
            p.copy_(v)
    if verbose:
        print(f"proximal: {n_iter} iterations, {n_evals} evaluations, objective {Fx:.10g}, "
              f"max |subgradient| {crit:.3g} (tol {tol:g})")
    return SolveResult(n_iter, n_evals, Fx, crit, crit <= tol or n_iter < max_iter)
