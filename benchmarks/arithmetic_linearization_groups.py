"""Which parameters' change does the linearization at theta_add miss, far from theta_add?

Trains the ``arithmetic`` benchmark's transformer on add, then subtract without a regularizer for ``--epochs``
epochs (weight decay ``--weight-decay``, default the benchmark's 1.0), and moves one group of parameters at a
time from theta_add to the trained theta (the others stay at theta_add). For each hybrid it reports the exact
KL FSD on 2,000 add training pairs, theta_add's own linearization on the same pairs (LAFTR with
``gates=relu`` and a 2,000-pair coreset as its input model, every pair used once: the exact FSD of the
linearized network), LAFTR as the continual method uses it, the group's norm ratio ``|theta_G| / |theta0_G|``,
and its relative change. Also the whole theta, and theta with each LayerNorm-fed stream scaled.

    python benchmarks/arithmetic_linearization_groups.py --out benchmarks/results/continual/arithmetic_groups.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from continual_arithmetic_drift import _train, train_add

import laftr
from laftr.continual import parse_method
from laftr.report import run_metadata, write_json_atomic

LINEARIZED = "laftr[gates=relu,input_model=coreset,coreset_size=2000,num_samples=2000]"
GROUPS = {
    "embeddings (token, position)": ("embed.", "pos"),
    "attention q, k": (".attn.q.", ".attn.k."),
    "attention v, o": (".attn.v.", ".attn.o."),
    "MLP": (".mlp.",),
    "LayerNorm gains and biases": (".ln1.", ".ln2.", "ln."),
    "readout (head)": ("head.",),
}


def _group(name: str, keys: tuple[str, ...]) -> bool:
    return any(name.startswith(k) or k in name for k in keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20, help="subtract epochs (default 20)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/arithmetic_linearization_groups.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    metadata = run_metadata(command, seed=args.seed, device="cpu")
    run = train_add(args.seed)
    bench, cfg, build, model, gen, add, sub, theta0 = (run.bench, run.cfg, run.build, run.model, run.gen, run.add,
                                                       run.sub, run.theta0)
    ests = {}
    for name in ("laftr", LINEARIZED):
        spec = parse_method(name, None, bench.traits())
        ests[name] = laftr.make_estimator(spec.estimator, **{"seed": args.seed, **spec.config}).fit(
            theta0, add.train_data())
    sub_cfg = cfg if args.weight_decay is None else dataclasses.replace(cfg, weight_decay=args.weight_decay)
    _train(model, sub.x_train, sub.y_train, sub_cfg, args.epochs, gen)
    model.eval()
    x_eval = add.x_train[:2000]
    s0 = {n: t.detach().clone() for n, t in theta0.state_dict().items()}
    s1 = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def row(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
        hybrid = build()
        hybrid.load_state_dict(state)
        hybrid.eval()
        with torch.no_grad():
            r = {"exact_kl": float(laftr.exact_fsd(theta0, hybrid, x_eval, metric="kl")),
                 "linearized": float(ests[LINEARIZED](hybrid)), "laftr": float(ests["laftr"](hybrid))}
        a = torch.cat([s0[n].flatten() for n in names])
        b = torch.cat([state[n].flatten() for n in names])
        r.update(norm_ratio=float(b.norm() / a.norm()), relative_change=float((b - a).norm() / a.norm()))
        return r

    params = [n for n, _ in theta0.named_parameters()]
    rows = {"all parameters": row(s1, params)}
    for label, keys in GROUPS.items():
        names = [n for n in params if _group(n, keys)]
        rows[label] = row({n: (s1[n] if n in names else s0[n]) for n in s0}, names)
    # every parameter moved except one group (which stays at theta_add)
    for label, keys in GROUPS.items():
        names = [n for n in params if _group(n, keys)]
        rows[f"all but {label}"] = row({n: (s0[n] if n in names else s1[n]) for n in s0}, params)
    for label, r in rows.items():
        print(f"{label:45s} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)
    out = {"benchmark": "arithmetic", "subtract_epochs": args.epochs, "subtract_weight_decay": sub_cfg.weight_decay,
           "what": "one parameter group moved from theta_add to theta (others at theta_add): exact KL vs the "
                   "linearized network's exact FSD vs LAFTR, on 2,000 add training pairs",
           "linearized": LINEARIZED, "rows": rows, "wall_time_s": time.perf_counter() - t_start,
           "metadata": metadata}
    write_json_atomic(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
