"""fit() of MultinomialLogisticRegression and LinearRegression (the C++ loop, csrc/fit/fit.cpp)
against the same loop written in Python with fastreg's ops, optimizers and the same generator."""
import copy

import pytest
import torch

import fastreg
from fastreg.nn import LinearRegression, MultinomialLogisticRegression


def classification_data(n=150, d=7, c=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    y = (X @ w.T + 0.5 * torch.randn(n, c, generator=g, dtype=dtype)).argmax(1)
    return X, y


def regression_data(n=150, d=6, k=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(k, d, generator=g, dtype=dtype)
    y = X @ w.T + 1.5 + 0.3 * torch.randn(n, k, generator=g, dtype=dtype)
    return X, y


def python_loop(model, X, y, opt, *, epochs, batch_size, shuffle=True, generator=None, l1=0.0, loss_kw=None):
    """The reference: what fit() promises to equal."""
    n = len(X)
    bs = n if batch_size is None else batch_size
    losses = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        total = 0.0
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            loss = model.loss(X[idx], y[idx], **(loss_kw or {}))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if l1:
                lr = next(g["lr"] for g in opt.param_groups if any(p is model.weight for p in g["params"]))
                with torch.no_grad():
                    w = model.weight
                    w.copy_(torch.sign(w) * (w.abs() - lr * l1).clamp_min(0))
            total += loss.item() * len(idx)
        losses.append(total / n)
    return losses


def twin(model_cls, *args, dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    a = model_cls(*args, dtype=dtype)
    b = copy.deepcopy(a)
    return a, b


def assert_state_close(opt_a, opt_b, pa, pb, tol):
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            torch.testing.assert_close(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name]), **tol)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, **tol)


TOL32 = {"rtol": 2e-4, "atol": 2e-5}
TOL64 = {"rtol": 1e-10, "atol": 1e-12}

OPTIMIZERS = {
    "adam": lambda m: fastreg.optim.Adam(m.parameters(), lr=0.02),
    "adamw-amsgrad-groups": lambda m: fastreg.optim.AdamW(
        [{"params": [m.weight], "weight_decay": 0.05}, {"params": [m.bias], "lr": 0.05, "weight_decay": 0.0}],
        lr=0.01, betas=(0.8, 0.95), amsgrad=True),
    "adam-l2-maximize": lambda m: fastreg.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.01, maximize=True),
    "sgd": lambda m: fastreg.optim.SGD(m.parameters(), lr=0.05),
    "sgd-nesterov-wd": lambda m: fastreg.optim.SGD(m.parameters(), lr=0.03, momentum=0.9, nesterov=True,
                                                    weight_decay=1e-3),
    "sgd-dampening-groups": lambda m: fastreg.optim.SGD(
        [{"params": [m.weight], "momentum": 0.5, "dampening": 0.3}, {"params": [m.bias]}], lr=0.04),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_classifier_fit_equals_python_loop(opt_name, dtype):
    X, y = classification_data(dtype=dtype)
    a, b = twin(MultinomialLogisticRegression, 7, 4, dtype=dtype)
    opt_a, opt_b = OPTIMIZERS[opt_name](a), OPTIMIZERS[opt_name](b)
    ret = a.fit(X, y, optimizer=opt_a, epochs=3, batch_size=32, generator=torch.Generator().manual_seed(5))
    assert ret is a
    ref = python_loop(b, X, y, opt_b, epochs=3, batch_size=32, generator=torch.Generator().manual_seed(5))
    tol = TOL32 if dtype == torch.float32 else TOL64
    assert_state_close(opt_a, opt_b, [a.weight, a.bias], [b.weight, b.bias], tol)
    torch.testing.assert_close(torch.tensor(a.history_["loss"], dtype=torch.float64),
                               torch.tensor(ref, dtype=torch.float64), **tol)
    assert a.n_iter_ == 3 and a.history_["epochs"] == 3
    # the optimizer state continues as if step() had been called: one more step each, still equal
    for m, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        m.loss(X, y).backward()
        opt.step()
    assert_state_close(opt_a, opt_b, [a.weight, a.bias], [b.weight, b.bias], tol)


@pytest.mark.parametrize("opt_name", ["adam", "sgd-nesterov-wd", "adamw-amsgrad-groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_regression_fit_equals_python_loop(opt_name, dtype):
    X, y = regression_data(dtype=dtype)
    a, b = twin(LinearRegression, 6, 3, dtype=dtype)
    opt_a, opt_b = OPTIMIZERS[opt_name](a), OPTIMIZERS[opt_name](b)
    a.fit(X, y, optimizer=opt_a, epochs=4, batch_size=40, generator=torch.Generator().manual_seed(2))
    ref = python_loop(b, X, y, opt_b, epochs=4, batch_size=40, generator=torch.Generator().manual_seed(2))
    tol = TOL32 if dtype == torch.float32 else TOL64
    assert_state_close(opt_a, opt_b, [a.weight, a.bias], [b.weight, b.bias], tol)
    torch.testing.assert_close(torch.tensor(a.history_["loss"], dtype=torch.float64),
                               torch.tensor(ref, dtype=torch.float64), **tol)


def test_global_generator_full_batch_no_shuffle_class_weights_l1():
    X, y = classification_data()
    cw = torch.tensor([1.0, 2.0, 0.5, 3.0])
    for kwargs in ({"batch_size": None, "shuffle": True}, {"batch_size": 17, "shuffle": False}):
        a, b = twin(MultinomialLogisticRegression, 7, 4)
        opt_a, opt_b = fastreg.optim.Adam(a.parameters(), lr=0.05), fastreg.optim.Adam(b.parameters(), lr=0.05)
        torch.manual_seed(11)  # the default generator, as a plain torch.randperm(n) loop uses it
        a.fit(X, y, optimizer=opt_a, epochs=3, class_weight=cw, l1=0.02, **kwargs)
        torch.manual_seed(11)
        python_loop(b, X, y, opt_b, epochs=3, l1=0.02, loss_kw={"weight": cw}, **kwargs)
        assert_state_close(opt_a, opt_b, [a.weight, a.bias], [b.weight, b.bias], TOL32)
    # l1 makes weights exactly zero
    m = MultinomialLogisticRegression(7, 4)
    m.fit(X, y, optimizer=fastreg.optim.SGD(m.parameters(), lr=0.1), epochs=5, batch_size=30, l1=0.5)
    assert (m.weight == 0).float().mean() > 0.5


def test_frozen_and_foreign_parameters_stay_fixed():
    X, y = regression_data()
    m = LinearRegression(6, 3)
    bias0, w0 = m.bias.detach().clone(), m.weight.detach().clone()
    m.bias.requires_grad_(False)
    opt = fastreg.optim.Adam(m.parameters(), lr=0.05)
    m.fit(X, y, optimizer=opt, epochs=2, batch_size=50)
    assert torch.equal(m.bias, bias0) and not torch.equal(m.weight, w0)
    assert m.bias not in opt.state
    m2 = LinearRegression(6, 3)
    w2 = m2.weight.detach().clone()
    opt2 = fastreg.optim.SGD([m2.bias], lr=0.1)  # only the bias is optimised
    m2.fit(X, y, optimizer=opt2, epochs=2)
    assert torch.equal(m2.weight, w2)


def test_validation_early_stopping_restore_best_and_callback():
    X, y = regression_data(n=200)
    m = LinearRegression(6, 3)
    opt = fastreg.optim.SGD(m.parameters(), lr=0.6)  # too large: diverges after a while
    seen = []
    m.fit(X[:150], y[:150], optimizer=opt, epochs=50, batch_size=10, validation_data=(X[150:], y[150:]),
          patience=2, callback=lambda e, model, h: seen.append(e))
    h = m.history_
    assert len(h["val_loss"]) == len(h["loss"]) == len(h["val_score"]) == h["epochs"] == len(seen)
    best = h["best_epoch"]
    if h["stopped_early"]:
        assert h["epochs"] == best + 3
    # restored: the model scores what the best epoch scored
    assert m.score(X[150:], y[150:]) == pytest.approx(h["val_score"][best], abs=1e-6)
    assert float(m.loss(X[150:], y[150:]).detach()) == pytest.approx(h["val_loss"][best], rel=1e-5)
    # a callback returning True stops after that epoch
    m2 = MultinomialLogisticRegression(7, 4)
    Xc, yc = classification_data()
    m2.fit(Xc, yc, optimizer=fastreg.optim.Adam(m2.parameters()), epochs=10, callback=lambda e, mo, h: e == 2)
    assert m2.n_iter_ == 3 and m2.history_["val_loss"] == []


def test_digits_accuracy():
    """The issue's configuration: load_digits, 75/25 split, standardised, 100 epochs, batch 64, Adam 1e-2."""
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.model_selection import train_test_split
    d = datasets.load_digits()
    X_tr, X_te, y_tr, y_te = train_test_split(torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target),
                                              test_size=0.25, random_state=0)
    mean, std = X_tr.mean(0), X_tr.std(0).clamp_min(1e-3)
    X_tr, X_te = (X_tr - mean) / std, (X_te - mean) / std
    torch.manual_seed(0)
    m = MultinomialLogisticRegression(64, 10)
    m.fit(X_tr, y_tr, optimizer=fastreg.optim.Adam(m.parameters(), lr=1e-2), epochs=100, batch_size=64,
          generator=torch.Generator().manual_seed(0))
    assert m.score(X_te, y_te) >= 0.96
    assert m.history_["loss"][-1] < 0.05 * m.history_["loss"][0]


def _opt(m):
    return fastreg.optim.Adam(m.parameters(), lr=0.01)


@pytest.mark.parametrize("case, exc, match", [
    ("nan_X", ValueError, "NaN or infinite"),
    ("inf_y", ValueError, "NaN or infinite"),
    ("label_high", ValueError, "label 4"),
    ("label_negative", ValueError, "label -1"),
    ("float_labels", TypeError, "integer class labels"),
    ("wrong_features", ValueError, "features"),
    ("wrong_rows", ValueError, "shape"),
    ("empty", ValueError, "empty"),
    ("dtype", TypeError, "dtype"),
    ("torch_optimizer", TypeError, "fastreg.optim"),
    ("grad_scaler", ValueError, "GradScaler"),
    ("batch_size", ValueError, "batch_size"),
    ("epochs", ValueError, "epochs"),
    ("patience_without_validation", ValueError, "validation_data"),
    ("class_weight_shape", ValueError, "class_weight"),
    ("negative_l1", ValueError, "l1"),
    ("not_tensor", TypeError, "torch.Tensor"),
    ("one_d_X", ValueError, "2-D"),
    ("validation_nan", ValueError, "X_val contains NaN"),
])
def test_bad_input_refused_before_any_work(case, exc, match):
    X, y = classification_data(n=40)
    m = MultinomialLogisticRegression(7, 4)
    opt = _opt(m)
    kw = {"optimizer": opt, "epochs": 2, "batch_size": 8}
    if case == "nan_X":
        X[37, 3] = float("nan")
    elif case == "inf_y":
        m = LinearRegression(7, 2)
        opt = kw["optimizer"] = _opt(m)
        y = torch.randn(40, 2)
        y[39, 1] = float("inf")
    elif case == "label_high":
        y[30] = 4
    elif case == "label_negative":
        y[30] = -1
    elif case == "float_labels":
        y = y.float()
    elif case == "wrong_features":
        X = X[:, :5]
    elif case == "wrong_rows":
        y = y[:30]
    elif case == "empty":
        X, y = X[:0], y[:0]
    elif case == "dtype":
        X = X.double()
    elif case == "torch_optimizer":
        kw["optimizer"] = torch.optim.Adam(m.parameters())
    elif case == "grad_scaler":
        opt.grad_scale = torch.ones(())
    elif case == "batch_size":
        kw["batch_size"] = 0
    elif case == "epochs":
        kw["epochs"] = 0
    elif case == "patience_without_validation":
        kw["patience"] = 3
    elif case == "class_weight_shape":
        kw["class_weight"] = torch.ones(3)
    elif case == "negative_l1":
        kw["l1"] = -1.0
    elif case == "not_tensor":
        X = X.tolist()
    elif case == "one_d_X":
        X = X[:, 0]
    elif case == "validation_nan":
        Xv = X.clone()
        Xv[0, 0] = float("inf")
        kw["validation_data"] = (Xv, y)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(exc, match=match):
        m.fit(X, y, **kw)
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    for st in opt.state.values():  # no step was counted
        assert float(st.get("step", 0)) == 0


def test_params_version_bumped_and_autograd_sees_it():
    X, y = classification_data()
    m = MultinomialLogisticRegression(7, 4)
    out = (m.weight ** 2).sum()  # saves the weight
    m.fit(X, y, optimizer=_opt(m), epochs=1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_not_supported_devices_and_dtypes_are_refused():
    X, y = classification_data()
    m = MultinomialLogisticRegression(7, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32 and float64"):
        m.fit(X.bfloat16(), y, optimizer=_opt(m))
    if torch.cuda.is_available():
        mc = MultinomialLogisticRegression(7, 4, device="cuda")
        with pytest.raises(ValueError, match="CPU only"):
            mc.fit(X.cuda(), y.cuda(), optimizer=_opt(mc))


@pytest.mark.parametrize("case", ["many_classes", "large_batch_regression"])
def test_blas_path_equals_python_loop(case):
    """Batches too large for the row kernels (V > 64, or > 2^21 multiply-adds) take the BLAS path."""
    if case == "many_classes":
        X, y = classification_data(n=200, d=5, c=70)
        a, b = twin(MultinomialLogisticRegression, 5, 70)
        cw = torch.rand(70) + 0.5
        kw, loss_kw = {"class_weight": cw}, {"weight": cw}
    else:
        X, y = regression_data(n=700, d=400, k=10)
        a, b = twin(LinearRegression, 400, 10)
        kw, loss_kw = {}, None
    opt_a, opt_b = fastreg.optim.Adam(a.parameters(), lr=0.01), fastreg.optim.Adam(b.parameters(), lr=0.01)
    bs = 64 if case == "many_classes" else 600
    a.fit(X, y, optimizer=opt_a, epochs=2, batch_size=bs, generator=torch.Generator().manual_seed(4), l1=1e-3, **kw)
    python_loop(b, X, y, opt_b, epochs=2, batch_size=bs, generator=torch.Generator().manual_seed(4), l1=1e-3,
                loss_kw=loss_kw)
    assert_state_close(opt_a, opt_b, [a.weight, a.bias], [b.weight, b.bias], TOL32)


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_rows_split_over_threads_equals_python_loop(kind):
    """Batches of >= 2^19 multiply-adds and >= 512 rows run the row kernels on several threads, each
    with its own grad_W / grad_b partial (the synthetic benchmark's 1000 x 100 x 10 batches)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the split is exercised (run in turn) even on one core
    try:
        if kind == "regression":
            X, y = regression_data(n=1300, d=100, k=10)
            a, b = twin(LinearRegression, 100, 10)
        else:
            X, y = classification_data(n=1300, d=100, c=10)
            a, b = twin(MultinomialLogisticRegression, 100, 10)
        opt_a, opt_b = fastreg.optim.Adam(a.parameters(), lr=0.01), fastreg.optim.Adam(b.parameters(), lr=0.01)
        a.fit(X, y, optimizer=opt_a, epochs=2, batch_size=600, generator=torch.Generator().manual_seed(6))
        python_loop(b, X, y, opt_b, epochs=2, batch_size=600, generator=torch.Generator().manual_seed(6))
    finally:
        torch.set_num_threads(threads)
    assert_state_close(opt_a, opt_b, [a.weight, a.bias], [b.weight, b.bias], TOL32)


def test_bench_fit_correctness_gate_and_bars():
    from fastreg.bench import fit as bench_fit
    assert bench_fit.check_fit_equals_python_loop() <= 1e-4
    rows = [{"problem": "digits", "provider": "fit", "median_ms": 10.0, "value": 0.97},
            {"problem": "digits", "provider": "torch", "median_ms": 150.0, "value": 0.97},
            {"problem": "digits", "provider": "sk-logistic", "median_ms": 40.0, "value": 0.97},
            {"problem": "synthetic", "provider": "fit", "median_ms": 100.0, "value": 0.9970},
            {"problem": "synthetic", "provider": "torch", "median_ms": 350.0, "value": 0.9970},
            {"problem": "synthetic", "provider": "sk-linear", "median_ms": 50.0, "value": 0.9975}]
    result = {text: passed for text, passed, _ in bench_fit.bars(rows)}
    assert result == {"digits fit() >= 10x faster than the torch loop": True,
                      "digits fit() >= 5x faster than sklearn LogisticRegression()": False,
                      "digits fit() test accuracy >= 96 %": True,
                      "synthetic fit() R^2 within 1e-3 of sklearn LinearRegression": True,
                      "synthetic fit() >= 3x faster than the torch loop": True}


def test_fit_epoch_operator_opcheck():
    """The operator's schema declares exactly what it mutates; fake and AOT dispatch work."""
    X, y = classification_data(n=20, d=3, c=4)
    w, b = torch.randn(4, 3), torch.randn(4)
    state = [torch.zeros(4, 3), torch.zeros(4, 3), torch.empty(0), torch.zeros(()),
             torch.zeros(4), torch.zeros(4), torch.empty(0), torch.zeros(())]
    hyper = [0.01, 0.9, 0.999, 0.0, 1e-8, 0.0, 0.0, 0.0] * 2
    args = (X, y, torch.randperm(20), [w, b], None, 0, 8, 0.0, 1, state, hyper, [1, 1], True)
    result = torch.library.opcheck(torch.ops.fastreg._fit_epoch.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_model_without_bias():
    X, y = classification_data()
    torch.manual_seed(0)
    a = MultinomialLogisticRegression(7, 4, bias=False)
    b = copy.deepcopy(a)
    opt_a = fastreg.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = fastreg.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    a.fit(X, y, optimizer=opt_a, epochs=2, batch_size=25, generator=torch.Generator().manual_seed(0))
    python_loop(b, X, y, opt_b, epochs=2, batch_size=25, generator=torch.Generator().manual_seed(0))
    assert_state_close(opt_a, opt_b, [a.weight], [b.weight], TOL32)
