"""``laftr continual``: continual-learning benchmarks with FSD regularizers."""

from __future__ import annotations

import argparse

from ..continual.benchmarks import ARCHS as CONTINUAL_ARCHS
from ..errors import UsageError
from .common import EXIT_OK, Subcommand, command_line, thread_count, user_options

#: The methods run when ``--methods`` is not given (less those a benchmark cannot run).
DEFAULT_METHODS = "none,joint,ewc,kfac,ntk,subset,laftr,laftr-classwise,laftr-exact,laftr-coreset"
#: Added to the default methods on networks with attention (LIFTR was made for transformers).
TRANSFORMER_METHODS = "liftr"


def default_methods(benchmark: str, arch: str | None = None) -> str:
    """The methods run when ``--methods`` is not given.

    :data:`DEFAULT_METHODS` less those the benchmark (with network ``arch``) cannot run, plus
    :data:`TRANSFORMER_METHODS` on attention networks. An unknown benchmark or network gives
    :data:`DEFAULT_METHODS` (the settings then report the error).
    """
    from ..continual.benchmarks import BENCHMARKS

    names = DEFAULT_METHODS.split(",")
    if benchmark not in BENCHMARKS:
        return DEFAULT_METHODS
    bench = BENCHMARKS[benchmark]
    try:
        excluded, traits = bench.excluded_methods(arch), bench.traits(arch)
    except ValueError:  # an arch the benchmark does not take: the settings report it
        return DEFAULT_METHODS
    if "transformer" in traits:
        names += TRANSFORMER_METHODS.split(",")
    return ",".join(m for m in names if m not in excluded)


def _args(p: argparse.ArgumentParser) -> None:
    from ..continual.benchmarks import BENCHMARKS

    p.add_argument("--benchmark", required=True, help=f"one of {', '.join(BENCHMARKS)}")
    p.add_argument("--arch", choices=list(CONTINUAL_ARCHS), default=None,
                   help="network: mlp, conv or vit (a small vision transformer, laftr.models.vit) on an "
                        "image benchmark, transformer on the arithmetic ones; default: the benchmark's own "
                        "(the MLP; the conv net for split-cifar; the transformer for arithmetic)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods, optionally with overrides, e.g. "
                        f"'none,laftr[lam=10],subset[coreset_size=786]' "
                        f"(default: {DEFAULT_METHODS.replace(',', ', ')}; less any the benchmark cannot run, "
                        f"plus {TRANSFORMER_METHODS} on transformers)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+N-1")
    p.add_argument("--data-dir", default=None,
                   help="data files "
                        "(MNIST IDX files; a folder with cifar-10-batches-py/ and cifar-100-python/; "
                        "Fashion-MNIST defaults to /usr/share/datasets/fashion-mnist)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    p.add_argument("--out", required=True, help="output folder (results.json, table.md, heatmaps.png)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out: keep its finished (method, seed) runs, run "
                        "the rest (the settings must be the same)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="'val' evaluates on a validation split carved from the training data (for tuning)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the benchmark's)")
    p.add_argument("--n-train", type=int, default=None, help="training examples per task (default: all)")
    p.add_argument("--n-eval", type=int, default=None, help="evaluation examples per task (default: all)")
    p.add_argument("--num-tasks", type=int, default=None,
                   help="tasks of a permuted benchmark (default 10), or the first tasks of a split or "
                        "arithmetic one (default all)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="decoupled weight decay; above 0 trains with AdamW "
                        "(default: the benchmark's, 0 except arithmetic's 1.0)")
    p.add_argument("--lam", type=float, default=None, help="penalty weight for every regularized method "
                   "(default: the validation-tuned value of each)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads for the run")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run(args: argparse.Namespace) -> int:
    from ..continual import ContinualSettings, run_benchmark

    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    methods = args.methods if args.methods is not None else default_methods(args.benchmark, args.arch)
    with user_options():
        settings = ContinualSettings(
            benchmark=args.benchmark, methods=methods,
            seeds=list(range(args.first_seed, args.first_seed + args.seeds)), split=args.split,
            quick=args.quick, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            n_train=args.n_train, n_eval=args.n_eval, num_tasks=args.num_tasks, arch=args.arch,
            weight_decay=args.weight_decay, lam=args.lam, data_dir=args.data_dir, device=args.device,
            threads=args.threads, progress=not args.no_progress,
        )  # checked here, before the run starts
    res = run_benchmark(settings, args.out, force=args.force, command=command_line(args), resume=args.resume)
    print(res["table_markdown"])
    print(f"wall time {res['wall_time_s']:.0f} s; results in {args.out}/results.json, table.md, heatmaps.png")
    return EXIT_OK


COMMANDS = (Subcommand("continual",
                       "continual learning with FSD regularizers (split/permuted/arithmetic benchmarks)",
                       _args, _run),)
