"""benchmarks/pbrf_solver.py: its comparison on a tiny problem (structure, agreement of the two solver settings,
the reference's zero difference) and its refusal to overwrite a result."""

from __future__ import annotations

import sys

import pytest
import torch
from cases import load_benchmark_script
from torch import nn


@pytest.fixture(scope="module")
def ps():
    module = load_benchmark_script("pbrf_solver")
    yield module
    sys.modules.pop(module.__name__, None)


def test_compare_two_solver_settings_on_the_same_queries(ps, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    solvers = ps.configs(rtol=1e-6, max_iter=200, damping=0.1)
    assert solvers["former"].stall_ftol == 1e-12 and solvers["former"].precondition == "none"
    assert solvers["current"].stall_ftol == 1e-11 and solvers["current"].precondition == "auto"
    res = ps.compare(model, X, Y, "classification", ("pbrf", "pbrf-weight"), solvers, [0, 1, 2],
                     {"weight": {}}, influence=ps.InfluenceConfig(damping=0.1))
    for name in ("pbrf", "pbrf-weight"):
        former, current = res[name]["former"], res[name]["current"]
        assert [q["index"] for q in current["queries"]] == [0, 1, 2]
        assert former["rel_diff_from_former"]["max"] == 0.0
        # the same minimizers: here (an untrained ReLU net, 40 examples) every exact solve stalls on a kink,
        # where the objective is flat to 1e-12 along the kink and a stalled point is determined to ~1e-4
        assert current["rel_diff_from_former"]["max"] < 1e-3
        assert current["evaluations"]["mean"] >= 1 and current["cpu_s_per_query"]["mean"] > 0
    assert res["influence"]["cpu_s_per_query"]["mean"] > 0
    rows = ps.table_rows({"methods": res})
    assert {r["solver"] for r in rows} == {"former", "current", "-"}
    with pytest.raises(ValueError, match="no PBRF solver"):
        ps.compare(model, X, Y, "classification", ("influence",), solvers, [0], {})


def test_run_refuses_to_overwrite(ps, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("{}")
    assert ps.main(["run", "--quick", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "{}"
