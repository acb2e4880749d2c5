"""Summaries fitted in pieces, loaded, merged and given to estimators: the checks a new-user audit found
missing (each test fails on the code before)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import perturbed
from torch import nn

import laftr
from laftr._util import param_dict
from laftr.graph import TracedNet
from laftr.inputs import make_input_model
from laftr.summary import fit_summary

pytestmark = pytest.mark.usefixtures("float64")


def _mlp(d=4, h=6, k=3):
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k))


def test_one_input_model_object_for_every_shard_counts_each_example_once():
    """docs/usage.md: give every shard's fit_summary the mixture whose centres you set. The same object was
    filled by each fit in turn: the merge counted 400 examples for 200 and halved the ReLU laws (an estimate
    0.23 for 0.47)."""
    X = torch.randn(200, 4)
    model = _mlp()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    net, th = TracedNet(model), param_dict(model, detach=True)
    mix = make_input_model("mixture", components=3)
    mix.prepare(lambda: iter([(X, None)]))
    a, b = fit_summary(net, th, X[:100], mix), fit_summary(net, th, X[100:], mix)
    assert float(a.counts.sum()) == 100 and mix.counts is None  # the object given stays unfitted
    merged = a.merge(b)
    whole_in = make_input_model("mixture", components=3)
    whole_in.centers = mix.centers.clone()
    whole = fit_summary(net, th, X, whole_in)
    torch.testing.assert_close(merged.counts, whole.counts)
    est = laftr.make_estimator("laftr-exact", input_model="mixture", components=3)
    ref = laftr.make_estimator("laftr-exact", input_model="mixture", components=3)
    torch.testing.assert_close(est.fit_summary_only(merged, model)(other), ref.fit_summary_only(whole, model)(other),
                               rtol=1e-10, atol=0)
    with pytest.raises(laftr.UsageError, match="has already seen data"):
        fit_summary(net, th, X, a.inputs)


def test_a_loaded_summary_keeps_its_theta0_check(tmp_path):
    """A summary read from a file had no theta0 fingerprint: merged with a summary fitted at other parameters,
    or given to fit_summary_only with another network, it was accepted (ReLU laws of theta0 A used at B)."""
    X = torch.randn(100, 4)
    A = _mlp()
    B = copy.deepcopy(A)
    with torch.no_grad():
        B[0].bias.sub_(3.0)
    loaded = laftr.load(laftr.save(laftr.make_estimator("laftr").fit(A, X[:50]), tmp_path / "a.laftr")).summary
    at_b = fit_summary(TracedNet(B), param_dict(B, detach=True), X[50:])
    with pytest.raises(laftr.UsageError, match="different parameters"):
        loaded.merge(at_b)
    with pytest.raises(laftr.UsageError, match="fitted at other parameters"):
        laftr.make_estimator("laftr").fit_summary_only(loaded, B)
    at_a = fit_summary(TracedNet(A), param_dict(A, detach=True), X[50:])
    assert float(loaded.merge(at_a).counts.sum()) == 100  # the same theta0: merged


def test_fit_summary_only_refuses_a_summary_of_other_input_model_options():
    """Only the input model's name was compared: a rank-1 summary given to a rank-4 estimator was used as
    rank 1 while its config (and file) said 4."""
    X = torch.randn(60, 4)
    model = _mlp()
    net, th = TracedNet(model), param_dict(model, detach=True)
    with pytest.raises(laftr.UsageError, match=r"other options than this estimator's: rank=1 \(estimator: 4\)"):
        laftr.make_estimator("laftr-exact", input_model="lowrank", rank=4).fit_summary_only(
            fit_summary(net, th, X, "lowrank", rank=1), model)
    with pytest.raises(laftr.UsageError, match="coreset_size=10 .estimator: 20."):
        laftr.make_estimator("laftr", input_model="coreset", coreset_size=20).fit_summary_only(
            fit_summary(net, th, X, "coreset", coreset_size=10), model)
    # the Gaussian sums do not depend on the seed: another seed is the estimator's sampling stream only
    est = laftr.make_estimator("laftr", seed=5).fit_summary_only(fit_summary(net, th, X, "gaussian", seed=1), model)
    assert est(model).item() == 0.0


def test_shards_of_a_normalized_network_merge_when_only_one_saw_a_constant_input():
    """A normalizer records nu_zero only once an input it normalizes is constant: merging a shard with one and
    a shard without was refused as 'another network'."""
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    X = torch.randn(40, 4)
    X[3] = 1.0  # LayerNorm centres it to zero
    net, th = TracedNet(model), param_dict(model, detach=True)
    merged = fit_summary(net, th, X[:20]).merge(fit_summary(net, th, X[20:]))
    whole = fit_summary(net, th, X)
    assert {k: list(v) for k, v in merged.site_sums.items()} == {k: list(v) for k, v in whole.site_sums.items()}
    for site, d in whole.site_sums.items():
        for k, v in d.items():
            torch.testing.assert_close(merged.site_sums[site][k], v, rtol=1e-12, atol=1e-12)


def test_seeds_beyond_64_bits_are_refused_at_construction():
    with pytest.raises(laftr.UsageError, match="seed must be an integer of magnitude below 2\\*\\*62"):
        laftr.make_estimator("laftr", seed=2 ** 64)


@pytest.mark.parametrize("shift", ["scale", "offset"])
def test_a_float32_closed_form_does_not_lose_the_distance_to_rounding(shift):
    """Inputs of scale 1e6: in float32 a + b - 2c cancelled to -131072 (scaled) and -1024 (offset) for a
    distance of 0.15 / 0.12. Such a result is now recomputed in float64; ordinary ones are left in float32."""
    torch.manual_seed(0)
    X = torch.randn(200, 4, dtype=torch.float64)
    X = X * 1e6 if shift == "scale" else X + 1e6
    lin = nn.Linear(4, 3).double()
    with torch.no_grad():
        lin.weight.mul_(1e-6 if shift == "scale" else 1.0)
    other = copy.deepcopy(lin)
    with torch.no_grad():
        other.weight.add_(1e-7 if shift == "scale" else 0.0)
        other.bias.add_(0.3)
    truth = laftr.make_estimator("laftr-exact").fit(lin, X)(other)
    got = laftr.make_estimator("laftr-exact").fit(lin.float(), X.float())(other.float())
    assert got.dtype == torch.float32 and float(truth) > 0
    assert abs(float(got) / float(truth) - 1) < 1e-2
    # an ordinary scale stays in float32, equal to the float64 value to float32's precision
    net, X = _mlp(), torch.randn(50, 4)
    small = laftr.make_estimator("laftr-exact").fit(copy.deepcopy(net).float(), X.float())
    wide = laftr.make_estimator("laftr-exact").fit(net, X)
    moved = perturbed(net, 0.1)
    assert small(copy.deepcopy(moved).float()).dtype == torch.float32
    torch.testing.assert_close(small(copy.deepcopy(moved).float()).double(), wide(moved), rtol=1e-4, atol=0)


def test_summaries_of_another_network_or_permuted_weights_are_refused(tmp_path):
    """An audit: a ReLU and a LeakyReLU network of the same weights have summaries with the same sites and
    statistics -- merged (38 of 400 counts off) and taken by fit_summary_only (laftr-exact +16 %); two rows of a
    weight swapped kept theta0's fingerprint (its sum and sum of squares). Both refused now."""
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    leaky = copy.deepcopy(relu)
    leaky[1], leaky[3] = nn.LeakyReLU(0.5), nn.LeakyReLU(0.5)
    X = torch.randn(200, 4)
    th = param_dict(relu, detach=True)
    a, b = fit_summary(TracedNet(relu), th, X[:100]), fit_summary(TracedNet(leaky), th, X[100:])
    with pytest.raises(laftr.UsageError, match="different networks"):
        a.merge(b)
    with pytest.raises(laftr.UsageError, match="fitted on another network"):
        laftr.make_estimator("laftr-exact").fit_summary_only(b, relu)
    loaded = laftr.load(laftr.save(laftr.make_estimator("laftr-exact").fit(leaky, X[100:]),
                                   tmp_path / "leaky.laftr")).summary
    with pytest.raises(laftr.UsageError, match="different networks"):  # (the file's sites: the same check)
        a.merge(loaded)
    swapped = copy.deepcopy(relu)
    with torch.no_grad():
        swapped[0].weight[[0, 1]] = swapped[0].weight[[1, 0]]
    c = fit_summary(TracedNet(swapped), param_dict(swapped, detach=True), X[100:])
    with pytest.raises(laftr.UsageError, match="different parameters"):
        a.merge(c)
    with pytest.raises(laftr.UsageError, match="other parameters"):
        laftr.make_estimator("laftr-exact").fit_summary_only(c, relu)
    # an estimator that keeps fewer sites (linearize="activations" drops a LayerNorm's) keeps the sites list
    normed = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    normed_leaky = copy.deepcopy(normed)
    normed_leaky[2] = nn.LeakyReLU(0.5)
    tn = param_dict(normed, detach=True)
    acts = [laftr.make_estimator("laftr", linearize="activations").fit_summary_only(
        fit_summary(TracedNet(m), tn, part), m) for m, part in ((normed, X[:100]), (normed_leaky, X[100:]))]
    assert len(acts[0].summary.site_sums) == 1  # (the LayerNorm's statistics dropped)
    with pytest.raises(laftr.UsageError, match="different networks"):
        acts[0].summary.merge(acts[1].summary)
    whole = fit_summary(TracedNet(relu), th, X)
    merged = a.merge(fit_summary(TracedNet(relu), th, X[100:]))  # (the same network: as before)
    for site, d in whole.site_sums.items():
        for k, v in d.items():
            torch.testing.assert_close(merged.site_sums[site][k], v)
