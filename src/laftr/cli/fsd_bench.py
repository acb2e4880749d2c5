"""``laftr fsd-bench``: FSD estimators scored against the exact FSD (accuracy, memory, time)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..bench.fsd import ARCHS
from ..errors import UsageError
from .common import (
    EXIT_OK,
    Subcommand,
    command_line,
    csv_list,
    int_list,
    spec_list,
    thread_count,
    user_options,
)


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None,
                   help="data set: an image classification set for mlp, mlp-gelu, cnn and vit (default "
                        "fashion-mnist), arithmetic for transformer and lstm (their default and only choice)")
    p.add_argument("--data-dir", default=None,
                   help="folder of the data set's files, when its loader needs one")
    p.add_argument("--arch", default="mlp", choices=list(ARCHS),
                   help="network "
                        "(default mlp: 784-256-256-10 ReLU; mlp-gelu: 784-512-512-10, LayerNorm + GELU; cnn: "
                        "the Split-CIFAR conv net; vit: a small vision transformer, patch 7, d_model 64, on "
                        "images such as fashion-mnist; transformer: a pre-LN decoder, d_model 128, on "
                        "--dataset arithmetic, modular addition mod 113 -> subtract / quadratic / random; "
                        "lstm: an embedding and a 2-layer LSTM 128 on the same)")
    p.add_argument("--quick", action="store_true", help="small run (under 2 minutes on 2 CPU cores)")
    p.add_argument("--out", required=True,
                   help="output folder "
                        "(results.json, table.md, scatter.png, memory.png; trajectory.png for arithmetic)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty output folder")
    p.add_argument("--methods", type=spec_list, default=None,
                   help="comma-separated method labels (default: all), e.g. "
                        "laftr,laftr-exact,kfac,subset-200, or estimator specs, e.g. "
                        "laftr[num_samples=400,input_model=diag] (labelled by the spec)")
    p.add_argument("--metrics", type=csv_list, default=None,
                   help="comma-separated metrics (default l2,l2-probs,kl)")
    p.add_argument("--coreset-sizes", type=int_list, default=None,
                   help="k of the subset/ntk baselines "
                        "(default 10,40,200,1000; the LAFTR-matched k is added)")
    p.add_argument("--n-fit", type=int, default=None,
                   help="task-A training examples (default: all; cnn 6000)")
    p.add_argument("--num-samples", type=int, default=None, help="Monte Carlo samples of LAFTR (default 64)")
    p.add_argument("--thetas", default="default", choices=["default", "near"],
                   help="the continuations of theta0: default (diverse, many far from theta0) or near "
                        "(10-100x smaller learning rates and strongly regularized runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch threads (default: torch's choice; 1 for --quick vit and transformer)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run(args: argparse.Namespace) -> int:
    from ..bench.fsd import THETA_SETS, FsdBenchConfig, run_fsd_bench

    if args.thetas != "default" and args.quick:
        raise UsageError("--thetas applies to full runs (--quick has its own small set)")
    with user_options():
        cfg = FsdBenchConfig.for_arch(
            args.arch, quick=args.quick, dataset=args.dataset, data_dir=args.data_dir, methods=args.methods,
            metrics=args.metrics, coreset_sizes=args.coreset_sizes, n_fit=args.n_fit,
            num_samples=args.num_samples, seed=args.seed, threads=args.threads, progress=not args.no_progress,
        )
        if args.thetas != "default":  # a new config: resolved and checked again
            cfg = dataclasses.replace(cfg, trajectories=THETA_SETS[args.thetas](cfg.dataset))
    res = run_fsd_bench(cfg, args.out, force=args.force, command=command_line(args))
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    figures = "scatter.png, memory.png" + (", trajectory.png" if "trajectory" in res else "")
    print(f"wrote {args.out}/results.json, table.md, {figures} in {res['timings']['total_s']:.0f} s")
    return EXIT_OK


COMMANDS = (Subcommand("fsd-bench", "score FSD estimators against the exact FSD (accuracy, memory, time)",
                       _args, _run),)
