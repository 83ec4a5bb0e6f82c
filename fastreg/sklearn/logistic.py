"""``fastreg.sklearn.LogisticRegression``: scikit-learn's multinomial / binary logistic regression,
fitted on fastreg's fused linear + cross-entropy op.

Data flows: fit validates X, y and the weights (``_validation``), encodes the labels as 0..V-1 and
hands a solver (``_solvers``) a closure that evaluates the objective and its gradient with one call
of ``fastreg.linear_cross_entropy``: the N x V logits are only ever held chunk by chunk, on the CPU
and on CUDA alike. The fitted ``coef_`` / ``intercept_`` are numpy arrays, as scikit-learn's.

The objective is scikit-learn's, divided by the total sample weight ``S = sum_i s_i`` so that
``tol`` means what it means there (scipy's ``gtol`` on this scaled objective)::

    (1/S) sum_i s_i log_loss_i  +  (1 - r) / (2 C S) |W|^2  +  r / (C S) |W|_1

with ``s_i = sample_weight_i * class_weight[y_i]``, ``r`` the L1 ratio (0 for 'l2', 1 for 'l1'),
the intercept unpenalised. Binary problems have one coefficient row ``w`` as in scikit-learn: the
fused op then sees the two-class weight ``[0; w]`` (logits ``(0, z)``, whose softmax cross-entropy is
the binomial log loss of ``z``), so binary and multinomial share one code path.

How the weights reach the fused op, cheapest first:
  * no sample weights (or all ones): ``reduction="sum"`` with the class weights as the op's
    ``weight=`` (torch's weighted sum is ``sum_i class_weight[y_i] * loss_i``): the forward pass
    computes the gradients as it goes, three GEMMs per evaluation;
  * other sample weights: ``reduction="none"`` and autograd on ``sum_i s_i loss_i``; the op's
    backward recomputes the logits chunk by chunk with ``s`` as the per-row upstream gradient (the
    logits are still never stored whole), four GEMMs per evaluation instead of three. Rows of
    weight zero are dropped first (removing a sample and giving it weight zero are the same
    problem), and if the remaining weights are all one the first path is used.
Probability targets (``s_i`` times a one-hot row) would give the first path too, but they are a
stored N x V tensor: exactly what the fused op exists to avoid.
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted
from torch.nn import functional as F

from ..functional import linear_cross_entropy
from . import _solvers
from ._validation import check_sample_weight, check_X, check_X_y, resolve_device, resolve_dtype, to_output

_PENALTIES = ("l2", "l1", "elasticnet", None)
_SOLVERS = ("lbfgs", "proximal", "adam", "sgd")
_PREDICT_CHUNK_ELEMENTS = 1 << 22  # logits held at once by predict (rows x classes)
# Logits the fused op holds at once during a fit (its own CPU default is 128 MiB): a quarter of
# that keeps the GEMMs large (>= 4096 rows up to 1000 float64 classes) and the fit's peak memory low
_LOGITS_CHUNK_BYTES = 32 << 20


class LogisticRegression(ClassifierMixin, BaseEstimator):
    """Logistic regression (multinomial for 3+ classes, binomial for 2) with scikit-learn's
    objective and API, fitted on fastreg's fused linear + cross-entropy op.

    Parameters
    ----------
    penalty : {'l2', 'l1', 'elasticnet', None}, default='l2'
        ``None`` (or ``C=inf``) fits without penalty.
    C : float, default=1.0
        Inverse regularisation strength (> 0): the objective is
        ``C * sum_i s_i log_loss_i + penalty(W)``.
    l1_ratio : float in [0, 1] or None
        The L1 share of 'elasticnet': penalty ``r |W|_1 + (1 - r)/2 |W|^2``.
    fit_intercept : bool, default=True
    class_weight : dict, 'balanced' or None
        Multiplies each sample's weight by its class's, as scikit-learn.
    solver : {'lbfgs', 'proximal', 'adam', 'sgd'}, default='lbfgs'
        'lbfgs' (penalty 'l2' or None): full-batch L-BFGS. 'proximal' (any penalty; needed for
        'l1' and 'elasticnet'): FISTA, full batch. Both stop when the largest (sub)gradient entry
        of the objective divided by the total sample weight is ``<= tol``. 'adam' / 'sgd':
        mini-batch epochs in C++ (``fastreg.nn.MultinomialLogisticRegression.fit``), for data
        better streamed than solved; ``max_iter`` epochs of ``batch_size`` rows, CPU only, no
        ``sample_weight``; class weights give each batch's weighted mean.
    max_iter : int, default=100
        Iterations (L-BFGS / FISTA) or epochs (adam / sgd).
    tol : float, default=1e-4
    warm_start : bool, default=False
        Start from the previous fit's ``coef_`` / ``intercept_`` when their shapes fit.
    device : str or torch.device, default='cpu'
        Where the solver runs ('cuda': the same solver and fused op on the GPU).
    dtype : None, 'float32' or 'float64', default=None
        Precision of the fit. None keeps float32 and float64 data as given (other data becomes
        float64); ``coef_`` has this dtype.
    verbose : int, default=0
        1: a line per fit; 2: a line per evaluation.
    learning_rate : float or None, default=None
        Step size of 'adam' (default 1e-2) and 'sgd' (default 1e-1).
    batch_size : int, default=256
        Rows per step of 'adam' / 'sgd'.
    random_state : int or None, default=None
        Seed of the batch order of 'adam' / 'sgd'.

    Attributes
    ----------
    classes_, coef_ (1 or n_classes, n_features), intercept_, n_iter_ (array of one int),
    n_features_in_, feature_names_in_ (pandas input with string column names).
    """

    def __init__(self, penalty="l2", *, C=1.0, l1_ratio=None, fit_intercept=True, class_weight=None, solver="lbfgs",
                 max_iter=100, tol=1e-4, warm_start=False, device="cpu", dtype=None, verbose=0, learning_rate=None,
                 batch_size=256, random_state=None):
        self.penalty = penalty
        self.C = C
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.device = device
        self.dtype = dtype
        self.verbose = verbose
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.random_state = random_state

    # ------------------------------------------------------------------ parameters
    def _l1_ratio(self) -> float:
        """The L1 share of the penalty, from penalty / l1_ratio; checks them."""
        if self.penalty not in _PENALTIES:
            raise ValueError(f"penalty must be one of {_PENALTIES}, got {self.penalty!r}")
        if self.penalty == "elasticnet":
            r = self.l1_ratio
            if r is None or isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 <= r <= 1:
                raise ValueError(f"penalty='elasticnet' needs l1_ratio in [0, 1], got {r!r}")
            return float(r)
        if self.l1_ratio is not None:
            warnings.warn(f"l1_ratio is only used with penalty='elasticnet' (penalty={self.penalty!r})")
        return 1.0 if self.penalty == "l1" else 0.0

    def _check_params(self):
        r = self._l1_ratio()
        C = self.C
        if isinstance(C, bool) or not isinstance(C, numbers.Real) or not C > 0 or math.isnan(C):
            raise ValueError(f"C must be a float > 0 (inf: no penalty), got {C!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        if self.solver == "lbfgs" and r > 0 and self.penalty is not None and C != math.inf:
            raise ValueError(f"solver='lbfgs' supports penalty 'l2' or None, got penalty={self.penalty!r}; "
                             "use solver='proximal' for 'l1' and 'elasticnet'")
        for name, low in (("max_iter", 0), ("batch_size", 1), ("verbose", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not self.tol >= 0:
            raise ValueError(f"tol must be a float >= 0, got {self.tol!r}")
        lr = self.learning_rate
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf):
            raise ValueError(f"learning_rate must be None or a float > 0, got {lr!r}")
        if not (self.class_weight is None or self.class_weight == "balanced" or isinstance(self.class_weight, dict)):
            raise ValueError(f"class_weight must be None, 'balanced' or a dict, got {self.class_weight!r}")
        no_penalty = self.penalty is None or C == math.inf
        return (0.0 if no_penalty else r), (math.inf if no_penalty else float(C))

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, sample_weight=None):
        """Fit on ``X`` (n_samples, n_features) and labels ``y`` (n_samples,); returns self."""
        r, C = self._check_params()
        device = resolve_device(self.device)
        X, y = check_X_y(self, X, y, device=device, dtype=resolve_dtype(self.dtype), classifier=True)
        check_classification_targets(y)
        classes, y_enc = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError("This solver needs samples of at least 2 classes in the data, but the data contains "
                             f"only one class: {classes[0]!r}")
        n, d = X.shape
        sw = check_sample_weight(sample_weight, n, device=device, dtype=X.dtype)
        target = torch.as_tensor(y_enc.reshape(-1), dtype=torch.int64).to(device)
        class_w = None
        if self.class_weight is not None:
            sw_np = None if sw is None else sw.cpu().numpy().astype(np.float64)
            class_w = torch.as_tensor(compute_class_weight(self.class_weight, classes=classes, y=y,
                                                           sample_weight=sw_np), dtype=X.dtype).to(device)
        X, target, row_w, total = _weights_for_the_fused_op(X, target, sw, class_w)
        binary = len(classes) == 2
        rows = 1 if binary else len(classes)
        W = torch.zeros(rows, d, dtype=X.dtype, device=device)
        b = torch.zeros(rows, dtype=X.dtype, device=device) if self.fit_intercept else None
        if self.warm_start and getattr(self, "coef_", None) is not None and self.coef_.shape == (rows, d):
            W.copy_(torch.as_tensor(self.coef_))
            if b is not None and getattr(self, "intercept_", None) is not None:
                b.copy_(torch.as_tensor(np.asarray(self.intercept_).reshape(rows)))
        params = [W.requires_grad_()] + ([b.requires_grad_()] if b is not None else [])
        l2 = 0.0 if C == math.inf else (1.0 - r) / (C * total)
        l1 = 0.0 if C == math.inf else r / (C * total)

        if self.solver in ("adam", "sgd"):
            if row_w is not None:
                raise ValueError(f"solver={self.solver!r} does not take sample_weight (it runs fastreg's "
                                 "mini-batch fit()); use solver='lbfgs' or 'proximal'")
            n_iter = self._fit_minibatch(X, target, class_w, W, b, binary, l2, l1)
        else:
            def objective():
                value = _objective(X, target, W, b, binary=binary, class_w=class_w, row_w=row_w, total=total, l2=l2)
                value.backward()
                return value.detach()

            if self.solver == "lbfgs":
                res = _solvers.lbfgs(objective, params, max_iter=self.max_iter, tol=self.tol, verbose=self.verbose)
            else:
                res = _solvers.proximal_gradient(objective, params, [l1] + [0.0] * (len(params) - 1),
                                                 max_iter=self.max_iter, tol=self.tol, verbose=self.verbose)
            if not res.converged:
                warnings.warn(f"{self.solver} failed to converge after {res.n_iter} iteration(s) (max |gradient| "
                              f"{res.grad_max:.3g} > tol {self.tol:g}); increase max_iter or scale the data "
                              "(e.g. StandardScaler)", ConvergenceWarning)
            n_iter = res.n_iter
        self.classes_ = classes
        self.coef_ = W.detach().cpu().numpy()
        self.intercept_ = b.detach().cpu().numpy() if b is not None else np.zeros(rows, dtype=self.coef_.dtype)
        self.n_iter_ = np.array([n_iter], dtype=np.int32)
        return self

    def _fit_minibatch(self, X, target, class_w, W, b, binary, l2, l1) -> int:
        """solver 'adam' / 'sgd': fastreg's C++ mini-batch fit() on the same penalised objective.
        Binary problems train the symmetric two-row model (rows -w/2, w/2 at the optimum), whose
        penalty on w is half the one-row model's: the L2 weight decay is doubled to match."""
        from ..nn import MultinomialLogisticRegression
        from ..optim import SGD, Adam

        if X.device.type != "cpu":
            raise ValueError(f"solver={self.solver!r} runs fastreg's mini-batch fit(), on the CPU only; use "
                             "solver='lbfgs' or 'proximal' on other devices")
        rows = 2 if binary else W.shape[0]
        model = MultinomialLogisticRegression(X.shape[1], rows, bias=b is not None, dtype=X.dtype)
        with torch.no_grad():
            model.weight.copy_(torch.cat([-0.5 * W, 0.5 * W]) if binary else W)
            if b is not None:
                model.bias.copy_(torch.cat([-0.5 * b, 0.5 * b]) if binary else b)
        groups = [{"params": [model.weight], "weight_decay": 2 * l2 if binary else l2}]
        if b is not None:
            groups.append({"params": [model.bias], "weight_decay": 0.0})
        if self.solver == "adam":
            opt = Adam(groups, lr=self.learning_rate or 1e-2)
        else:
            opt = SGD(groups, lr=self.learning_rate or 1e-1)
        gen = torch.Generator()
        gen.manual_seed(int(np.random.RandomState(self.random_state).randint(2**31 - 1)))
        model.fit(X, target, optimizer=opt, epochs=max(1, self.max_iter), batch_size=self.batch_size, generator=gen,
                  l1=l1, class_weight=class_w)
        with torch.no_grad():
            W.copy_(model.weight[1:] - model.weight[:1] if binary else model.weight)
            if b is not None:
                b.copy_(model.bias[1:] - model.bias[:1] if binary else model.bias)
        return model.n_iter_

    # ------------------------------------------------------------------ prediction
    def _params(self, X: torch.Tensor):
        W = torch.as_tensor(self.coef_).to(device=X.device, dtype=X.dtype)
        b = torch.as_tensor(np.asarray(self.intercept_)).to(device=X.device, dtype=X.dtype) \
            if self.fit_intercept else None
        return W, b

    def _check_X(self, X):
        check_is_fitted(self)
        dtype = torch.float32 if self.coef_.dtype == np.float32 else torch.float64
        return check_X(self, X, reset=False, device=resolve_device(self.device), dtype=dtype)

    def _scores(self, X: torch.Tensor, chunk_fn):
        """``chunk_fn(logits_chunk)`` over row chunks of ``X W^T + b``: at most
        ``_PREDICT_CHUNK_ELEMENTS`` logits exist at once besides what chunk_fn returns."""
        W, b = self._params(X)
        step = max(1, _PREDICT_CHUNK_ELEMENTS // max(1, W.shape[0]))
        return torch.cat([chunk_fn(F.linear(X[i:i + step], W, b)) for i in range(0, X.shape[0], step)])

    def decision_function(self, X):
        """Scores ``X @ coef_.T + intercept_``: (n_samples,) for two classes, else (n_samples, n_classes)."""
        X, as_tensor = self._check_X(X)
        z = self._scores(X, lambda z: z)
        return to_output(z[:, 0] if z.shape[1] == 1 else z, as_tensor)

    def predict(self, X):
        """The most likely class of each row (the first one on ties, as scikit-learn)."""
        X, as_tensor = self._check_X(X)
        if self.coef_.shape[0] == 1:
            idx = self._scores(X, lambda z: (z[:, 0] > 0).to(torch.int64))
        else:
            idx = self._scores(X, lambda z: z.argmax(dim=1))
        if as_tensor and self.classes_.dtype.kind in "iuf":
            return torch.as_tensor(self.classes_).to(X.device)[idx]
        return self.classes_[idx.cpu().numpy()]

    def predict_proba(self, X):
        """Class probabilities (n_samples, n_classes), columns in the order of ``classes_``."""
        X, as_tensor = self._check_X(X)
        if self.coef_.shape[0] == 1:
            p = self._scores(X, lambda z: torch.sigmoid(z))
            return to_output(torch.cat([1 - p, p], dim=1), as_tensor)
        return to_output(self._scores(X, lambda z: torch.softmax(z, dim=1)), as_tensor)

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``, as scikit-learn."""
        p = self.predict_proba(X)
        return torch.log(p) if isinstance(p, torch.Tensor) else np.log(p)

    def score(self, X, y, sample_weight=None):
        """Mean accuracy (weighted by ``sample_weight``)."""
        pred = self.predict(X)
        if isinstance(pred, torch.Tensor):
            pred = pred.cpu().numpy()
        if isinstance(y, torch.Tensor):
            y = y.cpu().numpy()
        if isinstance(sample_weight, torch.Tensor):
            sample_weight = sample_weight.cpu().numpy()
        return accuracy_score(y, pred, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags


def objective_value(model, X, y, sample_weight=None) -> float:
    """scikit-learn's objective ``C sum_i s_i log_loss_i + penalty(coef_)`` at a fitted model's
    ``coef_`` / ``intercept_``, in float64 on the CPU through the fused op. ``model``: this module's
    LogisticRegression or scikit-learn's (whose settings -- C, penalty / l1_ratio, class_weight --
    it reads), so that two solutions can be compared on the same scale."""
    penalty, r = getattr(model, "penalty", "l2"), getattr(model, "l1_ratio", None)
    if penalty == "deprecated":  # scikit-learn >= 1.8: the L1 share is l1_ratio alone
        r = float(r or 0.0)
    else:
        r = {"l1": 1.0, "elasticnet": float(r or 0.0)}.get(penalty, 0.0)
    C = math.inf if penalty is None else float(model.C)
    X = torch.as_tensor(np.asarray(X.cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64))
    y = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y).reshape(-1)
    target = torch.as_tensor(np.searchsorted(model.classes_, y), dtype=torch.int64)
    sw = check_sample_weight(sample_weight, X.shape[0], device=X.device, dtype=X.dtype)
    class_w = None
    if model.class_weight is not None:
        class_w = torch.as_tensor(compute_class_weight(model.class_weight, classes=model.classes_, y=y,
                                                       sample_weight=None if sw is None else sw.numpy()))
    X, target, row_w, _ = _weights_for_the_fused_op(X, target, sw, class_w)
    coef = np.asarray(model.coef_, dtype=np.float64)
    W = torch.as_tensor(coef)
    b = torch.as_tensor(np.asarray(model.intercept_, dtype=np.float64).reshape(W.shape[0]))
    with torch.no_grad():
        loss = float(_objective(X, target, W, b, binary=W.shape[0] == 1, class_w=class_w, row_w=row_w, total=1.0,
                                l2=0.0))
    if C == math.inf:
        return loss
    return C * loss + r * float(np.abs(coef).sum()) + 0.5 * (1 - r) * float((coef ** 2).sum())


def _weights_for_the_fused_op(X, target, sw, class_w):
    """(X, target, row weights or None, total weight S) -- see the module comment for the paths."""
    if sw is not None:
        keep = sw > 0
        if not bool(keep.all()):
            X, target, sw = X[keep], target[keep], sw[keep]
        if bool((sw == 1).all()):
            sw = None
    if sw is None:
        counts = torch.bincount(target, minlength=class_w.shape[0] if class_w is not None else 0)
        total = float((counts.to(class_w.dtype) * class_w).sum()) if class_w is not None else float(X.shape[0])
        return X, target, None, total
    row_w = sw * class_w[target] if class_w is not None else sw
    return X, target, row_w, float(row_w.sum())


def _objective(X, target, W, b, *, binary: bool, class_w, row_w, total: float, l2: float):
    """The smooth part of the scaled objective, differentiable in W and b (one fused-op call)."""
    if binary:  # logits (0, z): the binomial log loss of z, through the multinomial kernel
        W2 = torch.cat([torch.zeros_like(W), W])
        b2 = torch.cat([torch.zeros_like(b), b]) if b is not None else None
    else:
        W2, b2 = W, b
    chunk = max(256, _LOGITS_CHUNK_BYTES // (W2.shape[0] * X.element_size()))
    if row_w is None:
        loss = linear_cross_entropy(X, W2, target, linear_bias=b2, weight=class_w, reduction="sum", chunk_size=chunk)
    else:
        loss = (linear_cross_entropy(X, W2, target, linear_bias=b2, reduction="none", chunk_size=chunk)
                * row_w).sum()
    value = loss / total
    if l2:
        value = value + (0.5 * l2) * (W * W).sum()
    return value
