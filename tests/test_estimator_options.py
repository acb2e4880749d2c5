"""Estimator options in combination (findings of an audit over every option of every estimator).

An option accepted and then ignored is warned of when the estimator is made, naming the option and what it
applies to; options that contradict each other, or one accepted and then failing at every evaluation, are
refused; a saved estimator still loads.
"""

from __future__ import annotations

import pytest
import torch
from cases import perturbed
from torch import nn

import laftr
from laftr.errors import UnsupportedOpError, UsageError
from laftr.specs import format_spec, parse_spec

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize(("options", "match"), [
    ({"input_model": "gaussian", "rank": 5}, "rank applies to input_model 'lowrank', not 'gaussian'"),
    ({"input_model": "diag", "coreset_size": 10}, "coreset_size applies to input_model 'coreset'"),
    ({"input_model": "gaussian", "component_cov": "diag"}, "component_cov applies to input_model 'classwise'"),
    ({"input_model": "coreset", "vocab_size": 3}, "vocab_size applies to input_model 'tokens'"),
    ({"input_model": "lowrank", "components": 3}, "components applies to input_model 'mixture' / 'tokens-mixture'"),
])
def test_options_the_input_model_does_not_read_are_warned_of(options, match):
    """Each was accepted and changed nothing, silently (the same values with and without it). Warned, not
    refused: a sweep gives every input model the same options."""
    with pytest.warns(UserWarning, match=match + r".*\(ignored\)"):
        laftr.make_estimator("laftr", **options)
    spec = parse_spec(format_spec("laftr", options))
    with pytest.warns(UserWarning, match=match):  # the method-spec form goes the same way
        laftr.make_estimator(spec.base, **spec.options)


@pytest.mark.parametrize(("options", "match"), [
    ({"input_model": "classwise", "component_cov": "diag", "classwise_cov": "full"}, "not both"),
    ({"gates": "relu", "shared_masks": True}, "no mask to share"),
])
def test_contradicting_options_are_refused(options, match):
    """``classwise_cov`` (the former name) silently won over ``component_cov``; ``shared_masks`` with theta0's
    own linearization had no effect (refused with ``gates="none"`` already)."""
    with pytest.raises(UsageError, match=match):
        laftr.make_estimator("laftr", **options)


def test_options_for_the_input_model_chosen_are_accepted_and_files_still_load(tmp_path):
    for options in ({"input_model": "lowrank", "rank": 5}, {"input_model": "mixture", "components": 3,
                                                            "component_cov": "diag"},
                    {"input_model": "classwise", "classwise_cov": "diag"}, {"gates": "relu"}):
        laftr.make_estimator("laftr", **options)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    est = laftr.make_estimator("laftr", fixed_noise=True).fit(model, torch.randn(30, 4))
    est.config.rank = 7  # an old file's irrelevant setting: read as it was written
    path = laftr.save(est, tmp_path / "a.laftr")
    assert laftr.load(path).config.rank == 7


@pytest.mark.parametrize("name", ["kfac", "diag-fisher"])
def test_label_samples_need_a_sampled_fisher(name):
    with pytest.warns(UserWarning, match="num_label_samples applies to fisher='mc'"):
        laftr.make_estimator(name, fisher="exact", num_label_samples=3)
    assert laftr.make_estimator(name, fisher="mc", num_label_samples=3).config.num_label_samples == 3


def test_liftr_refuses_linearize_activations_at_once():
    """It fitted, and every evaluation failed with a ValueError blaming another network."""
    with pytest.raises(UsageError, match="linearize must be 'all'"):
        laftr.make_estimator("liftr", linearize="activations")


def test_liftr_exact_names_itself_and_liftr_in_its_refusals():
    """The closed forms' rules word their refusals for laftr-exact: a liftr-exact user was told to use
    'laftr'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    X = torch.randn(10, 1, 6, 6)
    with pytest.raises(UnsupportedOpError, match="liftr-exact does not handle max pooling; use the Monte Carlo "
                                                 "'liftr' estimator"):
        laftr.make_estimator("liftr-exact").fit(model, X)
    with pytest.raises(UnsupportedOpError, match="laftr-exact does not handle max pooling; use the Monte Carlo "
                                                 "'laftr' estimator"):
        laftr.make_estimator("laftr-exact").fit(model, X)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(MemoryError, match="liftr-exact would track"):
        laftr.make_estimator("liftr-exact", max_state=4).fit(mlp, torch.randn(20, 4))(perturbed(mlp, 0.1))


def test_fsd_bench_spellings_and_non_boolean_progress_get_clear_errors():
    with pytest.raises(UsageError, match=r"fsd-bench's spelling of make_estimator\('subset', coreset_size=10\)"):
        laftr.make_estimator("subset-10")
    with pytest.raises(UsageError, match="progress must be True or False"):
        laftr.make_estimator("laftr", progress="yes")
