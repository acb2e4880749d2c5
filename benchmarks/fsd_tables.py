"""Compact markdown tables of committed fsd-bench runs, for docs/results.md and the README.

    python benchmarks/fsd_tables.py benchmarks/results/fsd-bench-mlp benchmarks/results/fsd-bench-cnn
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from laftr.report import markdown_table

KEY = ["weight", "diag-fisher", "kfac", "laftr-diag", "laftr-lowrank", "laftr", "laftr-exact", "laftr-exact-diag",
       "laftr-exact-mumu",
       "laftr-shared-masks", "laftr-classwise", "laftr-mixture", "laftr-mixture-diag", "laftr-relu", "laftr-coreset",
       "laftr-pool-separate",
       "laftr-pool-argmax0", "laftr-pool-sample", "liftr", "liftr-diag"]


def table(res: dict, shown: tuple[str, ...] = ("l2", "kl")) -> str:
    """Per method: memory, CPU time, and Spearman / median |log ratio| / gradient cosine for ``shown`` metrics."""
    metrics = [m for m in res["config"]["metrics"] if m in shown]
    by = {(r["method"], r["metric"]): r for r in res["methods"]}
    names = [n for n in KEY if any((n, m) in by for m in metrics)]
    names += sorted({r["method"] for r in res["methods"] if r["family"] == "coreset"},
                    key=lambda n: (n.split("-")[0], int(n.split("-")[1].split(" ")[0])))
    rows = []
    for n in names:
        first = next(by[(n, m)] for m in metrics if (n, m) in by)
        row = {"method": n, "stored floats": f"{first['stored_floats']:,}",
               "CPU ms": round(first["cpu_ms_eval_backward"], 2)}
        for m in metrics:
            r = by.get((n, m))
            row[f"{m} Spearman"] = "" if r is None else f"{r['spearman']:.3f}"
            row[f"{m} med abs log ratio"] = "" if r is None else f"{r['median_abs_log_ratio']:.2f}"
            row[f"{m} grad cos"] = "" if r is None else f"{r['median_grad_cosine']:.2f}"
        rows.append(row)
    t = res["timings"]
    md = res["metadata"]
    head = (f"**{res['dataset']}, {res['arch']}** ({res['theta0']['params']:,} parameters; {len(res['thetas'])} "
            f"thetas; exact FSD over {res['theta0']['n_fit']:,} task-A inputs). One training step (batch 128): "
            f"{t['train_step_cpu_ms']:.2f} ms CPU; exact FSD + gradient over the task-A set: "
            f"{t['exact_fsd_and_grad_cpu_ms']:.0f} ms CPU. `{md['command']}`, git `{md['git_revision'][:8]}`, "
            f"{md['device']}, {md['num_threads']} thread(s).")
    return head + "\n\n" + markdown_table(rows) + "\n"


def main() -> None:
    for d in sys.argv[1:]:
        res = json.loads((Path(d) / "results.json").read_text())
        print(table(res))


if __name__ == "__main__":
    main()
