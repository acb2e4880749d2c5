"""``laftr influence`` and ``laftr mislabeled``; registered with :func:`laftr.cli.register_subcommand` on import."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, register_subcommand


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _hidden(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden widths must be comma-separated integers, got {text!r}") from None
    if not out or any(h < 1 for h in out):
        raise argparse.ArgumentTypeError(f"hidden widths must be positive integers, got {text!r}")
    return out


def _est_opts(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["laftr.num_samples=8192", "ntk.coreset_size=200"]`` -> ``{"laftr": {...}, "ntk": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not name or not field:
            raise ValueError(f"--est-opt wants ESTIMATOR.FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[field] = value
    return out


def _common_args(p: argparse.ArgumentParser, datasets: tuple[str, ...]) -> None:
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(datasets)}")
    p.add_argument("--methods", required=True, type=_csv,
                   help="comma-separated: pbrf, influence, influence-exact, pbrf-<estimator> (e.g. pbrf-laftr)")
    p.add_argument("--out", required=True, help="output folder (results.json, table.md, figures)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--quick", action="store_true", help="tiny configuration for smoke tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None, help="training examples used (first N of the split)")
    p.add_argument("--hidden", type=_hidden, default=None, help="hidden widths, e.g. 50,50")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--damping", type=float, default=None, help="lambda of the PBRF and influence function")
    p.add_argument("--epsilon", type=float, default=None,
                   help="weight of the removed example (default 1/N); responses are rescaled by (1/N)/epsilon")
    p.add_argument("--rtol", type=float, default=None, help="PBRF gradient tolerance (relative)")
    p.add_argument("--max-iter", type=int, default=None, help="PBRF L-BFGS iteration cap per query")
    p.add_argument("--est-opt", action="append", metavar="EST.FIELD=VALUE",
                   help="estimator option for pbrf-EST, e.g. laftr.num_samples=8192 (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _influence_args(p: argparse.ArgumentParser) -> None:
    from .experiment import INFLUENCE_DATASETS

    _common_args(p, INFLUENCE_DATASETS)
    p.add_argument("--n-queries", type=int, default=None, help="removed training points scored (default 50)")
    p.add_argument("--n-measure", type=int, default=20, help="test points of the measurement M (default 20)")


def _mislabeled_args(p: argparse.ArgumentParser) -> None:
    from .experiment import MISLABELED_DATASETS

    _common_args(p, MISLABELED_DATASETS)
    p.add_argument("--noise", type=float, default=0.1, help="fraction of training labels flipped (default 0.1)")


def _config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "dataset": args.dataset, "methods": args.methods, "seed": args.seed, "quick": args.quick,
        "n_train": args.n_train, "hidden": args.hidden, "epochs": args.epochs, "lr": args.lr,
        "damping": args.damping, "epsilon": args.epsilon, "estimator_options": _est_opts(args.est_opt),
        "progress": not args.no_progress,
    }
    if args.rtol is not None:
        kw["rtol"] = args.rtol
    if args.max_iter is not None:
        kw["max_iter"] = args.max_iter
    return kw


def _run(args: argparse.Namespace, which: str) -> int:
    import torch

    from ..report import OutDirError
    from .experiment import InfluenceExperimentConfig, MislabeledConfig, run_influence, run_mislabeled

    prog = f"laftr {which}"
    if args.threads is not None:
        if args.threads < 1:
            print(f"{prog}: error: --threads must be >= 1", file=sys.stderr)
            return EXIT_USAGE
        torch.set_num_threads(args.threads)
    command = "laftr " + " ".join(getattr(args, "_argv", []))
    try:
        kw = _config_kwargs(args)
        if which == "influence":
            cfg: Any = InfluenceExperimentConfig(n_queries=args.n_queries, n_measure=args.n_measure, **kw)
            cfg.resolved()
        else:
            cfg = MislabeledConfig(noise=args.noise, **kw)
            cfg.resolved()
    except (ValueError, TypeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if which == "influence":
            res = run_influence(cfg, args.out, force=args.force, command=command)
        else:
            res = run_mislabeled(cfg, args.out, force=args.force, command=command)
    except OutDirError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(res["table_markdown"])
    print(f"wall time {res['wall_time_s']:.1f} s; results in {args.out}")
    return EXIT_OK


def _influence_run(args: argparse.Namespace) -> int:
    return _run(args, "influence")


def _mislabeled_run(args: argparse.Namespace) -> int:
    return _run(args, "mislabeled")


register_subcommand("influence", "influence of removing training points: PBRF with FSD estimators vs the exact "
                    "PBRF and classical influence", _influence_args, _influence_run)
register_subcommand("mislabeled", "mislabeled-example detection by self-influence", _mislabeled_args,
                    _mislabeled_run)
