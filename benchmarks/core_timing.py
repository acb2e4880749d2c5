"""Cost of one LAFTR evaluation+backward on a 784-512-512-10 MLP over Fashion-MNIST (issue: core).

Times (medians over repeats, same run): LAFTR MC (64 samples) and laftr-exact evaluation+backward, one
plain training step (batch 128), exact FSD over the full training set; stored floats per input model.

    python benchmarks/core_timing.py --out benchmarks/results/core_timing.json
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

import laftr


def load_fmnist(root="/usr/share/datasets/fashion-mnist"):
    def read(name):
        with gzip.open(os.path.join(root, name)) as f:
            raw = f.read()
        return np.frombuffer(raw, np.uint8)
    X = read("train-images-idx3-ubyte.gz")[16:].reshape(-1, 784).astype(np.float32) / 255
    Y = read("train-labels-idx1-ubyte.gz")[8:].astype(np.int64)
    return torch.from_numpy(X), torch.from_numpy(Y)


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    X, Y = load_fmnist()
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(0, 12800, 128):  # a little training so the activation pattern is realistic
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[i:i + 128]), Y[i:i + 128]).backward()
        opt.step()
    theta = copy.deepcopy(model)
    opt = torch.optim.Adam(theta.parameters(), 1e-3)  # a continuation on shifted labels: theta moves away
    for i in range(12800, 25600, 128):
        opt.zero_grad()
        nn.functional.cross_entropy(theta(X[i:i + 128]), (Y[i:i + 128] + 1) % 10).backward()
        opt.step()
    theta_opt = torch.optim.SGD(theta.parameters(), 1e-3)
    res = {"command": " ".join([sys.executable.split("/")[-1]] + sys.argv), "seed": args.seed,
           "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "platform": platform.platform(), "n_train": len(X)}
    try:
        res["git_revision"] = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        res["git_revision"] = None

    def train_step():
        i = np.random.randint(0, len(X) - 128)
        theta_opt.zero_grad()
        nn.functional.cross_entropy(theta(X[i:i + 128]), Y[i:i + 128]).backward()

    res["train_step_s"] = timeit(train_step, args.reps * 3)
    t = time.perf_counter()
    truth = laftr.exact_fsd(model, theta, X, metric="l2").item()
    res["exact_fsd_full_train_s"] = time.perf_counter() - t
    res["exact_fsd_l2"] = truth
    rows = []
    for name, kw in [("laftr", {"num_samples": 64}), ("laftr-exact", {}),
                     ("laftr", {"num_samples": 64, "input_model": "diag"}),
                     ("laftr", {"num_samples": 64, "input_model": "lowrank", "rank": 20}),
                     ("laftr", {"num_samples": 64, "input_model": "classwise"}),
                     ("laftr", {"num_samples": 64, "input_model": "coreset", "coreset_size": 200})]:
        est = laftr.make_estimator(name, metric="l2", **kw)
        t = time.perf_counter()
        est.fit(model, (X, Y))
        fit_s = time.perf_counter() - t

        def step():
            theta_opt.zero_grad()
            est(theta).backward()

        s = timeit(step, args.reps)
        row = {"estimator": name, **kw, "fit_s": fit_s, "eval_backward_s": s,
               "ratio_to_train_step": s / res["train_step_s"], "ratio_to_exact_fsd": s / res["exact_fsd_full_train_s"],
               "stored_floats": est.stored_floats(), "estimate": est(theta).item()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res["rows"] = rows
    from laftr.io import atomic_write_bytes
    atomic_write_bytes(args.out, json.dumps(res, indent=2).encode())


if __name__ == "__main__":
    main()
