"""Why pbrf-<estimator> agrees or disagrees with pbrf on the regression tables: curvature diagnostics.

Near theta_s the PBRF objective is quadratic to first order: its Hessian is ``C + lam I - eps H_m`` with ``C``
the Hessian of the FSD term (exact: the Gauss-Newton matrix G; an estimator: the Hessian of its D-hat) and
``H_m`` that of the removed example's loss. This script trains the benchmark's model (same data, seed and
training as ``laftr influence``), forms G and each estimator's C densely (autograd Hessian of D-hat at
theta_s), and reports

- the spectra (top eigenvalues, trace) of G and C,
- ``J_m^T C J_m / J_m^T G J_m`` for removed points m (J_m the output gradient of example m): how much of the
  curvature in the directions that matter for removing m the estimator keeps,
- the correlation of the *linearized* responses ``eps grad M^T (C + lam I - eps J_m J_m^T)^{-1} grad L_m``
  with the linearized exact ones, which isolates the curvature error from the nonlinearity of the PBRF.

    python benchmarks/influence_curvature.py --out benchmarks/results/influence/curvature.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import numpy as np
import torch
from torch.nn.utils import stateless

import laftr
from laftr.influence import (
    DEFAULT_ESTIMATOR_OPTIONS,
    ClassicalInfluence,
    InfluenceExperimentConfig,
    Measurement,
    ParamSpace,
    load_tables,
    pearson,
    spearman,
    train_model,
)
from laftr.report import run_metadata, write_json_atomic


def estimator_hessian(est, model, space: ParamSpace) -> torch.Tensor:
    w = copy.deepcopy(model)
    theta = space.get(model)

    def f(vec):
        with stateless._reparametrize_module(w, space.unflatten(vec)):
            return est(w)

    return torch.autograd.functional.hessian(f, theta.clone())


def analyse(dataset: str, damping: float, estimators: list[str], seed: int = 0) -> dict:
    cfg = InfluenceExperimentConfig(dataset=dataset, methods=["pbrf"], seed=seed, damping=damping)
    ds, task = load_tables(dataset, cfg.n_train, seed)
    X, Y = ds.x_train, ds.y_train
    model = train_model(X, Y, task, cfg.hidden, cfg.epochs, cfg.lr, cfg.batch_size, seed)
    X64, Y64 = X.double(), Y.double()
    N = X.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)  # the same draws as run_influence
    test_idx = torch.randperm(ds.n_test, generator=gen)[: cfg.n_measure].sort().values.tolist()
    query_idx = torch.randperm(ds.n_train, generator=gen)[: cfg.n_queries].tolist()
    meas = Measurement(ds.x_test[test_idx].double(), ds.y_test[test_idx].double(), task)
    space = ParamSpace(model)
    G = ClassicalInfluence(model, (X64, Y64), solver="exact").dense_ggn()
    gM = meas.grad(model, space)
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    grads, jacs = [], []
    for q in query_idx:
        w = copy.deepcopy(model)
        g = torch.autograd.grad(0.5 * (w(X64[q : q + 1]) - Y64[q : q + 1]).pow(2).sum(), list(w.parameters()))
        grads.append(space.flatten(list(g)))
        j = torch.autograd.grad(w(X64[q : q + 1]).sum(), list(w.parameters()))
        jacs.append(space.flatten(list(j)))

    def linearized(C):
        out = []
        for g, j in zip(grads, jacs):
            A = C + damping * eye - torch.outer(j, j) / N
            out.append(float(gM @ torch.linalg.solve(A, g)) / N)
        return np.array(out)

    ref = linearized(G)
    ev_G = torch.linalg.eigvalsh(G).flip(0)
    res = {"dataset": dataset, "damping": damping, "num_params": int(G.shape[0]), "N": N,
           "G": {"top_eigenvalues": ev_G[:10].tolist(), "trace": float(G.trace()),
                 "eigenvalues_above_damping": int((ev_G > damping).sum())},
           "estimators": {}}
    for name in estimators:
        fields = {f.name for f in dataclasses.fields(laftr.make_estimator(name).config)}
        opts = {k: v for k, v in DEFAULT_ESTIMATOR_OPTIONS.get(name, {}).items() if k in fields}
        est = laftr.make_estimator(name, metric="mse", **opts).fit(model, (X64, Y64))
        t = time.process_time()
        C = estimator_hessian(est, model, space)
        C = 0.5 * (C + C.T)
        ev = torch.linalg.eigvalsh(C).flip(0)
        ratios = [float(j @ C @ j) / float(j @ G @ j) for j in jacs]
        lin = linearized(C)
        res["estimators"][name] = {
            "top_eigenvalues": ev[:10].tolist(), "trace": float(C.trace()), "min_eigenvalue": float(ev[-1]),
            "eigenvalues_above_damping": int((ev > damping).sum()),
            "JCJ_over_JGJ": {"median": float(np.median(ratios)), "q10": float(np.quantile(ratios, 0.1)),
                             "q90": float(np.quantile(ratios, 0.9))},
            "linearized_pearson_vs_exact_linearized": pearson(lin, ref),
            "linearized_spearman_vs_exact_linearized": spearman(lin, ref),
            "linearized_mean_abs_ratio": float(np.abs(lin).mean() / np.abs(ref).mean()),
            "hessian_cpu_s": time.process_time() - t,
        }
        r = res["estimators"][name]
        print(dataset, name, json.dumps(r["JCJ_over_JGJ"]), f"lin P {r['linearized_pearson_vs_exact_linearized']:.3f}",
              f"S {r['linearized_spearman_vs_exact_linearized']:.3f}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--datasets", default="boston,autompg,diabetes")
    ap.add_argument("--estimators", default="laftr-exact,weight,diag-fisher,kfac,ntk")
    args = ap.parse_args()
    torch.set_num_threads(1)
    command = "python benchmarks/influence_curvature.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    out = {"metadata": run_metadata(command, seed=0, device="cpu"), "results": []}
    for d in args.datasets.split(","):
        out["results"].append(analyse(d, args.damping, args.estimators.split(",")))
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
