"""Estimators and the regularizer inside users' training loops: torch.func transforms, autocast, frozen and
unfrozen layers, schedules, checkpoints (findings of a new-user audit; each test fails on the code before)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import laftr


def _net(seed=0, width=32, outputs=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, outputs))


def _data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def _moved(model, scale=0.1, seed=1):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


class _Penalty(nn.Module):
    """A module whose forward is an estimate (what a torch.func training step over a wrapper computes)."""

    def __init__(self, est, net):
        super().__init__()
        self.est, self.net = est, net

    def forward(self, x):
        return self.est(self.net)


@pytest.mark.parametrize("name,kw", [("weight", {}), ("diag-fisher", {}), ("kfac", {}), ("subset", {}), ("ntk", {}),
                                     ("laftr", {}), ("laftr", {"gates": "relu"}), ("liftr", {}),
                                     ("laftr-exact", {"metric": "l2"})])
def test_every_estimators_gradient_inside_torch_func_is_autograds(name, kw):
    """``torch.func.grad`` of an estimate (a training step written with torch.func over a wrapper module) equals
    autograd's gradient: ntk's was zero (its traced linearization is not differentiable inside a transform),
    laftr-exact raised (a custom autograd.Function without setup_context)."""
    model, (X, Y) = _net(), _data()
    est, twin = (laftr.make_estimator(name, **kw).fit(model, (X, Y)) for _ in range(2))
    other = _moved(model)
    params = {"net." + n: p.detach().clone() for n, p in other.named_parameters()}
    g = grad(lambda p: functional_call(_Penalty(est, other), p, (X[:1],)))(params)
    ref = torch.autograd.grad(twin(other), list(other.parameters()))
    assert any(r.abs().sum() > 0 for r in ref)
    for a, b in zip(g.values(), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_an_evaluation_inside_torch_func_leaves_the_ntk_usable():
    """ntk's traced linearization from inside ``torch.func.grad`` belongs to that transform: kept, every later
    evaluation returned garbage (1e16..1e35) without a gradient."""
    model, (X, Y) = _net(), _data()
    est = laftr.make_estimator("ntk", metric="kl").fit(model, (X, Y))
    twin = laftr.make_estimator("ntk", metric="kl").fit(model, (X, Y))
    other = _moved(model)
    params = {"net." + n: p.detach().clone() for n, p in other.named_parameters()}
    g = grad(lambda p: functional_call(_Penalty(est, other), p, (X[:1],)))(params)
    expected = twin(other)
    ref = torch.autograd.grad(expected, list(other.parameters()))
    torch.testing.assert_close(g["net.0.weight"], ref[0], rtol=1e-5, atol=1e-7)  # the transform's own value
    got = est(other)
    assert got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name,kw", [("ntk", {}), ("laftr", {"fixed_noise": True}), ("laftr", {"sample_pool": 200}),
                                     ("laftr-exact", {"metric": "l2"})])
def test_an_evaluation_under_autocast_leaves_later_full_precision_ones_alone(name, kw):
    """theta0's outputs (or moments) computed under ``torch.autocast`` were kept and read by later float32
    evaluations (ntk 23 % off, returning bfloat16; laftr with fixed_noise / sample_pool 3-5 % off)."""
    model, (X, Y) = _net(), _data()
    kw = {"metric": "kl", **kw}
    est, twin = (laftr.make_estimator(name, **kw).fit(model, (X, Y)) for _ in range(2))
    other = _moved(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = est(other)
    assert torch.isfinite(low)
    # (sample_pool: the pool of an autocast call is drawn apart, reseeding the stream: est's next call is the
    # first of a never-autocast twin)
    got, expected = est(other), twin(other)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["kfac", "diag-fisher"])
def test_a_layer_frozen_at_fit_and_trainable_later_is_named_by_curvature_estimators(name):
    """kfac / diag-fisher keep curvature for the parameters trainable at fit: a backbone frozen then and
    fine-tuned later moved with a penalty of exactly 0 and no gradient. Refused, naming the parameter; frozen
    again, the estimator runs."""
    model, (X, Y) = _net(), _data()
    model[0].requires_grad_(False)
    est = laftr.make_estimator(name, metric="kl").fit(model, (X, Y))
    other = _moved(model)
    assert est(other).item() > 0  # the layers it covers moved too
    other[0].requires_grad_(True)
    with pytest.raises(laftr.UsageError, match=r"parameter '0.weight' \(and 1 more\) is trainable now but has no "
                                              r"curvature.*frozen"):
        est(other)
    other[0].weight.requires_grad_(False)
    with pytest.raises(laftr.UsageError, match=r"parameter '0.bias' is trainable"):
        est(other)
    for name_ in ("laftr", "subset"):  # estimators that read the network itself see every parameter
        assert laftr.make_estimator(name_, metric="kl").fit(model, (X, Y))(other).item() > 0
