"""``laftr demo``: the continual-learning demo on split (Fashion-)MNIST."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_OK, Subcommand, command_line, positive_int


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="laftr-demo", help="output folder (default: laftr-demo/)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--quick", action="store_true", help="tiny run (seconds), for smoke tests")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="training epochs per task (default 3; quick: 1)")
    p.add_argument("--lam", type=float, default=None, help="weight of the LAFTR penalty (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    res = run_demo(
        args.out,
        force=args.force,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.no_progress,
        quick=args.quick,
        lam=args.lam,
        command=command_line(args),
    )
    sz = res["sizes"]
    print(f"data set: {res['dataset']}  (task A = classes 0-4, task B = classes 5-9; metric {res['metric']})")
    print(res["table_markdown"])
    print(
        f"LAFTR summary: {sz['summary_stored_floats']:,} stored floats, {sz['summary_file_bytes']:,} bytes "
        f"on disk (with theta0); task A training inputs: {sz['taskA_data_floats']:,} floats"
    )
    print(f"wall time {res['timings_s']['total']:.1f} s; report in {Path(args.out) / 'report.md'}")
    return EXIT_OK


COMMANDS = (Subcommand("demo", "continual-learning demo on split (Fashion-)MNIST", _args, _run),)
