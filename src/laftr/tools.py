"""``laftr summarize`` and ``laftr distance``: fit and use a summary for your own network from the shell.

A network is named either by a file holding a whole pickled module (``torch.save(model, "net.pt")``; loading
it runs pickled code, so only load files you trust) or by ``package.module:factory`` (a callable returning the
module, importable from the current folder or your environment) with ``--weights state_dict.pt``.

Data is a data set known to :func:`laftr.data.load_dataset` (``--dataset``, optionally restricted to some
``--classes``) or a ``.pt`` file holding a tensor of inputs or an ``(inputs, labels)`` pair (``--tensors``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, register_subcommand


class InputError(ValueError):
    """A model, data or option given on the command line that cannot be used; the message says why."""


# ---------------------------------------------------------------------------------------------- loading
def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """A module from ``file.pt`` (pickled module) or ``package.module:factory`` (+ a state-dict file)."""
    path = Path(spec)
    if path.suffix in (".pt", ".pth") or path.is_file():
        if not path.is_file():
            raise InputError(f"no model file at {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise InputError(f"could not load a model from {path}: {type(e).__name__}: {e}") from e
        if isinstance(obj, dict):
            raise InputError(f"{path} holds a state dict, not a module: name the architecture as "
                             "package.module:factory and pass this file with --weights")
        model = obj
    elif ":" in spec:
        mod_name, _, attr = spec.partition(":")
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise InputError(f"cannot import {spec!r}: {e}") from e
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    else:
        raise InputError(f"model {spec!r} is neither a .pt file nor package.module:factory")
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        wpath = Path(weights)
        if not wpath.is_file():
            raise InputError(f"no weights file at {wpath}")
        state = torch.load(wpath, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise InputError(f"{wpath} does not hold a state dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"the weights in {wpath} do not fit {spec}: {e}") from e
    return model.eval()


def load_data(dataset: str | None, data_dir: str | None, classes: list[int] | None, tensors: str | None,
              split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (and labels when known) from a named data set or a ``.pt`` file of tensors.

    Inputs stored as bytes (``uint8``, e.g. images) become float; other integer inputs are token ids and stay
    integer (a transformer's embedding needs them so; use ``input_model=tokens``)."""
    if (dataset is None) == (tensors is None):
        raise InputError("give exactly one of --dataset and --tensors")
    if tensors is not None:
        path = Path(tensors)
        if not path.is_file():
            raise InputError(f"no tensor file at {path}")
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, torch.Tensor):
            x, y = obj, None
        elif isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
            x, y = obj
        else:
            raise InputError(f"{path} must hold a tensor of inputs or an (inputs, labels) pair")
    else:
        from .data import load_dataset

        ds = load_dataset(dataset, data_dir)
        x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    if y is not None and len(y) != len(x):
        raise InputError(f"{len(x)} inputs but {len(y)} labels")
    if classes is not None:
        if y is None:
            raise InputError("--classes needs labels")
        keep = torch.isin(y, torch.tensor(classes))
        if not keep.any():
            raise InputError(f"no examples of classes {classes}")
        x, y = x[keep], y[keep]
    if limit is not None:
        x, y = x[:limit], (None if y is None else y[:limit])
    if x.dtype == torch.uint8:
        x = x.float()
    return x, y


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["num_samples=64", "input_model=diag"]`` -> ``{"num_samples": 64, "input_model": "diag"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"option {item!r} is not key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="net.pt (a pickled module) or package.module:factory")
    p.add_argument("--weights", default=None, help="a state dict (.pt) to load into the model")


def _data_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("data" if required else "data (for the exact FSD)")
    g.add_argument("--dataset", default=None, help="a data set name (fashion-mnist, mnist, mnist-sample, digits, ...)")
    g.add_argument("--data-dir", default=None, help="folder of the data set's files, when its loader needs one")
    g.add_argument("--tensors", default=None, help="a .pt file holding inputs or an (inputs, labels) pair")
    g.add_argument("--classes", type=_ints, default=None, help="keep only these classes, e.g. 0,1,2,3,4")
    g.add_argument("--limit", type=int, default=None, help="use at most this many examples")


# ---------------------------------------------------------------------------------------------- summarize
def _summarize_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _data_args(p, required=True)
    p.add_argument("--estimator", default="laftr", help="laftr (default), laftr-exact or any baseline name")
    p.add_argument("--metric", default="kl", help="l2, mse, l2-probs or kl (default kl)")
    p.add_argument("--outputs", type=_ints, default=None, help="compare only these output units (a task's head)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an estimator option, e.g. input_model=diag")
    p.add_argument("--out", required=True, help="the summary file to write (e.g. task1.laftr)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _summarize_run(args: argparse.Namespace) -> int:
    from . import make_estimator, save

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"laftr summarize: error: {out} exists; pass --force to replace it", file=sys.stderr)
        return EXIT_FAIL
    try:
        model = load_model(args.model, args.weights)
        x, y = load_data(args.dataset, args.data_dir, args.classes, args.tensors, limit=args.limit)
        est = make_estimator(args.estimator, metric=args.metric, progress=not args.no_progress,
                             **parse_options(args.set))
        t = time.perf_counter()
        est.fit(model, x if y is None else (x, y), outputs=args.outputs)
        fit_s = time.perf_counter() - t
        save(est, out)
    except (InputError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"laftr summarize: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    n_theta = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({out.stat().st_size:,} bytes): {est.name}, metric {est.metric}, fitted on {len(x):,} "
          f"examples in {fit_s:.1f} s")
    print(f"stored floats beyond theta0: {est.stored_floats():,} (theta0: {n_theta:,}; the data: "
          f"{x.numel():,} floats)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- distance
def _distance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("summary", help="a summary file written by laftr summarize or laftr.save")
    _model_args(p)
    _data_args(p, required=False)
    p.add_argument("--calls", type=int, default=8, help="estimator calls averaged (Monte Carlo; default 8)")


def _distance_run(args: argparse.Namespace) -> int:
    from . import SummaryFileError, exact_fsd, load

    if args.calls < 1:
        print("laftr distance: error: --calls must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        est = load(args.summary)
        model = load_model(args.model, args.weights)
        t = time.perf_counter()
        with torch.no_grad():
            vals = [float(est(model)) for _ in range(args.calls)]
        per_call = (time.perf_counter() - t) / args.calls
        truth = None
        if args.dataset is not None or args.tensors is not None:
            x, _ = load_data(args.dataset, args.data_dir, args.classes, args.tensors, limit=args.limit)
            model0 = est.theta0_model(model)
            truth = float(exact_fsd(model0, model, x, metric=est.metric, outputs=est.outputs))
    except (InputError, SummaryFileError, ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
        print(f"laftr distance: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    mean = statistics.mean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    print(f"{est.name} estimate ({est.metric}): {mean:.6g}" + (f" ± {sd / math.sqrt(len(vals)):.2g} (s.e. over "
          f"{len(vals)} calls)" if sd > 0 else "") + f"; {per_call * 1e3:.1f} ms per call")
    if truth is not None:
        print(f"exact FSD over {len(x):,} examples: {truth:.6g} (estimate / exact = {mean / truth:.3g})"
              if truth > 0 else f"exact FSD over {len(x):,} examples: {truth:.6g}")
    return EXIT_OK


register_subcommand("summarize", "fit an FSD summary of your data at your network's weights and save it",
                    _summarize_args, _summarize_run)
register_subcommand("distance", "estimate the FSD from a saved summary to a network's weights",
                    _distance_args, _distance_run)
