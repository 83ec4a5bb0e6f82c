"""scikit-learn estimators whose work runs on fastreg's fused ops (needs ``scikit-learn>=1.6``).

    from fastreg.sklearn import LogisticRegression, LinearRegression, Ridge
    clf = LogisticRegression(C=1.0).fit(X, y)        # numpy, pandas, lists or torch tensors
    clf.predict(X), clf.predict_proba(X), clf.score(X, y)

Same objectives, parameters and fitted attributes as scikit-learn's estimators of these names
(``get_params``/``set_params``, ``clone``, pickling, Pipeline, GridSearchCV, cross_val_score all
work); the fits run as full-batch solvers over ``fastreg.linear_cross_entropy`` and
``fastreg.linear_mse_loss`` (``logistic.py``, ``linear.py``, ``_solvers.py``), so the N x classes
logits are never stored whole, on the CPU or on CUDA (``device="cuda"``). Input handling:
``_validation.py``. User guide: docs/sklearn.md.
"""
try:
    import sklearn  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastreg.sklearn needs scikit-learn (pip install 'fastreg[sklearn]')") from e

from .linear import LinearRegression, Ridge  # noqa: E402
from .logistic import LogisticRegression, objective_value  # noqa: E402

__all__ = ["LogisticRegression", "LinearRegression", "Ridge", "objective_value"]
