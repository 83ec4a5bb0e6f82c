"""fastreg.nn.LinearRegression: nn.Linear-like parameters, loss = F.mse_loss, score = sklearn's R^2."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastreg.nn import LinearRegression, MultinomialLogisticRegression

metrics = pytest.importorskip("sklearn.metrics")


def test_init_forward_predict_like_nn_linear():
    torch.manual_seed(3)
    m = LinearRegression(5, 3)
    torch.manual_seed(3)
    ref = nn.Linear(5, 3)
    assert torch.equal(m.weight, ref.weight) and torch.equal(m.bias, ref.bias)
    x = torch.randn(7, 5)
    torch.testing.assert_close(m(x), ref(x))
    assert not m.predict(x).requires_grad
    assert LinearRegression(5, 3, bias=False).bias is None
    assert "in_features=5, out_features=3, bias=True" in repr(m)
    with pytest.raises(ValueError):
        LinearRegression(0, 1)


def test_loss_is_mse_with_gradients():
    m = LinearRegression(4, 2, dtype=torch.float64)
    x, t = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    loss = m.loss(x, t)
    ref = F.mse_loss(F.linear(x, m.weight, m.bias), t)
    torch.testing.assert_close(loss, ref)
    gw, gb = torch.autograd.grad(loss, [m.weight, m.bias])
    rw, rb = torch.autograd.grad(ref, [m.weight, m.bias])
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gb, rb)
    single = LinearRegression(4, 1, dtype=torch.float64)
    t1 = torch.randn(9, dtype=torch.float64)
    torch.testing.assert_close(single.loss(x, t1), F.mse_loss(single(x).squeeze(1), t1))


@pytest.mark.parametrize("outputs", [1, 3])
def test_score_matches_sklearn_r2(outputs):
    g = torch.Generator().manual_seed(0)
    m = LinearRegression(4, outputs, dtype=torch.float64)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = m.predict(x) + 0.7 * torch.randn(30, outputs, generator=g, dtype=torch.float64)
    expected = metrics.r2_score(y.numpy(), m.predict(x).numpy())  # uniform average over outputs
    assert m.score(x, y) == pytest.approx(expected, abs=1e-12)
    if outputs == 1:
        assert m.score(x, y[:, 0]) == pytest.approx(expected, abs=1e-12)


def test_score_constant_target_like_sklearn():
    m = LinearRegression(2, 2, dtype=torch.float64)
    x = torch.randn(6, 2, dtype=torch.float64)
    pred = m.predict(x)
    y = torch.stack([torch.full((6,), 2.0, dtype=torch.float64), pred[:, 1]], 1)  # constant; exact
    y_exact_const = y.clone()
    expected = metrics.r2_score(y.numpy(), pred.numpy())
    assert m.score(x, y) == pytest.approx(expected, abs=1e-12)
    with torch.no_grad():
        m.weight[0].zero_()
        m.bias[0] = 2.0
    expected = metrics.r2_score(y_exact_const.numpy(), m.predict(x).numpy())
    assert m.score(x, y_exact_const) == pytest.approx(expected, abs=1e-12) == 1.0


def test_classifier_score_is_accuracy():
    m = MultinomialLogisticRegression(3, 4)
    x = torch.randn(20, 3)
    y = m.predict(x).clone()
    y[:5] = (y[:5] + 1) % 4
    assert m.score(x, y) == pytest.approx(0.75)
