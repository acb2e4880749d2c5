"""``laftr``'s sample pool, ``fixed_noise``'s kept draw, and the pass over theta's stream alone.

A pool call must give what a pass over both streams gives on the same samples and linearizations (values and
gradients); the ops that say their Monte Carlo pass treats the streams separately must really do so (every
gate, normalizer and affine op of the registry's examples), and the ones linearized at theta0's values must say
they do not; a pool call is an unbiased estimate of the pool's average, which is a Monte Carlo estimate of the
closed form.
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


def _close(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-15)
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)


def _pool_average(est, model):
    """The pool's own average, computed here: every pool sample through both streams with its recorded draws."""
    (pool,) = est._draws.values()
    net = TracedNet(model)
    laws = est._site_laws(net, torch.device("cpu"), torch.float64)
    mode = SampleMode([est.theta0_on(model), param_dict(model)], laws, pool.groups, None, False, est.pool_mode,
                      replay=pool.drawn)
    with torch.no_grad():
        z0, z = net.run((pool.x, pool.x), mode)
    return laftr.discrepancy(z0, z, est.metric, est.outputs).mean().item()


NETS = {
    "mlp": lambda: (mlp().double(), _data(), {}),
    "classwise": lambda: (mlp().double(), _data(), {"input_model": "classwise", "component_cov": "diag"}),
    "cnn-maxpool-sample": lambda: (SmallCNN().double(), _data(60, (1, 6, 6)), {"maxpool": "sample"}),
    "cnn-argmax0": lambda: (SmallCNN().double(), _data(60, (1, 6, 6)), {}),
    "transformer": lambda: (transformer(7, 4, 3, d_model=8, heads=2, blocks=1, d_mlp=16).double(), _tokens(),
                            {"input_model": "tokens"}),
}


@pytest.mark.parametrize("case", list(NETS))
def test_pool_calls_equal_passes_over_both_streams(case, monkeypatch):
    """Each call (theta alone from the pool's theta0 outputs where the network allows it) equals a pass over
    both streams on the same samples and recorded linearizations; calls take different subsets."""
    model, data, opts = NETS[case]()
    thetas = [perturbed(model, 0.2, seed=s) for s in range(4)]
    make = lambda: laftr.make_estimator("laftr", num_samples=8, sample_pool=40, seed=5, **opts).fit(model, data)  # noqa: E731
    pooled = make()
    values = [_value_and_grad(pooled, t) for t in thetas]
    (pool,) = pooled._draws.values()
    assert pool.x.shape[0] == 40 and pool.z0.shape[0] == 40
    monkeypatch.setattr(TracedNet, "sample_separable", lambda self, mode: False)
    paired = make()
    for v, t in zip(values, thetas, strict=True):
        _close(v, _value_and_grad(paired, t))
    assert len({round(v[0].item(), 12) for v in values}) == len(values)


def _streams_run(monkeypatch, fn):
    """How many streams each pass of the network run by ``fn()`` had."""
    calls = []
    real_run = TracedNet.run

    def spy(self, inputs, mode):
        calls.append(len(inputs))
        return real_run(self, inputs, mode)

    with monkeypatch.context() as m:
        m.setattr(TracedNet, "run", spy)
        fn()
    return calls


def test_pool_calls_run_theta_alone_on_separable_networks(monkeypatch):
    model, data = mlp().double(), _data()
    est = laftr.make_estimator("laftr", num_samples=8, sample_pool=32).fit(model, data)
    other = perturbed(model, 0.2)
    est(other)
    assert _streams_run(monkeypatch, lambda: est(other)) == [1]


def test_a_planted_wrong_pool_is_caught():
    """The pool's theta0 outputs and draws are really used: corrupting either changes the value."""
    model, data = mlp().double(), _data()
    other = perturbed(model, 0.2)
    est = laftr.make_estimator("laftr", num_samples=8, sample_pool=8, seed=5).fit(model, data)
    first = est(other).item()  # the whole pool each call (a permutation of it): the same value every call
    assert est(other).item() == pytest.approx(first, rel=1e-12)
    (pool,) = est._draws.values()
    pool.z0 += 0.1
    assert est(other).item() != pytest.approx(first, rel=1e-6)
    pool.z0 -= 0.1
    site = next(iter(pool.drawn))
    pool.drawn[site] = 1 - pool.drawn[site]
    assert est(other).item() != pytest.approx(first, rel=1e-6)


def test_pool_calls_average_to_the_pool_average_which_estimates_the_closed_form():
    model, data = mlp().double(), _data(300)
    other = perturbed(model, 0.2)
    est = laftr.make_estimator("laftr", metric="l2", num_samples=10, sample_pool=60, seed=1).fit(model, data)
    with torch.no_grad():
        vals = torch.tensor([est(other).item() for _ in range(600)])
    whole = _pool_average(est, other)
    assert abs(vals.mean().item() - whole) < 4 * vals.std().item() / 600 ** 0.5
    big = laftr.make_estimator("laftr", metric="l2", num_samples=10, sample_pool=40000, seed=1).fit(model, data)
    big(other)
    (pool,) = big._draws.values()
    net = TracedNet(other)
    mode = SampleMode([big.theta0_on(other), param_dict(other)], big._site_laws(net, torch.device("cpu"),
                      torch.float64), pool.groups, None, False, big.pool_mode, replay=pool.drawn)
    with torch.no_grad():
        z0, z = net.run((pool.x, pool.x), mode)
    per = 0.5 * (z - z0).pow(2).sum(1)
    exact = laftr.make_estimator("laftr-exact", metric="l2").fit(model, data)(other).item()
    assert abs(per.mean().item() - exact) < 4 * per.std().item() / per.numel() ** 0.5


def test_pool_is_drawn_again_the_same_after_load_and_dropped_on_refit(tmp_path):
    model, data = mlp().double(), _data()
    other = perturbed(model, 0.2)
    a = laftr.make_estimator("laftr", num_samples=8, sample_pool=50, seed=2).fit(model, data)
    laftr.save(a, tmp_path / "s.laftr")
    b = laftr.load(tmp_path / "s.laftr")
    assert [a(other).item() for _ in range(3)] == [b(other).item() for _ in range(3)]
    assert a._draws
    a.fit(perturbed(model, 0.05, seed=9), data)
    assert not a._draws
    twin = perturbed(model, 0.2)  # another network object: its own pool, drawn from the seed again
    c = laftr.make_estimator("laftr", num_samples=8, sample_pool=50, seed=2).fit(model, data)
    first = c(other).item()
    assert c(twin).item() == first


def test_pool_at_theta0_is_zero_and_gradients_reach_every_parameter():
    model = transformer(7, 4, 3, d_model=8, heads=2, blocks=1, d_mlp=16).double()
    data = _tokens()
    est = laftr.make_estimator("laftr", input_model="tokens", num_samples=6, sample_pool=30).fit(model, data)
    assert est(model).item() == 0.0
    other = perturbed(model, 0.1)
    v, grads = _value_and_grad(est, other)
    assert v > 0 and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    mlp_model, mlp_data = mlp().double(), _data()
    est = laftr.make_estimator("laftr", num_samples=6, sample_pool=30).fit(mlp_model, mlp_data)
    assert est(mlp_model).item() == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("opts,match", [({"sample_pool": -1}, "sample_pool"), ({"sample_pool": 1.5}, "sample_pool"),
                                        ({"sample_pool": True}, "sample_pool"),
                                        ({"sample_pool": 10, "num_samples": 20}, "at least num_samples"),
                                        ({"sample_pool": 500, "fixed_noise": True}, "fixed_noise"),
                                        ({"sample_pool": 500, "shared_masks": True}, "shared_masks"),
                                        ({"sample_pool": 500, "gates": "relu"}, "relu"),
                                        ({"sample_pool": 500, "gates": "none"}, "gates='none'")])
def test_sample_pool_refuses_bad_values(opts, match):
    with pytest.raises(UsageError, match=match):
        laftr.make_estimator("laftr", **opts)


def test_liftr_refuses_a_sample_pool():
    with pytest.raises(UsageError, match="liftr has no sample_pool"):
        laftr.make_estimator("liftr", sample_pool=100)


# (bernoulli on a transformer keeps no theta0 outputs: attention reads theta0's values; the test below)
@pytest.mark.parametrize("gates,net", [("bernoulli", "mlp"), ("none", "mlp"), ("none", "transformer")])
def test_fixed_noise_keeps_theta0_outputs_and_runs_theta_alone(monkeypatch, gates, net):
    if net == "mlp":
        model, data, opts = mlp().double(), _data(), {}
    else:  # without linearization every network is separable, attention included
        model = transformer(7, 4, 3, d_model=8, heads=2, blocks=1, d_mlp=16).double()
        data, opts = _tokens(), {"input_model": "tokens"}
    other = perturbed(model, 0.2)
    est = laftr.make_estimator("laftr", num_samples=8, fixed_noise=True, gates=gates, **opts).fit(model, data)
    first = _value_and_grad(est, other)
    (draw,) = est._draws.values()
    assert draw.z0 is not None
    again = []
    assert _streams_run(monkeypatch, lambda: again.append(_value_and_grad(est, other))) == [1]  # theta alone
    again = again[0]
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


def test_fixed_noise_on_a_transformer_keeps_no_theta0_outputs():
    model = transformer(7, 4, 3, d_model=8, heads=2, blocks=1, d_mlp=16).double()
    est = laftr.make_estimator("laftr", input_model="tokens", num_samples=6, fixed_noise=True).fit(model, _tokens())
    other = perturbed(model, 0.1)
    assert est(other).item() == est(other).item()
    assert all(d.z0 is None for d in est._draws.values())


def test_a_rule_drawing_outside_mode_draw_is_refused_during_a_replay(monkeypatch):
    """A (user's) rule that draws from the generator itself cannot be replayed: a clear error, not silently
    fresh draws."""
    from laftr.rules import PiecewiseLinearGate

    model, data = mlp().double(), _data()
    est = laftr.make_estimator("laftr", num_samples=8, sample_pool=16).fit(model, data)
    real = PiecewiseLinearGate.sample

    def own_draw(self, mode, args, kwargs):
        torch.rand(1, generator=mode.generator, device=mode.generator.device)
        return real(self, mode, args, kwargs)

    monkeypatch.setattr(PiecewiseLinearGate, "sample", own_draw)
    with pytest.raises(RuntimeError, match="draw through mode.draw"):
        est(perturbed(model))
