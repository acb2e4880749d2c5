"""The PBRF solver's settings compared on the same queries (issue 10, item 3: the mislabeled benchmark's cost).

On the mislabeled benchmark's model and data (``laftr mislabeled --dataset fashion-mnist``: 1,000 training
images, 10 % of the labels flipped, MLP [64], damping 0.1, rtol 1e-6), every method answers the self-influence
of the first ``--queries`` training examples under each solver configuration, the configurations interleaved
query by query (so that the machine's load hits them alike):

- ``former``: the solver of the mislabeled run of git 2aec977 (100 curvature pairs, the noise-floor rule at
  ``stall_ftol=1e-12``, no preconditioning);
- ``current``: :class:`laftr.influence.PBRFConfig`'s defaults (``stall_ftol=1e-11``; ``pbrf-kfac`` and
  ``pbrf-weight`` preconditioned with the estimate's damped inverse Hessian).

(The comparison committed at git 2aec977, ``pbrf-solver-2aec977.json``, had as ``former`` the solver of git
719e699: 50 pairs, no noise-floor rule.) Both sides of one run use the same code, so a run isolates the
settings: code changes that are not settings (e.g. gradients computed only at accepted points) speed up both.

Per method and configuration: objective evaluations and CPU seconds per query (mean and median), the status
counts, and each query's self-influence; per method, the largest and the median relative difference of the
self-influences from ``former``'s. ``influence`` (no solver) is timed once, for the record.

    OMP_NUM_THREADS=1 python benchmarks/pbrf_solver.py run --threads 1 --queries 100 \\
        --out benchmarks/results/influence/pbrf-solver.json [--force]
    python benchmarks/pbrf_solver.py run --quick --out /tmp/pbrf-solver-quick.json   # mnist-sample, 3 queries
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from laftr.influence import (
    InfluenceConfig,
    MislabeledConfig,
    PBRFConfig,
    flip_labels,
    load_tables,
    make_method,
    resolve_estimator_options,
    train_model,
)
from laftr.report import markdown_table, run_metadata, write_json_atomic

METHODS = ("pbrf", "pbrf-laftr", "pbrf-ntk", "pbrf-kfac", "pbrf-weight")


def configs(rtol: float, max_iter: int, damping: float) -> dict[str, PBRFConfig]:
    """The compared solver settings (the first is the reference of the differences)."""
    base = PBRFConfig(damping=damping, rtol=rtol, max_iter=max_iter)
    return {"former": dataclasses.replace(base, stall_ftol=1e-12, precondition="none"), "current": base}


def _summ(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "max": max(values)}


def compare(model: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor, task: str, methods: tuple[str, ...],
            solvers: dict[str, PBRFConfig], queries: list[int], estimator_options: dict[str, Any],
            influence: InfluenceConfig | None = None) -> dict[str, Any]:
    """Answer ``queries`` with every method under every solver setting; their costs and agreement."""
    out: dict[str, Any] = {}
    for name in methods:
        if not name.startswith("pbrf"):
            raise ValueError(f"{name!r} has no PBRF solver to compare")
        meths = {}
        for key, cfg in solvers.items():
            m = make_method(name, pbrf=cfg, estimator_options=estimator_options)
            m.setup(model, (X, Y), task, None)
            meths[key] = m
        rows: dict[str, list[dict[str, Any]]] = {key: [] for key in solvers}
        for i in queries:
            for key, m in meths.items():
                r = m.query(i, measure=False, self_influence=True)
                rows[key].append({"index": i, "self_influence": r.self_influence, "cpu_s": r.cpu_seconds,
                                  "evaluations": r.stats["evaluations"], "iterations": r.stats["iterations"],
                                  "status": r.stats["status"]})
        ref = list(solvers)[0]
        rec: dict[str, Any] = {}
        for key, rs in rows.items():
            diffs = [abs(a["self_influence"] - b["self_influence"]) / abs(b["self_influence"])
                     for a, b in zip(rs, rows[ref], strict=True) if b["self_influence"] != 0]
            rec[key] = {
                "evaluations": _summ([float(r["evaluations"]) for r in rs]),
                "cpu_s_per_query": _summ([r["cpu_s"] for r in rs]),
                "status": {s: sum(r["status"] == s for r in rs) for s in sorted({r["status"] for r in rs})},
                "rel_diff_from_" + ref: _summ(diffs) if diffs else None,
                "queries": rs,
            }
        out[name] = rec
    if influence is not None:
        m = make_method("influence", influence=influence)
        m.setup(model, (X, Y), task, None)
        cpu = [m.query(i, measure=False, self_influence=True).cpu_seconds for i in queries]
        out["influence"] = {"cpu_s_per_query": _summ(cpu)}
    return out


def table_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method and setting: evaluations and CPU seconds per query, stalled solves, agreement."""
    rows = []
    for name, rec in res["methods"].items():
        for key, r in rec.items():
            if key == "cpu_s_per_query":  # influence
                rows.append({"method": name, "solver": "-", "CPU s/query": r["mean"]})
                continue
            diff = next((v for k, v in r.items() if k.startswith("rel_diff_from_")), None)
            rows.append({"method": name, "solver": key, "evaluations": r["evaluations"]["mean"],
                         "median evaluations": r["evaluations"]["median"], "CPU s/query": r["cpu_s_per_query"]["mean"],
                         "stalled": r["status"].get("stalled", 0),
                         "max rel. diff": diff["max"] if diff else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--queries", type=int, default=100)
    r.add_argument("--methods", default=",".join(METHODS))
    r.add_argument("--quick", action="store_true", help="mnist-sample, the quick mislabeled model, 3 queries")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"{args.out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(m for m in args.methods.split(",") if m)
    cfg = MislabeledConfig(dataset="mnist-sample" if args.quick else "fashion-mnist", quick=args.quick,
                           methods=list(methods))
    assert cfg.hidden is not None and cfg.epochs is not None and cfg.lr is not None and cfg.damping is not None
    ds, task = load_tables(cfg.dataset, cfg.n_train, cfg.seed)
    y, _ = flip_labels(ds.y_train, cfg.noise, int(ds.num_classes), torch.Generator().manual_seed(cfg.seed + 2))
    model = train_model(ds.x_train, y, task, cfg.hidden, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, False,
                        ds.num_classes)
    n_q = 3 if args.quick else args.queries
    solvers = configs(cfg.rtol, cfg.max_iter, cfg.damping)
    t0 = time.perf_counter()
    res = {
        "metadata": run_metadata(" ".join(["python benchmarks/pbrf_solver.py", *(argv or sys.argv[1:])]),
                                 seed=cfg.seed, device="cpu"),
        "setup": {"dataset": cfg.dataset, "n_train": int(ds.x_train.shape[0]), "hidden": list(cfg.hidden),
                  "damping": cfg.damping, "rtol": cfg.rtol, "max_iter": cfg.max_iter, "queries": n_q},
        "solvers": {k: dataclasses.asdict(v) for k, v in solvers.items()},
        "methods": compare(model, ds.x_train.double(), y, task, methods, solvers, list(range(n_q)),
                           resolve_estimator_options(cfg.estimator_options, task, list(methods)),
                           InfluenceConfig(damping=cfg.damping, cg_rtol=cfg.cg_rtol)),
    }
    res["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(args.out, res)
    print(markdown_table(table_rows(res), floatfmt=".3g"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
