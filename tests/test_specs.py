"""The one method-spec grammar (laftr.specs) and its use by continual, influence and fsd-bench."""

from __future__ import annotations

import argparse
import re

import pytest

from laftr.errors import OptionError, UsageError
from laftr.specs import Spec, check_keys, format_spec, format_value, parse_spec, parse_value, split_specs

# ------------------------------------------------------------------ the grammar


@pytest.mark.parametrize("text, value", [
    ("None", None), ("null", None), ("NULL", None), ("true", True), ("False", False), ("10", 10),
    ("1e-3", 1e-3), ("-2.5", -2.5), ("'a,b'", "a,b"), ("[50, 50]", [50, 50]), ("(1,2)", (1, 2)),
    ("gaussian", "gaussian"), ("tokens-mixture", "tokens-mixture"), (" diag ", "diag"), ("nan", "nan"),
])
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


@pytest.mark.parametrize("base, overrides", [
    ("laftr", ()),
    ("laftr", (("lam", 10), ("num_samples", 100))),
    ("laftr", (("num_samples", 100), ("lam", 10))),  # the order given is kept
    ("subset", (("coreset_size", 786), ("selection", "balanced"))),
    ("x", (("a", None), ("b", True), ("c", 1e-3), ("d", [1, 2]), ("e", (3, 4)), ("f", "a,b"), ("g", "None"),
           ("h", " padded"), ("i", "x=y"), ("j", "[x]"), ("k", -1))),
    ("pbrf-laftr@full", (("num_samples", 8),)),
])
def test_round_trip(base, overrides):
    text = format_spec(base, overrides)
    spec = parse_spec(text)
    assert spec == Spec(base, overrides) and spec.text == text and str(spec) == text
    assert [k for k, _ in overrides] == spec.keys() and spec.options == dict(overrides)
    assert format_spec(base, dict(overrides)) == text  # a mapping gives the same text
    assert parse_spec(spec.text).text == text  # canonical: a fixed point


def test_canonical_text_and_whitespace():
    spec = parse_spec("  laftr [ num_samples = 100 , input_model = diag , ]  ")
    assert spec == Spec("laftr", (("num_samples", 100), ("input_model", "diag")))
    assert spec.text == "laftr[num_samples=100,input_model=diag]"
    assert parse_spec("laftr[]") == Spec("laftr") and Spec("laftr").text == "laftr"
    assert format_value("gaussian") == "gaussian" and format_value("None") == "'None'"
    assert format_value(None) == "none" and format_spec("laftr", {"gates": None}) == "laftr[gates=none]"
    assert format_value("true") == "'true'" and format_value(True) == "True"


def test_nested_commas():
    spec = parse_spec("m[hidden=[50,50],pair=(1,2),name='a,b',d={'k': 1}]")
    assert spec.options == {"hidden": [50, 50], "pair": (1, 2), "name": "a,b", "d": {"k": 1}}
    assert split_specs("none, laftr[lam=10,num_samples=100],subset[coreset_size=786, selection=balanced],joint,"
                       "m[h=[1,2]]") == ["none", "laftr[lam=10,num_samples=100]",
                                         "subset[coreset_size=786, selection=balanced]", "joint", "m[h=[1,2]]"]
    assert split_specs(" , a ,, ") == ["a"] and split_specs("") == []


@pytest.mark.parametrize("text, bad", [
    ("laftr[lam=1", "'[' is not closed"),
    ("laftr]", "']'"),
    ("laftr[a=1]x", "after the closing bracket"),
    ("laftr[a=[1,2]", "'[' is not closed"),
    ("laftr[a=1]]", "unexpected ']'"),
    ("laftr[a=(1,2]", "'(' is not closed"),
    ("laftr[lam]", "'lam'"),
    ("laftr[=3]", "'=3'"),
    ("laftr[a b=3]", "'a b'"),
    ("laftr[lam=]", "'lam='"),
    ("laftr[lam=1,lam=2]", "'lam' given twice"),
    ("[lam=1]", "name is empty"),
    ("laftr[name='x]", "quote"),
])
def test_every_error_names_the_bad_part(text, bad):
    with pytest.raises(UsageError) as e:
        parse_spec(text, what="method")
    msg = str(e.value)
    assert bad in msg and repr(text.strip()) in msg, msg


@pytest.mark.parametrize("text, bad", [("a[b=1", "'[' is not closed"), ("a],b", "unexpected ']'"),
                                       ("a[b=(1,2],c", "unexpected ']'")])
def test_split_specs_unbalanced(text, bad):
    with pytest.raises(UsageError, match=re.escape(bad)) as e:
        split_specs(text, what="methods")
    assert "unbalanced brackets in methods" in str(e.value) and repr(text) in str(e.value)


def test_check_keys_names_the_bad_key_and_lists_the_valid_ones():
    spec = parse_spec("laftr[num_samples=3,num_sample=10]")
    with pytest.raises(OptionError) as e:
        check_keys(spec, ["lam", "num_samples"], who="method 'laftr'")
    msg = str(e.value)
    assert "no option 'num_sample'" in msg and "valid keys: lam, num_samples" in msg and spec.text in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)
    check_keys(parse_spec("laftr[lam=1]"), ["lam"])
    with pytest.raises(OptionError, match="do not set 'metric' \\(set elsewhere\\)"):
        check_keys(parse_spec("laftr[metric=kl]"), ["metric"], reserved={"metric": "set elsewhere"})


# ------------------------------------------------------------------ its users


def test_continual_refuses_an_unknown_key_at_parse_time():
    from laftr.continual import parse_method, parse_methods

    with pytest.raises(OptionError) as e:
        parse_methods("none,laftr[num_sample=10]")
    msg = str(e.value)
    assert "'num_sample'" in msg and "num_samples" in msg and "lam" in msg and "tasks_per_step" in msg
    with pytest.raises(UsageError, match="given twice"):
        parse_method("laftr[lam=1,lam=2]")
    with pytest.raises(UsageError, match="no estimator"):
        parse_method("joint[num_samples=3]")
    assert parse_method("subset[match_memory=laftr]").match_memory == "laftr"
    with pytest.raises(UsageError, match="match_memory"):
        parse_method("subset[match_memory=kfac]")
    # nested commas reach the config intact
    assert parse_method("laftr[num_samples=8,input_model=diag]").config["num_samples"] == 8


def test_influence_pbrf_spec():
    from laftr.influence import check_method, make_method, resolve_estimator_options
    from laftr.influence.methods import parse_method_name, split_variant

    assert check_method("pbrf-laftr[num_samples=200]") == "pbrf-laftr[num_samples=200]"
    assert parse_method_name("pbrf-laftr@mix[components=3]") == ("pbrf-laftr", "mix",
                                                                  Spec("laftr@mix", (("components", 3),)))
    assert split_variant("pbrf-laftr@full") == ("pbrf-laftr", "full")
    assert split_variant("pbrf-laftr[num_samples=2]") == ("pbrf-laftr", None)
    opts = resolve_estimator_options({"laftr@mix": {"input_model": "mixture"}}, "regression",
                                     ["pbrf-laftr[num_samples=200]", "pbrf-laftr@mix[components=3]"])
    meth = make_method("pbrf-laftr[num_samples=200,input_model=diag]", estimator_options=opts)
    assert meth.name == "pbrf-laftr[num_samples=200,input_model=diag]"
    assert meth.estimator_options == {**opts["laftr"], "num_samples": 200, "input_model": "diag"}
    tagged = make_method("pbrf-laftr@mix[components=3]", estimator_options=opts)
    assert tagged.estimator_options == {**opts["laftr@mix"], "components": 3}
    assert tagged.estimator_options["input_model"] == "mixture"
    with pytest.raises(OptionError, match="no option 'num_sample'.*valid keys: .*num_samples"):
        check_method("pbrf-laftr[num_sample=3]")
    # the resolver names what is wrong: an unknown estimator, an unknown option, the reserved metric
    for user, msg in (({"lafter": {}}, "unknown estimator 'lafter'"),
                      ({"laftr": {"num_sample": 3}}, "'laftr' has no option 'num_sample'"),
                      ({"laftr": {"metric": "kl"}}, "metric is the loss's Bregman divergence")):
        with pytest.raises(ValueError, match=msg):
            resolve_estimator_options(user, "classification")
    assert resolve_estimator_options(None, "classification")["laftr"]["input_model"] == "classwise"
    with pytest.raises(OptionError, match="metric"):
        check_method("pbrf-laftr[metric=kl]")
    with pytest.raises(UsageError, match="no estimator"):
        check_method("influence[damping=3]")
    with pytest.raises(UsageError, match="unknown influence method"):
        check_method("pbrf-nonsense[a=1]")
    with pytest.raises(UsageError, match="malformed"):
        check_method("pbrf-laftr[num_samples=3")


def test_cli_spec_list():
    from laftr.cli.common import spec_list

    assert spec_list("pbrf,pbrf-laftr[num_samples=200,input_model=diag]") == [
        "pbrf", "pbrf-laftr[num_samples=200,input_model=diag]"]
    with pytest.raises(argparse.ArgumentTypeError, match="unbalanced"):
        spec_list("pbrf-laftr[num_samples=200")


def test_fsd_bench_rows_are_specs():
    from laftr.bench.fsd import ARCHS, ROW_SPECS, BenchRow, FsdBenchConfig, MethodSpec, method_specs
    from laftr.metrics import QUADRATIC_METRICS

    assert MethodSpec is BenchRow
    cfg = FsdBenchConfig.for_arch("mlp", quick=True)
    rows = {r.label: r for r in method_specs(cfg, [7])}
    S = cfg.num_samples
    # the options of the hand-built rows before the table, key order included
    assert list(rows["laftr-shared-masks"].options.items()) == [
        ("num_samples", S), ("input_model", "gaussian"), ("shared_masks", True)]
    assert rows["laftr-shared-masks"].spec == f"laftr[num_samples={S},input_model=gaussian,shared_masks=True]"
    assert rows["laftr-lowrank"].options == {"num_samples": S, "input_model": "lowrank", "rank": cfg.rank}
    assert rows["laftr-exact-mumu"].metrics == tuple(sorted(QUADRATIC_METRICS))
    assert not rows["laftr-exact"].stochastic and rows["laftr"].stochastic
    assert rows["kfac"].options == {"fisher": "mc"} and rows["weight"].spec == "weight"
    assert rows["subset-7 (=laftr memory)"].options == {"coreset_size": 7}
    assert rows["ntk-40"].family == "coreset" and rows["diag-fisher"].family == "parametric"
    for row in rows.values():
        assert BenchRow.from_spec(row.label, row.spec) == row  # the spec text is the whole row
    tok = {r.label: r for r in method_specs(FsdBenchConfig.for_arch("transformer", quick=True))}
    assert tok["laftr"].options["input_model"] == "tokens" and tok["kfac"].options["unsupported"] == "diag"
    assert list(tok["liftr"].options) == ["num_samples", "input_model", "vocab_size", "input_cov"]
    assert tok["liftr-diag"].stochastic and tok["liftr-diag"].family == "liftr"
    # every named row is in the table
    named = {label for group in ROW_SPECS.values() for label in group}
    assert {r.label for a in ARCHS for r in method_specs(FsdBenchConfig.for_arch(a))} - named <= {
        f"{m}-{k}" for m in ("subset", "ntk") for k in (10, 40, 200, 1000)}


def test_fsd_bench_methods_take_specs():
    from laftr.bench.fsd import FsdBenchConfig, _selected, method_specs

    cfg = FsdBenchConfig.for_arch("mlp", quick=True,
                                  methods=["laftr", "laftr[num_samples = 400, input_model=diag]", "laftr-exact"])
    cfg.validate()
    rows = method_specs(cfg)
    extra = rows[-1]
    assert extra.label == extra.spec == "laftr[num_samples=400,input_model=diag]" and extra.stochastic
    assert {r.label for r in rows if r.label in _selected(cfg)} == {"laftr", "laftr-exact", extra.label}
    # a named row of another network is not turned into an ad-hoc row; the config refuses it by name
    with pytest.raises(UsageError, match="'laftr-exact' has no row on --arch transformer"):
        FsdBenchConfig.for_arch("transformer", quick=True, methods=["laftr", "laftr-exact"])
    tcfg = FsdBenchConfig.for_arch("transformer", quick=True, methods=["laftr"])
    tcfg.methods = ["laftr", "laftr-exact"]  # changed in place, not validated
    assert "laftr-exact" not in {r.label for r in method_specs(tcfg)}
    with pytest.raises(UsageError, match="no row on"):
        tcfg.validate()
    # an estimator's name that is a row of another network only (liftr on an MLP): the estimator, its defaults
    # (was silently left out)
    mcfg = FsdBenchConfig.for_arch("mlp", quick=True, methods=["liftr"])
    assert [(r.label, r.spec) for r in method_specs(mcfg) if r.label in _selected(mcfg)] == [("liftr", "liftr")]
    for bad, msg in [("magic", "unknown method"), ("laftr[num_sample=3]", "no option 'num_sample'"),
                     ("laftr[seed=3]", "do not set 'seed'"), ("laftr[num_samples=3", "malformed")]:
        with pytest.raises(UsageError, match=re.escape(msg)):
            FsdBenchConfig.for_arch("mlp", quick=True, methods=[bad])
