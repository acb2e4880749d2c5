"""Cost of one LAFTR evaluation + backward on a 784-512-512-10 MLP over Fashion-MNIST (core issue).

Measured in one run, medians over repeats: evaluation + backward of LAFTR Monte Carlo (64 samples) on every
input model, with kept draws (``fixed_noise``, ``sample_pool``) and of laftr-exact; one plain training step (Adam, batch 128: forward, backward, step); the exact
FSD over the full training set (forward only, and forward + backward as a regularizer would need it); and the
floats each input model stores.

    python benchmarks/core_timing.py --out benchmarks/results/core_timing.json
    python benchmarks/core_timing.py --device cuda --out benchmarks/results/core_timing_cuda.json

On a GPU the timings synchronize the device around each call (wall times; the CPU times then mostly measure
the host's waiting).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import laftr
from laftr import exact_fsd_and_grad
from laftr.data import load_fashion_mnist
from laftr.models import mlp, num_params
from laftr.report import markdown_table, run_metadata, write_json_atomic

INPUT_MODELS = [
    ("laftr", {"input_model": "gaussian"}),
    ("laftr", {"input_model": "diag"}),
    ("laftr", {"input_model": "lowrank", "rank": 20}),
    ("laftr", {"input_model": "classwise"}),
    ("laftr", {"input_model": "coreset", "coreset_size": 200}),
    # kept draws: theta0's outputs known, theta's stream alone (the same samples every call / a pool)
    ("laftr", {"input_model": "gaussian", "fixed_noise": True}),
    ("laftr", {"input_model": "gaussian", "sample_pool": 4096}),
    ("laftr-exact", {"input_model": "gaussian"}),
    ("laftr-exact", {"input_model": "diag"}),
]


CPU: dict[int, float] = {}


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for when CUDA was never used)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn, reps: int) -> float:
    """Median wall seconds of ``fn``; the median process-CPU seconds go to ``CPU[id(fn)]``."""
    fn()  # warm-up
    ts, cs = [], []
    for _ in range(reps):
        sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    CPU[id(fn)] = statistics.median(cs)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results JSON (refuses to overwrite without --force)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not args.force:
        sys.exit(f"{out} exists; pass --force to replace it")
    device = torch.device(args.device)
    # the revision the run started on
    metadata = run_metadata(" ".join(["python"] + sys.argv), args.seed, device=device)
    if device.type == "cuda":
        metadata["gpu"] = torch.cuda.get_device_name(device)
    torch.manual_seed(args.seed)
    ds = load_fashion_mnist(args.data_dir).flat()
    X, Y = ds.x_train.to(device), ds.y_train.to(device)
    gen = torch.Generator().manual_seed(args.seed)

    def train(model, labels, epochs=1):
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(epochs):
            perm = torch.randperm(len(X), generator=gen).to(device)
            for i in range(0, len(X) - 127, 128):
                b = perm[i:i + 128]
                opt.zero_grad()
                F.cross_entropy(model(X[b]), labels[b]).backward()
                opt.step()

    model0 = mlp(784, (512, 512), 10).to(device)
    train(model0, Y)  # theta0: one epoch on Fashion-MNIST
    theta = copy.deepcopy(model0)
    train(theta, (Y + 1) % 10)  # theta: one epoch on shifted labels, far from theta0 in function space
    model0.requires_grad_(False)
    opt = torch.optim.Adam(theta.parameters(), 1e-4)

    def train_step():
        b = torch.randint(len(X), (128,), generator=gen).to(device)
        opt.zero_grad()
        F.cross_entropy(theta(X[b]), Y[b]).backward()
        opt.step()

    res = {"n_train": len(X), "params": num_params(model0), "num_samples": args.num_samples}
    def fwd():
        laftr.exact_fsd(model0, theta, X, batch_size=2000)

    def fwd_bwd():
        exact_fsd_and_grad(model0, theta, X, batch_size=2000)

    res["train_step_s"] = median_time(train_step, args.reps * 4)
    res["train_step_cpu_s"] = CPU[id(train_step)]
    res["exact_fsd_forward_s"] = median_time(fwd, 3)
    res["exact_fsd_forward_cpu_s"] = CPU[id(fwd)]
    res["exact_fsd_forward_backward_s"] = median_time(fwd_bwd, 3)
    res["exact_fsd_forward_backward_cpu_s"] = CPU[id(fwd_bwd)]
    res["exact_fsd_l2"] = float(laftr.exact_fsd(model0, theta, X))
    rows = []
    for name, kw in INPUT_MODELS:
        extra = {} if name == "laftr-exact" else {"num_samples": args.num_samples}
        est = laftr.make_estimator(name, metric="l2", seed=args.seed, **kw, **extra)
        t = time.perf_counter()
        est.fit(model0, (X, Y))
        sync()
        fit_s = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():  # the first evaluation builds what later ones reuse (factors, caches, a pool)
            est(theta)
        sync()
        first_s, first_cpu_s = time.perf_counter() - t, time.process_time() - c

        def step(est=est):
            opt.zero_grad()
            est(theta).backward()

        s = median_time(step, args.reps if name == "laftr" else max(3, args.reps // 3))
        with torch.no_grad():
            vals = [float(est(theta)) for _ in range(5 if name == "laftr" else 1)]
        c = CPU[id(step)]
        variant = ", ".join(f"{k}={v}" for k, v in kw.items() if k != "input_model")
        rows.append({"estimator": name, **kw, "variant": variant, "fit_s": fit_s, "first_call_s": first_s,
                     "first_call_cpu_s": first_cpu_s, "eval_backward_ms": s * 1e3,
                     "eval_backward_cpu_ms": c * 1e3, "cpu_x_train_step": c / res["train_step_cpu_s"],
                     "cpu_x_exact_fsd_forward_backward": c / res["exact_fsd_forward_backward_cpu_s"],
                     "x_train_step": s / res["train_step_s"],
                     "x_exact_fsd_forward": s / res["exact_fsd_forward_s"],
                     "x_exact_fsd_forward_backward": s / res["exact_fsd_forward_backward_s"],
                     "stored_floats": est.stored_floats(), "estimate_l2": statistics.mean(vals)})
        print(rows[-1], flush=True)
    res["rows"] = rows
    res["metadata"] = metadata
    res["table_markdown"] = markdown_table(rows, ["estimator", "input_model", "variant", "stored_floats", "fit_s",
                                                  "first_call_cpu_s",
                                                  "eval_backward_cpu_ms", "cpu_x_train_step",
                                                  "cpu_x_exact_fsd_forward_backward", "eval_backward_ms",
                                                  "x_train_step", "x_exact_fsd_forward_backward", "estimate_l2"],
                                           floatfmt=".3g")
    write_json_atomic(out, res)
    print(res["table_markdown"])
    print(f"train step {res['train_step_s'] * 1e3:.2f} ms (CPU {res['train_step_cpu_s'] * 1e3:.2f}); exact FSD over {len(X)}: forward "
          f"{res['exact_fsd_forward_s']:.2f} s, forward+backward {res['exact_fsd_forward_backward_s']:.2f} s; "
          f"exact l2 FSD {res['exact_fsd_l2']:.4g}")


if __name__ == "__main__":
    main()
