"""Input models: the label-free mixture against the Gaussian and classwise models it generalizes, its k-means,
sharding and memory, and bad options."""

from __future__ import annotations

import pytest
import torch
from cases import mlp, perturbed
from torch import nn

import laftr
from laftr._util import param_dict
from laftr.errors import DataError
from laftr.graph import TracedNet
from laftr.inputs import MixtureInputs, kmeans, make_input_model
from laftr.summary import fit_summary

DT = torch.float64


pytestmark = pytest.mark.usefixtures("float64")


def _clusters(n_per=40, k=3, d=5, spread=8.0, seed=0):
    """``k`` well separated Gaussian clusters; the label is the cluster."""
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(k, d, generator=g)
    X = torch.cat([centers[j] + torch.randn(n_per, d, generator=g) for j in range(k)])
    Y = torch.arange(k).repeat_interleave(n_per)
    perm = torch.randperm(len(X), generator=g)
    return X[perm], Y[perm]


def test_one_component_equals_gaussian():
    model = mlp()
    X, _Y = _clusters()
    other = perturbed(model, 0.3)
    g = laftr.make_estimator("laftr-exact").fit(model, X)
    m = laftr.make_estimator("laftr-exact", input_model="mixture", components=1).fit(model, X)
    torch.testing.assert_close(m(other), g(other), rtol=1e-12, atol=0)
    for metric in ("kl", "l2"):  # Monte Carlo: the same draws
        gm = laftr.make_estimator("laftr", metric=metric, num_samples=50, fixed_noise=True).fit(model, X)
        mm = laftr.make_estimator("laftr", metric=metric, num_samples=50, fixed_noise=True, input_model="mixture",
                                  components=1).fit(model, X)
        torch.testing.assert_close(mm(other), gm(other), rtol=1e-12, atol=0)
    assert m.stored_floats() == g.stored_floats() + 1  # the component's weight


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_mixture_with_labels_as_components_equals_classwise(cov):
    """On well separated clusters k-means finds the labels (in some order), and the mixture is then classwise
    LAFTR for data without labels."""
    model = mlp()
    X, Y = _clusters()
    other = perturbed(model, 0.3)
    cw = laftr.make_estimator("laftr-exact", input_model="classwise", component_cov=cov).fit(model, (X, Y))
    mx = laftr.make_estimator("laftr-exact", input_model="mixture", components=3, component_cov=cov).fit(model, X)
    comp = mx.summary.inputs.assign(X, None)
    # the components are the clusters, relabelled
    pairs = {(int(a), int(b)) for a, b in zip(comp, Y)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
    torch.testing.assert_close(mx(other), cw(other), rtol=1e-10, atol=0)
    assert mx.stored_floats() == cw.stored_floats()
    for est in (cw, mx):  # Monte Carlo of both agrees with their closed form
        mc = [laftr.make_estimator("laftr", input_model=est.cfg.input_model, components=3, component_cov=cov,
                                   num_samples=20000, seed=s).fit(model, (X, Y))(other).item() for s in range(4)]
        assert abs(sum(mc) / 4 / cw(other).item() - 1) < 0.05


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    X, Y = _clusters(k=4, n_per=30)
    C = kmeans(X, 4, seed=3)
    assign = ((X[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
    assert len({(int(a), int(b)) for a, b in zip(assign, Y)}) == 4
    assert torch.equal(C, kmeans(X, 4, seed=3))
    # more components than distinct points: capped, no empty component
    assert kmeans(X[:2].repeat(5, 1), 4, seed=0).shape[0] == 2


def test_mixture_is_independent_of_batch_size_and_order_and_shards_merge():
    model = mlp()
    X, _Y = _clusters(n_per=50)
    net = TracedNet(model)
    p0 = param_dict(model, detach=True)
    opts = {"components": 3, "mixture_sample": 64, "seed": 4}
    a = fit_summary(net, p0, X, MixtureInputs(**opts), batch_size=17)
    perm = torch.randperm(len(X))
    b = fit_summary(net, p0, X[perm], MixtureInputs(**opts), batch_size=64)
    assert torch.equal(a.inputs.centers, b.inputs.centers)  # the k-means sample is chosen by hash
    for k, v in a.tensors().items():
        torch.testing.assert_close(b.tensors()[k], v, rtol=1e-12, atol=1e-12, msg=k)
    # shards fitted with the same components merge into the summary of all the data
    parts = []
    for sl in (slice(0, 70), slice(70, None)):
        inp = MixtureInputs(**opts)
        inp.centers = a.inputs.centers
        parts.append(fit_summary(net, p0, X[sl], inp, batch_size=9))
    merged = parts[0].merge(parts[1])
    for k, v in a.tensors().items():
        torch.testing.assert_close(merged.tensors()[k], v, rtol=1e-12, atol=1e-12, msg=k)
    other = fit_summary(net, p0, X[:70], MixtureInputs(components=3, mixture_sample=16, seed=9))
    with pytest.raises(ValueError, match="components differ|different options"):
        parts[1].merge(other)


def test_mixture_stored_floats_and_file_round_trip(tmp_path):
    model = mlp(5, (8, 6), 3)
    X, _ = _clusters()
    units, d = 8 + 6, 5
    for cov, per in (("full", 1 + d + d * d), ("diag", 1 + 2 * d)):
        est = laftr.make_estimator("laftr", input_model="mixture", components=3, component_cov=cov,
                                   fixed_noise=True, metric="kl").fit(model, X)
        assert est.stored_floats() == 3 * units + 3 * per, cov
        back = laftr.load(laftr.save(est, tmp_path / f"m-{cov}.laftr"))
        other = perturbed(model)
        torch.testing.assert_close(back(other), est(other), rtol=1e-12, atol=0)
        assert torch.equal(back.summary.inputs.centers, est.summary.inputs.centers)


def test_classwise_cov_is_still_accepted():
    est = laftr.make_estimator("laftr", input_model="classwise", classwise_cov="diag")
    assert est.cfg.component_cov == "diag"


@pytest.mark.parametrize("kw,match", [
    ({"input_model": "mixture", "components": 0}, "components"),
    ({"input_model": "mixture", "components": 2.5}, "components"),
    ({"input_model": "mixture", "component_cov": "lowrank"}, "component_cov"),
    ({"input_model": "gmm"}, "input_model"),
    ({"num_samples": "64"}, "num_samples"),
    ({"num_samples": 2.5}, "num_samples"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_input_model_options(kw, match):
    with pytest.raises(laftr.UsageError, match=match):
        laftr.make_estimator("laftr", **kw)


def test_unknown_option_names_the_estimator_that_has_it():
    with pytest.raises(laftr.OptionError, match=r"'max_state'.*laftr-exact"):
        laftr.make_estimator("laftr", max_state=10)
    with pytest.raises(laftr.OptionError, match=r"'num_samples'.*laftr"):
        laftr.make_estimator("laftr-exact", num_samples=10)
    with pytest.raises(laftr.UsageError, match="unknown input_model"):
        make_input_model("nope")


def test_classwise_labels_must_index_the_networks_outputs():
    # labels such as 100002 made a classwise summary keep (and save) 100003 groups, almost all empty
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(40, 5)
    y = torch.randint(0, 3, (40,))
    ok = laftr.make_estimator("laftr", metric="kl", input_model="classwise").fit(net, (x, y))
    assert ok.summary.inputs.num_groups == 3
    for bad in (y + 100000, torch.where(y == 2, 3, y)):
        with pytest.raises(DataError, match=f"class label {int(bad.max())} but the network has 3 output units"):
            laftr.make_estimator("laftr", metric="kl", input_model="classwise").fit(net, (x, bad))
    # input models that do not group by label take any labels
    laftr.make_estimator("laftr", metric="kl", input_model="diag").fit(net, (x, y + 100000))


@pytest.mark.parametrize("spec", ["gaussian", "diag", "lowrank", "classwise"])
def test_shards_fitted_with_other_seeds_merge_where_no_random_choice_shaped_the_sums(spec):
    """A Gaussian's sums do not depend on the seed: shards fitted with seeds 1 and 2 merge into the sums of
    the whole (refused before as 'different options'); the merged model keeps the first's seed. Where the
    seed chose something (a mixture's k-means sample, a coreset's hash) shards of other seeds still refuse."""
    model = mlp()
    X, Y = _clusters()
    net, p0 = TracedNet(model), param_dict(model, detach=True)

    def fit(seed, rows):
        inp = make_input_model(spec, seed=seed, **({"rank": 3} if spec == "lowrank" else {}))
        return fit_summary(net, p0, (X[rows], Y[rows]), inp)

    whole = fit(1, slice(None))
    merged = fit(1, slice(0, 50)).merge(fit(2, slice(50, None)))
    assert merged.inputs.seed == 1
    for k, v in whole.tensors().items():
        torch.testing.assert_close(merged.tensors()[k], v, rtol=1e-12, atol=1e-12, msg=k)
    for chosen in ("mixture", "coreset"):
        a = fit_summary(net, p0, X[:50], make_input_model(chosen, seed=1))
        b = fit_summary(net, p0, X[50:], make_input_model(chosen, seed=2))
        with pytest.raises(ValueError, match="different options|different sizes or seeds|components differ"):
            a.merge(b)


def test_inputs_whose_sums_lose_their_variance_are_refused(float64):
    """Features around 1e8 with a spread of 1: ``E x^2 - (E x)^2`` from float64 sums is rounding (stored
    variances 0-8, a negative eigenvalue, laftr-exact -0.026 for an exact 0.004, silently). Refused at fit
    with the fix; an offset of 1e5, or a feature that is a large constant, is fine."""
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(64, 5, generator=g)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    for name in ("laftr", "laftr-exact", "liftr"):
        with pytest.raises(laftr.DataError, match="mean 1e\\+08.*lose their variance"):
            laftr.make_estimator(name).fit(model, Z + 1e8)
    laftr.make_estimator("laftr-exact").fit(model, Z + 1e5)
    with_constant = Z.clone()
    with_constant[:, 2] = 1e8 + 0.1
    est = laftr.make_estimator("laftr-exact").fit(model, with_constant)
    assert float(est.summary.inputs.group_moments()[1][0, 2]) == 0.0
    # time-ordered records (Unix seconds, one a second): the first batch of 8 spans 7 s (a variance of 5, lost
    # in its own sums), the data 5,000 s (a variance of 2e6, kept): judged on the whole data's sums (a check on
    # the first batch alone refused it)
    stamps = torch.randn(5000, 5, generator=g)
    stamps[:, 0] = 1.7e9 + torch.arange(5000.0)
    laftr.make_estimator("laftr-exact", batch_size=8).fit(model, stamps)
