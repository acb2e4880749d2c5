"""Do the regularizers' FSD estimates follow the true one while the arithmetic network forgets add?

Trains the ``arithmetic`` benchmark's transformer on add with the benchmark's schedule, fits every method's
estimator on add's training pairs (the configs the continual methods use on token benchmarks), then trains
subtract *without* a regularizer and, after selected epochs, compares each estimate with the exact KL FSD on
add's training pairs and add's test accuracy. It explains the search: a penalty only protects add if its
estimate grows with the true distance from the first steps on.

    python benchmarks/continual_arithmetic_drift.py --out benchmarks/results/continual/arithmetic_drift.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import laftr
from laftr.continual import TrainConfig, build_stream, get_benchmark, parse_method
from laftr.report import run_metadata, write_json_atomic

METHODS = ("laftr", "laftr[gates=relu]", "liftr", "ewc", "kfac", "subset")
#: ``--diagnose``: theta0's own linearization evaluated on 2,000 real add pairs (no input model, no sampling
#: noise: every stored pair once), i.e. the exact FSD of the network linearized at theta_add.
LINEARIZED = "laftr[gates=relu,input_model=coreset,coreset_size=2000,num_samples=2000]"
CHECKPOINTS = (1, 2, 3, 5, 10, 20, 30)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, epochs: int,
           gen: torch.Generator, hook: Callable[[int], None] | None = None) -> None:
    """The benchmark's optimizer (a fresh AdamW) over shuffled batches; ``hook(epoch)`` after each epoch."""
    opt = cfg.optimizer(model.parameters())
    model.train()
    for ep in range(1, epochs + 1):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if hook is not None:
            hook(ep)


@dataclasses.dataclass
class AddRun:
    """The benchmark's network trained on add (``model``, trained further by the caller) and a frozen copy."""

    bench: Any
    cfg: TrainConfig
    build: Callable[[], torch.nn.Module]
    model: torch.nn.Module
    theta0: torch.nn.Module
    gen: torch.Generator
    add: Any
    sub: Any


def train_add(seed: int) -> AddRun:
    """Train the ``arithmetic`` benchmark's transformer on add with the benchmark's schedule (seeded)."""
    bench = get_benchmark("arithmetic")
    stream = build_stream(bench, None, seed=seed)
    cfg = TrainConfig(epochs=bench.epochs, batch_size=bench.batch_size, lr=bench.lr,
                      weight_decay=bench.weight_decay, progress=False)
    build = bench.build_model(stream)
    torch.manual_seed(seed)
    model = build()
    gen = torch.Generator().manual_seed(seed)
    add, sub = stream[0], stream[1]
    _train(model, add.x_train, add.y_train, cfg, cfg.epochs, gen)
    theta0 = build()
    theta0.load_state_dict(model.state_dict())
    theta0.eval()
    return AddRun(bench, cfg, build, model, theta0, gen, add, sub)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay while subtract trains (default: the benchmark's, 1.0)")
    p.add_argument("--diagnose", action="store_true",
                   help=f"also track the linearized network's exact FSD ({LINEARIZED}) and parameter norms")
    args = p.parse_args(argv)
    methods = (*METHODS, LINEARIZED) if args.diagnose else METHODS
    torch.set_num_threads(args.threads)
    command = "python benchmarks/continual_arithmetic_drift.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    run = train_add(args.seed)
    bench, cfg, model, gen, add, sub, theta0 = run.bench, run.cfg, run.model, run.gen, run.add, run.sub, run.theta0
    flat0 = torch.cat([q.detach().flatten() for q in model.parameters()])
    estimators = {}
    for name in methods:
        spec = parse_method(name, None, bench.traits())
        est = laftr.make_estimator(spec.estimator, **{"seed": args.seed, **spec.config})
        est.fit(model, add.train_data())
        estimators[name] = est
    rows = []

    def hook(ep: int) -> None:
        if ep not in CHECKPOINTS:
            return
        model.eval()
        with torch.no_grad():
            row = {"epoch": ep,
                   "add_test_acc": float((model(add.x_eval).argmax(1) == add.y_eval).double().mean()),
                   "exact_kl": float(laftr.exact_fsd(theta0, model, add.x_train, metric="kl"))}
            for name, est in estimators.items():
                row[name] = float(est(model))
            if args.diagnose:
                flat = torch.cat([q.detach().flatten() for q in model.parameters()])
                row["param_norm_ratio"] = float(flat.norm() / flat0.norm())
                row["relative_change"] = float((flat - flat0).norm() / flat0.norm())
        model.train()
        rows.append(row)
        print(json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)

    sub_cfg = cfg if args.weight_decay is None else dataclasses.replace(cfg, weight_decay=args.weight_decay)
    _train(model, sub.x_train, sub.y_train, sub_cfg, cfg.epochs, gen, hook)
    out = {"benchmark": "arithmetic", "what": "FSD estimates vs exact KL on add while subtract trains unregularized",
           "subtract_weight_decay": sub_cfg.weight_decay,
           "methods": {n: parse_method(n, None, bench.traits()).describe() for n in methods},
           "rows": rows, "wall_time_s": time.perf_counter() - t_start,
           "metadata": run_metadata(command, seed=args.seed, device="cpu")}
    write_json_atomic(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
