"""``fastreg.sklearn.LinearRegression`` and ``Ridge``: least squares and ridge regression with
scikit-learn's API, solved exactly by a direct solver where it fits, else iteratively on fastreg's
fused linear + MSE op.

Data flows: fit validates X, y, sample_weight (``_validation``) into tensors on the estimator's
device, then one of
  * ``svd`` (direct, the default up to ``DIRECT_MAX_FEATURES`` features): centre X and y with the
    (weighted) means, scale the rows by ``sqrt(sample_weight)``, take the thin SVD
    ``X = U S V^T`` and set ``coef = V diag(d) U^T y`` with ``d = S / (S^2 + alpha)``; for
    ``alpha = 0`` singular values below ``max(n, d) * eps * S_max`` are dropped, which gives the
    minimum-norm least-squares solution (what scikit-learn's LinearRegression returns for
    rank-deficient X). The intercept is ``y_mean - x_mean . coef``. Memory: two copies of X's size.
  * ``lbfgs`` (iterative, on the raw X: no copy): L-BFGS (``_solvers.lbfgs``) over
    ``(1/S) [sum_i s_i |y_i - W x_i - b|^2 + sum_k alpha_k |W_k|^2]``, each evaluation one call of
    ``fastreg.linear_mse_loss`` (``reduction="sum"``; with sample weights ``"none"`` and autograd on
    the weighted sum), until ``max |gradient| <= tol * max |gradient at the start|``.
Both minimise scikit-learn's objective ``sum_i s_i |y_i - W x_i - b|^2 + alpha |W|^2`` (intercept
unpenalised); the fitted ``coef_`` / ``intercept_`` are numpy arrays of the fitting dtype.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score
from sklearn.utils.validation import check_is_fitted
from torch.nn import functional as F

from ..functional import linear_mse_loss
from . import _solvers
from ._validation import check_sample_weight, check_X, check_X_y, resolve_device, resolve_dtype, to_output

DIRECT_MAX_FEATURES = 4096  # 'auto' solves directly up to this many features (the SVD's cost grows as n d^2)
_SOLVERS = ("auto", "svd", "lbfgs")


class _LeastSquares(RegressorMixin, BaseEstimator):
    """fit / predict / score shared by LinearRegression (alpha 0) and Ridge."""

    def _alpha(self, n_targets: int) -> np.ndarray:
        raise NotImplementedError

    def _check_common_params(self):
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        mi = self.max_iter
        if mi is not None and (isinstance(mi, bool) or not isinstance(mi, numbers.Integral) or mi < 0):
            raise ValueError(f"max_iter must be None or an int >= 0, got {mi!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not self.tol >= 0:
            raise ValueError(f"tol must be a float >= 0, got {self.tol!r}")

    def fit(self, X, y, sample_weight=None):
        """Fit on ``X`` (n_samples, n_features) and targets ``y`` (n_samples,) or (n_samples, n_targets)."""
        self._check_common_params()
        device = resolve_device(self.device)
        X, y = check_X_y(self, X, y, device=device, dtype=resolve_dtype(self.dtype), classifier=False)
        Y = y.unsqueeze(1) if y.dim() == 1 else y
        alpha = self._alpha(Y.shape[1])
        sw = check_sample_weight(sample_weight, X.shape[0], device=device, dtype=X.dtype)
        if sw is not None and bool((sw == 1).all()):
            sw = None
        solver = self.solver
        if solver == "auto":
            solver = "svd" if X.shape[1] <= DIRECT_MAX_FEATURES else "lbfgs"
        if solver == "svd":
            W, b = _solve_svd(X, Y, sw, torch.as_tensor(alpha).to(device=device, dtype=X.dtype), self.fit_intercept)
            n_iter = 1
        else:
            W, b, n_iter = self._solve_lbfgs(X, Y, sw, alpha)
        coef = W.detach().cpu().numpy()
        self.coef_ = coef[0] if y.dim() == 1 else coef
        if b is None:
            self.intercept_ = 0.0  # as scikit-learn, whatever the number of targets
        else:
            intercept = b.detach().cpu().numpy()
            self.intercept_ = float(intercept[0]) if y.dim() == 1 else intercept
        self.n_iter_ = n_iter
        self.solver_ = solver
        return self

    def _solve_lbfgs(self, X, Y, sw, alpha):
        k, d = Y.shape[1], X.shape[1]
        W = torch.zeros(k, d, dtype=X.dtype, device=X.device, requires_grad=True)
        b = torch.zeros(k, dtype=X.dtype, device=X.device, requires_grad=True) if self.fit_intercept else None
        params = [W] + ([b] if b is not None else [])
        total = float(sw.sum()) if sw is not None else float(X.shape[0])
        alpha_t = torch.as_tensor(alpha).to(device=X.device, dtype=X.dtype).unsqueeze(1)

        def objective():
            if sw is None:
                loss = linear_mse_loss(X, W, Y, linear_bias=b, reduction="sum")
            else:
                loss = (linear_mse_loss(X, W, Y, linear_bias=b, reduction="none") * sw.unsqueeze(1)).sum()
            value = (loss + (alpha_t * W * W).sum()) / total
            value.backward()
            return value.detach()

        objective()
        g0 = max(float(p.grad.abs().max()) for p in params)
        max_iter = 1000 if self.max_iter is None else self.max_iter
        tol = self.tol * max(g0, torch.finfo(X.dtype).tiny)
        res = _solvers.lbfgs(objective, params, max_iter=max_iter, tol=tol, verbose=getattr(self, "verbose", 0))
        if not res.converged:
            warnings.warn(f"lbfgs failed to converge after {res.n_iter} iteration(s) (max |gradient| "
                          f"{res.grad_max:.3g} > {tol:.3g} = tol x the initial one); increase max_iter or "
                          "standardise the features", ConvergenceWarning)
        return W, b, res.n_iter

    def predict(self, X):
        """``X @ coef_.T + intercept_``: (n_samples,) or (n_samples, n_targets)."""
        check_is_fitted(self)
        coef = np.asarray(self.coef_)
        dtype = torch.float32 if coef.dtype == np.float32 else torch.float64
        X, as_tensor = check_X(self, X, reset=False, device=resolve_device(self.device), dtype=dtype)
        W = torch.as_tensor(coef).to(device=X.device, dtype=X.dtype)
        b = torch.as_tensor(np.asarray(self.intercept_, dtype=coef.dtype)).to(device=X.device, dtype=X.dtype)
        if W.dim() == 1:
            return to_output(F.linear(X, W.unsqueeze(0), b.reshape(1))[:, 0], as_tensor)
        return to_output(F.linear(X, W, b.expand(W.shape[0])), as_tensor)

    def score(self, X, y, sample_weight=None):
        """R^2 of the predictions (multi-output: uniform average), as scikit-learn's ``r2_score``."""
        pred = self.predict(X)
        as_np = [v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for v in (pred, y, sample_weight)]
        return r2_score(as_np[1], as_np[0], sample_weight=as_np[2])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.target_tags.multi_output = True
        return tags


def _solve_svd(X, Y, sw, alpha, fit_intercept: bool):
    """Direct (ridge) least squares on centred, sqrt(weight)-scaled data; see the module comment."""
    if fit_intercept:
        if sw is None:
            x_mean, y_mean = X.mean(0), Y.mean(0)
        else:
            x_mean = (sw @ X) / sw.sum()
            y_mean = (sw @ Y) / sw.sum()
        Xc, Yc = X - x_mean, Y - y_mean
    else:
        Xc, Yc = X, Y
    if sw is not None:
        root = sw.sqrt().unsqueeze(1)
        Xc, Yc = Xc * root, Yc * root
    U, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    UtY = U.T @ Yc                                               # (r, k)
    if bool((alpha == 0).all()):
        cutoff = S.max() * max(X.shape) * torch.finfo(X.dtype).eps if S.numel() else 0.0
        d = torch.where(S > cutoff, 1.0 / S, torch.zeros_like(S)).unsqueeze(1)
    else:
        d = S.unsqueeze(1) / (S.unsqueeze(1) ** 2 + alpha.unsqueeze(0))   # (r, k)
    W = (Vh.T @ (d * UtY)).T                                     # (k, d)
    b = (y_mean - W @ x_mean) if fit_intercept else None
    return W, b


class LinearRegression(_LeastSquares):
    """Ordinary (weighted) least squares, as scikit-learn's LinearRegression, on fastreg's ops.

    Parameters
    ----------
    fit_intercept : bool, default=True
    solver : {'auto', 'svd', 'lbfgs'}, default='auto'
        'svd': the exact (minimum-norm) solution by a thin SVD of the centred data; 'lbfgs':
        L-BFGS over the fused linear + MSE op (no copy of X); 'auto': 'svd' up to 4096 features.
    max_iter : int or None, default=None
        L-BFGS iterations (None: 1000).
    tol : float, default=1e-6
        L-BFGS stops when the largest gradient entry is below ``tol`` times its value at the start.
    device, dtype : as in :class:`fastreg.sklearn.LogisticRegression`.

    Attributes: ``coef_`` (n_features,) or (n_targets, n_features), ``intercept_`` (float or
    (n_targets,)), ``n_iter_`` (1 for the direct solver), ``solver_``, ``n_features_in_``,
    ``feature_names_in_``.
    """

    def __init__(self, *, fit_intercept=True, solver="auto", max_iter=None, tol=1e-6, device="cpu", dtype=None):
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype

    def _alpha(self, n_targets: int) -> np.ndarray:
        return np.zeros(n_targets)


class Ridge(_LeastSquares):
    """Ridge regression ``min sum_i s_i |y_i - W x_i - b|^2 + alpha |W|^2``, as scikit-learn's Ridge.

    Parameters
    ----------
    alpha : float >= 0 or array of one per target, default=1.0
    fit_intercept, solver, max_iter, device, dtype : as :class:`LinearRegression`.
    tol : float, default=1e-4 (the L-BFGS solver's relative gradient tolerance).
    """

    def __init__(self, alpha=1.0, *, fit_intercept=True, solver="auto", max_iter=None, tol=1e-4, device="cpu",
                 dtype=None):
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype

    def _alpha(self, n_targets: int) -> np.ndarray:
        alpha = self.alpha
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.detach().cpu().numpy()
        if isinstance(alpha, bool):
            raise ValueError(f"alpha must be a float >= 0 or an array of them, got {alpha!r}")
        try:
            a = np.asarray(alpha, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a float >= 0 or an array of them, got {alpha!r}") from None
        if a.size == 1:
            a = np.full(n_targets, a[0])
        if a.size != n_targets:
            raise ValueError(f"Number of targets and number of penalties do not correspond: {a.size} != {n_targets}")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
        return a
