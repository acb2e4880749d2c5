"""Influence cost against the number of training examples N (issue 10, item 4).

For each N, an MLP is trained on the first N Fashion-MNIST training images with the protocol of
``laftr influence --dataset fashion-mnist`` (MLP 784-100-10, Adam lr 1e-3, batch 128, 10 epochs, float32, then
float64; damping 0.1; M = mean loss on 20 seeded random test images). Then, in the same run and on the same
removed training examples, three methods are timed:

- ``pbrf``: the exact PBRF. Set-up: the outputs at theta_s over the training set. Per query: an L-BFGS solve
  whose every objective evaluation is a forward and backward pass over all N training examples.
- ``pbrf-laftr``: the PBRF with LAFTR (the experiment's classification defaults: classwise diagonal Gaussians,
  1024 fixed Monte Carlo samples). Set-up: fitting the LAFTR summary (one pass over the data). Per query: the
  same solver with the LAFTR estimate in place of the data term: nothing in it depends on N.
- ``influence``: the classical influence function. Set-up: one conjugate-gradient solve
  ``(G + lam I)^{-1} grad M`` over the training set (per measurement M). Per query: one loss gradient.

The queries of the three methods are interleaved (query 1 of each, then query 2, ...), so that a change of the
machine's load hits all of them alike. Per-query times are medians of the method's own timing (CPU seconds of
this process, ``time.process_time``, and wall seconds); the PBRF's timing excludes its untimed stationarity
check, as in ``laftr influence``. Stored floats: ``est.stored_floats()`` for ``pbrf-laftr``; the N training
examples' inputs and labels for ``pbrf`` and ``influence``.

    OMP_NUM_THREADS=1 python benchmarks/influence_cost.py run --threads 1 \\
        --out benchmarks/results/influence/cost.json --queries-at 30000=5 --queries-at 60000=5 [--force]
    python benchmarks/influence_cost.py run --quick --out /tmp/cost-quick.json    # N = 200, 400; one query
    python benchmarks/influence_cost.py table benchmarks/results/influence/cost.json  # table (+ plot)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from laftr.influence import (  # with the experiment's own defaults
    CLASSIFICATION_LAFTR_OPTIONS,
    DEFAULT_ESTIMATOR_OPTIONS,
    InfluenceConfig,
    InfluenceExperimentConfig,
    Measurement,
    PBRFConfig,
    make_method,
    train_model,
)
from laftr.models import num_params
from laftr.report import markdown_table, pyplot, run_metadata, write_json_atomic

SIZES = (1000, 5000, 10000, 30000, 60000)
QUICK_SIZES = (200, 400)
METHODS = ("pbrf", "pbrf-laftr", "influence")
#: pbrf-laftr's per-query time counts as flat in N when the log-log slope of the per-N medians is within this.
FLAT_SLOPE = 0.1
#: the target ratio of pbrf-laftr's to pbrf's per-query time at the largest N.
TARGET_RATIO = 0.1


def experiment_defaults() -> dict[str, Any]:
    """The settings of ``laftr influence --dataset fashion-mnist`` (not the subset size or the query count)."""
    c = InfluenceExperimentConfig(dataset="fashion-mnist", methods=["pbrf"])
    laftr_opts = {**DEFAULT_ESTIMATOR_OPTIONS.get("laftr", {}), **CLASSIFICATION_LAFTR_OPTIONS}
    return {"hidden": tuple(c.hidden), "epochs": c.epochs, "lr": c.lr, "batch_size": c.batch_size,
            "n_measure": c.n_measure, "damping": c.damping, "rtol": c.rtol, "max_iter": c.max_iter,
            "cg_rtol": c.cg_rtol, "laftr_options": laftr_opts}


@dataclasses.dataclass
class CostConfig:
    """Options of :func:`measure_cost` (defaults: the Fashion-MNIST influence experiment's).

    Attributes:
        sizes: the training-set sizes N (the first N examples of the training split).
        n_queries: removed training examples timed per N (the same ones for every method and every N: drawn
            from the first ``min(sizes)`` examples).
        queries_at: per-N overrides of ``n_queries`` (e.g. fewer where the exact PBRF is slow).
        methods: the methods timed (names for ``laftr.influence.make_method``).
        seed: seed of the model's initialization and training order, the measurement and the queries.
        hidden, epochs, lr, batch_size: the MLP and its training.
        n_measure: test points of the measurement M.
        damping, rtol, max_iter: PBRF solver options (damping also for the influence function).
        cg_rtol: tolerance of the influence function's conjugate gradient.
        laftr_options: options of the LAFTR estimator of ``pbrf-laftr``.
    """

    sizes: tuple[int, ...] = SIZES
    n_queries: int = 8
    queries_at: dict[int, int] = dataclasses.field(default_factory=dict)
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    hidden: tuple[int, ...] = (100,)
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    n_measure: int = 20
    damping: float = 0.1
    rtol: float = 1e-7
    max_iter: int = 1000
    cg_rtol: float = 1e-8
    laftr_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the sizes and query counts."""
        self.sizes = tuple(int(n) for n in self.sizes)
        if not self.sizes or any(n < 2 for n in self.sizes) or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"sizes must be distinct integers >= 2, got {self.sizes}")
        self.queries_at = {int(k): int(v) for k, v in self.queries_at.items()}
        if self.n_queries < 1 or any(v < 1 for v in self.queries_at.values()):
            raise ValueError("every query count must be >= 1")
        if unknown := set(self.queries_at) - set(self.sizes):
            raise ValueError(f"queries_at names sizes not in sizes: {sorted(unknown)}")

    def queries(self, n: int) -> int:
        """The number of queries timed at size ``n`` (at most ``min(sizes)``, the pool they are drawn from)."""
        return min(min(self.sizes), self.queries_at.get(n, self.n_queries))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _slope(ns: list[int], ts: list[float | None]) -> float | None:
    """The least-squares slope of log(t) against log(N) (None with fewer than two points)."""
    pts = [(math.log(n), math.log(t)) for n, t in zip(ns, ts, strict=True) if t]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def measure_size(cfg: CostConfig, n: int, data: tuple[torch.Tensor, ...], progress: bool = False) -> dict[str, Any]:
    """Train on the first ``n`` examples of ``data = (X, Y, X_test, Y_test)`` and time every method there.

    The removed examples are the first ``cfg.queries(n)`` of one seeded permutation of the first
    ``min(cfg.sizes)`` training examples, so every N removes the same images (in every training set).
    """
    X_all, Y_all, X_test, Y_test = data
    if n > X_all.shape[0]:
        raise ValueError(f"N = {n} exceeds the {X_all.shape[0]} training examples")
    X, Y = X_all[:n], Y_all[:n]
    num_classes = int(Y_all.max()) + 1
    t0, c0 = time.perf_counter(), time.process_time()
    model = train_model(X, Y, "classification", cfg.hidden, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed,
                        num_classes=num_classes)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    X64 = X.double()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    test_idx = torch.randperm(X_test.shape[0], generator=gen)[: cfg.n_measure].sort().values.tolist()
    query_idx = torch.randperm(min(cfg.sizes), generator=gen)[: cfg.queries(n)].tolist()
    meas = Measurement(X_test[test_idx].double(), Y_test[test_idx], "classification")
    with torch.no_grad():
        acc = float((model(X_test.double()).argmax(1) == Y_test).double().mean())
    pcfg = PBRFConfig(damping=cfg.damping, rtol=cfg.rtol, max_iter=cfg.max_iter)
    icfg = InfluenceConfig(damping=cfg.damping, cg_rtol=cfg.cg_rtol)
    methods: dict[str, Any] = {}
    rec: dict[str, dict[str, Any]] = {}
    for name in cfg.methods:
        meth = make_method(name, pbrf=pcfg, influence=icfg, estimator_options={"laftr": cfg.laftr_options})
        t0, c0 = time.perf_counter(), time.process_time()
        meth.setup(model, (X64, Y), "classification", meas)
        setup_s, setup_cpu = time.perf_counter() - t0, time.process_time() - c0
        methods[name] = meth
        describe = meth.describe()
        rec[name] = {"setup_s": setup_s, "setup_cpu_s": setup_cpu, "stored_floats": int(meth.stored_floats()),
                     "query_s": [], "query_cpu_s": [], "call_s": [], "call_cpu_s": [], "influence": [],
                     "iterations": [], "evaluations": [], "status": [], "failures": [],
                     "setup_cg": describe.get("setup_cg"),
                     "estimator": describe.get("estimator")}
        _log(progress, f"N={n} {name}: setup {setup_cpu:.2f} CPU s ({setup_s:.2f} wall)")
    for i in query_idx:  # interleaved: query i of every method, then the next
        for name, meth in methods.items():
            r = rec[name]
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                q = meth.query(i, measure=True)
            except FloatingPointError as e:  # an estimator's PBRF without a local minimum: not timed
                r["failures"].append({"index": i, "error": str(e)})
                continue
            r["call_s"].append(time.perf_counter() - t0)
            r["call_cpu_s"].append(time.process_time() - c0)
            r["query_s"].append(q.seconds)
            r["query_cpu_s"].append(q.cpu_seconds)
            r["influence"].append(q.influence)
            for k in ("iterations", "evaluations", "status"):
                if k in q.stats:
                    r[k].append(q.stats[k])
            _log(progress, f"N={n} {name} query {i}: {q.cpu_seconds:.3f} CPU s ({q.seconds:.3f} wall)"
                 + (f", {q.stats['evaluations']} evaluations" if "evaluations" in q.stats else ""))
    for r in rec.values():
        r["median_query_cpu_s"] = _median(r["query_cpu_s"])
        r["median_query_s"] = _median(r["query_s"])
        if r["evaluations"]:  # the cost of one objective evaluation (per query: CPU seconds / evaluations)
            r["median_cpu_s_per_evaluation"] = _median([c / e for c, e in zip(r["query_cpu_s"], r["evaluations"],
                                                                               strict=True) if e])
            r["median_evaluations"] = _median([float(e) for e in r["evaluations"]])
    out: dict[str, Any] = {
        "n_train": n, "query_indices": query_idx, "n_queries": len(query_idx), "test_indices": test_idx,
        "model": {"hidden": list(cfg.hidden), "num_params": num_params(model), "test_accuracy": acc,
                  "train_s": train_s, "train_cpu_s": train_cpu},
        "methods": rec,
    }
    if "pbrf" in rec and "pbrf-laftr" in rec:
        a, b = rec["pbrf-laftr"], rec["pbrf"]
        out["pbrf_laftr_over_pbrf_cpu"] = (a["median_query_cpu_s"] / b["median_query_cpu_s"]
                                           if a["median_query_cpu_s"] and b["median_query_cpu_s"] else None)
        out["pbrf_laftr_over_pbrf_wall"] = (a["median_query_s"] / b["median_query_s"]
                                            if a["median_query_s"] and b["median_query_s"] else None)
    return out


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def measure_cost(cfg: CostConfig, data: tuple[torch.Tensor, ...], progress: bool = False) -> dict[str, Any]:
    """Time every method at every size of ``cfg`` on ``data = (X, Y, X_test, Y_test)`` (flat inputs).

    Returns the results (without run metadata): per size, per method the set-up and per-query times (CPU and
    wall), stored floats and solver statistics; and the summary the targets are judged on.
    """
    t_start = time.perf_counter()
    sizes = []
    for n in cfg.sizes:
        sizes.append(measure_size(cfg, n, data, progress))
    ns = [s["n_train"] for s in sizes]
    summary: dict[str, Any] = {"log_log_slope_query_cpu": {}, "log_log_slope_query_wall": {}}
    for name in cfg.methods:
        summary["log_log_slope_query_cpu"][name] = _slope(ns, [s["methods"][name]["median_query_cpu_s"]
                                                               for s in sizes])
        summary["log_log_slope_query_wall"][name] = _slope(ns, [s["methods"][name]["median_query_s"]
                                                                for s in sizes])
    if "pbrf" in cfg.methods and "pbrf-laftr" in cfg.methods:
        lf = [s["methods"]["pbrf-laftr"]["median_query_cpu_s"] for s in sizes]
        ok = [t for t in lf if t]
        summary["pbrf_laftr_query_cpu_max_over_min"] = max(ok) / min(ok) if ok else None
        summary["pbrf_laftr_slope_per_evaluation_cpu"] = _slope(
            ns, [s["methods"]["pbrf-laftr"].get("median_cpu_s_per_evaluation") for s in sizes])
        summary["pbrf_slope_per_evaluation_cpu"] = _slope(
            ns, [s["methods"]["pbrf"].get("median_cpu_s_per_evaluation") for s in sizes])
        last = sizes[-1]
        slope = summary["log_log_slope_query_cpu"]["pbrf-laftr"]
        summary["targets"] = {
            "flat_criterion": f"|log-log slope of pbrf-laftr's median CPU s/query against N| <= {FLAT_SLOPE}",
            "pbrf_laftr_flat": None if slope is None else abs(slope) <= FLAT_SLOPE,
            "ratio_criterion": f"pbrf-laftr / pbrf median CPU s/query at N = {last['n_train']} <= {TARGET_RATIO}",
            "ratio_at_largest_n_cpu": last.get("pbrf_laftr_over_pbrf_cpu"),
            "ratio_at_largest_n_wall": last.get("pbrf_laftr_over_pbrf_wall"),
            "ratio_met": (None if last.get("pbrf_laftr_over_pbrf_cpu") is None
                          else last["pbrf_laftr_over_pbrf_cpu"] <= TARGET_RATIO),
        }
    return {"config": dataclasses.asdict(cfg), "sizes": sizes, "summary": summary,
            "wall_time_s": time.perf_counter() - t_start}


def table_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per N: set-up and per-query CPU seconds and stored floats of each method, and the ratio."""
    rows = []
    for s in res["sizes"]:
        row: dict[str, Any] = {"N": s["n_train"], "queries": s["n_queries"]}
        for name, r in s["methods"].items():
            row[f"{name} setup s"] = r["setup_cpu_s"]
            row[f"{name} s/query"] = r["median_query_cpu_s"]
        for name, r in s["methods"].items():
            row[f"{name} floats"] = r["stored_floats"]
        row["pbrf-laftr / pbrf"] = s.get("pbrf_laftr_over_pbrf_cpu")
        row["(wall)"] = s.get("pbrf_laftr_over_pbrf_wall")
        rows.append(row)
    return rows


def evaluation_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per N, for the PBRF methods: median objective evaluations per query and CPU milliseconds per evaluation."""
    rows = []
    for s in res["sizes"]:
        row: dict[str, Any] = {"N": s["n_train"]}
        for name, r in s["methods"].items():
            if "median_cpu_s_per_evaluation" in r:
                row[f"{name} evaluations/query"] = r["median_evaluations"]
                row[f"{name} CPU ms/evaluation"] = 1e3 * r["median_cpu_s_per_evaluation"]
        rows.append(row)
    return rows


def plot(res: dict[str, Any], path: Path) -> None:
    """Per-query and set-up CPU seconds against N (log-log), one colour per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ns = [s["n_train"] for s in res["sizes"]]
    names = list(res["sizes"][0]["methods"])
    for k, name in enumerate(names):
        c = f"C{k}"
        q = [s["methods"][name]["median_query_cpu_s"] for s in res["sizes"]]
        st = [s["methods"][name]["setup_cpu_s"] for s in res["sizes"]]
        ax.plot(ns, q, "o-", c=c, label=f"{name}: per query")
        ax.plot(ns, st, "s--", c=c, alpha=0.6, label=f"{name}: set-up")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training examples N (Fashion-MNIST)")
    ax.set_ylabel("CPU seconds (1 thread)")
    ax.set_title("Influence cost against N (median over queries)", fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: dict[str, Any]) -> str:
    """The table of per-N costs (CPU seconds; the wall-time ratio in the last column)."""
    return (markdown_table(table_rows(res), floatfmt=".3g") + "\n\n"
            + markdown_table(evaluation_rows(res), floatfmt=".3g"))


def _parse_queries_at(items: list[str]) -> dict[int, int]:
    out = {}
    for item in items:
        n, eq, k = item.partition("=")
        if not eq:
            raise SystemExit(f"--queries-at takes N=K, got {item!r}")
        out[int(n)] = int(k)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run`` (measure, write the JSON and the plot) or ``table`` (print from a JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True, help="results JSON (refuses to overwrite without --force)")
    r.add_argument("--force", action="store_true")
    r.add_argument("--quick", action="store_true", help=f"N = {QUICK_SIZES}, one query (a smoke test)")
    r.add_argument("--sizes", default=None, help=f"comma-separated N (default {','.join(map(str, SIZES))})")
    r.add_argument("--queries", type=int, default=None, help="queries per N (default 8; 1 with --quick)")
    r.add_argument("--queries-at", action="append", default=[], metavar="N=K", help="K queries at size N")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    r.add_argument("--no-plot", action="store_true", help="do not write the plot (<out>.png)")
    r.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("table")
    t.add_argument("json")
    t.add_argument("--plot", default=None, help="also (re)write the plot to this PNG")
    args = ap.parse_args(argv)
    if args.cmd == "table":
        import json

        res = json.loads(Path(args.json).read_text())
        print(markdown(res))
        if args.plot:
            plot(res, Path(args.plot))
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{out} exists; pass --force to replace it", file=sys.stderr)
        return 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = (tuple(int(s) for s in args.sizes.split(",")) if args.sizes
             else QUICK_SIZES if args.quick else SIZES)
    queries = args.queries if args.queries is not None else (1 if args.quick else 8)
    command = " ".join(["python", *([sys.argv[0]] if argv is None else ["benchmarks/influence_cost.py"]),
                        *(sys.argv[1:] if argv is None else argv)])
    metadata = run_metadata(command, seed=args.seed, device="cpu")  # the revision the run started on
    d = experiment_defaults()
    cfg = CostConfig(sizes=sizes, n_queries=queries, queries_at=_parse_queries_at(args.queries_at),
                     seed=args.seed, **d)
    from laftr.data import load_fashion_mnist

    ds = load_fashion_mnist().flat()
    res = measure_cost(cfg, (ds.x_train, ds.y_train, ds.x_test, ds.y_test), progress=not args.no_progress)
    res = {"metadata": metadata, "quick": bool(args.quick),
           "data": {"name": "fashion-mnist", "train_subset": "the first N examples of the training split",
                    "n_test": int(ds.n_test)},
           "stored_floats_note": ("pbrf-laftr: est.stored_floats() (the LAFTR summary beyond theta_s); pbrf and "
                                  "influence: the N training inputs and labels (N * 785)"),
           "timing_note": ("per-query seconds are the method's own timing (QueryResult.seconds / cpu_seconds: the "
                           "solve and the response, without the PBRF's stationarity check); call_s / call_cpu_s "
                           "time the whole query() call; set-up is InfluenceMethod.setup (pbrf: outputs at "
                           "theta_s; pbrf-laftr: fitting LAFTR; influence: one CG solve for M)"),
           **res}
    write_json_atomic(out, res)
    if not args.no_plot:
        plot(res, out.with_suffix(".png"))
    print(markdown(res))
    print(res["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
