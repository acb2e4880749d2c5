"""``laftr info FILE``: what a saved summary file holds."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from .common import EXIT_OK, Subcommand
from .loading import read_summary


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a summary saved by laftr.save or laftr summarize (e.g. taskA.laftr)")


def _run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    est = read_summary(path)
    arch = est.arch or []
    n_theta = sum(math.prod(int(s) for s in shape) for _, shape in arch)
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
        signature = getattr(est, "site_signature", None) or []
        print(f"sites ({len(signature)}, statistics stored for {len(summary.site_sums)}):")
        for site in signature:
            name, family = site[0], site[1]
            stats = summary.site_sums.get(name, {})
            shapes = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in stats.items())
            print(f"  {name}: {family} ({shapes or 'nothing stored'})")
    print(f"architecture ({len(arch)} parameter tensors):")
    for name, shape in arch:
        print(f"  {name}: {list(shape)}")
    return EXIT_OK


COMMANDS = (Subcommand("info", "describe a saved summary file", _args, _run),)
