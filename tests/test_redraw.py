"""``laftr``'s kept draws (``redraw_every``, ``fixed_noise``) and the pass over theta's stream alone.

A kept draw must give, call for call, what a pass over both streams on the same draw gives (values and
gradients, bit for bit); the j-th draw must be the one ``redraw_every=1`` makes on its j-th call; the ops that
say their Monte Carlo pass treats the streams separately must really do so (every gate, normalizer and affine
op of the registry's examples), and the ones linearized at theta0's values must say they do not.
"""

from __future__ import annotations

import pytest
import torch
from cases import SmallCNN, TinyResNet, mlp, perturbed, randomize_bn
from test_rules import OPS, _op_net

import laftr
from laftr._util import param_dict
from laftr.errors import UsageError
from laftr.graph import OwnMode, SampleMode, TracedNet
from laftr.models import transformer

pytestmark = pytest.mark.usefixtures("float64")


def _data(n=120, shape=(5,), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def _tokens(n=120, vocab=7, length=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, 3, (n,), generator=g)


def _runs(model, data, **opts):
    """theta's outputs from a pass over both streams and from a pass over theta's alone, on the same draws."""
    est = laftr.make_estimator("laftr", num_samples=9, seed=4, **opts).fit(model, data)
    other = perturbed(model, 0.3)
    net = TracedNet(other)
    laws = est._site_laws(net, torch.device("cpu"), torch.float64)
    x, groups = est.summary.inputs.sample(9, torch.Generator().manual_seed(2), torch.device("cpu"), torch.float64)
    p0, p = est.theta0_on(other), param_dict(other)

    def run(params):
        mode = SampleMode(params, laws, groups, torch.Generator().manual_seed(3), pool_mode=est.pool_mode)
        return mode, net.run(tuple(x for _ in params), mode)

    mode, (_, both) = run([p0, p])
    _, (alone,) = run([p])
    return mode.separable(net), both, alone


@pytest.mark.parametrize("target", OPS, ids=lambda t: getattr(t, "__name__", str(t)))
def test_every_gate_and_norm_is_separable_and_theta_alone_equals_theta_in_both(target):
    separable, both, alone = _runs(_op_net(target), _data())
    assert separable
    assert torch.equal(alone, both)


@pytest.mark.parametrize("case", ["mlp", "leaky", "cnn-maxpool-sample", "cnn-maxpool-separate", "resnet-bn"])
def test_networks_of_separable_ops_run_theta_alone_bit_for_bit(case):
    g = torch.Generator().manual_seed(0)
    opts = {}
    if case == "mlp":
        model, data = mlp().double(), _data()
    elif case == "leaky":
        model, data = mlp(leaky=0.1).double(), _data()
    elif case.startswith("cnn"):
        model, data = SmallCNN().double(), _data(60, (1, 6, 6))
        opts["maxpool"] = case.rsplit("-", 1)[1]
    else:
        model = TinyResNet().double()
        randomize_bn(model, g)
        model.eval()
        data = _data(60, (1, 6, 6))
    separable, both, alone = _runs(model, data, **opts)
    assert separable
    assert torch.equal(alone, both)


@pytest.mark.parametrize("case", ["cnn-argmax0", "transformer"])
def test_ops_linearized_at_theta0s_values_are_not_separable(case):
    """theta0's max-pool selection and attention read theta0's stream: a pass over theta's alone differs, so
    they must say they are not separable (the check has teeth)."""
    if case == "cnn-argmax0":
        model, data, opts = SmallCNN().double(), _data(60, (1, 6, 6)), {"maxpool": "argmax0"}
    else:
        model, data = transformer(7, 4, 3, d_model=8, heads=2, blocks=1, d_mlp=16).double(), _tokens()
        opts = {"input_model": "tokens"}
    separable, both, alone = _runs(model, data, **opts)
    assert not separable
    assert not torch.allclose(alone, both)


def test_own_linearization_and_liftr_are_never_separable():
    model = mlp().double()
    net = TracedNet(model)
    assert not OwnMode([param_dict(model)]).separable(net)
    est = laftr.make_estimator("liftr", num_samples=4).fit(model, _data())
    mode = est._mode(net, [param_dict(model)], torch.zeros(4, dtype=torch.long), torch.Generator(),
                     torch.device("cpu"), torch.float64)
    assert not mode.separable(net)


def _value_and_grad(est, model):
    model.zero_grad(set_to_none=True)
    d = est(model)
    d.backward()
    return d.detach(), [p.grad.clone() for p in model.parameters()]


def _same(a, b):
    return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


@pytest.mark.parametrize("opts", [{}, {"input_model": "classwise", "component_cov": "diag"},
                                  {"metric": "l2"}, {"gates": "relu"}])
def test_redraw_every_keeps_each_draw_for_that_many_calls(opts, monkeypatch):
    """Calls k*R+1 .. k*R+R share the draw that redraw_every=1 makes on its (k+1)-th call; the calls after the
    first on a draw (theta alone, from theta0's kept outputs) equal passes over both streams on it."""
    model, data = mlp().double(), _data()
    thetas = [perturbed(model, 0.2, seed=s) for s in range(7)]
    R = 3
    kept = laftr.make_estimator("laftr", num_samples=8, seed=5, redraw_every=R, **opts).fit(model, data)
    fresh = laftr.make_estimator("laftr", num_samples=8, seed=5, **opts).fit(model, data)
    values = [_value_and_grad(kept, t) for t in thetas]
    # the draws: calls 1, R+1, 2R+1 of the kept estimator are calls 1, 2, 3 of the fresh one
    for j, call in enumerate(range(0, len(thetas), R)):
        assert _same(values[call], _value_and_grad(fresh, thetas[call])), f"draw {j}"
    # the same theta twice within one draw gives the same value; across draws another one
    again = laftr.make_estimator("laftr", num_samples=8, seed=5, redraw_every=R, **opts).fit(model, data)
    a, b, c, d = (again(thetas[0]).item() for _ in range(4))
    assert a == b == c and d != a
    # every call equals a pass over both streams on the same draw (theta0's stream recomputed)
    monkeypatch.setattr(TracedNet, "sample_separable", lambda self, mode: False)
    paired = laftr.make_estimator("laftr", num_samples=8, seed=5, redraw_every=R, **opts).fit(model, data)
    for i, t in enumerate(thetas):
        assert _same(values[i], _value_and_grad(paired, t)), f"call {i + 1}"
    assert all(d.z0 is None for d in paired._draws.values())
    if opts.get("gates") != "relu":
        assert all(d.z0 is not None for d in kept._draws.values())


def test_a_planted_wrong_theta0_output_is_caught(monkeypatch):
    """The kept outputs of theta0 are really used: corrupting them changes the value (the test above would see
    a wrong cache)."""
    model, data = mlp().double(), _data()
    other = perturbed(model, 0.2)
    est = laftr.make_estimator("laftr", num_samples=8, seed=5, redraw_every=4).fit(model, data)
    first = est(other).item()
    (draw,) = est._draws.values()
    draw.z0 = draw.z0 + 0.1
    assert est(other).item() != first


def test_kept_theta0_outputs_follow_the_network_and_refits():
    """Another model object (same weights) and a refit recompute theta0's outputs; a loaded estimator draws
    afresh and gives the same values as the original on its first calls."""
    model, data = mlp().double(), _data()
    other = perturbed(model, 0.2)
    twin = perturbed(model, 0.2)
    est = laftr.make_estimator("laftr", num_samples=8, seed=5, redraw_every=3).fit(model, data)
    v1 = est(other).item()
    assert est(twin).item() == v1  # another object: theta0's outputs recomputed for its network, same value
    (draw,) = est._draws.values()
    assert draw.source[0] is est._net(twin)
    est.fit(perturbed(model, 0.05, seed=9), data)
    assert not est._draws
    est2 = laftr.make_estimator("laftr", num_samples=8, seed=5, redraw_every=3).fit(model, data)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        laftr.save(est2, Path(d) / "s.laftr")
        back = laftr.load(Path(d) / "s.laftr")
    assert [back(other).item() for _ in range(4)] == [est2(other).item() for _ in range(4)]


def test_redraw_every_is_an_unbiased_estimate_of_the_closed_form():
    """The mean of many calls (l2) matches laftr-exact (each call is a Monte Carlo estimate on its draw)."""
    torch.manual_seed(0)
    model, data = mlp().double(), _data(300)
    other = perturbed(model, 0.2)
    exact = laftr.make_estimator("laftr-exact", metric="l2").fit(model, data)(other).item()
    est = laftr.make_estimator("laftr", metric="l2", num_samples=50, seed=1, redraw_every=4).fit(model, data)
    with torch.no_grad():
        vals = torch.tensor([est(other).item() for _ in range(1200)])
    # 300 independent draws, each used 4 times: the standard error is that of the 300 draws
    se = vals.view(-1, 4)[:, 0].std() / 300 ** 0.5
    assert abs(vals.mean().item() - exact) < 4 * se


@pytest.mark.parametrize("bad", [0, -2, 1.5, "3", True])
def test_redraw_every_refuses_bad_values(bad):
    with pytest.raises(UsageError, match="redraw_every"):
        laftr.make_estimator("laftr", redraw_every=bad)


def test_fixed_noise_keeps_theta0_outputs_and_runs_theta_alone():
    model, data = mlp().double(), _data()
    other = perturbed(model, 0.2)
    est = laftr.make_estimator("laftr", num_samples=8, fixed_noise=True).fit(model, data)
    first = _value_and_grad(est, other)
    (draw,) = est._draws.values()
    assert draw.z0 is not None
    calls = []
    real_run = TracedNet.run

    def spy(self, inputs, mode):
        calls.append(len(inputs))
        return real_run(self, inputs, mode)

    TracedNet.run = spy
    try:
        again = _value_and_grad(est, other)
    finally:
        TracedNet.run = real_run
    assert calls == [1]  # theta's stream alone
    assert _same(first, again)


def test_redraw_on_a_transformer_reruns_both_streams_on_the_kept_draw():
    model = transformer(7, 4, 3, d_model=8, heads=2, blocks=1, d_mlp=16).double()
    data = _tokens()
    other = perturbed(model, 0.1)
    est = laftr.make_estimator("laftr", input_model="tokens", num_samples=6, redraw_every=2).fit(model, data)
    a, b, c = (est(other).item() for _ in range(3))
    assert a == b and c != a
    assert all(d.z0 is None for d in est._draws.values())
