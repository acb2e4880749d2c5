"""fsd-bench: its statistics against scipy, an end-to-end quick run, and bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from cases import mlp, perturbed

import laftr
from laftr.bench.fsd import FsdBenchConfig, Trajectory, agreement, pearson, run_fsd_bench, spearman
from laftr.cli import main
from laftr.exact import exact_fsd_and_grad
from laftr.report import OutDirError

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
        main(["fsd-bench", "--quick", "--out", str(tmp_path / "d"), "--arch", "transformer"])
    with pytest.raises(ValueError, match="disjoint"):
        FsdBenchConfig(task_a=[0, 1], task_b=[1, 2]).validate()
    with pytest.raises(ValueError, match="trajectory kind"):
        FsdBenchConfig(trajectories=[Trajectory("dance", "adam", 1e-3, [1])]).validate()
