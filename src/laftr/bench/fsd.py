"""``laftr fsd-bench``: how closely each FSD estimator tracks the exact FSD, side by side with its memory and time.

Protocol (docs/fsd-bench.md):

1. theta0: a network trained on task A (by default Fashion-MNIST classes 0-4, multi-head: task A's loss
   and distances use output units 0-4 only).
2. Every estimator is fitted ONCE at theta0 on task A's training inputs; the exact FSD is over the same inputs.
3. Many thetas from diverse continuations of theta0 (another task, permuted pixels, random labels, more
   training on task A, function-space-regularized training on another task), each at several checkpoints, so
   the exact FSD spans orders of magnitude.
4. For every (method, metric, theta): the estimate (mean of ``eval_calls`` calls for stochastic estimators),
   the cosine between the gradient of ONE call and the exact FSD's gradient (what a regularizer uses), and
   the wall time of evaluation + backward. Per method and metric: Pearson correlation of log values,
   Spearman correlation, median |log(estimate / exact)|, median gradient cosine, stored floats, median ms.

Everything is measured in one run, on one machine, with the provenance written to ``results.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import exact_fsd, make_estimator
from .._util import trainable_params
from ..exact import exact_fsd_and_grad
from ..metrics import QUADRATIC_METRICS, check_metric, discrepancy
from ..models import conv_net, mlp, num_params
from ..report import markdown_table, prepare_out_dir, pyplot, run_metadata, write_json_atomic

log = logging.getLogger(__name__)

ARCHS = ("mlp", "cnn", "mlp-gelu")
KINDS = ("task-B", "permuted", "random-labels", "task-A", "task-B+reg")


@dataclasses.dataclass
class Trajectory:
    """One continuation of theta0; every checkpoint (in optimizer steps) becomes a theta.

    Attributes:
        kind: ``task-B`` (task B's classes on their own outputs), ``permuted`` (all classes, pixels under a
            fixed permutation, all outputs), ``random-labels`` (task A's inputs, random task-A labels),
            ``task-A`` (more training on task A itself), ``task-B+reg`` (task B plus ``lam`` times the exact
            KL FSD to theta0 on a random task-A minibatch: a replay regularizer that stays close to theta0).
        optimizer: ``adam`` or ``sgd``.
        lr: learning rate.
        checkpoints: steps (batches) after which theta is recorded.
        lam: weight of the replay regularizer (``task-B+reg`` only).
    """

    kind: str
    optimizer: str
    lr: float
    checkpoints: list[int]
    lam: float = 0.0

    def label(self) -> str:
        lam = f" lam={self.lam:g}" if self.kind == "task-B+reg" else ""
        return f"{self.kind} {self.optimizer} lr={self.lr:g}{lam}"


def default_trajectories(quick: bool = False) -> list[Trajectory]:
    """44 thetas (11 trajectories x 4 checkpoints), or 10 with ``quick``."""
    if quick:
        ck = [3, 30]
        return [Trajectory("task-B", "adam", 1e-3, ck), Trajectory("permuted", "adam", 1e-3, ck),
                Trajectory("random-labels", "adam", 1e-3, ck), Trajectory("task-A", "sgd", 0.1, ck),
                Trajectory("task-B+reg", "adam", 1e-3, ck, lam=10.0)]
    ck = [2, 10, 50, 250]
    return [
        *(Trajectory("task-B", "adam", lr, ck) for lr in (1e-4, 1e-3, 1e-2)),
        *(Trajectory("permuted", "adam", lr, ck) for lr in (1e-4, 1e-3)),
        *(Trajectory("random-labels", "adam", lr, ck) for lr in (1e-4, 1e-3)),
        *(Trajectory("task-A", "sgd", lr, ck) for lr in (0.01, 0.1)),
        *(Trajectory("task-B+reg", "adam", 1e-3, ck, lam=lam) for lam in (1.0, 10.0)),
    ]


@dataclasses.dataclass
class FsdBenchConfig:
    """Settings of one benchmark run (all recorded in results.json).

    Attributes:
        dataset: a classification data set known to :func:`laftr.data.load_dataset`.
        data_dir: where its files are (when the loader needs one).
        arch: ``mlp`` (784-hidden-10, ReLU), ``mlp-gelu`` (784-512-512-10 with LayerNorm after each hidden Linear
            and GELU) or ``cnn`` (the conv net of METHOD.md section 4, scaled by ``width``).
        hidden: MLP hidden widths (``mlp-gelu``: 512, 512 unless given).
        width: channel/fc multiplier of the conv net.
        task_a: task A's classes (theta0's task, and the outputs compared).
        task_b: task B's classes (a continuation task).
        n_fit: task-A training examples used for theta0, the estimators' fit and the exact FSD (None: all).
        n_other: examples of each continuation task.
        epochs_a: epochs of training on task A.
        batch_size: batch size of every training run.
        lr_a: Adam learning rate on task A.
        metrics: output discrepancies compared.
        methods: method labels to run (None: all of :func:`method_specs`).
        coreset_sizes: k of the coreset baselines (``subset``, ``ntk``); the k matching LAFTR's memory is added.
        num_samples: Monte Carlo samples of the LAFTR estimators.
        rank: rank of LAFTR's low-rank input model.
        components: mixture components of ``laftr-mixture`` (no labels used).
        laftr_coreset: stored inputs of LAFTR's coreset input model.
        eval_calls: calls averaged for a stochastic estimator's estimate.
        trajectories: the continuations (None: :func:`default_trajectories`).
        seed: seed of everything.
        threads: torch threads (None: leave as is).
        progress: progress bars.
        quick: the settings came from :meth:`quick` (recorded).
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    arch: str = "mlp"
    hidden: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    width: float = 0.5
    task_a: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3, 4])
    task_b: list[int] = dataclasses.field(default_factory=lambda: [5, 6, 7, 8, 9])
    n_fit: int | None = None
    n_other: int = 10000
    epochs_a: int = 3
    batch_size: int = 128
    lr_a: float = 1e-3
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["l2", "l2-probs", "kl"])
    methods: list[str] | None = None
    coreset_sizes: list[int] = dataclasses.field(default_factory=lambda: [10, 40, 200, 1000])
    num_samples: int = 64
    rank: int = 20
    components: int = 10
    laftr_coreset: int = 200
    eval_calls: int = 4
    trajectories: list[Trajectory] | None = None
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    quick: bool = False

    @classmethod
    def for_arch(cls, arch: str, quick: bool = False, **overrides: Any) -> FsdBenchConfig:
        """Defaults for ``arch``, shrunk to a sub-two-minute run with ``quick``; ``overrides`` win."""
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
        base: dict[str, Any] = {"arch": arch, "quick": quick}
        if arch == "cnn":
            base.update(n_fit=6000, n_other=6000, epochs_a=2, coreset_sizes=[10, 40, 200, 1000])
        if arch == "mlp-gelu":
            base.update(hidden=[512, 512])
        if quick:
            base.update(n_fit=1500 if arch == "mlp" else 600, n_other=1500 if arch == "mlp" else 600,
                        hidden=[64, 64], width=0.25, epochs_a=2, coreset_sizes=[10, 40], num_samples=32,
                        eval_calls=2, rank=5, laftr_coreset=40)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {list(ARCHS)}")
        for m in self.metrics:
            check_metric(m)
        if not self.metrics:
            raise ValueError("no metrics given")
        if set(self.task_a) & set(self.task_b) or not self.task_a or not self.task_b:
            raise ValueError(f"task A {self.task_a} and task B {self.task_b} must be disjoint, non-empty")
        if any(k < 1 for k in self.coreset_sizes) or self.num_samples < 1 or self.eval_calls < 1:
            raise ValueError("coreset sizes, num_samples and eval_calls must be positive")
        if self.n_fit is not None and self.n_fit < 10:
            raise ValueError("n_fit must be at least 10 examples")
        if self.methods is not None:
            static = {s.label for a in ARCHS for s in method_specs(dataclasses.replace(self, arch=a))}
            bad = [m for m in self.methods if m not in static and not re.fullmatch(r"(subset|ntk)-\d+", m)]
            if bad or not self.methods:
                raise ValueError(f"unknown method(s) {bad}; known: {sorted(static)} and subset-K / ntk-K")
        for t in self.trajectories or []:
            if t.kind not in KINDS:
                raise ValueError(f"unknown trajectory kind {t.kind!r}; choose one of {list(KINDS)}")
            if t.optimizer not in ("adam", "sgd") or t.lr <= 0 or not t.checkpoints or min(t.checkpoints) < 1:
                raise ValueError(f"bad trajectory {t}")


# ------------------------------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A row of the benchmark: an estimator name with its options.

    ``family`` is ``laftr``, ``parametric`` or ``coreset``; ``metrics`` limits the metrics it supports.
    """

    label: str
    estimator: str
    options: dict[str, Any]
    family: str
    metrics: tuple[str, ...] | None = None
    stochastic: bool = False


def method_specs(cfg: FsdBenchConfig, matched_k: Sequence[int] = ()) -> list[MethodSpec]:
    """Every method of the benchmark for ``cfg`` (before the ``methods`` filter).

    ``matched_k`` adds coreset baselines whose memory matches LAFTR's (``k = stored floats / input dim``).
    """
    S = cfg.num_samples
    lf = {"num_samples": S}
    specs = [
        MethodSpec("laftr", "laftr", {**lf, "input_model": "gaussian"}, "laftr", stochastic=True),
        MethodSpec("laftr-shared-masks", "laftr", {**lf, "input_model": "gaussian", "shared_masks": True}, "laftr",
                   stochastic=True),
        MethodSpec("laftr-diag", "laftr", {**lf, "input_model": "diag"}, "laftr", stochastic=True),
        MethodSpec("laftr-lowrank", "laftr", {**lf, "input_model": "lowrank", "rank": cfg.rank}, "laftr",
                   stochastic=True),
        MethodSpec("laftr-classwise", "laftr", {**lf, "input_model": "classwise"}, "laftr", stochastic=True),
        MethodSpec("laftr-mixture", "laftr", {**lf, "input_model": "mixture", "components": cfg.components},
                   "laftr", stochastic=True),
        MethodSpec("laftr-mixture-diag", "laftr", {**lf, "input_model": "mixture", "components": cfg.components,
                                                   "component_cov": "diag"}, "laftr", stochastic=True),
        MethodSpec("laftr-relu", "laftr", {**lf, "input_model": "gaussian", "gates": "relu"}, "laftr",
                   stochastic=True),
        MethodSpec("laftr-coreset", "laftr", {**lf, "input_model": "coreset", "coreset_size": cfg.laftr_coreset},
                   "laftr", stochastic=True),
    ]
    if cfg.arch != "cnn":  # the closed form tracks joint second moments: MLP-sized states, no max pooling
        specs += [MethodSpec("laftr-exact", "laftr-exact", {"input_model": "gaussian"}, "laftr",
                             metrics=tuple(sorted(QUADRATIC_METRICS))),
                  MethodSpec("laftr-exact-diag", "laftr-exact", {"input_model": "diag"}, "laftr",
                             metrics=tuple(sorted(QUADRATIC_METRICS))),
                  MethodSpec("laftr-exact-mumu", "laftr-exact", {"input_model": "gaussian", "mu_outer": True},
                             "laftr", metrics=tuple(sorted(QUADRATIC_METRICS)))]
    else:  # max pooling: theta0's argmax (default), each stream its own max (the original code), or sampled
        specs += [MethodSpec("laftr-pool-separate", "laftr", {**lf, "input_model": "gaussian", "maxpool": "separate"},
                             "laftr", stochastic=True),
                  MethodSpec("laftr-pool-sample", "laftr", {**lf, "input_model": "gaussian", "maxpool": "sample"},
                             "laftr", stochastic=True)]
    # K-FAC has Kronecker factors for Linear/Conv2d layers only: LayerNorm's parameters get its diagonal term
    kfac_opts = {"fisher": "mc", **({"unsupported": "diag"} if cfg.arch == "mlp-gelu" else {})}
    specs += [
        MethodSpec("weight", "weight", {}, "parametric"),
        MethodSpec("diag-fisher", "diag-fisher", {"fisher": "mc"}, "parametric"),
        MethodSpec("kfac", "kfac", kfac_opts, "parametric"),
    ]
    asked = {int(m.split("-")[1]) for m in cfg.methods or [] if re.fullmatch(r"(subset|ntk)-\d+", m)}
    for k in sorted(set(cfg.coreset_sizes) | set(matched_k) | asked):
        tag = " (=laftr memory)" if k in matched_k and k not in cfg.coreset_sizes else ""
        specs.append(MethodSpec(f"subset-{k}{tag}", "subset", {"coreset_size": k}, "coreset"))
        specs.append(MethodSpec(f"ntk-{k}{tag}", "ntk", {"coreset_size": k}, "coreset"))
    return specs


# ------------------------------------------------------------------------------------------- data and training
@dataclasses.dataclass
class _Data:
    xa: torch.Tensor
    ya: torch.Tensor
    xb: torch.Tensor
    yb: torch.Tensor
    xp: torch.Tensor  # permuted-pixel inputs (all classes)
    yp: torch.Tensor
    name: str


def _load(cfg: FsdBenchConfig, gen: torch.Generator) -> _Data:
    from ..data import load_dataset

    ds = load_dataset(cfg.dataset, cfg.data_dir)
    if ds.task != "classification":
        raise ValueError(f"fsd-bench needs a classification data set; {ds.name} is {ds.task}")
    if ds.num_classes is not None and max(cfg.task_a + cfg.task_b) >= ds.num_classes:
        raise ValueError(f"{ds.name} has {ds.num_classes} classes; tasks {cfg.task_a} / {cfg.task_b} do not fit")

    def pick(classes: list[int], n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.nonzero(torch.isin(ds.y_train, torch.tensor(classes))).flatten()
        if len(idx) == 0:
            raise ValueError(f"{ds.name} has no training examples of classes {classes}")
        if n is not None and n < len(idx):
            idx = idx[torch.randperm(len(idx), generator=gen)[:n]].sort().values
        return ds.x_train[idx], ds.y_train[idx]

    xa, ya = pick(cfg.task_a, cfg.n_fit)
    xb, yb = pick(cfg.task_b, cfg.n_other)
    xp, yp = pick(sorted(set(range(ds.num_classes or 10))), cfg.n_other)
    perm = torch.randperm(xp[0].numel(), generator=gen)
    xp = xp.reshape(len(xp), -1)[:, perm].reshape(xp.shape)
    return _Data(xa, ya, xb, yb, xp, yp, ds.name)


def _build(cfg: FsdBenchConfig, in_shape: tuple[int, ...], n_out: int) -> nn.Module:
    if cfg.arch == "mlp":
        return mlp(math.prod(in_shape), cfg.hidden, n_out)
    if cfg.arch == "mlp-gelu":
        return mlp(math.prod(in_shape), cfg.hidden, n_out, activation="gelu", norm="layernorm")
    return conv_net(in_shape, n_out, width=cfg.width)


def _head_ce(logits: torch.Tensor, y: torch.Tensor, classes: Sequence[int] | None) -> torch.Tensor:
    if classes is None:
        return F.cross_entropy(logits, y)
    lut = torch.full((int(max(classes)) + 1,), -1, dtype=torch.long, device=y.device)
    lut[torch.as_tensor(list(classes), device=y.device)] = torch.arange(len(classes), device=y.device)
    return F.cross_entropy(logits[:, list(classes)], lut[y])


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: Sequence[int] | None, steps: int,
           opt: torch.optim.Optimizer, batch_size: int, gen: torch.Generator,
           extra: Callable[[nn.Module], torch.Tensor] | None = None, on_step: Callable[[int], None] | None = None,
           ) -> None:
    model.train()
    perm = torch.randperm(len(x), generator=gen)
    pos = 0
    for step in range(1, steps + 1):
        if pos + batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=gen), 0
        b = perm[pos: pos + batch_size]
        pos += batch_size
        loss = _head_ce(model(x[b]), y[b], classes)
        if extra is not None:
            loss = loss + extra(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)
    model.eval()


def _task_of(t: Trajectory, cfg: FsdBenchConfig, data: _Data, model0: nn.Module, gen: torch.Generator):
    """Training inputs, labels, output units and extra loss term of a trajectory."""
    if t.kind in ("task-B", "task-B+reg"):
        x, y, classes = data.xb, data.yb, cfg.task_b
    elif t.kind == "permuted":
        x, y, classes = data.xp, data.yp, None
    elif t.kind == "random-labels":
        x = data.xa
        y = torch.tensor(cfg.task_a)[torch.randint(len(cfg.task_a), (len(x),), generator=gen)]
        classes = cfg.task_a
    else:
        x, y, classes = data.xa, data.ya, cfg.task_a
    extra = None
    if t.kind == "task-B+reg":
        def extra(m: nn.Module) -> torch.Tensor:
            b = torch.randint(len(data.xa), (cfg.batch_size,), generator=gen)
            with torch.no_grad():
                z0 = model0(data.xa[b])
            return t.lam * discrepancy(z0, m(data.xa[b]), "kl", cfg.task_a).mean()
    return x, y, classes, extra


def _continuations(cfg: FsdBenchConfig, model0: nn.Module, data: _Data, gen: torch.Generator,
                   ) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """``[(theta description, state dict), ...]`` for every checkpoint of every trajectory."""
    out: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
    trajs = cfg.trajectories if cfg.trajectories is not None else default_trajectories(cfg.quick)
    for ti, t in enumerate(tqdm(trajs, desc="continuations", disable=not cfg.progress)):
        model = copy.deepcopy(model0).requires_grad_(True)
        opt = (torch.optim.Adam(model.parameters(), lr=t.lr) if t.optimizer == "adam"
               else torch.optim.SGD(model.parameters(), lr=t.lr))
        x, y, classes, extra = _task_of(t, cfg, data, model0, gen)

        def snap(step: int, t: Trajectory = t, model: nn.Module = model, ti: int = ti) -> None:
            if step in t.checkpoints:
                desc = {"trajectory": ti, "label": t.label(), "kind": t.kind, "optimizer": t.optimizer, "lr": t.lr,
                        "lam": t.lam, "steps": step}
                out.append((desc, {k: v.detach().clone() for k, v in model.state_dict().items()}))

        _train(model, x, y, classes, max(t.checkpoints), opt, cfg.batch_size, gen, extra, snap)
    return out


# ------------------------------------------------------------------------------------------- statistics
def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (1-based)."""
    order = np.argsort(v, kind="mergesort")
    r = np.empty(len(v), dtype=np.float64)
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        r[order[i: j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return r


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation (nan when either side is constant)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties averaged)."""
    return pearson(_ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64)))


def agreement(estimates: Sequence[float], exact: Sequence[float]) -> dict[str, float]:
    """Pearson of logs, Spearman and median |log(estimate / exact)|; non-positive estimates are counted and
    floored at 1e-30 before taking logs."""
    est = np.asarray(estimates, dtype=np.float64)
    ex = np.asarray(exact, dtype=np.float64)
    nonpos = int((est <= 0).sum())
    le, lx = np.log(np.maximum(est, 1e-30)), np.log(np.maximum(ex, 1e-30))
    return {"pearson_log": pearson(le, lx), "spearman": spearman(est, ex),
            "median_abs_log_ratio": float(np.median(np.abs(le - lx))), "nonpositive": nonpos}


def _flat(grads: dict[str, torch.Tensor] | Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    vals = list(grads.values()) if isinstance(grads, dict) else list(grads)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                      for g, p in zip(vals, like)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float(a @ b / (na * nb))


def _is_gate(mod: nn.Module) -> bool:
    from ..rules import GateRule, module_rule

    rule = module_rule(mod)
    return rule is not None and issubclass(rule, GateRule)


@torch.no_grad()
def _pattern_change(model0: nn.Module, model: nn.Module, x: torch.Tensor, batch: int = 1000) -> float:
    """Fraction of (example, hidden unit) pairs whose activation pattern (the sign of the pre-activation of every
    activation module: ReLU on/off) differs between theta0 and theta."""
    acts: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def hooks(m: nn.Module, key: str) -> list[Any]:
        return [mod.register_forward_hook(lambda _m, inp, _o, key=key: acts[key].append((inp[0] > 0).flatten(1)))
                for mod in m.modules() if _is_gate(mod)]

    hs = hooks(model0, "a") + hooks(model, "b")
    diff = tot = 0
    try:
        for i in range(0, len(x), batch):
            acts["a"].clear()
            acts["b"].clear()
            model0(x[i: i + batch])
            model(x[i: i + batch])
            for u, v in zip(acts["a"], acts["b"]):
                diff += int((u != v).sum())
                tot += u.numel()
    finally:
        for h in hs:
            h.remove()
    return diff / max(tot, 1)


# ------------------------------------------------------------------------------------------- the run
def run_fsd_bench(cfg: FsdBenchConfig, out_dir: str | Path, force: bool = False,
                  command: str = "laftr fsd-bench") -> dict[str, Any]:
    """Run the benchmark and write ``results.json``, ``table.md``, ``scatter.png`` and ``memory.png``.

    Raises:
        laftr.report.OutDirError: ``out_dir`` exists and is not empty (and ``force`` is False).
    """
    cfg.validate()
    out = prepare_out_dir(out_dir, force=force)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    metadata = run_metadata(command, cfg.seed)  # the revision and machine the run started on
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = _load(cfg, gen)
    in_shape = tuple(data.xa.shape[1:])
    n_out = max(max(cfg.task_a + cfg.task_b) + 1, int(data.yp.max()) + 1)
    timings: dict[str, float] = {}

    # theta0 on task A
    t0 = time.perf_counter()
    model0 = _build(cfg, in_shape, n_out)
    opt = torch.optim.Adam(model0.parameters(), lr=cfg.lr_a)
    steps_a = cfg.epochs_a * math.ceil(len(data.xa) / cfg.batch_size)
    _train(model0, data.xa, data.ya, cfg.task_a, steps_a, opt, cfg.batch_size, gen)
    timings["train_theta0_s"] = time.perf_counter() - t0
    acc_a = _accuracy(model0, data.xa, data.ya, cfg.task_a)
    log.info("theta0: %s, %d params, task-A train accuracy %.3f", cfg.arch, num_params(model0), acc_a)

    # a reference cost: one plain training step on a batch of 128
    wall, cpu = _time_train_step(model0, data, cfg)
    timings["train_step_ms"], timings["train_step_cpu_ms"] = wall * 1e3, cpu * 1e3

    # thetas
    t0 = time.perf_counter()
    thetas = _continuations(cfg, model0, data, gen)
    timings["continuations_s"] = time.perf_counter() - t0
    live = copy.deepcopy(model0).requires_grad_(True)
    params = list(trainable_params(live).values())

    # exact FSD and its gradient at every theta
    t0 = time.perf_counter()
    exact: dict[str, list[float]] = {m: [] for m in cfg.metrics}
    exact_grads: dict[str, list[torch.Tensor]] = {m: [] for m in cfg.metrics}
    theta_rows = []
    exact_times: list[float] = []
    exact_cpu: list[float] = []
    for desc, sd in tqdm(thetas, desc="exact FSD", disable=not cfg.progress):
        live.load_state_dict(sd)
        row = dict(desc)
        row["weight_distance"] = float(sum((sd[n] - p0.detach()).pow(2).sum() for n, p0 in model0.named_parameters()).sqrt())
        row["pattern_change"] = _pattern_change(model0, live, data.xa)
        row["exact"] = {}
        for m in cfg.metrics:
            te, ce = time.perf_counter(), time.process_time()
            d, g = exact_fsd_and_grad(model0, live, data.xa, metric=m, outputs=cfg.task_a, batch_size=1000)
            exact_times.append(time.perf_counter() - te)
            exact_cpu.append(time.process_time() - ce)
            exact[m].append(float(d))
            exact_grads[m].append(_flat(g, params))
            row["exact"][m] = float(d)
        theta_rows.append(row)
    timings["exact_s"] = time.perf_counter() - t0
    timings["exact_fsd_and_grad_ms"] = statistics.median(exact_times) * 1e3
    timings["exact_fsd_and_grad_cpu_ms"] = statistics.median(exact_cpu) * 1e3
    te, ce = time.perf_counter(), time.process_time()
    exact_fsd(model0, live, data.xa, metric=cfg.metrics[0], outputs=cfg.task_a, batch_size=1000)
    timings["exact_fsd_forward_ms"] = (time.perf_counter() - te) * 1e3
    timings["exact_fsd_forward_cpu_ms"] = (time.process_time() - ce) * 1e3

    # the methods: LAFTR's memory decides the matched coreset sizes
    d_in = math.prod(in_shape)
    probe = make_estimator("laftr", input_model="gaussian", num_samples=1).fit(model0, data.xa[:50])
    diag_probe = make_estimator("laftr", input_model="diag", num_samples=1).fit(model0, data.xa[:50])
    matched = sorted({max(1, round(e.stored_floats() / d_in)) for e in (probe, diag_probe)})
    specs = method_specs(cfg, matched)
    if cfg.methods is not None:
        specs = [s for s in specs if s.label.split(" ")[0] in cfg.methods]
    results = []
    bar = tqdm(total=sum(len([m for m in cfg.metrics if s.metrics is None or m in s.metrics]) for s in specs),
               desc="estimators", disable=not cfg.progress)
    for spec in specs:
        for metric in cfg.metrics:
            if spec.metrics is not None and metric not in spec.metrics:
                continue
            bar.set_postfix_str(f"{spec.label} {metric}")
            results.append(_run_method(spec, metric, cfg, model0, live, params, data, thetas, exact[metric],
                                       exact_grads[metric], theta_rows))
            bar.update()
    bar.close()
    timings["total_s"] = time.perf_counter() - t_start

    res = {
        "benchmark": "fsd-bench",
        "config": dataclasses.asdict(cfg),
        "dataset": data.name,
        "arch": cfg.arch,
        "theta0": {"params": num_params(model0), "task_a_train_accuracy": acc_a, "n_fit": len(data.xa),
                   "input_dim": d_in},
        "matched_coreset_k": matched,
        "timings": timings,
        "methods": results,
        "thetas": theta_rows,
        "metadata": metadata,
    }
    res["exact_range"] = {m: [min(v), max(v)] for m, v in exact.items()}
    write_json_atomic(out / "results.json", res)
    (out / "table.md").write_text(render_table(res), encoding="utf-8")
    plot_scatter(res, out / "scatter.png")
    plot_memory(res, out / "memory.png")
    return res


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x[i: i + 1000])[:, list(classes)].argmax(1) for i in range(0, len(x), 1000)])
    return float((torch.tensor(classes)[pred] == y).float().mean())


def _time_train_step(model0: nn.Module, data: _Data, cfg: FsdBenchConfig, reps: int = 20) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one Adam step on a batch of 128."""
    m = copy.deepcopy(model0).requires_grad_(True)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x, y = data.xa[:128], data.ya[:128]
    ts, cs = [], []
    for _ in range(reps + 2):
        t, c = time.perf_counter(), time.process_time()
        loss = _head_ce(m(x), y, cfg.task_a)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return statistics.median(ts[2:]), statistics.median(cs[2:])


def _run_method(spec: MethodSpec, metric: str, cfg: FsdBenchConfig, model0: nn.Module, live: nn.Module,
                params: list[torch.Tensor], data: _Data, thetas: list, exact: list[float],
                exact_grads: list[torch.Tensor], theta_rows: list[dict[str, Any]]) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    est = make_estimator(spec.estimator, metric=metric, seed=cfg.seed, **spec.options)
    est.fit(model0, (data.xa, data.ya), outputs=cfg.task_a)
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    calls = cfg.eval_calls if spec.stochastic else 1
    live.load_state_dict(thetas[0][1])
    est(live)  # warm-up (tracing, cached input models), not timed
    values, cosines, times, cpu, rel_sd = [], [], [], [], []
    for (_, sd), g_exact in zip(thetas, exact_grads):
        live.load_state_dict(sd)
        vals = []
        for c in range(calls):
            t, ct = time.perf_counter(), time.process_time()
            d = est(live)
            g = torch.autograd.grad(d, params, allow_unused=True)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - ct)
            vals.append(float(d.detach()))
            if c == 0:  # one call's gradient: what a regularizer uses
                cosines.append(_cosine(_flat(g, params), g_exact))
        values.append(sum(vals) / len(vals))
        if len(vals) > 1 and values[-1] != 0:
            rel_sd.append(statistics.stdev(vals) / abs(values[-1]))
    for row, v in zip(theta_rows, values):
        row.setdefault("estimates", {}).setdefault(spec.label, {})[metric] = v
    far = [r["pattern_change"] for r in theta_rows]
    cut = statistics.median(far)
    near_idx = [i for i, f in enumerate(far) if f <= cut]
    far_idx = [i for i, f in enumerate(far) if f > cut]
    out = {
        "method": spec.label,
        "estimator": spec.estimator,
        "options": spec.options,
        "family": spec.family,
        "metric": metric,
        "stored_floats": int(est.stored_floats()),
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu_s,
        "ms_eval_backward": statistics.median(times) * 1e3,
        "cpu_ms_eval_backward": statistics.median(cpu) * 1e3,
        "median_grad_cosine": float(np.nanmedian(cosines)) if cosines else float("nan"),
        "single_call_rel_sd": statistics.median(rel_sd) if rel_sd else 0.0,
        "estimates": values,
        "grad_cosines": cosines,
        **agreement(values, exact),
    }
    for name, idx in (("near", near_idx), ("far", far_idx)):
        if idx:
            out[f"median_abs_log_ratio_{name}"] = float(np.median(
                [abs(math.log(max(values[i], 1e-30)) - math.log(max(exact[i], 1e-30))) for i in idx]))
    return out


# ------------------------------------------------------------------------------------------- reporting
TABLE_COLUMNS = ["method", "stored_floats", "pearson_log", "spearman", "median_abs_log_ratio",
                 "median_abs_log_ratio_near", "median_abs_log_ratio_far", "median_grad_cosine",
                 "cpu_ms_eval_backward", "ms_eval_backward", "fit_s"]


def render_table(res: dict[str, Any]) -> str:
    """Markdown: one table per metric, methods ordered by stored floats."""
    t = res["timings"]
    lines = [
        f"# fsd-bench: {res['dataset']}, {res['arch']} ({res['theta0']['params']:,} parameters)",
        "",
        (f"theta0 trained on classes {res['config']['task_a']} (train accuracy "
         f"{res['theta0']['task_a_train_accuracy']:.3f}); {len(res['thetas'])} thetas; exact FSD over "
         f"{res['theta0']['n_fit']:,} task-A training inputs."),
        (f"Reference costs (process CPU time; wall in parentheses): one training step (batch 128) "
         f"{t['train_step_cpu_ms']:.2f} ms ({t['train_step_ms']:.2f}); exact FSD + gradient over the task-A set "
         f"{t['exact_fsd_and_grad_cpu_ms']:.0f} ms ({t['exact_fsd_and_grad_ms']:.0f}); forward only "
         f"{t['exact_fsd_forward_cpu_ms']:.0f} ms ({t['exact_fsd_forward_ms']:.0f})."),
        ("cpu_ms_eval_backward: process CPU time of one estimator evaluation + backward (median); it is less "
         "affected by other load on the machine than the wall time ms_eval_backward. Run with --threads 1 the "
         "two agree on an idle machine."),
        ("near/far: median |log ratio| over thetas whose activation pattern (sign of every pre-activation) on task "
         "A changed less/more than the median."),
        "",
    ]
    for metric in res["config"]["metrics"]:
        rows = sorted([r for r in res["methods"] if r["metric"] == metric], key=lambda r: (r["stored_floats"],
                                                                                           r["method"]))
        lo, hi = res["exact_range"][metric]
        lines += [f"## metric `{metric}` (exact FSD from {lo:.3g} to {hi:.3g})", "",
                  markdown_table(rows, TABLE_COLUMNS, floatfmt=".3g"), ""]
    md = res["metadata"]
    lines.append(f"command: `{md['command']}`; git {md['git_revision']}; {md['device']} ({md['num_threads']} "
                 f"threads); torch {md['torch_version']}; {md['timestamp']}; total {t['total_s']:.0f} s")
    return "\n".join(lines) + "\n"


_MARKERS = "os^vD<>ph*XP"


def _styles(names: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """One (colour, marker) per method, the same in every panel."""
    cmap = pyplot().get_cmap("tab20")
    return {n: (cmap(i % 20), _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(names)}


def _legend(fig: Any, axes: Any) -> None:
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def _scatter_methods(res: dict[str, Any]) -> list[str]:
    """The methods drawn in the scatter: everything but the coreset sweep's intermediate sizes."""
    names = []
    for r in res["methods"]:
        name = r["method"]
        if r["family"] == "coreset" and "=laftr memory" not in name and not name.endswith("-200"):
            continue
        if name not in names:
            names.append(name)
    return names


def plot_scatter(res: dict[str, Any], path: Path) -> None:
    """Estimate vs exact FSD, log-log, one panel per metric, one colour per method."""
    plt = pyplot()
    metrics = res["config"]["metrics"]
    names = _scatter_methods(res)
    style = _styles(names)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ex = np.array([t["exact"][metric] for t in res["thetas"]])
        for name in names:
            r = next((r for r in res["methods"] if r["method"] == name and r["metric"] == metric), None)
            if r is None:
                continue
            color, marker = style[name]
            ax.scatter(ex, np.maximum(r["estimates"], 1e-12), s=14, color=color, marker=marker, label=name,
                       alpha=0.8)
        lo, hi = ex.min(), ex.max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"exact FSD ({metric})")
        ax.set_ylabel("estimate")
        ax.set_title(f"{res['dataset']} {res['arch']}: {metric}")
    fig.tight_layout()
    _legend(fig, axes)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_memory(res: dict[str, Any], path: Path) -> None:
    """Spearman correlation and median |log ratio| against stored floats, per metric."""
    plt = pyplot()
    metrics = res["config"]["metrics"]
    others = []
    for r in res["methods"]:
        if r["family"] != "coreset" and r["method"] not in others:
            others.append(r["method"])
    style = _styles(others)
    fig, axes = plt.subplots(2, len(metrics), figsize=(5 * len(metrics), 7.5), squeeze=False)
    for j, metric in enumerate(metrics):
        rows = [r for r in res["methods"] if r["metric"] == metric]
        for k, key in enumerate(("spearman", "median_abs_log_ratio")):
            ax = axes[k][j]
            for fam, ls in (("subset", "-o"), ("ntk", "--s")):
                pts = sorted((max(r["stored_floats"], 1), r[key]) for r in rows
                             if r["family"] == "coreset" and r["estimator"] == fam)
                if pts:
                    ax.plot(*zip(*pts), ls, color="gray" if fam == "subset" else "black", ms=4,
                            label=f"{fam} (k sweep)")
            for r in rows:
                if r["family"] != "coreset":
                    color, marker = style[r["method"]]
                    ax.scatter(max(r["stored_floats"], 1), r[key], color=color, marker=marker, label=r["method"],
                               zorder=3)
            ax.set_xscale("log")
            if key == "median_abs_log_ratio":
                ax.set_yscale("log")
            ax.set_xlabel("stored floats beyond theta0 (log; 1 = none)")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(metric)
    fig.tight_layout()
    _legend(fig, axes)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
