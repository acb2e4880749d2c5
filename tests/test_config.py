"""The one config base: every experiment config is resolved and validated when it is constructed."""

from __future__ import annotations

import dataclasses

import pytest

import laftr
from laftr.bench.fsd import FsdBenchConfig, Trajectory
from laftr.config import ExperimentConfig
from laftr.continual import ContinualSettings, run_benchmark
from laftr.continual.runner import resolve_settings
from laftr.errors import UsageError
from laftr.influence import (
    InfluenceBaseConfig,
    InfluenceExperimentConfig,
    MislabeledConfig,
    run_influence,
    run_mislabeled,
)


@dataclasses.dataclass
class Toy(ExperimentConfig):
    size: str = "small"
    width: int | None = None
    depth: int = 2

    def _resolve(self):
        self._fill({"width": 8 if self.size == "small" else 64})

    def _validate(self):
        if self.depth < 1:
            raise UsageError(f"depth must be >= 1, got {self.depth}")


def test_the_base_resolves_then_validates():
    assert laftr.ExperimentConfig is ExperimentConfig
    assert Toy().width == 8 and Toy(size="large").width == 64 and Toy(width=3).width == 3
    with pytest.raises(UsageError, match="depth must be >= 1, got 0"):
        Toy(depth=0)
    cfg = Toy()
    assert dataclasses.replace(cfg, size="large").width == 8  # filled fields are kept: a given value
    with pytest.raises(UsageError, match="depth"):
        dataclasses.replace(cfg, depth=-1)
    cfg.depth = 0  # a change in place is checked by validate()
    with pytest.raises(UsageError, match="depth"):
        cfg.validate()


def test_every_experiment_config_derives_from_the_base():
    for cls in (FsdBenchConfig, ContinualSettings, InfluenceExperimentConfig, MislabeledConfig):
        assert issubclass(cls, ExperimentConfig) and dataclasses.is_dataclass(cls), cls


def test_influence_configs_raise_at_construction():
    with pytest.raises(UsageError, match="unknown influence method 'magic'"):
        InfluenceExperimentConfig(dataset="boston", methods=["pbrf", "magic"])
    with pytest.raises(UsageError, match="unknown data set"):
        InfluenceExperimentConfig(dataset="cifar-10", methods=["pbrf"])
    with pytest.raises(UsageError, match="give at least one method"):
        InfluenceExperimentConfig(dataset="boston", methods=[])
    with pytest.raises(UsageError, match="damping must be >= 0"):
        InfluenceExperimentConfig(dataset="boston", methods=["pbrf"], damping=-1.0)
    with pytest.raises(UsageError, match="n_measure must be >= 1 and n_queries >= 2"):
        InfluenceExperimentConfig(dataset="boston", methods=["pbrf"], n_queries=1)
    with pytest.raises(UsageError, match="hidden widths must be positive"):
        MislabeledConfig(dataset="mnist-sample", methods=["pbrf"], hidden=(0,))
    with pytest.raises(UsageError, match="classification"):
        MislabeledConfig(dataset="boston", methods=["pbrf"])
    with pytest.raises(UsageError, match="noise"):
        MislabeledConfig(dataset="mnist-sample", methods=["pbrf"], noise=0.0)
    with pytest.raises(TypeError):  # keyword-only
        InfluenceExperimentConfig("boston", ["pbrf"])


def test_influence_configs_are_complete_once_constructed():
    cfg = InfluenceExperimentConfig(dataset="boston", methods=["influence", "influence"], quick=True)
    assert cfg.methods == ["pbrf", "influence"]  # the reference first, repeats dropped
    assert (cfg.n_train, cfg.hidden, cfg.epochs, cfg.lr, cfg.n_queries, cfg.damping) == (120, (16, 16), 200, 3e-3,
                                                                                         8, 1.0)
    full = InfluenceExperimentConfig(dataset="fashion-mnist", methods=["pbrf"])
    assert (full.n_train, full.hidden, full.epochs, full.lr, full.n_queries, full.damping) == (10000, (100,), 10,
                                                                                               1e-3, 50, 0.1)
    assert InfluenceExperimentConfig(dataset="boston", methods=["pbrf"], hidden=(7,)).hidden == (7,)
    mis = MislabeledConfig(dataset="mnist-sample", methods=["pbrf-weight"], quick=True)
    assert mis.methods == ["pbrf-weight"]  # no reference added
    assert (mis.n_train, mis.hidden, mis.epochs, mis.lr, mis.damping) == (150, (16,), 30, 1e-3, 0.1)
    # the shared fields are declared once; mislabeled detection has its own defaults for four of them
    shared = {f.name for f in dataclasses.fields(InfluenceBaseConfig)}
    assert shared <= {f.name for f in dataclasses.fields(mis)} and shared <= {f.name for f in dataclasses.fields(cfg)}
    assert (cfg.batch_size, cfg.rtol, cfg.max_iter, cfg.cg_rtol) == (128, 1e-7, 1000, 1e-8)
    assert (mis.batch_size, mis.rtol, mis.max_iter, mis.cg_rtol) == (64, 1e-6, 500, 1e-6)
    # resolved() is kept for older code: an equal copy
    again = cfg.resolved()
    assert again == cfg and again is not cfg and type(again) is InfluenceExperimentConfig


@pytest.mark.parametrize("field, value, msg", [("epsilon", 0.0, "epsilon must be"), ("epsilon", -1.0, "epsilon"),
                                                ("rtol", -1.0, "rtol must be"), ("max_iter", 0, "max_iter")])
def test_influence_configs_check_the_solver_settings_at_construction(field, value, msg):
    # were found by the PBRF solver after the network was trained (a traceback from the command line)
    for cls, kw in ((InfluenceExperimentConfig, {"dataset": "diabetes"}), (MislabeledConfig, {"dataset": "mnist-sample"})):
        with pytest.raises(UsageError, match=msg):
            cls(methods=["pbrf"], quick=True, **kw, **{field: value})


def test_runs_check_a_config_changed_in_place(tmp_path):
    cfg = InfluenceExperimentConfig(dataset="diabetes", methods=["pbrf"], quick=True)
    cfg.damping = -1.0
    with pytest.raises(UsageError, match="damping"):
        run_influence(cfg, tmp_path / "a")
    mis = MislabeledConfig(dataset="mnist-sample", methods=["pbrf"], quick=True)
    mis.methods = ["magic"]
    with pytest.raises(UsageError, match="unknown influence method"):
        run_mislabeled(mis, tmp_path / "b")
    settings = ContinualSettings("split-fmnist", "none", [0])
    settings.methods = "none,foo"
    with pytest.raises(UsageError, match="unknown method"):
        run_benchmark(settings, tmp_path / "c")
    assert not any(tmp_path.iterdir())  # refused before touching the disk


def test_fsd_bench_config_resolves_and_validates():
    cfg = FsdBenchConfig(dataset="arithmetic", arch="transformer")
    assert cfg.task_a == [] and cfg.task_b == [] and (cfg.d_model, cfg.heads, cfg.blocks, cfg.d_mlp) == (128, 4, 2, 512)
    assert FsdBenchConfig().task_a == [0, 1, 2, 3, 4] and FsdBenchConfig().d_model is None
    assert FsdBenchConfig.for_arch("transformer", quick=True).d_model == 32  # for_arch: a network's defaults
    with pytest.raises(UsageError, match="unknown arch"):
        FsdBenchConfig.for_arch("rnn")
    with pytest.raises(UsageError, match="unknown arch"):
        FsdBenchConfig(arch="rnn")
    with pytest.raises(UsageError, match="--dataset arithmetic"):
        FsdBenchConfig(arch="transformer")
    with pytest.raises(UsageError, match="unknown method"):
        FsdBenchConfig(methods=["magic"])
    cfg = FsdBenchConfig.for_arch("mlp", quick=True)
    with pytest.raises(UsageError, match="trajectory kind"):
        dataclasses.replace(cfg, trajectories=[Trajectory("dance", "adam", 1e-3, [1])])


@pytest.mark.parametrize("kwargs, msg", [
    # a method the run would have silently left out of every table
    ({"methods": ["laftr-exact"], "metrics": ["kl"]}, "'laftr-exact' .*supports the metrics l2, mse only"),
    ({"arch": "transformer", "dataset": "arithmetic", "methods": ["laftr-exact"]},
     "'laftr-exact' has no row on --arch transformer"),
    # a bad option value named before theta0 is trained (was found after the run folder was opened)
    ({"methods": ["laftr[gates=bogus]"]}, "method 'laftr\\[gates=bogus\\]': unknown gates 'bogus'"),
    ({"methods": ["laftr[num_samples=0]"]}, "num_samples must be a positive integer"),
    ({"threads": 0}, "threads must be a positive integer"),
])
def test_fsd_bench_config_refuses_methods_it_would_drop_or_fail_late(kwargs, msg):
    with pytest.raises(UsageError, match=msg):
        kw = dict(kwargs)
        FsdBenchConfig.for_arch(kw.pop("arch", "mlp"), quick=True, **kw)
    ok = FsdBenchConfig.for_arch("mlp", quick=True, methods=["laftr-exact"], metrics=["kl", "l2"])
    assert ok.methods == ["laftr-exact"]


def test_continual_settings_resolve_the_run_at_construction():
    with pytest.raises(UsageError, match="unknown method"):
        ContinualSettings("split-fmnist", "none,foo", [0])
    with pytest.raises(UsageError, match="not available"):
        ContinualSettings("arithmetic", "laftr-exact", [0])
    settings = ContinualSettings("split-fmnist", "none,laftr", [0], quick=True)
    bench, stream_kw, train, methods, reference = resolve_settings(settings)  # the old entry point
    assert [m.name for m in methods] == ["none", "laftr"] and reference.name == "laftr"
    assert bench.name == "split-fmnist" and train.epochs >= 1 and "n_train" in stream_kw
    # what is recorded: the fields as given (None: the benchmark's protocol), nothing resolved added
    assert set(dataclasses.asdict(settings)) == {f.name for f in dataclasses.fields(ContinualSettings)}
    assert settings.epochs is None


def test_fsd_bench_sizes_beyond_the_data_are_refused_before_any_file(tmp_path):
    # were recorded as given while the run used all the data (subset-100000000 stored 1,500 inputs)
    from laftr.bench.fsd import run_fsd_bench

    for kw, msg in (({"methods": ["subset-100000000"]}, r"coreset size\(s\) \[100000000\] but task A has"),
                    ({"methods": ["ntk-5000"]}, r"coreset size\(s\) \[5000\] but task A has 721")):
        cfg = FsdBenchConfig.for_arch("mlp", quick=True, dataset="digits", progress=False, **kw)
        with pytest.raises(UsageError, match=msg):
            run_fsd_bench(cfg, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
