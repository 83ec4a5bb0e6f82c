"""Input and output handling of the ``fastreg.sklearn`` estimators.

Data flows: whatever the user passes (numpy arrays, lists, pandas frames, anything array-like, or
torch tensors on any device) -> checked here -> a C-contiguous torch tensor of the fitting dtype on
the estimator's device. Array-likes go through scikit-learn's own ``validate_data`` (so the error
messages, ``n_features_in_``, ``feature_names_in_`` and the pandas handling are scikit-learn's, duck
typed: no pandas import here), then ``torch.from_numpy`` without a copy when they are already
float32/float64 and C-contiguous. Torch tensors skip the conversion to numpy (a CUDA tensor stays
on its device) and get the same checks, with the same messages, in torch.
Results go back the way the data came: numpy arrays, or torch tensors when X was a tensor.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch
from sklearn.utils.validation import validate_data

_FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device) -> torch.device:
    """The estimator's ``device`` parameter as a ``torch.device`` (refused with a clear error)."""
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"device must be a torch device or its name ('cpu', 'cuda', 'cuda:1'), got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch.cuda.is_available() is False")
    return dev


def resolve_dtype(dtype):
    """The ``dtype`` parameter: None (keep the data's float32/float64, else float64) or a float dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be None, float32 or float64 (numpy, torch or a string), got {dtype!r}")
    return _FLOAT_DTYPES[name]


def _numpy_dtypes(dtype):
    """The ``dtype`` argument of scikit-learn's check_array for our dtype rule."""
    if dtype is None:
        return [np.float64, np.float32]
    return np.float32 if dtype == torch.float32 else np.float64


def _torch_dtype_for(t: torch.Tensor, dtype):
    if dtype is not None:
        return dtype
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float64


def _check_tensor(name: str, t: torch.Tensor, *, ndim, dtype, device, estimator_name: str) -> torch.Tensor:
    """The checks of scikit-learn's check_array, for a torch tensor that stays a tensor."""
    if t.is_complex():
        raise ValueError("Complex data not supported")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a sparse tensor ({t.layout}), but {estimator_name} needs dense data")
    if t.dim() not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"Expected {want} {name}, got a tensor of shape {tuple(t.shape)}")
    t = t.detach().to(device=device, dtype=_torch_dtype_for(t, dtype)).contiguous()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"Input {name} contains NaN or infinity.")
    return t


def _min_samples(n: int, what: str, estimator_name: str) -> None:
    if n < 1:
        raise ValueError(f"Found array with {n} sample(s) ({what}) while a minimum of 1 is required by "
                         f"{estimator_name}.")


def _from_numpy(a: np.ndarray, device) -> torch.Tensor:
    # read-only arrays (memory maps) are never written to, so sharing their memory is safe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device)


def check_X(est, X, *, reset: bool, device, dtype=None) -> tuple[torch.Tensor, bool]:
    """X as a 2-D finite float tensor on ``device``; also whether it came as a torch tensor.
    ``reset``: set ``n_features_in_`` / ``feature_names_in_`` (fit) or check them (predict)."""
    name = type(est).__name__
    if isinstance(X, torch.Tensor):
        X = _check_tensor("X", X, ndim=(2,), dtype=dtype, device=device, estimator_name=name)
        validate_data(est, X, reset=reset, skip_check_array=True)  # n_features_in_, feature names
        _min_samples(X.shape[0], f"shape={tuple(X.shape)}", name)
        if X.shape[1] < 1:
            raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while a minimum of 1 is "
                             f"required by {name}.")
        return X, True
    X = validate_data(est, X, reset=reset, dtype=_numpy_dtypes(dtype), order="C")
    return _from_numpy(X, device), False


def check_X_y(est, X, y, *, device, dtype=None, classifier: bool):
    """X and y of ``fit``. X: as :func:`check_X`. y: for a classifier a 1-D numpy array of labels
    (of any type: the labels are encoded by the caller); for a regressor a float tensor of X's dtype
    on ``device``, (n,) or (n, n_targets)."""
    name = type(est).__name__
    if y is None:
        raise ValueError(f"This {name} estimator requires y to be passed, but the target y is None.")
    if isinstance(X, torch.Tensor):
        X, _ = check_X(est, X, reset=True, device=device, dtype=dtype)
        n = X.shape[0]
        if classifier:
            y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
            if y.ndim == 2 and y.shape[1] == 1:
                y = y.ravel()
            if y.ndim != 1:
                raise ValueError(f"y should be a 1d array, got an array of shape {y.shape} instead.")
        else:
            if not isinstance(y, torch.Tensor):
                y = torch.as_tensor(np.asarray(y, dtype=np.float64))
            y = _check_tensor("y", y, ndim=(1, 2), dtype=X.dtype, device=device, estimator_name=name)
        if y.shape[0] != n:
            raise ValueError(f"Found input variables with inconsistent numbers of samples: [{n}, {y.shape[0]}]")
        return X, y
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    X, y = validate_data(est, X, y, dtype=_numpy_dtypes(dtype), order="C", multi_output=not classifier,
                         y_numeric=not classifier)
    X = _from_numpy(X, device)
    if not classifier:
        y = _from_numpy(np.asarray(y, dtype=np.float32 if X.dtype == torch.float32 else np.float64), device)
    return X, y


def check_sample_weight(sample_weight, n: int, *, device, dtype) -> torch.Tensor | None:
    """Per-sample weights as a (n,) tensor (a scalar is broadcast), or None. Refuses negative,
    NaN or infinite weights and weights that are all zero."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, numbers.Number):
        sw = torch.full((n,), float(sample_weight), dtype=dtype, device=device)
    else:
        if isinstance(sample_weight, torch.Tensor):
            sw = sample_weight.detach()
        else:
            arr = np.asarray(sample_weight)
            if arr.dtype.kind not in "biuf":
                raise ValueError(f"sample_weight must be numeric, got dtype {arr.dtype}")
            sw = torch.as_tensor(arr.astype(np.float64))
        if sw.dim() != 1:
            raise ValueError(f"Sample weights must be 1D array or scalar, got shape {tuple(sw.shape)}")
        if sw.shape[0] != n:
            raise ValueError(f"sample_weight.shape == ({sw.shape[0]},), expected ({n},)!")
        sw = sw.to(device=device, dtype=dtype).contiguous()
    if not bool(torch.isfinite(sw).all()):
        raise ValueError("sample_weight contains NaN or infinity.")
    if bool((sw < 0).any()):
        raise ValueError("Negative values in data passed to sample_weight")
    if not bool((sw > 0).any()):
        raise ValueError("Sample weights must contain at least one non-zero number.")
    return sw


def to_output(t: torch.Tensor, as_tensor: bool):
    """A result tensor as the caller's type: the tensor itself, or a numpy array."""
    return t if as_tensor else t.detach().cpu().numpy()
