"""``laftr influence`` and ``laftr mislabeled``: PBRF influence with FSD estimators, mislabeled detection."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError
from ..specs import parse_value
from .common import (
    EXIT_OK,
    Subcommand,
    command_line,
    positive_int_list,
    spec_list,
    thread_count,
    user_options,
)


def _est_opts(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["laftr.num_samples=8192", "ntk.coreset_size=200"]`` -> ``{"laftr": {...}, "ntk": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not name or not field:
            raise UsageError(f"--est-opt wants ESTIMATOR.FIELD=VALUE, got {item!r}")
        out.setdefault(name, {})[field] = parse_value(raw)  # (as a method's brackets read it: True, 1e-3)
    _check_est_opts(out)
    return out


def _check_est_opts(options: dict[str, dict[str, Any]]) -> None:
    """Refuse an unknown estimator or option before the run starts (the experiment checks them again)."""
    from ..estimators import REGISTRY
    from ..estimators.base import check_options

    for key, opts in options.items():
        name = key.partition("@")[0]  # a tagged variant, pbrf-<name>@<tag>, takes its estimator's options
        if name not in REGISTRY:
            raise UsageError(f"--est-opt: unknown estimator {name!r}; known: {sorted(REGISTRY)}")
        check_options(REGISTRY[name].Config, opts, f"--est-opt: estimator {name!r}")
        if "metric" in opts:
            raise UsageError("--est-opt: the estimator's metric is the loss's Bregman "
                             "divergence; do not set it")


def _common_args(p: argparse.ArgumentParser, datasets: tuple[str, ...]) -> None:
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(datasets)}")
    p.add_argument("--methods", required=True, type=spec_list,
                   help="comma-separated: pbrf, influence, influence-exact, "
                        "pbrf-<estimator> (e.g. pbrf-laftr), with overrides of its options in "
                        "brackets (e.g. pbrf-laftr[num_samples=200,input_model=diag])")
    p.add_argument("--out", required=True, help="output folder (results.json, table.md, figures)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--quick", action="store_true", help="tiny configuration for smoke tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None,
                   help="training examples used: N drawn at random (seeded by --seed) from the split; "
                        "default: the data set's")
    p.add_argument("--hidden", type=positive_int_list, default=None, help="hidden widths, e.g. 50,50")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--damping", type=float, default=None, help="lambda of the PBRF and influence function")
    p.add_argument("--epsilon", type=float, default=None,
                   help="weight of the removed example (default 1/N); responses are "
                        "rescaled by (1/N)/epsilon")
    p.add_argument("--rtol", type=float, default=None, help="PBRF gradient tolerance (relative)")
    p.add_argument("--max-iter", type=int, default=None, help="PBRF L-BFGS iteration cap per query")
    p.add_argument("--est-opt", action="append", metavar="EST.FIELD=VALUE",
                   help="estimator option for pbrf-EST, e.g. laftr.num_samples=8192 (repeatable)")
    p.add_argument("--threads", type=thread_count, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _influence_args(p: argparse.ArgumentParser) -> None:
    from ..influence.experiment import INFLUENCE_DATASETS

    _common_args(p, INFLUENCE_DATASETS)
    p.add_argument("--n-queries", type=int, default=None, help="removed training points scored (default 50)")
    p.add_argument("--n-measure", type=int, default=20, help="test points of the measurement M (default 20)")


def _mislabeled_args(p: argparse.ArgumentParser) -> None:
    from ..influence.experiment import MISLABELED_DATASETS

    _common_args(p, MISLABELED_DATASETS)
    p.add_argument("--noise", type=float, default=0.1,
                   help="fraction of training labels flipped (default 0.1)")


def _config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "dataset": args.dataset, "methods": args.methods, "seed": args.seed, "quick": args.quick,
        "n_train": args.n_train, "hidden": None if args.hidden is None else tuple(args.hidden),
        "epochs": args.epochs, "lr": args.lr, "damping": args.damping, "epsilon": args.epsilon,
        "estimator_options": _est_opts(args.est_opt), "progress": not args.no_progress,
    }
    if args.rtol is not None:
        kw["rtol"] = args.rtol
    if args.max_iter is not None:
        kw["max_iter"] = args.max_iter
    return kw


def _run(args: argparse.Namespace, which: str) -> int:
    import torch

    from ..influence.experiment import (
        InfluenceExperimentConfig,
        MislabeledConfig,
        run_influence,
        run_mislabeled,
    )

    kw = _config_kwargs(args)
    with user_options():
        if which == "influence":
            cfg: Any = InfluenceExperimentConfig(n_queries=args.n_queries, n_measure=args.n_measure, **kw)
        else:
            cfg = MislabeledConfig(noise=args.noise, **kw)  # checked here, before the run starts
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run = run_influence if which == "influence" else run_mislabeled
    res = run(cfg, args.out, force=args.force, command=command_line(args))
    print(res["table_markdown"])
    print(f"wall time {res['wall_time_s']:.1f} s; results in {args.out}")
    return EXIT_OK


def _influence_run(args: argparse.Namespace) -> int:
    return _run(args, "influence")


def _mislabeled_run(args: argparse.Namespace) -> int:
    return _run(args, "mislabeled")


COMMANDS = (
    Subcommand("influence", "influence of removing training points: PBRF with FSD estimators vs the exact "
               "PBRF and classical influence", _influence_args, _influence_run),
    Subcommand("mislabeled", "mislabeled-example detection by self-influence", _mislabeled_args,
               _mislabeled_run),
)
