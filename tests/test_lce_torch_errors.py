"""fastreg.linear_cross_entropy on the calls torch 2.13 refuses for F.linear_cross_entropy (the
error inputs of its OpInfo, torch/testing/_internal/common_methods_invocations.py): fastreg refuses
each too, except an input of more than two dimensions, which fastreg takes as (*, D) (a documented
superset: it computes what F.cross_entropy(F.linear(...)) of the flattened rows does)."""
import pytest
import torch
import torch.nn.functional as F

import fastreg


def _arg(*shape):
    return torch.randn(*shape)


# (input, linear_weight, target, kwargs, the message torch gives)
TORCH_ERRORS = [
    (_arg(2, 3), _arg(2), _arg(2, 2), {}, "expected linear_weight with dimensionality at least 2"),
    (_arg(2, 3), _arg(2, 4), _arg(2, 2), {}, "expected equal input and linear_weight last dimensions"),
    (_arg(2, 3), _arg(2, 3), _arg(2, 2), dict(ignore_index=0), "ignore_index cannot be specified"),
    (_arg(3), _arg(2, 4, 3), _arg(2, 4), {}, "K-dimensional loss"),
    (_arg(2, 3), _arg(2, 3), torch.tensor([0, 1]), dict(linear_bias=_arg(3)), r"expected linear_bias shape \(2,\)"),
]


@pytest.mark.parametrize("input, weight, target, kwargs, torch_message", TORCH_ERRORS,
                         ids=[case[-1][:30] for case in TORCH_ERRORS])
def test_refused_where_torch_refuses(input, weight, target, kwargs, torch_message):
    if hasattr(F, "linear_cross_entropy"):
        with pytest.raises(RuntimeError, match=torch_message):
            F.linear_cross_entropy(input, weight, target, **kwargs)
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        fastreg.linear_cross_entropy(input, weight, target, **kwargs)


def test_more_than_two_dimensions_taken_as_rows():
    x, w, t = _arg(2, 3, 3), _arg(2, 3), torch.rand(2, 3, 2).softmax(-1)
    want = F.cross_entropy(F.linear(x, w).flatten(0, 1), t.flatten(0, 1))
    torch.testing.assert_close(fastreg.linear_cross_entropy(x, w, t), want)


def test_probability_targets_refuse_ignore_index_as_torch():
    x, w, probs = _arg(4, 3), _arg(5, 3), torch.rand(4, 5).softmax(-1)
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified when target contains probabilities"):
        fastreg.linear_cross_entropy(x, w, probs, ignore_index=0)
    with pytest.raises(RuntimeError, match="ignore_index .* not supported|ignore_index cannot be specified"):
        F.cross_entropy(x @ w.T, probs, ignore_index=0)
    # the defaults (-100; None as torch 2.13's F.linear_cross_entropy has it) are fine
    want = F.cross_entropy(x @ w.T, probs)
    torch.testing.assert_close(fastreg.linear_cross_entropy(x, w, probs), want)
    torch.testing.assert_close(fastreg.linear_cross_entropy(x, w, probs, ignore_index=None), want)
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified"):
        fastreg.nn.LinearCrossEntropyLoss(ignore_index=3)(x, w, probs)
