"""Command-line interface: ``laftr demo``, ``laftr info FILE``, ``laftr --version``.

Subcommands live in :data:`SUBCOMMANDS`, a dict ``name -> (add_arguments, run)``: ``add_arguments(parser)``
declares the options on the subparser and ``run(args) -> int`` executes and returns the exit code. To add
one (e.g. ``fsd-bench``, ``continual``, ``influence``, ``mislabeled``), write those two functions and call
:func:`register_subcommand` (or add an entry to the dict) before :func:`main` builds the parser.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2  # bad arguments, unreadable input files

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# name -> (help text, add_arguments, run)
SUBCOMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}


def register_subcommand(name: str, help: str, add_arguments: AddArgs, run: Run) -> None:
    """Make ``laftr NAME`` available: ``add_arguments(subparser)`` then ``run(args) -> exit code``."""
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS[name] = (help, add_arguments, run)


# ---------------------------------------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="laftr-demo", help="output folder (default: laftr-demo/)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--quick", action="store_true", help="tiny run (seconds), for smoke tests")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per task (default 3; quick: 1)")
    p.add_argument("--lam", type=float, default=None, help="weight of the LAFTR penalty (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _demo_run(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .report import OutDirError

    if args.epochs is not None and args.epochs < 1:
        print("laftr demo: error: --epochs must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    command = "laftr " + " ".join(args._argv)
    try:
        res = run_demo(
            args.out,
            force=args.force,
            epochs=args.epochs,
            seed=args.seed,
            progress=not args.no_progress,
            quick=args.quick,
            lam=args.lam,
            command=command,
        )
    except OutDirError as e:
        print(f"laftr demo: error: {e}", file=sys.stderr)
        return EXIT_FAIL
    sz = res["sizes"]
    print(f"data set: {res['dataset']}  (task A = classes 0-4, task B = classes 5-9; metric {res['metric']})")
    print(res["table_markdown"])
    print(
        f"LAFTR summary: {sz['summary_stored_floats']:,} stored floats, {sz['summary_file_bytes']:,} bytes on disk "
        f"(with theta0); task A training inputs: {sz['taskA_data_floats']:,} floats"
    )
    print(f"wall time {res['timings_s']['total']:.1f} s; report in {Path(args.out) / 'report.md'}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a summary saved by laftr.save (e.g. taskA.laftr)")


def _info_run(args: argparse.Namespace) -> int:
    import dataclasses

    from . import SummaryFileError, load

    path = Path(args.file)
    try:
        est = load(path)
    except FileNotFoundError as e:
        print(f"laftr info: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SummaryFileError as e:
        print(f"laftr info: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # any other unreadable file
        print(f"laftr info: error: {path} could not be read as a laftr summary: {e}", file=sys.stderr)
        return EXIT_USAGE
    arch = est.arch or []
    n_theta = 0
    for _, shape in arch:
        k = 1
        for s in shape:
            k *= int(s)
        n_theta += k
    print(f"file:          {path} ({path.stat().st_size:,} bytes)")
    print(f"estimator:     {est.name}")
    print(f"metric:        {est.metric}")
    print(f"stored floats: {est.stored_floats():,} (beyond theta0)")
    print(f"theta0 floats: {n_theta:,}")
    print(f"outputs:       {est.outputs if est.outputs is not None else 'all'}")
    print("config:")
    for k, v in dataclasses.asdict(est.config).items():
        print(f"  {k} = {v!r}")
    summary = getattr(est, "summary", None)
    if summary is not None:  # LAFTR: what theta0 decided, per site, and the input model
        print(f"input model:   {summary.inputs.name} ({summary.num_groups} group(s), input shape "
              f"{list(summary.input_shape)})")
        print(f"sites ({len(summary.site_sums)}):")
        for site in getattr(est, "site_signature", None) or []:
            name, family = site[0], site[1]
            stats = summary.site_sums.get(name, {})
            shapes = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in stats.items())
            print(f"  {name}: {family} ({shapes or 'nothing stored'})")
    print(f"architecture ({len(arch)} parameter tensors):")
    for name, shape in arch:
        print(f"  {name}: {list(shape)}")
    return EXIT_OK


register_subcommand("demo", "continual-learning demo on split (Fashion-)MNIST", _demo_args, _demo_run)
register_subcommand("info", "describe a saved summary file", _info_args, _info_run)


# ---------------------------------------------------------------------------------------------- plug-ins
#: Modules that register further subcommands when imported (each calls :func:`register_subcommand`).
PLUGINS = ("laftr.tools", "laftr.bench.cli", "laftr.continual.cli", "laftr.influence.cli")


def _load_plugins() -> None:
    import importlib

    for name in PLUGINS:
        importlib.import_module(name)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    _load_plugins()

    parser = argparse.ArgumentParser(
        prog="laftr",
        description="Function space distance from a compact summary of the training data (LAFTR).",
    )
    parser.add_argument("--version", action="version", version=f"laftr {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``laftr`` console script; returns the exit code (argparse errors exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = argv
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return int(args._run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
