"""Findings of the influence-function audit (/tmp/audit-inf/REPORT.md), one test (or group) per finding.

Each test failed before its fix: a noisy or stale answer accepted, a raw torch or Python error, or a bad
setting accepted. Tiny float64 problems, a few seconds in all.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laftr
from laftr.cli import main
from laftr.errors import DataError, NoLocalMinimumError, UsageError
from laftr.influence import (
    DEFAULT_ESTIMATOR_OPTIONS,
    PBRF,
    ClassicalInfluence,
    ConvergenceError,
    InfluenceConfig,
    InfluenceExperimentConfig,
    Measurement,
    MislabeledConfig,
    PBRFConfig,
    make_method,
    per_example_loss,
    resolve_estimator_options,
)
from laftr.influence.experiment import _query_all

DT = torch.float64


pytestmark = pytest.mark.usefixtures("float64_one_thread")


def _reg(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    return X, (X @ torch.randn(d, 1, generator=g)).tanh() + 0.1 * torch.randn(n, 1, generator=g)


def _cls(n=40, d=3, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _mlp(d=3, h=5, k=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))


# ---------------------------------------------------------------------------------------------- finding 1
def test_pbrf_liftr_defaults_keep_one_draw_and_answer_the_same_twice():
    """``pbrf-liftr`` had no default ``fixed_noise``: one query asked three times gave three answers."""
    assert DEFAULT_ESTIMATOR_OPTIONS["liftr"]["fixed_noise"] is True
    opts = resolve_estimator_options({}, "regression", ["pbrf-liftr"])
    assert opts["liftr"]["fixed_noise"] is True
    X, Y = _reg()
    model = _mlp()
    meth = make_method("pbrf-liftr", pbrf=PBRFConfig(damping=1.0), estimator_options=opts)
    meth.setup(model, (X, Y), "regression", Measurement(*_reg(8, seed=3)))
    assert meth.query(3).influence == meth.query(3).influence


@pytest.mark.parametrize("name,options,msg", [
    ("laftr", {}, r"fixed_noise=False.*fixed_noise=True"),                  # the estimator's default
    ("liftr", {"num_samples": 8}, r"fixed_noise=False.*fixed_noise=True"),
    ("laftr", {"num_samples": 4, "sample_pool": 16}, "sample_pool=16"),      # a random subset per call
])
def test_pbrf_refuses_an_estimator_that_draws_at_every_evaluation(name, options, msg):
    X, Y = _reg()
    model = _mlp()
    est = laftr.make_estimator(name, metric="mse", **options).fit(model, (X, Y))
    with pytest.raises(UsageError, match=msg):
        PBRF(model, fsd=est, num_train=40, task="regression", damping=1.0)
    # the method refuses the same options when it is made, before any fit
    with pytest.raises(UsageError, match=msg):
        make_method(f"pbrf-{name}", estimator_options={name: options})
    # one kept draw, or an estimator that draws nothing, is accepted
    fixed = laftr.make_estimator(name, metric="mse", fixed_noise=True, num_samples=8).fit(model, (X, Y))
    PBRF(model, fsd=fixed, num_train=40, task="regression", damping=1.0)
    exact = laftr.make_estimator("laftr-exact", metric="mse").fit(model, (X, Y))
    PBRF(model, fsd=exact, num_train=40, task="regression", damping=1.0)


def test_experiment_config_refuses_fresh_draws_before_training():
    with pytest.raises(UsageError, match="fixed_noise=True"):
        InfluenceExperimentConfig(dataset="boston", methods=["pbrf-laftr[fixed_noise=false]"], quick=True)
    with pytest.raises(UsageError, match="fixed_noise=True"):
        InfluenceExperimentConfig(dataset="boston", methods=["pbrf-liftr"], quick=True,
                                  estimator_options={"liftr": {"fixed_noise": False}})
    InfluenceExperimentConfig(dataset="boston", methods=["pbrf-liftr", "pbrf-laftr"], quick=True)


def test_experiment_config_refuses_bad_option_values_before_training():
    """A bad value (not a bad name) of an estimator's option was refused when its method's turn came, after the
    network was trained and every method before it had answered its queries; refused at construction now. And
    --est-opt reads values as a method's brackets do (True was the string 'True')."""
    from laftr.cli.influence import _est_opts

    with pytest.raises(UsageError, match="num_samples must be a positive integer"):
        InfluenceExperimentConfig(dataset="boston", methods=["pbrf", "pbrf-laftr[num_samples=8.0]"], quick=True)
    with pytest.raises(UsageError, match="num_samples must be a positive integer"):
        InfluenceExperimentConfig(dataset="boston", methods=["pbrf", "pbrf-laftr"], quick=True,
                                  estimator_options={"laftr": {"num_samples": 8.5}})
    assert _est_opts(["laftr.fixed_noise=True", "laftr.num_samples=64", "kfac.chunk_size=1e3"]) == {
        "laftr": {"fixed_noise": True, "num_samples": 64}, "kfac": {"chunk_size": 1000.0}}


# ---------------------------------------------------------------------------------------------- finding 2
@pytest.mark.parametrize("damping", [0, 0.0, -1.0, True, float("nan")])
def test_pbrf_refuses_damping_that_is_not_positive(damping):
    X, Y = _reg()
    with pytest.raises(UsageError, match="damping must be"):
        PBRFConfig(damping=damping)
    with pytest.raises(UsageError, match="damping must be"):
        PBRF(_mlp(), (X, Y), damping=damping)
    with pytest.raises(UsageError, match="damping must be"):
        InfluenceExperimentConfig(dataset="boston", methods=["pbrf"], damping=damping)


def test_cli_refuses_damping_zero(tmp_path, capsys):
    argv = ["influence", "--dataset", "boston", "--methods", "pbrf,influence", "--quick", "--damping", "0",
            "--out", str(tmp_path / "x"), "--no-progress"]
    assert main(argv) == 2
    assert "damping must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unconverged_conjugate_gradient_is_an_error_not_a_log_line():
    X, Y = _reg(n=5)
    model = _mlp(h=20)  # 101 parameters, 5 examples: G is singular
    meas = Measurement(*_reg(6, seed=2))
    # damping 0: G + 0 I has no inverse; was a residual of 1e18 and influences of 1e14
    ci = ClassicalInfluence(model, (X, Y), damping=0.0)
    with pytest.raises((UsageError, ConvergenceError), match=r"damping > 0"):
        ci.set_measurement(meas)
    # too few iterations at a proper damping: a FloatingPointError, which the experiments count as failed
    ci = ClassicalInfluence(model, (X, Y), damping=1e-3, cg_max_iter=2)
    with pytest.raises(ConvergenceError, match="did not converge") as e:
        ci.self_influence(X[:1], Y[:1])
    assert isinstance(e.value, FloatingPointError)
    assert ci.last_info is not None and not ci.last_info.converged


def test_a_float32_solve_is_judged_by_what_float32_resolves():
    """float32 cannot reach the default cg_rtol 1e-8 (its residual stalls near 5e-7 here): not an error."""
    X, Y = _cls()
    model = _mlp(k=3)
    ref = ClassicalInfluence(model, (X, Y), damping=1e-3).self_influence(X[:1], Y[:1])
    ci = ClassicalInfluence(copy.deepcopy(model).float(), (X.float(), Y), damping=1e-3)
    assert ci.self_influence(X[:1].float(), Y[:1]) == pytest.approx(ref, rel=1e-4)
    assert ci.last_info is not None and ci.last_info.converged and ci.last_info.rel_residual > 1e-7


def test_damping_zero_works_where_G_is_positive_definite():
    """A linear model with more examples than parameters: G is invertible, and both solvers give G^-1 b."""
    X, Y = _reg(n=40, d=3)
    model = nn.Linear(3, 1)
    ref = ClassicalInfluence(model, (X, Y), damping=0.0, solver="exact")
    G = ref.dense_ggn()
    b = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0))
    x = torch.linalg.solve(G, b)
    torch.testing.assert_close(ref.solve(b), x, rtol=1e-10, atol=0)
    torch.testing.assert_close(ClassicalInfluence(model, (X, Y), damping=0.0, cg_rtol=1e-12).solve(b), x,
                               rtol=1e-8, atol=0)


def test_exact_solver_at_damping_zero_refuses_a_singular_G_clearly():
    """Was torch's raw ``_LinAlgError`` from Cholesky (or, where rounding let it through, garbage)."""
    X, Y = _reg(n=3)
    ci = ClassicalInfluence(_mlp(h=4), (X, Y), damping=0.0, solver="exact")
    with pytest.raises(UsageError, match=r"G is singular.*damping > 0"):
        ci.self_influence(X[:1], Y[:1])


def test_experiments_count_unconverged_solves_as_failures():
    X, Y = _reg()
    model = _mlp()
    meas = Measurement(*_reg(6, seed=2))
    setup = (model, (X, Y), "regression", meas)
    # the measurement's CG solve does not converge: every query fails (was: scored)
    cg = make_method("influence", influence=InfluenceConfig(damping=1e-3, cg_max_iter=1))
    vals, rec = _query_all(cg, "influence", setup, [0, 1], False, "influence", float("nan"), measure=True)
    assert len(rec["failures"]) == 2 and "did not converge" in rec["failures"][0]["error"]
    assert all(v != v for v in vals)  # NaN
    # self-influences: one CG solve per query
    cg = make_method("influence", influence=InfluenceConfig(damping=1e-3, cg_max_iter=1))
    vals, rec = _query_all(cg, "influence", (model, (X, Y), "regression", None), [0, 1], False,
                           "self_influence", float("inf"), measure=False, self_influence=True)
    assert len(rec["failures"]) == 2 and vals == [float("inf")] * 2
    # a PBRF solve stopped at its iteration cap is not a solution
    pb = make_method("pbrf", pbrf=PBRFConfig(damping=1e-3, max_iter=1))
    vals, rec = _query_all(pb, "pbrf", setup, [0, 1], False, "influence", float("nan"), measure=True)
    assert len(rec["failures"]) == 2 and "max_iter" in rec["failures"][0]["error"]
    # converged solves are scored
    pb = make_method("pbrf", pbrf=PBRFConfig(damping=1.0))
    vals, rec = _query_all(pb, "pbrf", setup, [0, 1], False, "influence", float("nan"), measure=True)
    assert rec["failures"] == [] and all(v == v for v in vals)


# ---------------------------------------------------------------------------------------------- finding 3
def test_pbrf_refuses_an_estimator_fitted_before_the_buffers_changed():
    X, Y = _cls()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model.train()
    model(X)
    model.eval()
    est = laftr.make_estimator("subset", metric="kl", coreset_size=40).fit(model, (X, Y))
    PBRF(model, fsd=est, num_train=40, task="classification", damping=0.5)  # fitted here: accepted
    model.train()
    model(X * 3 + 1)  # the running statistics change, the parameters do not
    model.eval()
    with pytest.raises(UsageError, match=r"other parameters.*buffer '1.running_mean'"):
        PBRF(model, fsd=est, num_train=40, task="classification", damping=0.5)


# ---------------------------------------------------------------------------------------------- finding 4
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width_give_the_int64_answer(dtype):
    X, Y = _cls()
    model = _mlp(k=3)
    Yn = Y.to(dtype)
    z = model(X)
    torch.testing.assert_close(per_example_loss(z, Yn, "classification"),
                               per_example_loss(z, Y, "classification"),
                               rtol=0, atol=0)
    assert Measurement(X[:5], Yn[:5])(model).item() == Measurement(X[:5], Y[:5])(model).item()
    pb, pb64 = PBRF(model, (X, Yn), damping=0.5), PBRF(model, (X, Y), damping=0.5)
    torch.testing.assert_close(pb.solve(X[:1], Yn[:1]).delta, pb64.solve(X[:1], Y[:1]).delta, rtol=0, atol=0)
    ci, ci64 = ClassicalInfluence(model, (X, Yn), damping=0.5), ClassicalInfluence(model, (X, Y), damping=0.5)
    assert ci.self_influence(X[:1], Yn[:1]) == ci64.self_influence(X[:1], Y[:1])


def test_bool_targets_are_refused_with_the_conversion():
    X, Y = _cls(k=2)
    model = _mlp(k=2)
    Yb = Y.bool()
    with pytest.raises(DataError, match=r"bool.*y.long\(\)"):
        per_example_loss(model(X), Yb, "classification")
    for make in (lambda: Measurement(X, Yb), lambda: PBRF(model, (X, Yb), damping=0.5),
                 lambda: ClassicalInfluence(model, (X, Yb), damping=0.5)):
        with pytest.raises(DataError, match=r"bool.*y.long\(\)"):
            make()
    with pytest.raises(DataError, match="bool"):
        PBRF(model, (X, Y), damping=0.5).solve(X[:1], Yb[:1])


# ---------------------------------------------------------------------------------------------- finding 5
def test_token_inputs_keep_their_dtype_in_every_method():
    """An nn.Embedding model: PBRF and ClassicalInfluence cast the ids to float64 (a raw torch error)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 10, (30, 2), generator=g), torch.randint(0, 3, (30,), generator=g)
    X32 = X.int()  # int32 ids too
    meas = Measurement(X[:5], Y[:5])
    assert torch.isfinite(meas(model))
    pb = PBRF(model, (X32, Y), damping=0.5)
    sol = pb.solve(X32[:1], Y[:1])
    assert sol.converged and pb.X is not None and pb.X.dtype == torch.int32
    exact = ClassicalInfluence(model, (X32, Y), damping=0.5, solver="exact")
    cg = ClassicalInfluence(model, (X, Y), damping=0.5, cg_rtol=1e-12)
    assert cg.self_influence(X[:1], Y[:1]) == pytest.approx(exact.self_influence(X32[:1], Y[:1]), rel=1e-9)
    # in the linear-response limit the PBRF's rescaled response is the first-order one
    lin = PBRF(model, (X32, Y), damping=0.5, epsilon=1e-6)
    assert lin.example_loss_change(lin.solve(X32[:1], Y[:1]), X32[:1], Y[:1]) == pytest.approx(
        exact.self_influence(X[:1], Y[:1]), rel=1e-3)


def test_integer_images_are_refused_the_same_way_by_every_method():
    """uint8 inputs of a float network: accepted (cast) by PBRF and ClassicalInfluence, a raw torch error in
    Measurement. Now one rule (floating inputs follow the model, integer inputs keep their dtype) and one
    DataError naming the dtype and the fix."""
    model = nn.Sequential(nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    Xu = torch.randint(0, 255, (30, 4), dtype=torch.uint8, generator=g)
    Y = torch.randint(0, 3, (30,), generator=g)
    for make in (lambda: PBRF(model, (Xu, Y), damping=0.5),
                 lambda: ClassicalInfluence(model, (Xu, Y), damping=0.5),
                 lambda: Measurement(Xu, Y)(model)):
        with pytest.raises(DataError, match=r"dtype uint8.*save float inputs"):
            make()
    # as floats they work, in the model's dtype
    assert PBRF(model, (Xu.float(), Y), damping=0.5).X.dtype == DT


# ---------------------------------------------------------------------------------------------- finding 6
def test_classical_influence_with_an_unused_parameter_equals_the_model_without_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp(k=3)
            self.aux = nn.Linear(5, 2)  # an auxiliary head forward does not use

        def forward(self, x):
            return self.body(x)

    net = Net()
    X, Y = _cls()
    meas = Measurement(*_cls(6, seed=4))
    with_aux = ClassicalInfluence(net, (X, Y), damping=0.5, cg_rtol=1e-12)
    alone = ClassicalInfluence(net.body, (X, Y), damping=0.5, cg_rtol=1e-12)
    assert with_aux.self_influence(X[:1], Y[:1]) == pytest.approx(alone.self_influence(X[:1], Y[:1]),
                                                                  rel=1e-9)
    with_aux.set_measurement(meas)
    alone.set_measurement(meas)
    assert with_aux.influence(X[:1], Y[:1]) == pytest.approx(alone.influence(X[:1], Y[:1]), rel=1e-9)
    assert with_aux.loss_grad(X[:1], Y[:1])[-12:].abs().max() == 0  # the head's 12 entries


# ---------------------------------------------------------------------------------------------- finding 7
def test_training_data_in_laftrs_other_forms():
    X, Y = _reg(n=20)
    model = _mlp()
    loader = DataLoader(TensorDataset(X, Y), batch_size=8)
    ref = PBRF(model, (X, Y), damping=1.0).solve(X[:1], Y[:1]).delta
    for train in (loader, [(X[:8], Y[:8]), (X[8:], Y[8:])], [{"x": X, "y": Y}]):
        delta = PBRF(model, train, damping=1.0).solve(X[:1], Y[:1]).delta
        torch.testing.assert_close(delta, ref, rtol=0, atol=0)
    ci = ClassicalInfluence(model, (X, Y), damping=1.0).self_influence(X[:1], Y[:1])
    assert ClassicalInfluence(model, loader, damping=1.0).self_influence(X[:1], Y[:1]) == ci
    # inputs without targets: a DataError naming the accepted forms (was "too many values to unpack")
    for train, msg in ((X, "no targets"), ([X, Y], "pass an \\(X, Y\\) pair as a tuple"),
                       (DataLoader(TensorDataset(X), batch_size=8), "no targets"), (42, "int")):
        for ctor in (PBRF, ClassicalInfluence):
            with pytest.raises(DataError, match=msg):
                ctor(model, train, damping=1.0)


def test_a_query_of_the_wrong_width_is_a_data_error_naming_the_shapes():
    X, Y = _reg(n=20)
    model = _mlp()
    est = laftr.make_estimator("kfac", metric="mse").fit(model, (X, Y))
    bad = torch.randn(1, 5)
    with pytest.raises(DataError, match=r"shape \(5,\).*takes inputs whose last dimension is 3"):
        PBRF(model, fsd=est, num_train=20, task="regression", damping=1.0).solve(bad, Y[:1])
    with pytest.raises(DataError, match=r"input shape \(5,\).*training inputs \(3,\)"):
        PBRF(model, (X, Y), damping=1.0).solve(bad, Y[:1])
    ci = ClassicalInfluence(model, (X, Y), damping=1.0)
    with pytest.raises(DataError, match=r"input shape \(5,\).*training inputs \(3,\)"):
        ci.self_influence(bad, Y[:1])
    with pytest.raises(DataError, match=r"shape \(5,\)"):
        ci.set_measurement(Measurement(bad, Y[:1]))


# ---------------------------------------------------------------------------------------------- finding 8
@pytest.mark.parametrize("num_train", [40.5, 1.9, True, "40", 0, -5])
def test_num_train_must_be_a_positive_integer(num_train):
    X, Y = _cls()
    model = _mlp(k=3)
    est = laftr.make_estimator("subset", metric="kl").fit(model, (X, Y))
    with pytest.raises(UsageError, match="num_train"):
        PBRF(model, fsd=est, num_train=num_train, task="classification", damping=1.0)
    with pytest.raises(UsageError, match="num_train"):
        PBRF(model, (X, Y), num_train=num_train, damping=1.0)
    assert PBRF(model, (X, Y), num_train=torch.tensor(40).item(), damping=1.0).num_train == 40


# ---------------------------------------------------------------------------------------------- finding 9
@pytest.mark.parametrize("bad,msg", [
    ({"n_train": 40.5}, "n_train"), ({"n_train": True}, "n_train"), ({"n_queries": 3.5}, "n_queries"),
    ({"n_measure": 2.5}, "n_measure"), ({"seed": 1.5}, "seed"), ({"seed": -1}, "seed"),
    ({"epochs": 2.5}, "epochs"), ({"epochs": 0}, "epochs"), ({"batch_size": 2.5}, "batch_size"),
    ({"max_iter": 10.5}, "max_iter"),
    ({"hidden": (16.5,)}, "hidden"), ({"hidden": 16}, "hidden"), ({"hidden": (True,)}, "hidden"),
    ({"damping": True}, "damping"), ({"damping": float("inf")}, "damping"), ({"lr": float("nan")}, "lr"),
    ({"quick": "no"}, "quick"), ({"progress": 1}, "progress"), ({"cg_rtol": -1}, "cg_rtol"),
    ({"cg_rtol": float("nan")}, "cg_rtol"), ({"cg_rtol": 1.0}, "cg_rtol"), ({"epsilon": True}, "epsilon"),
    ({"estimator_options": {"laftr": 3}}, "estimator_options"),
])
def test_experiment_configs_check_every_field_at_construction(bad, msg):
    for cls, kw in ((InfluenceExperimentConfig, {"dataset": "boston"}),
                    (MislabeledConfig, {"dataset": "mnist-sample"})):
        if cls is MislabeledConfig and set(bad) & {"n_queries", "n_measure"}:
            continue  # fields of the influence experiment only
        with pytest.raises(UsageError, match=msg):
            cls(methods=["influence"], **kw, **bad)


def test_methods_given_as_a_string_are_named():
    with pytest.raises(UsageError, match=r"list of method names, e.g. \['pbrf', 'influence'\], not the "):
        InfluenceExperimentConfig(dataset="boston", methods="pbrf,influence")
    with pytest.raises(UsageError, match="list of method names"):
        MislabeledConfig(dataset="mnist-sample", methods=["pbrf", 3])


def test_mislabeled_noise_must_flip_a_label():
    with pytest.raises(UsageError, match=r"flips no label of n_train=150"):
        MislabeledConfig(dataset="mnist-sample", methods=["influence"], quick=True, noise=0.001)
    ok = MislabeledConfig(dataset="mnist-sample", methods=["influence"], quick=True, noise=0.01)
    assert ok.noise == 0.01


@pytest.mark.parametrize("cls,bad,msg", [
    (PBRFConfig, {"max_iter": 2.5}, "max_iter"), (PBRFConfig, {"batch_size": 7.5}, "batch_size"),
    (PBRFConfig, {"history_size": True}, "history_size"), (PBRFConfig, {"epsilon": "1e-3"}, "epsilon"),
    (PBRFConfig, {"max_step": float("nan")}, "max_step"), (PBRFConfig, {"rtol": True}, "rtol"),
    (InfluenceConfig, {"cg_max_iter": 2.5}, "cg_max_iter"),
    (InfluenceConfig, {"batch_size": 7.5}, "batch_size"),
    (InfluenceConfig, {"damping": "1"}, "damping"), (InfluenceConfig, {"damping": True}, "damping"),
    (InfluenceConfig, {"cg_rtol": 2.0}, "cg_rtol"),
])
def test_solver_configs_check_their_types(cls, bad, msg):
    with pytest.raises(UsageError, match=msg):
        cls(**bad)


# ---------------------------------------------------------------------------------------------- finding 10
def test_cli_help_says_the_training_subset_is_random(capsys):
    with pytest.raises(SystemExit):
        main(["influence", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "first N" not in out and "N drawn at random (seeded by --seed)" in out


# ---------------------------------------------------------------------------------------------- unchanged
def test_no_local_minimum_is_still_a_floating_point_error():
    """The refusals above are UsageError/DataError; the PBRF's numerical outcome keeps its own class."""
    X, Y = _reg()
    model = nn.Linear(3, 1)
    est = laftr.make_estimator("weight", metric="mse", scale=0.01).fit(model, (X, Y))
    with pytest.raises(NoLocalMinimumError):
        PBRF(model, fsd=est, num_train=40, task="regression", damping=0.01).solve(X[:1], Y[:1])
    assert issubclass(ConvergenceError, FloatingPointError)
    assert not issubclass(ConvergenceError, laftr.LaftrError)
    assert copy.deepcopy(PBRFConfig(damping=0.5)).damping == 0.5


def test_a_model_returning_a_tuple_is_named_by_every_method():
    """A network returning ``(logits, features)`` failed inside the losses with a raw torch error."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x), x

    X, Y = _reg()
    for make in (lambda m: PBRF(m, (X, Y)), lambda m: ClassicalInfluence(m, (X, Y))):
        with pytest.raises(laftr.UsageError, match="returned a tuple of 2, not a tensor.*SelectOutput"):
            make(Pair())
