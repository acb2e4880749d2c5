"""``laftr summarize`` and ``laftr distance``: fit and use a summary for your own network from the shell.

A network is named by ``package.module:factory`` (a callable returning the module, importable from the current
folder or your environment) with ``--weights`` (a state dict saved with
``torch.save(model.state_dict(), ...)``, or a safetensors file), or by a file holding a whole pickled module
(``torch.save(model, "net.pt")``) together with ``--trust-pickle``: unpickling runs code stored in the file,
so such files are refused without it.

Data is a data set known to :func:`laftr.data.load_dataset` (``--dataset``, optionally restricted to some
``--classes``) or a ``.pt`` file holding a tensor of inputs or an ``(inputs, labels)`` pair (``--tensors``).

Both run under ``torchrun --nproc-per-node N -m laftr summarize|distance ...``: every process reads the data
and keeps its contiguous part (rank ``r`` of ``N``: examples ``r*n//N`` up to ``(r+1)*n//N``); ``summarize``
fits with the sums reduced over the processes (the summary one process fits on all the data, up to float64
rounding) and ``distance`` computes the exact FSD likewise and averages the Monte Carlo calls of every
process (each its own samples). Rank 0 alone writes the file and prints; a failure on any rank makes every
rank exit with an error.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .._util import unwritable
from ..errors import LaftrError, OutputPathError, UsageError
from .common import EXIT_OK, Subcommand, int_list, positive_int, process_group, shard
from .loading import (
    check_model_accepts,
    load_data,
    load_model,
    names_a_model_file,
    parse_options,
    read_summary,
)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="package.module:factory (a function returning the network; with --weights), or a "
                        "file holding a whole pickled module (needs --trust-pickle)")
    p.add_argument("--weights", default=None,
                   help="the network's weights: a state dict saved with torch.save(model.state_dict(), FILE) "
                        "or a safetensors file (read without unpickling code)")
    p.add_argument("--factory-weights", action="store_true",
                   help="use the weights the factory's network comes with (a factory that loads trained "
                        "weights itself); without it, --model package.module:factory needs --weights, so "
                        "that a forgotten --weights is not a silent run on random weights")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow --model FILE to be a pickled module (torch.save(model, FILE)). Unpickling "
                        "RUNS CODE stored in the file: use only for files you made or trust")
    p.add_argument("--device", default=None,
                   help="where the network runs: cpu (default), cuda or cuda:N; under torchrun, cuda gives "
                        "each process the GPU of its LOCAL_RANK and the processes talk over NCCL")


def _data_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("data" if required else "data (for the exact FSD)")
    g.add_argument("--dataset", default=None,
                   help="a data set name (fashion-mnist, mnist, mnist-sample, digits, ...)")
    g.add_argument("--data-dir", default=None,
                   help="folder of the data set's files, when its loader needs one")
    g.add_argument("--tensors", default=None,
                   help="a .pt file (torch.save) holding a tensor of inputs, an (inputs, labels) pair, or a "
                        "dict {'x': inputs, 'y': labels} (or 'inputs' / 'labels'); never unpickles code")
    g.add_argument("--classes", type=int_list, default=None, help="keep only these classes, e.g. 0,1,2,3,4")
    g.add_argument("--limit", type=positive_int, default=None, help="use at most this many examples (>= 1)")


# ---------------------------------------------------------------------------------------------- summarize
def _summarize_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _data_args(p, required=True)
    p.add_argument("--estimator", default="laftr", help="laftr (default), laftr-exact or any baseline name")
    p.add_argument("--metric", default="kl", help="l2, mse, l2-probs or kl (default kl)")
    p.add_argument("--outputs", type=int_list, default=None,
                   help="compare only these output units (a task's head), e.g. 0,1,2")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="an estimator option, e.g. input_model=diag")
    p.add_argument("--out", required=True, help="the summary file to write (e.g. task1.laftr)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _network(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The network of ``--model`` with its weights, on ``device``.

    A factory's network needs ``--weights`` or ``--factory-weights``: its own weights are usually a random
    initialization, and a summary or distance computed there is a silent wrong answer.
    """
    factory = not names_a_model_file(args.model) and ":" in args.model
    if args.weights is not None and args.factory_weights:
        raise UsageError("give --weights FILE or --factory-weights, not both")
    model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)  # names import errors first
    if factory and args.weights is None and not args.factory_weights:
        raise UsageError(f"--model {args.model} without --weights: the network would keep the weights the "
                         "factory gives it, usually a random initialization. Pass the trained weights with "
                         "--weights FILE, or --factory-weights if the factory returns the trained network")
    return model.to(device)


def _check_out_file(out: Path, force: bool) -> None:
    from ..io import is_laftr_summary

    if out.is_dir():
        raise OutputPathError(f"--out {out} is a folder; name the summary file to write, e.g. "
                              f"{out / 'task.laftr'}")
    if out.exists() and not is_laftr_summary(out):
        raise OutputPathError(f"{out} exists and is not a laftr summary: choose another --out (or remove the "
                              "file); --force replaces an earlier summary, never another file")
    if out.exists() and not force:
        raise OutputPathError(f"{out} exists (a laftr summary); pass --force to replace it")
    if not out.parent.is_dir():
        what = "is a file, not a folder" if out.parent.exists() else "does not exist"
        raise OutputPathError(f"cannot write {out}: {out.parent} {what}")
    why = unwritable(out.parent)
    if why is not None:
        raise OutputPathError(f"cannot write {out}: no file can be created in {out.parent} ({why}); choose "
                              "another --out")


def _summarize_run(args: argparse.Namespace) -> int:
    with process_group(args.device) as (rank, world, device):
        return _summarize(args, rank, world, device)


def _summarize(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    """The run on one rank of ``world`` (1: a single process): fit on this rank's shard, rank 0 writes."""
    from .. import distributed as dist_
    from .. import make_estimator, save

    out = Path(args.out)

    def prepare() -> tuple[Any, ...]:
        if rank == 0:
            _check_out_file(out, args.force)
        options = parse_options(args.set)
        for key, flag in (("metric", "--metric"), ("progress", "--no-progress"), ("outputs", "--outputs")):
            if key in options:
                raise UsageError(f"--set {key}=...: {key} is an option of the command, not of the "
                                 f"estimator; use {flag}")
        est = make_estimator(args.estimator, metric=args.metric, progress=not args.no_progress and rank == 0,
                             **options)
        model = _network(args, device)
        x, y = load_data(args.dataset, args.data_dir, args.classes, args.tensors, limit=args.limit)
        check_model_accepts(model, x, f"--model {args.model}", outputs=args.outputs)
        return est, model, x, y

    # several ranks: every rank learns whether any failed (no rank is left waiting in the fit)
    est, model, x, y = dist_.agree(prepare, "laftr summarize") if world > 1 else prepare()
    xs, ys = shard(rank, world, x, y)
    t = time.perf_counter()
    est.fit(model, xs if ys is None else (xs, ys), outputs=args.outputs)
    fit_s = time.perf_counter() - t

    def write() -> None:
        if rank == 0:
            save(est, out, overwrite=None if args.force else False)  # --force: an earlier summary only

    dist_.agree(write, "writing the summary") if world > 1 else write()
    if rank == 0:
        n_theta = sum(p.numel() for p in model.parameters())
        ranks = f" by {world} processes" if world > 1 else ""
        print(f"wrote {out} ({out.stat().st_size:,} bytes): {est.name}, metric {est.metric}, fitted on "
              f"{len(x):,} examples{ranks} in {fit_s:.1f} s")
        print(f"stored floats beyond theta0: {est.stored_floats():,} (theta0: {n_theta:,}; the data: "
              f"{x.numel():,} floats)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- distance
def _distance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("summary", help="a summary file written by laftr summarize or laftr.save")
    _model_args(p)
    _data_args(p, required=False)
    p.add_argument("--calls", type=positive_int, default=8,
                   help="estimator calls averaged (Monte Carlo; default 8)")


def _distance_run(args: argparse.Namespace) -> int:
    with process_group(args.device) as (rank, world, device):
        return _distance(args, rank, world, device)


def _distance(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    """The run on one rank of ``world``: its own Monte Carlo draws and data shard; rank 0 prints."""
    from .. import distributed as dist_
    from .. import exact_fsd

    def prepare() -> tuple[Any, ...]:
        est = read_summary(args.summary, device)
        model = _network(args, device)
        try:
            model0 = est.theta0_model(model)  # checks that the network has the summary's architecture
        except LaftrError:
            raise
        except ValueError as e:  # laftr's architecture check raises a bare ValueError naming the parameter
            raise UsageError(f"--model {args.model} does not fit {args.summary}: {e}") from e
        x = None
        unused = [flag for flag, v in (("--classes", args.classes), ("--limit", args.limit),
                                       ("--data-dir", args.data_dir)) if v is not None]
        if unused and args.dataset is None and args.tensors is None:
            raise UsageError(f"{' and '.join(unused)} choose the data of the exact FSD: give --dataset or "
                             "--tensors too")
        if args.data_dir is not None and args.tensors is not None:
            raise UsageError("--data-dir is the folder of a --dataset's files; --tensors names its own file")
        if args.dataset is not None or args.tensors is not None:
            x, _ = load_data(args.dataset, args.data_dir, args.classes, args.tensors, limit=args.limit)
            check_model_accepts(model, x, f"--model {args.model}")
        return est, model, model0, x

    est, model, model0, x = dist_.agree(prepare, "laftr distance") if world > 1 else prepare()
    vals, times = [], []
    with torch.no_grad():  # in a group, each rank draws from its own stream (laftr, liftr)
        for _ in range(args.calls):
            t = time.perf_counter()
            vals.append(float(est(model)))
            times.append(time.perf_counter() - t)
    # the median of the calls after the first, which traces the network and caches theta0's state
    per_call = statistics.median(times[1:] or times)
    if world > 1:
        vals = [v for rank_vals in dist_.all_gather_objects(vals) for v in rank_vals]
    truth = None if x is None else float(exact_fsd(model0, model, shard(rank, world, x)[0], metric=est.metric,
                                                   outputs=est.outputs))
    if rank != 0:
        return EXIT_OK
    mean = statistics.mean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    se = f" ± {sd / math.sqrt(len(vals)):.2g} (s.e. over {len(vals)} calls)" if sd > 0 else ""
    ranks = f" ({args.calls} on each of {world} processes)" if world > 1 else ""
    first = f" (the first {times[0] * 1e3:.1f} ms)" if len(times) > 1 else ""
    print(f"{est.name} estimate ({est.metric}): {mean:.6g}{se}{ranks}; "
          f"{per_call * 1e3:.1f} ms per call{first}")
    if truth is not None and x is not None:
        print(f"exact FSD over {len(x):,} examples: {truth:.6g} (estimate / exact = {mean / truth:.3g})"
              if truth > 0 else f"exact FSD over {len(x):,} examples: {truth:.6g}")
    return EXIT_OK


COMMANDS = (
    Subcommand("summarize", "fit an FSD summary of your data at your network's weights and save it",
               _summarize_args, _summarize_run),
    Subcommand("distance", "estimate the FSD from a saved summary to a network's weights",
               _distance_args, _distance_run),
)
