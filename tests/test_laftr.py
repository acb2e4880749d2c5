"""LAFTR against exact computations: closed form vs Monte Carlo, relu gates vs exact FSD, invariances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cases import CumprodNet, FunctionalNet, GeluNet, SmallCNN, TinyResNet, mlp, perturbed, randomize_bn
from torch import nn

import laftr
from laftr.errors import UsageError
from laftr.graph import TracedNet
from laftr.rules import UnsupportedOpError
from laftr.summary import fit_summary

DT = torch.float64


pytestmark = pytest.mark.usefixtures("float64")


def _data(n=120, shape=(5,), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((n, *shape), generator=g)
    Y = torch.randint(0, classes, (n,), generator=g)
    return X, Y


def _mc_mean_se(est_kwargs, model, other, data, reps=12, samples=4000):
    vals = []
    for r in range(reps):
        e = laftr.make_estimator("laftr", num_samples=samples, seed=100 + r, **est_kwargs).fit(model, data)
        vals.append(e(other).item())
    v = torch.tensor(vals)
    return v.mean().item(), v.std().item() / math.sqrt(reps)


@pytest.mark.parametrize("input_model", ["gaussian", "diag", "lowrank", "classwise", "coreset"])
def test_exact_matches_monte_carlo(input_model):
    model = mlp()
    other = perturbed(model, 0.2)
    data = _data()
    kw = {"input_model": input_model, "rank": 2, "coreset_size": 50}
    exact = laftr.make_estimator("laftr-exact", **kw).fit(model, data)(other).item()
    mean, se = _mc_mean_se(kw, model, other, data)
    assert se > 0
    assert abs(mean - exact) < 4 * se + 1e-12, (mean, exact, se)
    # and the MC error shrinks with S: a 100x smaller sample is visibly noisier
    small = [laftr.make_estimator("laftr", num_samples=40, seed=s, **kw).fit(model, data)(other).item()
             for s in range(12)]
    assert torch.tensor(small).std().item() > 3 * se


def test_mu_outer_closed_form_of_the_original_code_is_biased():
    """E[m m^T] = mu mu^T drops the diagonal term mu - mu^2: it misses Monte Carlo by many standard errors."""
    model = mlp()
    other = perturbed(model, 0.3)
    data = _data()
    ours = laftr.make_estimator("laftr-exact").fit(model, data)(other).item()
    biased = laftr.make_estimator("laftr-exact", mu_outer=True).fit(model, data)(other).item()
    mean, se = _mc_mean_se({}, model, other, data)
    assert abs(mean - ours) < 4 * se
    assert abs(mean - biased) > 20 * se, (mean, biased, se)
    with pytest.raises(ValueError, match="mu_outer"):
        laftr.make_estimator("laftr", mu_outer=True)


@pytest.mark.parametrize("factory", [lambda: mlp(leaky=0.1), FunctionalNet, lambda: TinyResNet(c=2)])
def test_exact_matches_monte_carlo_other_architectures(factory):
    model = factory()
    randomize_bn(model, torch.Generator().manual_seed(3))
    shape = (1, 4, 4) if isinstance(model, TinyResNet) else (5,)
    data = _data(80, shape)
    other = perturbed(model, 0.2)
    exact = laftr.make_estimator("laftr-exact").fit(model, data)(other).item()
    mean, se = _mc_mean_se({}, model, other, data, reps=10, samples=3000)
    assert abs(mean - exact) < 4 * se + 1e-12, (mean, exact, se)


@pytest.mark.parametrize("metric", ["l2", "l2-probs", "kl", "mse"])
@pytest.mark.parametrize("factory,shape,head", [
    (mlp, (5,), "4"), (FunctionalNet, (5,), "head"), (SmallCNN, (1, 6, 6), "fc"),
])
def test_relu_gates_on_data_equal_exact_fsd_when_only_head_differs(metric, factory, shape, head):
    model = factory()
    randomize_bn(model, torch.Generator().manual_seed(2))
    X, Y = _data(60, shape)
    other = perturbed(model, 0.5, only=head)
    est = laftr.make_estimator("laftr", metric=metric, gates="relu", input_model="coreset", coreset_size=60,
                               num_samples=60).fit(model, (X, Y))
    truth = laftr.exact_fsd(model, other, X, metric=metric)
    assert truth > 1e-4
    torch.testing.assert_close(est(other), truth, rtol=1e-10, atol=1e-12)
    # when hidden layers change too, relu gates are no longer exact
    moved = perturbed(model, 0.5)
    assert not torch.allclose(est(moved), laftr.exact_fsd(model, moved, X, metric=metric), rtol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "kl"])
@pytest.mark.parametrize("factory,shape", [
    (mlp, (5,)), (FunctionalNet, (5,)), (SmallCNN, (1, 6, 6)), (lambda: TinyResNet(c=2), (1, 4, 4)), (GeluNet, (4,)),
])
def test_no_linearization_on_every_input_is_the_exact_fsd(metric, factory, shape):
    """gates='none' runs the real networks: on a coreset holding every input, each drawn once, it is the exact FSD
    -- for any theta, hidden layers moved too (where gates='relu' is not), gradients included."""
    model = factory()
    randomize_bn(model, torch.Generator().manual_seed(2))
    X, Y = _data(60, shape)
    moved = perturbed(model, 0.5)
    est = laftr.make_estimator("laftr", metric=metric, gates="none", input_model="coreset", coreset_size=60,
                               num_samples=60).fit(model, (X, Y))
    assert est.cfg.pool_mode == "separate"
    value = est(moved)
    truth = laftr.exact_fsd(model, moved, X, metric=metric, grad=True)
    assert truth > 1e-3
    torch.testing.assert_close(value, truth, rtol=1e-10, atol=1e-14)
    params = list(moved.parameters())
    for g, g_ref in zip(torch.autograd.grad(value, params), torch.autograd.grad(truth, params), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-14)
    assert est(model).item() == 0.0
    relu = laftr.make_estimator("laftr", metric=metric, gates="relu", input_model="coreset", coreset_size=60,
                                num_samples=60).fit(model, (X, Y))
    assert not torch.allclose(relu(moved), truth, rtol=1e-6)  # the linearization's error, which 'none' removes


def test_no_linearization_runs_ops_that_no_rule_covers(tmp_path):
    """gates='none' runs an op laftr has no rule for (a cumulative product) exactly in each network: on a coreset
    of every input it is the exact FSD, values and gradients, saved and loaded; with a Gaussian input model it
    runs and is differentiable. The linearizing modes still refuse the op by name."""
    model = CumprodNet().double()
    X, _ = _data(40, (4,))
    moved = perturbed(model, 0.3)
    est = laftr.make_estimator("laftr", metric="kl", gates="none", input_model="coreset", coreset_size=40,
                               num_samples=40).fit(model, X)
    value, truth = est(moved), laftr.exact_fsd(model, moved, X, metric="kl", grad=True)
    assert truth > 1e-3
    torch.testing.assert_close(value, truth, rtol=1e-10, atol=1e-14)
    params = list(moved.parameters())
    for g, g_ref in zip(torch.autograd.grad(value, params), torch.autograd.grad(truth, params), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-14)
    laftr.save(est, tmp_path / "c.laftr")
    torch.testing.assert_close(laftr.load(tmp_path / "c.laftr")(moved), truth, rtol=1e-10, atol=1e-14)
    gauss = laftr.make_estimator("laftr", gates="none", num_samples=16).fit(model, X)
    assert gauss(model).item() == 0.0
    v = gauss(moved)
    v.backward()
    assert v > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in moved.parameters())
    for gates in ("bernoulli", "relu"):
        with pytest.raises(UnsupportedOpError, match=r"cumprod.*no rule"):
            laftr.make_estimator("laftr", gates=gates).fit(model, X)


def test_no_linearization_averages_the_exact_fsd_over_the_gaussian():
    """gates='none' with the Gaussian input model: an unbiased Monte Carlo estimate of the exact FSD over
    N(mean, covariance) of the data, checked against that FSD on 200,000 draws made here."""
    model = mlp()
    other = perturbed(model, 0.3)
    X, Y = _data()
    mean, se = _mc_mean_se({"gates": "none", "metric": "kl"}, model, other, (X, Y))
    cov = torch.cov(X.T, correction=0)  # the summary keeps population moments
    gauss = torch.distributions.MultivariateNormal(X.mean(0), covariance_matrix=cov + 1e-12 * torch.eye(5))
    torch.manual_seed(0)
    Z = gauss.sample((200_000,))
    ref = laftr.exact_fsd(model, other, Z, metric="kl").item()
    assert se > 0
    assert abs(mean - ref) < 4 * se + 1e-4 * ref, (mean, ref, se)
    # and it is not what LAFTR's linearization gives on the same input model
    lin, lin_se = _mc_mean_se({"metric": "kl"}, model, other, (X, Y))
    assert abs(lin - ref) > 4 * (lin_se + se), (lin, ref)


def test_gates_none_from_a_method_spec():
    """A method spec's bare ``gates=none`` reads as None, which means gates='none'."""
    from laftr.specs import parse_spec

    spec = parse_spec("laftr[gates=none,num_samples=8]")
    assert dict(spec.overrides)["gates"] is None
    assert laftr.make_estimator(spec.base, **dict(spec.overrides)).cfg.gates == "none"


def _positive_net():
    model = mlp(4, (6, 5), 3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("4"):
                p.copy_(p.abs() + 0.05)
    return model


def test_bernoulli_equals_relu_gates_when_pattern_cannot_change():
    model = _positive_net()
    X = torch.rand(40, 4)  # positive inputs, positive weights: every unit always on
    other = perturbed(model, 0.3)
    kw = {"input_model": "coreset", "coreset_size": 40, "num_samples": 40}
    bern = laftr.make_estimator("laftr", metric="kl", **kw).fit(model, X)
    relu = laftr.make_estimator("laftr", metric="kl", gates="relu", **kw).fit(model, X)
    assert all(torch.equal(m, torch.ones_like(m)) for m in bern.summary.site_means().values())
    torch.testing.assert_close(bern(other), relu(other), rtol=1e-12, atol=0)
    # the closed form on the coreset's moments is then the exact l2 FSD on those points (a linear network)
    lin = laftr.make_estimator("laftr-exact", input_model="coreset", coreset_size=40).fit(model, X)
    other_lin = perturbed(model, 0.01)  # small move: pattern still all-on for the perturbed net
    torch.testing.assert_close(lin(other_lin), laftr.exact_fsd(model, other_lin, X), rtol=1e-9, atol=1e-14)


def test_exact_finite_difference_gradient_and_regularizer_pulls_back():
    model = mlp(4, (5,), 2)
    data = _data(50, (4,))
    est = laftr.make_estimator("laftr-exact").fit(model, data)
    other = perturbed(model, 0.3)
    params = list(other.parameters())
    d = est(other)
    grads = torch.autograd.grad(d, params)
    eps = 1e-6
    for p, g in zip(params, grads):
        for idx in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[idx] += eps
                up = est(other).item()
                p[idx] -= 2 * eps
                down = est(other).item()
                p[idx] += eps
            assert abs((up - down) / (2 * eps) - g[idx].item()) < 1e-6 * max(1.0, abs(g[idx].item()))
    # gradient descent on the estimate moves theta toward theta0 in function space
    X = data[0]
    before = laftr.exact_fsd(model, other, X).item()
    opt = torch.optim.SGD(other.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        est(other).backward()
        opt.step()
    assert laftr.exact_fsd(model, other, X).item() < 0.7 * before


def test_mc_gradcheck_with_fixed_noise():
    model = mlp(3, (4,), 2)
    est = laftr.make_estimator("laftr", metric="kl", num_samples=16, fixed_noise=True).fit(model, _data(30, (3,)))
    other = perturbed(model, 0.2)
    w = other[0].weight
    d = est(other)
    (g,) = torch.autograd.grad(d, [w])
    eps = 1e-6
    with torch.no_grad():
        w[1, 2] += eps
        up = est(other).item()
        w[1, 2] -= 2 * eps
        down = est(other).item()
        w[1, 2] += eps
    assert abs((up - down) / (2 * eps) - g[1, 2].item()) < 1e-6
    assert est(model).item() == 0.0


def test_merge_of_shards_equals_fit_on_all_and_batch_size_invariance():
    model = mlp()
    X, Y = _data(101)
    net = TracedNet(model)
    p0 = {k: v.detach() for k, v in model.state_dict().items()}
    for kw in ({"inputs": "classwise", "seed": 5}, {"inputs": "coreset", "coreset_size": 17, "seed": 5}):
        full = fit_summary(net, p0, (X, Y), batch_size=13, **kw)
        a = fit_summary(net, p0, (X[:40], Y[:40]), batch_size=64, **kw)
        b = fit_summary(net, p0, (X[40:], Y[40:]), batch_size=7, **kw)
        merged = b.merge(a)
        for k, v in full.tensors().items():
            torch.testing.assert_close(merged.tensors()[k], v, rtol=1e-12, atol=1e-12, msg=k)
    merged = fit_summary(net, p0, (X[40:], Y[40:]), "classwise", 7, seed=5).merge(
        fit_summary(net, p0, (X[:40], Y[:40]), "classwise", 64, seed=5))
    # the merged summary gives the same distance
    other = perturbed(model)
    e1 = laftr.make_estimator("laftr-exact", input_model="classwise").fit(model, (X, Y), )
    e2 = laftr.make_estimator("laftr-exact", input_model="classwise").fit_summary_only(merged, model)
    torch.testing.assert_close(e1(other), e2(other), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name,kw", [("laftr-exact", {"input_model": "lowrank", "rank": 2}),
                                     ("laftr", {"metric": "kl", "fixed_noise": True, "input_model": "classwise"}),
                                     ("laftr", {"input_model": "coreset", "coreset_size": 10, "fixed_noise": True})])
def test_save_load_round_trip(tmp_path, name, kw):
    model = SmallCNN(maxpool=True) if name == "laftr" else mlp()
    shape = (1, 6, 6) if name == "laftr" else (5,)
    data = _data(40, shape)
    est = laftr.make_estimator(name, **kw).fit(model, data, outputs=[0, 2])
    other = perturbed(model)
    path = laftr.save(est, tmp_path / "s.laftr")
    back = laftr.load(path)
    assert back.stored_floats() == est.stored_floats()
    assert back.outputs == [0, 2]
    torch.testing.assert_close(back(other), est(other), rtol=1e-12, atol=0)


def test_outputs_restrict_the_distance():
    model = mlp()
    X, _ = _data()
    other = perturbed(model, only="4")
    full = laftr.exact_fsd(model, other, X)
    parts = laftr.exact_fsd(model, other, X, outputs=[0]) + laftr.exact_fsd(model, other, X, outputs=[1, 2])
    torch.testing.assert_close(full, parts)
    e = laftr.make_estimator("laftr-exact").fit(model, X, outputs=[1, 2])
    e_all = laftr.make_estimator("laftr-exact").fit(model, X)
    e0 = laftr.make_estimator("laftr-exact").fit(model, X, outputs=[0])
    torch.testing.assert_close(e(other) + e0(other), e_all(other))


def test_stored_floats_formulas():
    model = mlp(5, (8, 6), 3)
    data = _data()
    units = 8 + 6
    expect = {"gaussian": units + 5 + 25, "diag": units + 10, "lowrank": units + 5 + 10 + 5,
              "coreset": units + 7 * 5, "classwise": 3 * units + 3 * (1 + 5 + 25)}
    for im, n in expect.items():
        e = laftr.make_estimator("laftr", input_model=im, rank=2, coreset_size=7).fit(model, data)
        assert e.stored_floats() == n, im
    # conv net: mu per (channel, row, column); max-pool argmax frequencies only when the pool rule samples them
    cnn, (Xc, _) = SmallCNN(), _data(20, (1, 6, 6))
    gates, pool, dc = 3 * 6 * 6 + 4 * 4 * 4, 4 * 4 * 4, 36
    for mp, n in (("auto", gates), ("argmax0", gates), ("separate", gates), ("sample", gates + pool)):
        e = laftr.make_estimator("laftr", maxpool=mp).fit(cnn, Xc)
        assert e.stored_floats() == n + dc + dc * dc, mp
    # classes absent from the data (labels 3 and 4 only, of a network with 5 outputs) cost nothing
    X, Y = data
    e = laftr.make_estimator("laftr", input_model="classwise").fit(mlp(5, (8, 6), 5), (X, Y % 2 + 3))
    assert e.stored_floats() == 2 * units + 2 * (1 + 5 + 25)
    # theta0's own linearization and the real networks read no site statistics: they keep the input model alone
    for gates in ("relu", "none"):
        for im, n in expect.items():
            e = laftr.make_estimator("laftr", input_model=im, rank=2, coreset_size=7, gates=gates).fit(model, data)
            assert e.summary.site_sums == {} and e.stored_floats() == n - (3 * units if im == "classwise" else units)
        e = laftr.make_estimator("laftr", gates=gates).fit(cnn, Xc)
        assert e.stored_floats() == dc + dc * dc


@pytest.mark.parametrize("gates", ["relu", "none"])
def test_gates_that_read_no_site_law_fit_without_a_pass_of_the_network(gates, monkeypatch):
    """``gates="relu"``/``"none"``: the fit reads the data for the input model only (the network is not run over
    it), and a summary with site statistics given to them (or read from an older file) is kept without them;
    the estimates are the same either way."""
    model, data = mlp(5, (8, 6), 3), _data()
    model1 = perturbed(model, 0.3)
    full = laftr.make_estimator("laftr", input_model="classwise").fit(model, data).summary
    assert full.site_sums
    calls = []
    run = TracedNet.run
    monkeypatch.setattr(TracedNet, "run", lambda self, *a, **k: calls.append(a[1].method) or run(self, *a, **k))
    e = laftr.make_estimator("laftr", input_model="classwise", gates=gates, fixed_noise=True).fit(model, data)
    assert "fit" not in calls
    given = laftr.make_estimator("laftr", input_model="classwise", gates=gates, fixed_noise=True)
    given.fit_summary_only(full, model)
    assert given.summary.site_sums == {} and full.site_sums  # the caller's summary is not changed
    assert given.stored_floats() == e.stored_floats()
    torch.testing.assert_close(given(model1), e(model1), rtol=1e-12, atol=0)
    assert float(e(model1)) > 0
    with pytest.raises(UsageError, match="record_inputs"):
        fit_summary(TracedNet(model), dict(model.named_parameters()), data, "gaussian", record_sites=False,
                    record_inputs=lambda *a: None)


def test_cnn_and_resnet_monte_carlo_run_and_are_differentiable():
    for model, shape in [(SmallCNN(), (1, 6, 6)), (TinyResNet(), (1, 5, 5))]:
        data = _data(30, shape)
        for mp in ["sample", "argmax0", "separate"]:
            e = laftr.make_estimator("laftr", metric="kl", num_samples=8, maxpool=mp).fit(model, data)
            other = perturbed(model)
            d = e(other)
            assert d.ndim == 0 and d.item() > 0
            d.backward()
            assert all(p.grad is not None for p in other.parameters())


@pytest.mark.parametrize("maxpool", ["sample", "argmax0", "separate"])
def test_max_pool_with_a_fixed_argmax_is_exact(maxpool):
    """No gates and a max pool whose argmax is the same on every input (a large value at a fixed position of
    each window): every selection rule then picks theta0's positions, and LAFTR on a coreset of all the data
    is the exact FSD (the network is affine apart from the pool)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        model[0].bias.zero_()
    g = torch.Generator().manual_seed(0)
    X = 0.1 * torch.rand(30, 1, 4, 4, generator=g)
    X[:, :, ::2, 1::2] += 5.0  # the top-right position of every 2x2 window wins
    other = perturbed(model, 0.05, only="3")  # the conv stays, so theta's argmax is theta0's too
    est = laftr.make_estimator("laftr", metric="kl", input_model="coreset", coreset_size=30, num_samples=30,
                               maxpool=maxpool).fit(model, X)
    pi = est.summary.site_means()["_1"]
    assert pi.shape == (2, 4, 4) and torch.all(pi[:, 1] == 1)  # stored argmax frequencies
    torch.testing.assert_close(est(other), laftr.exact_fsd(model, other, X, metric="kl"), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------- bad input
def test_unsupported_op_is_named():
    # GELU, the op this test named before it got a rule, is supported now (tests/test_rules.py)
    with pytest.raises(UnsupportedOpError, match=r"cumprod.*no rule"):
        laftr.make_estimator("laftr").fit(CumprodNet(), torch.randn(10, 4))


def test_bad_inputs_give_clear_errors(tmp_path):
    model = mlp()
    X, _Y = _data()
    with pytest.raises(ValueError, match="unknown metric"):
        laftr.make_estimator("laftr", metric="cosine")
    with pytest.raises(ValueError, match="unknown estimator") as e:
        laftr.make_estimator("laftrr")
    assert "is a" not in str(e.value)  # no alias to point to
    # the names of the benchmarks' methods and rows point to the estimator they mean
    with pytest.raises(ValueError, match=r"'ewc' is a continual-learning method: the estimator "
                                         r"make_estimator\('diag-fisher', metric='kl'\)"):
        laftr.make_estimator("ewc")
    with pytest.raises(ValueError, match=r"'laftr-relu' is a row of the fsd-bench tables: the spec "
                                         r"'laftr\[num_samples=\{S\},input_model=gaussian,gates=relu\]'"):
        laftr.make_estimator("laftr-relu")
    with pytest.raises(ValueError, match="closed form only"):
        laftr.make_estimator("laftr-exact", metric="kl")
    with pytest.raises(ValueError, match="input_model"):
        laftr.make_estimator("laftr", input_model="gmm")
    with pytest.raises(ValueError, match=r"unknown gates 'exact'.*'none'"):
        laftr.make_estimator("laftr", gates="exact")
    with pytest.raises(ValueError, match="gates='none'.*shared_masks must be False"):
        laftr.make_estimator("laftr", gates="none", shared_masks=True)
    for pool in ("sample", "argmax0"):
        with pytest.raises(ValueError, match=f"gates='none'.*got '{pool}'"):
            laftr.make_estimator("laftr", gates="none", maxpool=pool)
    with pytest.raises(RuntimeError, match="not fitted"):
        laftr.make_estimator("laftr")(model)
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        laftr.make_estimator("laftr").fit(model, Xn)
    with pytest.raises(ValueError, match="labels"):
        laftr.make_estimator("laftr", input_model="classwise").fit(model, X)
    est = laftr.make_estimator("laftr").fit(model, X)
    with pytest.raises(ValueError, match="architecture mismatch"):
        est(mlp(5, (9, 6), 3))
    with pytest.raises(ValueError, match="out of range"):
        laftr.make_estimator("laftr", num_samples=4).fit(model, X, outputs=[7])(model)
    path = laftr.save(est, tmp_path / "a.laftr")
    raw = path.read_bytes()
    (tmp_path / "trunc.laftr").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(laftr.SummaryFileError):
        laftr.load(tmp_path / "trunc.laftr")
    (tmp_path / "junk.laftr").write_bytes(b"not a summary at all")
    with pytest.raises(laftr.SummaryFileError):
        laftr.load(tmp_path / "junk.laftr")
    with pytest.raises(FileNotFoundError):
        laftr.load(tmp_path / "missing.laftr")
    with pytest.raises(FileExistsError):
        laftr.save(est, path, overwrite=False)
    with pytest.raises(ValueError, match="shape"):
        laftr.exact_fsd(model, mlp(5, (8, 6), 4), X)


def test_exact_refuses_max_pool_and_huge_states():
    model = SmallCNN(maxpool=True)
    data = _data(20, (1, 6, 6))
    with pytest.raises(UnsupportedOpError, match="max pooling"):
        laftr.make_estimator("laftr-exact").fit(model, data)(model)
    big = mlp(5, (400, 400), 3)
    with pytest.raises(MemoryError, match="Monte Carlo"):
        laftr.make_estimator("laftr-exact", max_state=500).fit(big, _data())(big)


@pytest.mark.parametrize("name,opts", [("laftr", {}), ("laftr", {"input_model": "classwise", "classwise_cov": "diag"}),
                                       ("laftr", {"input_model": "mixture", "components": 3, "mixture_sample": 60}),
                                       ("liftr", {})])
def test_fixed_noise_draws_its_inputs_once_and_keeps_the_values(name, opts):
    """fixed_noise keeps the input draw (and the generator's state after it): the cached calls give what a call
    drawing everything afresh gives, bit for bit, values and gradients."""
    model, data = mlp(), _data()
    other = perturbed(model)
    est = laftr.make_estimator(name, fixed_noise=True, num_samples=16, seed=3, **opts).fit(model, data)

    def value_and_grad():
        other.zero_grad(set_to_none=True)
        d = est(other)
        d.backward()
        return d.detach(), [p.grad.clone() for p in other.parameters()]

    fresh = value_and_grad()
    assert len(est._draws) == 1
    # laftr keeps the linearizations as well: later calls replay them (a draw from the generator would raise)
    assert bool(next(iter(est._draws.values())).drawn) == (name == "laftr")
    for _ in range(2):
        cached = value_and_grad()
        assert torch.equal(cached[0], fresh[0]) and all(torch.equal(a, b) for a, b in zip(cached[1], fresh[1]))
    est._draws.clear()
    assert torch.equal(value_and_grad()[0], fresh[0])
    back = _roundtrip(est)
    assert torch.equal(back(other).detach(), fresh[0])  # a loaded estimator rebuilds the same draw


def _roundtrip(est):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.laftr"
        laftr.save(est, path)
        return laftr.load(path)


class _NoClosedForm(nn.Module):
    """A product of data (SiLU written by hand), max pooling or a softmax over data: laftr-exact has no closed form."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv, self.lin, self.head = nn.Conv2d(1, 2, 3), nn.Linear(4, 6), nn.Linear(6, 3)
        self.pooled = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        if self.kind == "maxpool":
            return self.pooled(F.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))
        h = self.lin(x)
        return self.head(h * torch.sigmoid(h) if self.kind == "product" else torch.softmax(h, -1))


@pytest.mark.parametrize("kind, msg", [("product", "product of two data-dependent tensors"),
                                       ("maxpool", "does not handle max pooling"), ("softmax", "through attention")])
def test_closed_form_refuses_at_fit_not_at_first_use(kind, msg):
    # was refused only at the first evaluation, after a fit (and a save) that looked fine
    torch.manual_seed(0)
    x = torch.randn(20, 1, 8, 8) if kind == "maxpool" else torch.randn(20, 4)
    with pytest.raises(UnsupportedOpError, match=msg):
        laftr.make_estimator("laftr-exact", metric="l2").fit(_NoClosedForm(kind), x)
    laftr.make_estimator("laftr", metric="l2").fit(_NoClosedForm(kind), x)  # the Monte Carlo estimator runs it


def test_summaries_of_other_parameters_or_widths_do_not_merge_or_serve_another_model():
    # were merged without a word (a summary recorded nothing of its theta0), or failed with a raw RuntimeError
    from laftr._util import param_dict

    torch.manual_seed(0)
    model, X = mlp(), torch.randn(80, 5)
    net, p0 = TracedNet(model), param_dict(model, detach=True)
    a, b = fit_summary(net, p0, X[:40], "gaussian"), fit_summary(net, p0, X[40:], "gaussian")
    merged = a.merge(b)  # the same theta0: fine, and usable at that model
    laftr.make_estimator("laftr").fit_summary_only(merged, model)
    other = perturbed(model, 0.1)
    c = fit_summary(net, param_dict(other, detach=True), X[40:], "gaussian")
    with pytest.raises(UsageError, match="fitted at different parameters"):
        a.merge(c)
    with pytest.raises(UsageError, match="fitted at other parameters than the model's"):
        laftr.make_estimator("laftr").fit_summary_only(merged, other)
    wide = mlp(5, (16, 6), 3)
    d = fit_summary(TracedNet(wide), param_dict(wide, detach=True), X[40:], "gaussian")
    with pytest.raises(UsageError, match="other layer widths|fitted at different parameters"):
        a.merge(d)
    d.theta0 = None  # (a summary read back from a file: its theta0 is not known) the widths are still checked
    with pytest.raises(UsageError, match="other layer widths"):
        a.merge(d)
