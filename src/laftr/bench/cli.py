"""``laftr fsd-bench``: registered with :func:`laftr.cli.register_subcommand` on import."""

from __future__ import annotations

import argparse
import sys

from ..cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, register_subcommand
from .fsd import ARCHS


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None,
                   help="data set: an image classification set for mlp, mlp-gelu, cnn and vit (default "
                        "fashion-mnist), arithmetic for transformer (its default and only choice)")
    p.add_argument("--data-dir", default=None, help="folder of the data set's files, when its loader needs one")
    p.add_argument("--arch", default="mlp", choices=list(ARCHS),
                   help="network (default mlp: 784-256-256-10 ReLU; mlp-gelu: 784-512-512-10, LayerNorm + GELU; "
                        "cnn: the Split-CIFAR conv net; vit: a small vision transformer, patch 7, d_model 64, on "
                        "images such as fashion-mnist; transformer: a pre-LN decoder, d_model 128, on "
                        "--dataset arithmetic, modular addition mod 113 -> subtract / quadratic / random)")
    p.add_argument("--quick", action="store_true", help="small run (under 2 minutes on 2 CPU cores)")
    p.add_argument("--out", required=True,
                   help="output folder (results.json, table.md, scatter.png, memory.png; trajectory.png for arithmetic)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty output folder")
    p.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated method labels (default: all), e.g. laftr,laftr-exact,kfac,subset-200")
    p.add_argument("--metrics", type=_csv, default=None, help="comma-separated metrics (default l2,l2-probs,kl)")
    p.add_argument("--coreset-sizes", type=lambda s: [int(v) for v in _csv(s)], default=None,
                   help="k of the subset/ntk baselines (default 10,40,200,1000; the LAFTR-matched k is added)")
    p.add_argument("--n-fit", type=int, default=None, help="task-A training examples (default: all; cnn 6000)")
    p.add_argument("--num-samples", type=int, default=None, help="Monte Carlo samples of LAFTR (default 64)")
    p.add_argument("--thetas", default="default", choices=["default", "near"],
                   help="the continuations of theta0: default (diverse, many far from theta0) or near (10-100x "
                        "smaller learning rates and strongly regularized runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 for --quick vit and transformer)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run(args: argparse.Namespace) -> int:
    from ..data import DatasetNotFoundError
    from ..report import OutDirError
    from .fsd import THETA_SETS, FsdBenchConfig, run_fsd_bench

    try:
        cfg = FsdBenchConfig.for_arch(
            args.arch, quick=args.quick, dataset=args.dataset, data_dir=args.data_dir, methods=args.methods,
            metrics=args.metrics, coreset_sizes=args.coreset_sizes, n_fit=args.n_fit,
            num_samples=args.num_samples, seed=args.seed, threads=args.threads, progress=not args.no_progress,
        )
        if args.thetas != "default":
            if args.quick:
                raise ValueError("--thetas applies to full runs (--quick has its own small set)")
            cfg.trajectories = THETA_SETS[args.thetas](cfg.dataset)
        cfg.validate()
    except ValueError as e:
        print(f"laftr fsd-bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    command = "laftr " + " ".join(getattr(args, "_argv", ["fsd-bench"]))
    try:
        res = run_fsd_bench(cfg, args.out, force=args.force, command=command)
    except OutDirError as e:
        print(f"laftr fsd-bench: error: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (DatasetNotFoundError, ValueError) as e:
        print(f"laftr fsd-bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from pathlib import Path

    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    figures = "scatter.png, memory.png" + (", trajectory.png" if "trajectory" in res else "")
    print(f"wrote {args.out}/results.json, table.md, {figures} in {res['timings']['total_s']:.0f} s")
    return EXIT_OK


register_subcommand("fsd-bench", "score FSD estimators against the exact FSD (accuracy, memory, time)",
                    _add_args, _run)
