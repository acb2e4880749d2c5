"""benchmarks/influence_cost.py: its core function on a tiny synthetic problem (result structure, positive times,
the same removed examples at every N) and its refusal to overwrite a result."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from cases import load_benchmark_script

from laftr.report import write_json_atomic


@pytest.fixture(scope="module")
def ic():
    module = load_benchmark_script("influence_cost")
    yield module
    sys.modules.pop(module.__name__, None)


def test_defaults_are_the_fashion_mnist_experiments(ic):
    d = ic.experiment_defaults()
    assert d["hidden"] == (100,) and d["epochs"] == 10 and d["damping"] == 0.1 and d["n_measure"] == 20
    assert d["laftr_options"]["input_model"] == "classwise" and d["laftr_options"]["fixed_noise"] is True
    assert ic.QUICK_SIZES == (200, 400) and ic.SIZES[-1] == 60000
    with pytest.raises(ValueError, match="sizes not in sizes"):
        ic.CostConfig(sizes=(10, 20), queries_at={30: 1})


def test_measure_cost_structure_and_positive_times(ic, one_thread, tmp_path):
    g = torch.Generator().manual_seed(0)
    X, Xt = torch.rand(80, 12, generator=g), torch.rand(30, 12, generator=g)
    Y, Yt = torch.randint(0, 3, (80,), generator=g), torch.randint(0, 3, (30,), generator=g)
    laftr_opts = {"fixed_noise": True, "num_samples": 16, "input_model": "classwise", "classwise_cov": "diag"}
    cfg = ic.CostConfig(sizes=(40, 80), n_queries=2, queries_at={80: 1}, hidden=(6,), epochs=1, n_measure=5,
                        max_iter=50, laftr_options=laftr_opts)
    res = ic.measure_cost(cfg, (X, Y, Xt, Yt))
    path = write_json_atomic(tmp_path / "cost.json", res)
    res = json.loads(path.read_text())  # what the run stores
    assert [s["n_train"] for s in res["sizes"]] == [40, 80]
    assert [s["n_queries"] for s in res["sizes"]] == [2, 1]
    assert res["sizes"][1]["query_indices"] == res["sizes"][0]["query_indices"][:1]  # the same examples
    assert all(i < 40 for s in res["sizes"] for i in s["query_indices"])
    for s in res["sizes"]:
        assert set(s["methods"]) == {"pbrf", "pbrf-laftr", "influence"}
        for name, r in s["methods"].items():
            assert r["setup_s"] > 0 and r["setup_cpu_s"] >= 0
            assert len(r["query_cpu_s"]) + len(r["failures"]) == s["n_queries"]
            assert all(t > 0 for t in r["query_s"] + r["query_cpu_s"] + r["call_s"])
            if r["query_cpu_s"]:
                assert r["median_query_cpu_s"] > 0 and r["median_query_s"] > 0
            if name != "influence" and r["query_cpu_s"]:
                assert r["median_cpu_s_per_evaluation"] > 0 and min(r["evaluations"]) >= 1
        n = s["n_train"]
        assert s["methods"]["pbrf"]["stored_floats"] == s["methods"]["influence"]["stored_floats"] == n * 13
        assert 0 < s["methods"]["pbrf-laftr"]["stored_floats"]
    summary = res["summary"]
    assert set(summary["log_log_slope_query_cpu"]) == {"pbrf", "pbrf-laftr", "influence"}
    assert {"pbrf_laftr_flat", "ratio_at_largest_n_cpu", "ratio_met"} <= set(summary["targets"])
    rows = ic.table_rows(res)
    assert [r["N"] for r in rows] == [40, 80] and "pbrf-laftr / pbrf" in rows[0]
    assert ic.markdown(res).count("|") > 20


def test_run_refuses_to_overwrite(ic, tmp_path, capsys):
    out = tmp_path / "cost.json"
    out.write_text("{}")
    assert ic.main(["run", "--quick", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and out.read_text() == "{}"
