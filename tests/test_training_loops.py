"""Estimators and the regularizer inside users' training loops: torch.func transforms, autocast, frozen and
unfrozen layers, schedules, checkpoints (findings of a new-user audit; each test fails on the code before)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import perturbed
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
    return perturbed(model, scale, seed)


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
    if "sample_pool" in kw:  # (the pool of an autocast call is drawn apart; the calls' stream goes on)
        twin(other)
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


# ------------------------------------------------------------------------------------------ FSDRegularizer
def _wide(seed=0):
    """Two hidden layers of the same shape (16 -> 16 -> 16): freezing one or the other keeps the shapes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 4)).double()


def _grad_of(model, value):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}


def test_refresh_reestimates_when_the_trainable_layers_change_and_applies_lam_as_it_is_now():
    """refresh > 1 kept the fresh call's gradient as a list by position: swapping which same-shaped layer is
    frozen applied layer 2's gradient to layer 0 (cosine -0.18); and ``lam`` was baked in, so a changed lam
    took effect only at the next fresh call."""
    from laftr.continual import FSDRegularizer

    model, (X, _) = _wide(), _data()
    est = laftr.make_estimator("laftr-exact").fit(model, X.double())
    other = _moved(model, 0.05)
    reg = FSDRegularizer(None, lam=1.0, refresh=4)
    reg.add(est)
    other[2].requires_grad_(False)
    reg.penalty(other)  # fresh, with layer 2 frozen
    other[2].requires_grad_(True)
    other[0].requires_grad_(False)  # the same parameter shapes, other layers
    pen = reg.penalty(other)
    want = _grad_of(other, est(other))
    got = _grad_of(other, pen)
    assert set(got) == {n for n, p in other.named_parameters() if p.requires_grad}
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=1e-10, atol=0)
    # lam changed between two calls of a cycle: the expansion is scaled by the new one at once
    other[0].requires_grad_(True)
    reg = FSDRegularizer(None, lam=1.0, refresh=4)
    reg.add(est)
    first = reg.penalty(other)
    reg.lam = 100.0
    second = reg.penalty(other)  # the same parameters: the expansion equals the fresh value
    assert float(second) == pytest.approx(100.0 * float(first), rel=1e-12)
    g1, g2 = _grad_of(other, second), _grad_of(other, 100.0 * est(other))
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-10, atol=0)


@pytest.mark.parametrize("est_kw", [{}, {"sample_pool": 64}])
def test_a_logging_call_without_gradients_leaves_later_penalties_alone(est_kw):
    """The logging call drew from the task draw and the estimators' sample streams: adding one line of logging
    changed every later training penalty (with a sample pool, also when the logging call drew the pool)."""
    from laftr.continual import FSDRegularizer

    model, (X, Y) = _net(), _data()
    ests = [laftr.make_estimator("laftr", metric="kl", num_samples=8, seed=s, **est_kw).fit(model, (X, Y))
            for s in (1, 2, 3)]
    other = _moved(model)
    runs = []
    for log in (False, True):
        reg = FSDRegularizer(None, lam=1.0, tasks_per_step=1, seed=7)
        for e in ests:
            reg.add(copy.deepcopy(e))
        vals = []
        for step in range(6):
            if log and step % 2 == 0:
                with torch.no_grad():
                    assert reg.penalty(other) > 0
            vals.append(float(reg.penalty(other).detach()))
        runs.append(vals)
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


@pytest.mark.parametrize("kw,est_kw", [({"tasks_per_step": 1}, {}), ({"every": 2}, {}), ({"refresh": 3}, {}),
                                       ({"tasks_per_step": 1}, {"sample_pool": 64})])
def test_a_checkpointed_regularizer_resumes_with_the_penalties_of_the_uninterrupted_run(tmp_path, kw, est_kw):
    """state_dict / load_state_dict (there was none: laftr.save per estimator lost the sample streams, the
    task draw and the every / refresh schedules; with every=2 a resumed run regularized the other steps). A
    sample pool drawn again after loading reseeded the calls' stream (a review)."""
    from laftr.continual import FSDRegularizer

    def make():
        return laftr.make_estimator("laftr", metric="kl", num_samples=8, **est_kw)

    def train(reg, model, opt, steps):
        vals = []
        for _ in range(steps):
            pen = reg.penalty(model)
            loss = model(X).pow(2).mean() + pen
            opt.zero_grad()
            loss.backward()
            opt.step()
            vals.append(float(pen))
        return vals

    X, Y = _data()
    model = _net()
    reg = FSDRegularizer(make, lam=3.0, seed=5, **kw)
    for t in range(3):
        torch.manual_seed(t)
        reg.after_task(model, (X, Y))
        with torch.no_grad():
            model[0].weight.add_(0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(reg, model, opt, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "reg": reg.state_dict()}, tmp_path / "c.pt")
    rest = train(reg, model, opt, 5)

    ck = torch.load(tmp_path / "c.pt", weights_only=True)  # tensors, numbers and strings only
    model2 = _net(seed=9)
    model2.load_state_dict(ck["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    opt2.load_state_dict(ck["opt"])
    reg2 = FSDRegularizer(make, lam=1.0)
    reg2.load_state_dict(ck["reg"])
    assert len(reg2) == 3 and reg2.lam == 3.0 and reg2.stored_floats() == reg.stored_floats()
    assert train(reg2, model2, opt2, 5) == rest
    with pytest.raises(laftr.UsageError, match="what FSDRegularizer.state_dict"):
        reg2.load_state_dict({"estimators": []})
    bad = dict(ck["reg"], every=0)
    with pytest.raises(laftr.UsageError, match="every must be an integer >= 1"):
        FSDRegularizer(make).load_state_dict(bad)


def test_regularizer_settings_are_checked_when_set():
    from laftr.continual import FSDRegularizer

    for kw, match in (({"seed": "a"}, "seed must be a non-negative integer"), ({"seed": 1.5}, "seed must"),
                      ({"lam": True}, "lam must be a number"), ({"eval_mode": False}, "eval_mode must be True"),
                      ({"eval_mode": "no"}, "eval_mode must be True")):
        with pytest.raises(laftr.UsageError, match=match):
            FSDRegularizer(None, **kw)
    reg = FSDRegularizer(None, lam=1.0, every=2)
    for attr, value, match in (("lam", -5, "lam must be a finite number >= 0"), ("every", 0, "every must be"),
                               ("refresh", 2, "set one of them"), ("tasks_per_step", 1.5, "tasks_per_step")):
        with pytest.raises(laftr.UsageError, match=match):
            setattr(reg, attr, value)
    assert reg.lam == 1.0 and reg.every == 2 and reg.refresh == 1
    model, (X, _) = _net(), _data()
    reg.add(laftr.make_estimator("subset").fit(model, X))
    with pytest.raises(laftr.UsageError, match=r"which=\[3\]: 3 is not the index of a stored task \(0..0\)"):
        reg.distances(model, which=[3])


def test_weight_norm_everywhere_runs_in_kfac_diag_and_ntk():
    """kfac(unsupported="diag") on a network whose every Linear is weight-normed raised autograd's "inputs
    to grad() cannot be empty" (no layer tapped); ntk raised NotImplementedError (no forward-mode AD for the
    weight-norm kernel, in the interpreter too): its products now go by reverse mode twice."""
    from torch.nn.utils.parametrizations import weight_norm

    from laftr.estimators.ntk import _jvp_by_double_vjp

    torch.manual_seed(0)
    X, Y = torch.randn(64, 16, dtype=torch.float64), torch.randint(0, 4, (64,))
    model = nn.Sequential(weight_norm(nn.Linear(16, 32)), nn.Tanh(), weight_norm(nn.Linear(32, 4))).double()
    est = laftr.make_estimator("kfac", metric="kl", unsupported="diag").fit(model, (X, Y))
    assert est.layers == [] and len(est.diag) == 6
    other = _moved(model, 1e-4)
    ntk = laftr.make_estimator("ntk", metric="kl", coreset_size=64).fit(model, X)
    got, exact = ntk(other), laftr.exact_fsd(model, other, X, metric="kl")
    assert got.requires_grad and 0.98 < float(got / exact) < 1.02  # a linearization, exact as theta -> theta0
    assert 0.5 < float(est(other) / exact) < 2  # K-FAC's diagonal fallback: a quadratic approximation
    # the double reverse-mode product equals forward mode, value and gradient in the tangent (plain network)
    net = _net().double()
    p0 = {n: p.detach() for n, p in net.named_parameters()}
    v = {n: torch.randn_like(p, requires_grad=True) for n, p in p0.items()}
    f = lambda p: functional_call(net, p, (X,))  # noqa: E731
    z0, jv = _jvp_by_double_vjp(f, p0, v)
    z0_, jv_ = torch.func.jvp(f, (p0,), (v,))
    torch.testing.assert_close(z0, z0_, rtol=1e-12, atol=0)
    torch.testing.assert_close(jv, jv_, rtol=1e-10, atol=1e-12)
    ga = torch.autograd.grad(jv.pow(2).sum(), list(v.values()))
    gb = torch.autograd.grad(jv_.pow(2).sum(), list(v.values()))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_refused_state_dict_leaves_the_regularizer_as_it_was():
    """load_state_dict took the settings before checking the rest: a refused state left lam 7 / every 4 as
    lam 2 / every 1; damaged parts gave raw TypeErrors and KeyErrors (a review)."""
    from laftr.continual import FSDRegularizer

    model, (X, Y) = _net(), _data()
    src = FSDRegularizer(lambda: laftr.make_estimator("laftr", num_samples=4), lam=2.0, refresh=3)
    src.after_task(model, (X, Y))
    src.penalty(_moved(model))  # an anchor
    good = src.state_dict()
    damaged = {
        "generator": (dict(good, generator=torch.zeros(3, dtype=torch.uint8)), "generator state is unreadable"),
        "anchor": (dict(good, anchor={"value": 1.0}), "refresh anchor is not the dict"),
        "nan": (dict(good, anchor=dict(good["anchor"], value=torch.tensor(float("nan")))), "anchor's value is nan"),
        "device": (dict(good, anchor=dict(good["anchor"], device="nodevice")), "cannot use"),
        "blob": (dict(good, estimators=[3.0]), "stored task 0 is a float"),
        "extra": (dict(good, surprise=1), "unknown entries \\['surprise'\\]"),
        "seed": (dict(good, sample_states=[dict(good["sample_states"][0], seed=12345)]), "no stream"),
    }
    for name, (state, match) in damaged.items():
        reg = FSDRegularizer(lambda: laftr.make_estimator("laftr", num_samples=4), lam=7.0, every=4)
        with pytest.raises(laftr.UsageError, match=match):
            reg.load_state_dict(state)
        assert (reg.lam, reg.every, reg.refresh, len(reg)) == (7.0, 4, 1, 0), name
    est = laftr.make_estimator("laftr", fixed_noise=True).fit(model, X)
    with pytest.raises(laftr.UsageError, match="fixed_noise draws the same samples"):
        est.load_sample_state(good["sample_states"][0])
