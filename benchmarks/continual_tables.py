"""Markdown tables of the committed continual-learning results (for docs/continual.md and the README).

    python benchmarks/continual_tables.py            # results tables of every benchmark folder
    python benchmarks/continual_tables.py --search   # the validation searches
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from laftr.report import markdown_table

RESULTS = Path(__file__).resolve().parent / "results" / "continual"


def results_table(path: Path) -> str:
    res = json.loads(path.read_text())
    rows = []
    for name, m in res["methods"].items():
        s = m.get("summary")
        if not s:
            continue
        floats = [f for run in s["stored_floats_per_task"] for f in run]
        acc, bwt = s["final_avg_acc"], s["bwt"]
        spec = m["spec"]
        k = {r["details"].get("coreset_size") for r in s["runs"]} - {None}
        k = k or ({spec["config"]["coreset_size"]} if "coreset_size" in spec["config"] else set())
        rows.append({
            "method": name,
            "estimator": spec["estimator"] or "",
            "avg acc (%)": f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}",
            "BWT (%)": f"{100 * bwt['mean']:+.2f} ± {100 * bwt['std']:.2f}",
            "stored floats / task": f"{sum(floats) / max(len(floats), 1):,.0f}",
            "k": ",".join(str(v) for v in sorted(k)),
            "lam": f"{spec['lam']:g}" if spec["kind"] == "fsd" else "",
            "time / seed (s)": f"{s['wall_time_s']['mean']:.0f}",
        })
    cols = ["method", "estimator", "avg acc (%)", "BWT (%)", "stored floats / task", "k", "lam", "time / seed (s)"]
    p = res["protocol"]
    head = (f"**{res['benchmark']}**: {len(res['settings']['seeds'])} seeds, {p['train']['epochs']} epochs/task, "
            f"{p['stream']['n_train'] or 'all'} training examples/task, device {res['metadata']['device']}, "
            f"git {str(res['metadata']['git_revision'])[:7]}, total {res.get('wall_time_s', 0) / 3600:.1f} h "
            f"({res.get('status')})\n\n")
    return head + markdown_table(rows, cols)


def search_table(path: Path) -> str:
    res = json.loads(path.read_text())
    rows = []
    for method, entry in res["methods"].items():
        for param, e in entry.items():
            rows.append({
                "method": method,
                "param": param,
                "grid (val avg acc %)": ", ".join(f"{r[param]:g}: {100 * r['val_avg_acc']:.2f}" for r in e["grid"]),
                "chosen": f"{e['best']:g}",
            })
    return f"**{res['benchmark']}** (validation split)\n\n" + markdown_table(
        rows, ["method", "param", "grid (val avg acc %)", "chosen"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--search", action="store_true", help="tables of the validation searches")
    args = p.parse_args(argv)
    if args.search:
        for path in sorted(RESULTS.glob("search_*.json")):
            print(search_table(path), end="\n\n")
    else:
        for path in sorted(RESULTS.glob("*/results.json")):
            print(results_table(path), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
