"""fastreg/bench/small.py: the correctness gate and the closures it times (the quick end-to-end run
of the whole suite is in tests/test_bench.py)."""
import pytest
import torch

from fastreg.bench import small


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_cases_agree_with_eager_and_time(loss):
    fns, err = small.loss_case(loss, 16, 3, 2)
    assert err < 1e-12
    steps, step_err = small.step_case(loss, 16, 3, 2)
    assert step_err < 1e-12
    per_call = small.time_interleaved({**fns, **{"step " + k: f for k, f in steps.items()}}, inner=3, samples=2,
                                      warmup=1)
    assert set(per_call) == {"fastreg", "eager", "step fastreg", "step eager"}
    assert all(t > 0 for t in per_call.values())


def test_step_case_detects_a_wrong_update(monkeypatch):
    """The gate compares the updated parameters: a loss that differs from eager's must show up."""
    import fastreg
    monkeypatch.setattr(fastreg.nn.MultinomialLogisticRegression, "loss",
                        lambda self, x, t: fastreg.linear_cross_entropy(x, self.weight, t, linear_bias=self.bias,
                                                                        label_smoothing=0.3))
    _, err = small.step_case("ce", 16, 3, 4)
    assert err > 1e-6
