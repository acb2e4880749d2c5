"""ntk's ways to its Jacobian-vector products where torch.func.linearize is wrong or missing (findings of an
op-coverage audit; each test fails on the code before)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import laftr

pytestmark = pytest.mark.usefixtures("float64")


def _moved(model, scale=1e-4):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def _ratio(model, X, scale=1e-4):
    other = _moved(model, scale)
    return float(laftr.make_estimator("ntk", coreset_size=len(X)).fit(model, X)(other)
                 / laftr.exact_fsd(model, other, X))


@pytest.mark.parametrize("mode", ["circular", "reflect", "zeros"])
def test_circular_padding_is_not_left_to_a_wrong_trace(mode):
    """torch.func.linearize mis-traces circular padding (products of 1e277 where jvp gives 1e-3): ntk
    returned inf or garbage. A traced map is now checked once against jvp."""
    X = torch.randn(12, 3, 10)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, padding_mode=mode), nn.Flatten(), nn.Linear(40, 3))
    assert 0.99 < _ratio(model, X) < 1.01


def test_a_packed_sequence_goes_by_reverse_mode_twice():
    """A GRU fed a pack_padded_sequence: forward mode raised a RuntimeError ntk did not catch."""

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

        def forward(self, x):
            p = pack_padded_sequence(x, torch.full((x.shape[0],), 4), batch_first=True, enforce_sorted=False)
            return self.head(self.rnn(p)[1][-1])

    torch.manual_seed(0)
    assert 0.99 < _ratio(Packed(), torch.randn(10, 6, 4), 1e-3) < 1.01


def test_no_way_to_the_products_and_an_infinite_jacobian_are_named():
    """EmbeddingBag (no forward mode, no double backward) ended in torch's NotImplementedError; a ReLU into
    LPPool (sqrt at 0: an infinite derivative) returned NaN without a word."""
    torch.manual_seed(0)
    bag = nn.Sequential(nn.EmbeddingBag(11, 5, mode="mean"), nn.ReLU(), nn.Linear(5, 3))
    ids = torch.randint(0, 11, (10, 6))
    with pytest.raises(laftr.UnsupportedOpError, match="ntk cannot take Jacobian-vector products.*reverse mode"):
        laftr.make_estimator("ntk", coreset_size=10).fit(bag, ids)(_moved(bag))
    pool = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.LPPool2d(2, 2), nn.Flatten(), nn.Linear(12, 3))
    X = torch.randn(10, 2, 7, 7)
    with pytest.raises(laftr.UnsupportedOpError, match="Jacobian at theta0 is not finite"):
        laftr.make_estimator("ntk", coreset_size=10).fit(pool, X)(_moved(pool))


def test_products_without_a_second_derivative_are_refused_when_differentiated():
    """``nn.Hardsigmoid`` (MobileNetV3's gate): torch has no derivative of ``hardsigmoid_backward``, so the
    forward-mode product through it cannot be differentiated: the estimate came back and the user's
    ``backward()`` failed inside torch. Now the evaluation that would be differentiated is refused by name;
    without gradients the value is given (the same as the module's linearization by autograd's jvp)."""
    from laftr.errors import UnsupportedOpError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Hardsigmoid(), nn.Flatten(), nn.Linear(48, 3))
    X = torch.randn(20, 2, 6, 6)
    other = _moved(model, 0.1)
    est = laftr.make_estimator("ntk", coreset_size=20).fit(model, X)
    with pytest.raises(UnsupportedOpError, match="cannot be differentiated.*hardsigmoid"):
        est(other)
    with torch.no_grad():
        value = est(other)
    p0 = {n: p.detach() for n, p in model.named_parameters()}
    v = {n: p.detach() - p0[n] for n, p in other.named_parameters()}
    z0, dz = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (X,)), (p0,), (v,))
    torch.testing.assert_close(value, 0.5 * (dz ** 2).sum(1).mean(), rtol=1e-10, atol=0)
