"""The ``weight`` estimator whatever the ``requires_grad`` flags, and the closed forms under autocast.

``weight`` is ``1/2 * scale * ||theta - theta0||^2`` over every parameter of theta0: it used to sum over the
parameters that required grad when it was evaluated (a frozen layer that moved did not count, an all-frozen
model was refused), unlike the other quadratic estimators. ``laftr-exact`` and ``liftr-exact`` under CPU
bfloat16 autocast used to fail in the backward pass (the custom ``W A W^T`` function of :mod:`laftr.moments`
saved tensors of both dtypes and multiplied them outside autocast).
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import mlp, perturbed
from torch import nn

import laftr
from laftr import moments

SCALE = 2.5


@pytest.mark.parametrize("frozen", ["none", "layer0", "all"])
def test_weight_sums_over_every_parameter_whatever_requires_grad(float64, one_thread, frozen):
    model = mlp(4, (8,), 3)
    est = laftr.make_estimator("weight", scale=SCALE).fit(model, torch.randn(20, 4))
    other = perturbed(model, 0.3)
    if frozen == "layer0":  # moved, then frozen (phase 2 of alternating training)
        other[0].requires_grad_(False)
    elif frozen == "all":  # an evaluation copy, an EMA model
        other.requires_grad_(False)
    p0 = dict(model.named_parameters())
    expected = 0.5 * SCALE * sum(float((p.detach() - p0[n].detach()).pow(2).sum())
                                 for n, p in other.named_parameters())
    value = est(other)
    torch.testing.assert_close(float(value.detach()), expected, rtol=1e-12, atol=0)
    trainable = {n: p for n, p in other.named_parameters() if p.requires_grad}
    assert value.requires_grad == bool(trainable)
    if trainable:
        grads = torch.autograd.grad(value, list(trainable.values()))
        for (n, p), g in zip(trainable.items(), grads, strict=True):
            torch.testing.assert_close(g, SCALE * (p.detach() - p0[n].detach()), rtol=1e-12, atol=0)


def test_weight_counts_no_buffer_and_refuses_other_parameters(float64, one_thread):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    est = laftr.make_estimator("weight").fit(model, torch.randn(20, 4))
    other = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        other[1].running_mean.add_(1.0)  # a buffer that moved: no parameter changed
    assert float(est(other)) == 0.0
    with pytest.raises(ValueError, match="architecture mismatch.*'3.weight' has shape"):
        est(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)))
    with pytest.raises(ValueError, match="architecture mismatch.*'3.weight' is missing"):
        est(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()))


def _amp_case(name):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 6, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    est = laftr.make_estimator(name, metric="l2").fit(model, X)
    return est, perturbed(model, 0.1)


def _grad(value, model):
    grads = torch.autograd.grad(value, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def _value_and_grad(est, model):
    value = est(model)
    return value, _grad(value, model)


@pytest.mark.parametrize("name", ["laftr-exact", "liftr-exact"])
def test_closed_forms_differentiate_under_cpu_bfloat16_autocast(one_thread, name):
    est, other = _amp_case(name)
    ref, ref_grad = _value_and_grad(est, other)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = est(other)
    grad = _grad(value, other)  # outside autocast, as torch's recipes do (and as a GradScaler's backward is)
    assert value.dtype == torch.bfloat16  # the products did run in the lower precision
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value.float(), ref, rtol=5e-2, atol=0)
    assert float((grad.float() - ref_grad).norm()) <= 5e-2 * float(ref_grad.norm())
    again, again_grad = _value_and_grad(est, other)  # outside autocast again: the float32 numbers
    assert float(again.detach()) == float(ref.detach())
    torch.testing.assert_close(again_grad, ref_grad, rtol=1e-6, atol=0)


def test_custom_sandwich_is_kept_outside_autocast(float64, one_thread, monkeypatch):
    est, other = _amp_case("laftr-exact")
    other = other.double()
    apply = moments._Sandwich.apply
    calls = []

    def counted(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(moments._Sandwich, "apply", counted)
    value, grad = _value_and_grad(est, other)
    assert calls  # the custom backward outside autocast
    monkeypatch.setattr(moments, "in_func_transform", lambda: True)  # the plain products, forced
    n = len(calls)
    plain, plain_grad = _value_and_grad(est, other)
    assert len(calls) == n
    torch.testing.assert_close(value, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-10, atol=1e-14)
    monkeypatch.undo()
    monkeypatch.setattr(moments._Sandwich, "apply", counted)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est(other.float())
    assert len(calls) == n  # none under autocast
