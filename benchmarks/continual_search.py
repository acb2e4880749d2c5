"""Validation search of continual-learning hyperparameters (lam, or any method/estimator key).

Every value is run on the benchmark's *validation* split (part of each task's training data held out;
test data is never touched), one seed (``--seeds N``: N seeds from ``--seed`` on, the validation accuracy
averaged over them), usually a shorter schedule than the final runs. Each method's grid
goes into its own folder ``<root>/<method>__<param>/results.json``; afterwards every folder under the root
is gathered into ``benchmarks/results/continual/search_<benchmark>.json`` with the best value per method.

Example::

    python benchmarks/continual_search.py --benchmark split-fmnist --methods laftr,laftr-exact \
        --grid 1,10,100,1000 --epochs 2 --threads 1

With ``--arch vit`` (an image benchmark run with a vision transformer) the grids and the summary are kept
apart from the benchmark's own network: ``search/<benchmark>-vit/`` and ``search_<benchmark>-vit.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from laftr.continual import ContinualSettings, run_benchmark
from laftr.report import run_metadata, write_json_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "continual"


def gather(benchmark: str, root: Path) -> dict:
    """Collect every finished grid under ``root`` into one summary with the best value per method."""
    out: dict = {"benchmark": benchmark, "selection": "highest final average validation accuracy",
                 "methods": {}}
    for path in sorted(root.glob("*__*/results.json")):
        if path.parent.name.startswith("."):  # a run still in progress (or interrupted): not a finished grid
            continue
        res = json.loads(path.read_text())
        method, param = path.parent.name.split("__")[:2]
        rows = []
        for name, m in res["methods"].items():
            if not m.get("summary"):
                continue
            s = m["summary"]
            spec = m["spec"]
            value = spec["lam"] if param == "lam" else spec["config"].get(param, spec.get(param))
            rows.append({"spec": name, param: value, "val_avg_acc": s["final_avg_acc"]["mean"],
                         "val_avg_acc_std": s["final_avg_acc"].get("std"), "seeds": len(res["settings"]["seeds"]),
                         "val_bwt": s["bwt"]["mean"], "time_s": s["wall_time_s"]["mean"]})
        if not rows:
            continue
        entry = out["methods"].setdefault(method, {}).setdefault(param, {"grid": [], "runs": []})
        entry["grid"] = sorted(entry["grid"] + rows, key=lambda r: (r[param] is None, r[param]))
        entry["runs"].append({"folder": path.parent.name, "protocol": res["protocol"],
                              "seeds": res["settings"]["seeds"], "command": res["metadata"]["command"],
                              "git_revision": res["metadata"]["git_revision"], "status": res.get("status")})
        best = max(entry["grid"], key=lambda r: r["val_avg_acc"])
        entry["best"], entry["best_val_avg_acc"] = best[param], best["val_avg_acc"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", required=True)
    p.add_argument("--methods", required=True, help="comma-separated base methods (no overrides)")
    p.add_argument("--grid", required=True, help="comma-separated values of --param")
    p.add_argument("--param", default="lam", help="the key searched (default lam)")
    p.add_argument("--fixed", default="", help="extra overrides for every run, e.g. 'num_samples=40'")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--num-tasks", type=int, default=None)
    p.add_argument("--arch", default=None, help="network of an image benchmark (mlp, vit; default: its own)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="schedule override (default: the benchmark's); the results go to <benchmark>-wd<W>")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1, help="how many seeds (--seed, --seed + 1, ...) each value is "
                   "run with; the validation accuracy is their mean")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default=None, help="folder of the raw grids (default results/continual/search/<bench>)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--gather-only", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the grid folders, to extend an earlier grid")
    p.add_argument("--name", default=None, help="name of the entry (default: the method), e.g. for a variant "
                   "given by --fixed; needs a single method")
    p.add_argument("--reference", action="store_true",
                   help="also run 'none' and 'joint' on the same validation protocol (folder reference/)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    seeds = [args.seed + k for k in range(args.seeds)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = (args.benchmark + (f"-{args.arch}" if args.arch else "")
           + (f"-wd{args.weight_decay:g}" if args.weight_decay is not None else ""))
    root = Path(args.root) if args.root else RESULTS / "search" / key
    command = "python benchmarks/continual_search.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.reference and not args.gather_only:
        settings = ContinualSettings(
            benchmark=args.benchmark, methods="none,joint", seeds=seeds, split="val", epochs=args.epochs,
            n_train=args.n_train, num_tasks=args.num_tasks, arch=args.arch, weight_decay=args.weight_decay,
                threads=args.threads, progress=False)
        run_benchmark(settings, root / "reference", force=args.force, command=command)
    if not args.gather_only:
        values = [v.strip() for v in args.grid.split(",") if v.strip()]
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            extra = f",{args.fixed}" if args.fixed else ""
            specs = ",".join(f"{method}[{args.param}={v}{extra}]" for v in values)
            settings = ContinualSettings(
                benchmark=args.benchmark, methods=specs, seeds=seeds, split="val", epochs=args.epochs,
                n_train=args.n_train, num_tasks=args.num_tasks, arch=args.arch, weight_decay=args.weight_decay,
                threads=args.threads,
                progress=False)
            t0 = time.perf_counter()
            folder = f"{args.name or method}__{args.param}" + (f"__{args.tag}" if args.tag else "")
            run_benchmark(settings, root / folder, force=args.force, command=command)
            print(f"search {method} {args.param}: {time.perf_counter() - t0:.0f} s", flush=True)
    summary = gather(key, root)
    ref = root / "reference" / "results.json"
    if ref.is_file():
        r = json.loads(ref.read_text())
        summary["reference"] = {n: m["summary"]["final_avg_acc"]["mean"] for n, m in r["methods"].items()
                                if m.get("summary")}
    summary["metadata"] = run_metadata(command)
    path = write_json_atomic(RESULTS / f"search_{key}.json", summary)
    for method, entry in summary["methods"].items():
        for param, e in entry.items():
            print(f"{method:18s} {param}: best {e['best']} (val acc {e['best_val_avg_acc']:.4f}); grid "
                  + ", ".join(f"{r[param]}: {r['val_avg_acc']:.4f}" for r in e["grid"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
