"""The influence and mislabeled-detection experiments behind ``laftr influence`` and ``laftr mislabeled``.

``run_influence``: train an MLP, fix a measurement ``M`` (mean loss on random test points) and random
removed training points, answer every query with every method, and score each method's influences
against ``pbrf``'s by Pearson and Spearman correlation. ``run_mislabeled``: flip a fraction of the
training labels, train, rank every training example by each method's self-influence and report the
fraction of flipped examples found versus the fraction inspected (curve and area).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._util import is_integer
from ..config import ExperimentConfig
from ..errors import UsageError
from ..estimators.base import REGISTRY
from ..models import mlp, num_params
from ..report import RunFolder, markdown_table, pyplot, run_metadata, write_json_atomic
from ..stats import curve_area, detection_curve, pearson, spearman
from ..training import train
from ._checks import check_bool, check_int, check_positive, is_number
from .classical import InfluenceConfig
from .losses import infer_task, per_example_loss
from .measure import Measurement
from .methods import PBRFMethod, check_method, make_method, parse_method_name
from .pbrf import PBRFConfig

log = logging.getLogger(__name__)

#: The data sets of :func:`run_influence`: three regression tables and two classification sets.
INFLUENCE_DATASETS = ("boston", "autompg", "diabetes", "fashion-mnist", "mnist-sample")
#: The classification data sets, those of :func:`run_mislabeled` (labels to flip).
MISLABELED_DATASETS = ("fashion-mnist", "mnist-sample")

#: Estimator options used unless overridden (only fields the estimator's config has are passed). The Monte
#: Carlo estimators keep one draw (``fixed_noise``): the PBRF refuses fresh samples at every evaluation.
DEFAULT_ESTIMATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "laftr": {"fixed_noise": True, "num_samples": 4096},
    "liftr": {"fixed_noise": True},
    "ntk": {"coreset_size": 100},
    "subset": {"coreset_size": 100},
}

#: LAFTR's defaults on classification sets, one diagonal Gaussian and one set of gate probabilities per
#: class (16.7k floats on Fashion-MNIST; the full per-class covariances would be 6.2M), and 1024 Monte Carlo
#: samples.
CLASSIFICATION_LAFTR_OPTIONS: dict[str, Any] = {"input_model": "classwise", "classwise_cov": "diag",
                                                "num_samples": 1024}


def resolve_estimator_options(user: dict[str, dict[str, Any]] | None, task: str,
                              methods: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The influence experiments' estimator options, per estimator name or tagged variant ``<name>@<tag>``.

    ``DEFAULT_ESTIMATOR_OPTIONS`` (and ``CLASSIFICATION_LAFTR_OPTIONS`` for a classification task's ``laftr``)
    merged with the user's options ``{name: {key: value}}``; ``methods`` adds the tagged variants they name.

    A variant starts from its estimator's defaults. Default keys the estimator's config lacks are dropped;
    user keys it lacks are rejected.
    """
    user = user or {}
    keys = set(REGISTRY) | set(user)
    for m in methods or []:
        _, tag, spec = parse_method_name(m)
        if tag is not None:
            keys.add(spec.base)  # <name>@<tag>
    if methods is not None:
        specs = [parse_method_name(m)[2] for m in methods]
        used = {sp.base for sp in specs if sp.base}
        unused = sorted(k for k in user if user[k] and k not in used)
        if unused:
            raise UsageError(f"options given for {', '.join(map(repr, unused))}, which no method uses "
                             f"(methods: {', '.join(methods)}): they would be ignored")
        for sp in specs:
            twice = sorted(set(dict(sp.overrides)) & set(user.get(sp.base, {})))
            if twice:
                raise UsageError(f"{sp.base} option(s) {twice} given both in the method's brackets and by "
                                 "--est-opt; give each once")
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(keys):
        name = key.partition("@")[0]
        if name not in REGISTRY:
            raise UsageError(f"options given for unknown estimator {name!r}; known: {sorted(REGISTRY)}")
        fields = {f.name for f in dataclasses.fields(REGISTRY[name].Config)}
        opts = {k: v for k, v in DEFAULT_ESTIMATOR_OPTIONS.get(name, {}).items() if k in fields}
        if name == "laftr" and task == "classification":
            opts.update(CLASSIFICATION_LAFTR_OPTIONS)
        for k, v in user.get(key, {}).items():
            if k not in fields:
                raise UsageError(f"estimator {name!r} has no option {k!r}; its options: {sorted(fields)}")
            if k == "metric":
                raise UsageError("the estimator's metric is the loss's Bregman divergence; do not set it")
            opts[k] = v
        out[key] = opts
    return out


def _check_methods(methods: Any) -> None:
    """Refuse ``methods`` unless it is a list (or tuple) of method names."""
    if isinstance(methods, str):
        raise UsageError(f"methods must be a list of method names, e.g. {methods.split(',')!r}, not the "
                         f"string {methods!r}")
    if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
        raise UsageError(f"methods must be a list of method names, e.g. ['pbrf', 'influence'], "
                         f"got {methods!r}")


def _unique(methods: list[str]) -> list[str]:
    """``methods`` without repeats, in their first order."""
    seen: list[str] = []
    for m in methods:
        if m not in seen:
            seen.append(m)
    return seen


# --------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(kw_only=True)
class InfluenceBaseConfig(ExperimentConfig):
    """The fields shared by :class:`InfluenceExperimentConfig` and :class:`MislabeledConfig`.

    The data, the methods, the trained MLP and the solvers. Fields left at ``None`` take the defaults of the
    data set (and of ``quick``) when the config is constructed; then every field is checked
    (:class:`~laftr.errors.UsageError` naming the first bad one). Every field is keyword-only.

    Attributes:
        dataset: the data set (each experiment lists its own).
        methods: a list of method names (:func:`~laftr.influence.make_method`); repeats are dropped.
        seed: seed of the model's initialization, the training order and every random choice (>= 0).
        quick: a small, fast configuration for smoke tests (not a benchmark).
        n_train: training examples used (a seeded random subset of the split; None: all, unless the
            experiment's default is a subset).
        hidden: hidden widths of the MLP.
        epochs: training epochs (full-batch steps for regression tables).
        lr: Adam learning rate of training.
        batch_size: training batch size (classification; regression trains full batch).
        damping: ``lam`` > 0 of the PBRF and of the influence function (0 is ill-posed: refused).
        epsilon: weight of the removed example (None: ``1/N``), see :class:`~laftr.influence.PBRFConfig`.
        rtol: PBRF stopping tolerance.
        max_iter: the PBRF solver's iteration cap.
        cg_rtol: conjugate-gradient tolerance of the classical influence.
        estimator_options: per estimator name, options of ``pbrf-<name>`` (merged with defaults; checked
            at construction, and a Monte Carlo estimator without ``fixed_noise`` is refused).
        progress: show progress bars.
    """

    dataset: str
    methods: list[str]
    seed: int = 0
    quick: bool = False
    n_train: int | None = None
    hidden: tuple[int, ...] | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 128
    damping: float | None = None
    epsilon: float | None = None
    rtol: float = 1e-7
    max_iter: int = 1000
    cg_rtol: float = 1e-8
    estimator_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    progress: bool = False

    def resolved(self) -> InfluenceBaseConfig:
        """A copy of this config (same class), resolved and checked again.

        Kept for older code: a config is complete and checked once constructed.
        """
        return dataclasses.replace(self)

    def _defaults(self) -> dict[str, Any]:
        """The defaults of the fields left at ``None``, for the data set and ``quick`` (none here)."""
        return {}

    def _resolve(self) -> None:
        """Drop repeated methods; fill the fields left at ``None`` from :meth:`_defaults`."""
        _check_methods(self.methods)
        self.methods = _unique(list(self.methods))
        self._fill(self._defaults())

    def _task(self) -> str:
        """``classification`` on the classification sets, else ``regression``."""
        return "classification" if self.dataset in MISLABELED_DATASETS else "regression"

    def _validate(self) -> None:
        """Check the methods, the model and its training, and the solvers (the data set is the subclass's).

        Sizes are integers (not bools or floats), flags bools, rates and tolerances finite numbers.
        """
        _check_methods(self.methods)
        if not self.methods:
            raise UsageError("give at least one method")
        for m in self.methods:
            check_method(m)
        check_int(self.seed, "seed", minimum=0)
        check_bool(self.quick, "quick")
        check_bool(self.progress, "progress")
        if self.n_train is not None and not (is_integer(self.n_train) and self.n_train >= 2):
            raise UsageError(f"n_train must be an integer >= 2 (or None: the default), got {self.n_train!r}")
        if (not isinstance(self.hidden, (tuple, list)) or not self.hidden
                or not all(is_integer(h) and h >= 1 for h in self.hidden)):
            raise UsageError(f"hidden widths must be positive integers, e.g. (50, 50), got {self.hidden!r}")
        assert self.epochs is not None and self.lr is not None and self.damping is not None  # _resolve
        check_int(self.epochs, "epochs", minimum=1)
        check_positive(self.lr, "lr")
        check_int(self.batch_size, "batch_size", minimum=1)
        d = self.damping
        if not (is_number(d) and math.isfinite(d)):
            raise UsageError(f"damping must be a finite number > 0, got {d!r}")
        if d < 0:
            raise UsageError(f"damping must be >= 0 to weigh the proximity term, and > 0 for a well-posed "
                             f"PBRF; got {d!r}")
        if d == 0:
            raise UsageError("damping must be > 0, got 0: without the proximity term the PBRF of a network "
                             "with more parameters than the data constrain has no unique minimum, and "
                             "(G + 0 I)^{-1} of the influence function does not exist; use e.g. 1e-3")
        if not isinstance(self.estimator_options, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.estimator_options.items()):
            raise UsageError("estimator_options must be a dict {estimator name: {option: value}}, got "
                             f"{self.estimator_options!r}")
        # the solvers' settings, checked now rather than after the network is trained
        PBRFConfig(damping=d, epsilon=self.epsilon, rtol=self.rtol, max_iter=self.max_iter)
        InfluenceConfig(damping=d, cg_rtol=self.cg_rtol)
        # the estimators' options (unknown ones, and Monte Carlo draws the PBRF refuses)
        options = resolve_estimator_options(self.estimator_options, self._task(), self.methods)
        for m in self.methods:
            meth = make_method(m, estimator_options=options)
            if isinstance(meth, PBRFMethod) and meth.estimator_name is not None:
                meth.make_estimator(self._task())  # option values, checked before the network is trained


@dataclasses.dataclass(kw_only=True)
class InfluenceExperimentConfig(InfluenceBaseConfig):
    """Options of :func:`run_influence`, complete and checked once constructed.

    ``InfluenceExperimentConfig(dataset="boston", methods=["pbrf", "magic"])`` raises at once (an unknown
    method); fields left at ``None`` take the data set's defaults (and ``quick``'s).

    Attributes:
        dataset: ``boston``, ``autompg``, ``diabetes``, ``fashion-mnist`` or ``mnist-sample``.
        methods: method names; ``pbrf`` (the reference) is added first when missing.
        n_measure: test points of the measurement ``M``.
        n_queries: removed training points scored.
    """

    n_measure: int = 20
    n_queries: int | None = None

    def _defaults(self) -> dict[str, Any]:
        """The defaults of the regression tables or of the classification sets (smaller with ``quick``)."""
        reg = self.dataset not in MISLABELED_DATASETS
        q = self.quick
        return {
            "n_train": (None if not q else 120) if reg else (10000 if not q else 500),
            "hidden": ((50, 50) if not q else (16, 16)) if reg else ((100,) if not q else (32,)),
            "epochs": (500 if not q else 200) if reg else (10 if not q else 3),
            "lr": 3e-3 if reg else 1e-3,
            "n_queries": 50 if not q else 8,
            "damping": 1.0 if reg else 0.1,
        }

    def _resolve(self) -> None:
        """The shared defaults, and ``pbrf`` first among the methods when missing."""
        super()._resolve()
        if self.methods and "pbrf" not in self.methods:
            self.methods = ["pbrf", *self.methods]

    def _validate(self) -> None:
        """Check the data set, the shared fields, the measurement and the queries."""
        if self.dataset not in INFLUENCE_DATASETS:
            raise UsageError(f"unknown data set {self.dataset!r}; choose one of {list(INFLUENCE_DATASETS)}")
        super()._validate()
        assert self.n_queries is not None  # _resolve
        check_int(self.n_measure, "n_measure")
        check_int(self.n_queries, "n_queries")
        if self.n_measure < 1 or self.n_queries < 2:
            raise UsageError("n_measure must be >= 1 and n_queries >= 2")


# --------------------------------------------------------------------------------------------- data/model
def load_tables(name: str, n_train: int | None, seed: int = 0) -> tuple[Any, str]:
    """The data set, flattened, restricted to ``n_train`` random training examples; and its task.

    The examples are drawn with a seed (some sets, e.g. ``mnist-sample``, are sorted by class).
    """
    import dataclasses as _dc

    from ..data import load_dataset

    ds = load_dataset(name).flat()
    if n_train is not None and n_train < ds.n_train:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(ds.n_train, generator=gen)[:n_train].sort().values
        subset = (f"sorted(torch.randperm({ds.n_train}, generator=Generator().manual_seed({seed}))"
                  f"[:{n_train}])")
        ds = _dc.replace(ds, x_train=ds.x_train[idx], y_train=ds.y_train[idx],
                         meta={**ds.meta, "train_subset": subset})
    elif n_train is not None and n_train > ds.n_train:
        raise UsageError(f"{name} has {ds.n_train} training examples; n_train={n_train} is too many")
    return ds, infer_task(ds.y_train)


def train_model(X: torch.Tensor, Y: torch.Tensor, task: str, hidden: tuple[int, ...], epochs: int, lr: float,
                batch_size: int, seed: int, progress: bool = False,
                num_classes: int | None = None) -> nn.Module:
    """Train an MLP with Adam in float32 and return it in float64, ready for influence computations.

    Full batch for regression, minibatches for classification (the training loop ``laftr.training.train``).
    """
    torch.manual_seed(seed)  # nn.Linear initializes from the global generator
    out_dim = Y.shape[1] if task == "regression" else (num_classes or int(Y.max()) + 1)
    model = mlp(X.shape[1], tuple(hidden), out_dim, flatten=False).float()
    X = X.float()
    Y = Y.float() if Y.is_floating_point() else Y
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train(model, lambda idx: per_example_loss(model(X[idx]), Y[idx], task).mean(), X.shape[0], opt,
          batch_size=batch_size, gen=torch.Generator().manual_seed(seed), epochs=epochs,
          full_batch=task == "regression", progress=progress, desc="training")
    return model.double().eval()


def _model_stats(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, Xt: torch.Tensor, Yt: torch.Tensor,
                 task: str) -> dict[str, float]:
    with torch.no_grad():
        z, zt = model(X.double()), model(Xt.double())
        out = {"train_loss": float(per_example_loss(z, Y, task).mean()),
               "test_loss": float(per_example_loss(zt, Yt, task).mean())}
        if task == "classification":
            out["train_accuracy"] = float((z.argmax(1) == Y).double().mean())
            out["test_accuracy"] = float((zt.argmax(1) == Yt).double().mean())
    return out


def _targets64(Y: torch.Tensor) -> torch.Tensor:
    return Y.double() if Y.is_floating_point() else Y


def _summ(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "max": float(a.max())}


def _solver_summary(stats: list[dict[str, Any]]) -> dict[str, Any]:
    if not stats or "iterations" not in stats[0]:
        return {}
    return {
        "iterations": _summ([s["iterations"] for s in stats]),
        "evaluations": _summ([s["evaluations"] for s in stats]),
        "grad_ratio": _summ([s["grad_ratio"] for s in stats]),
        "status": {k: sum(1 for s in stats if s["status"] == k)
                   for k in sorted({s["status"] for s in stats})},
    }


# --------------------------------------------------------------------------------------------- influence
def run_influence(config: InfluenceExperimentConfig, out_dir: str | Path, force: bool = False,
                  command: str = "") -> dict[str, Any]:
    """Run the influence benchmark and write its files to ``out_dir``.

    The files are ``results.json``, ``table.md`` and ``scatter.png``.

    Raises:
        ValueError: unknown data set or method, bad options.
        laftr.errors.OutDirError: ``out_dir`` exists, is not empty, and ``force`` is False.
    """
    cfg = dataclasses.replace(config)  # a copy, resolved and checked again (it may have changed in place)
    # construction filled every setting left at None
    assert cfg.hidden is not None and cfg.epochs is not None
    assert cfg.lr is not None and cfg.damping is not None
    est_opts = resolve_estimator_options(cfg.estimator_options,
                                  "classification" if cfg.dataset in MISLABELED_DATASETS
                                  else "regression", cfg.methods)
    folder = RunFolder(out_dir, force=force)
    out = folder.open()
    t_start = time.perf_counter()
    metadata = run_metadata(command, seed=cfg.seed, device="cpu")  # the revision the run started on
    ds, task = load_tables(cfg.dataset, cfg.n_train, cfg.seed)
    X, Y = ds.x_train, ds.y_train
    model = train_model(X, Y, task, cfg.hidden, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, cfg.progress,
                        ds.num_classes)
    X64, Y64 = X.double(), _targets64(Y)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    if cfg.n_measure > ds.n_test or cfg.n_queries > ds.n_train:
        raise UsageError(f"n_measure ({cfg.n_measure}) or n_queries ({cfg.n_queries}) exceeds the test "
                         f"({ds.n_test}) or training ({ds.n_train}) set")
    test_idx = torch.randperm(ds.n_test, generator=gen)[: cfg.n_measure].sort().values.tolist()
    query_idx = torch.randperm(ds.n_train, generator=gen)[: cfg.n_queries].tolist()
    meas = Measurement(ds.x_test[test_idx].double(), _targets64(ds.y_test[test_idx]), task)
    pcfg = PBRFConfig(damping=cfg.damping, epsilon=cfg.epsilon, rtol=cfg.rtol, max_iter=cfg.max_iter)
    icfg = InfluenceConfig(damping=cfg.damping, cg_rtol=cfg.cg_rtol)
    results: dict[str, Any] = {}
    for name in cfg.methods:
        meth = make_method(name, pbrf=pcfg, influence=icfg, estimator_options=est_opts)
        vals, record = _query_all(meth, name, (model, (X64, Y64), task, meas), query_idx, cfg.progress,
                                  "influence", float("nan"), measure=True)
        results[name] = {"influences": vals, **record}
        log.info("%s: setup %.2fs, %.3fs CPU per query", name, record["setup_cpu_s"],
                 results[name]["cpu_seconds_per_query"] or 0)
    ref = np.asarray(results["pbrf"]["influences"], dtype=np.float64)
    t_ref = results["pbrf"]["cpu_seconds_per_query"]
    rows = []
    for name, r in results.items():
        v = np.asarray(r["influences"], dtype=np.float64)
        ok = np.isfinite(v) & np.isfinite(ref)
        r["n_scored"] = int(ok.sum())
        r["pearson"] = pearson(v[ok], ref[ok]) if ok.sum() >= 2 else None
        r["spearman"] = spearman(v[ok], ref[ok]) if ok.sum() >= 2 else None
        c = r["cpu_seconds_per_query"]
        r["time_ratio_vs_pbrf"] = (c / t_ref) if c and t_ref else None
        rows.append({
            "method": name, "pearson": r["pearson"], "spearman": r["spearman"],
            "CPU s/query": c, "setup CPU s": r["setup_cpu_s"], "time / pbrf": r["time_ratio_vs_pbrf"],
            "stored floats": r["stored_floats"], "failed": len(r["failures"]),
        })
    table = markdown_table(rows, floatfmt=".3g")
    res = {
        "metadata": metadata,
        "config": dataclasses.asdict(cfg),
        "estimator_options": est_opts,
        "dataset": {"name": cfg.dataset, "task": task, "n_train": ds.n_train, "n_test": ds.n_test,
                    "train_subset": ds.meta.get("train_subset", "all"),
                    "input_dim": int(X.shape[1])},
        "model": {"hidden": list(cfg.hidden), "num_params": num_params(model),
                  **_model_stats(model, X64, Y64, ds.x_test, _targets64(ds.y_test), task)},
        "measurement": {"test_indices": test_idx, "value": float(meas(model).detach())},
        "query_indices": query_idx,
        "reference": "pbrf",
        "methods": results,
        "table_markdown": table,
        "wall_time_s": time.perf_counter() - t_start,
    }
    write_json_atomic(out / "results.json", res)
    (out / "table.md").write_text(_influence_md(res))
    _scatter(res, out / "scatter.png")
    folder.commit()
    return res


def _influence_md(res: dict[str, Any]) -> str:
    c, m = res["config"], res["model"]
    lines = [
        f"# Influence vs PBRF: {c['dataset']}",
        "",
        (f"MLP {m['hidden']} ({m['num_params']:,} parameters), N = {res['dataset']['n_train']}, "
        f"damping {c['damping']}, epsilon {'1/N' if c['epsilon'] is None else c['epsilon']}, "
        f"{len(res['query_indices'])} removed training points, M = mean loss on {c['n_measure']} test "
        f"points. Train loss {m['train_loss']:.4g}, test loss {m['test_loss']:.4g}."),
        "",
        res["table_markdown"],
        "",
        (f"Command: `{res['metadata']['command']}` (git {res['metadata']['git_revision']}), "
        f"wall time {res['wall_time_s']:.0f} s."),
        "",
    ]
    return "\n".join(lines)


def _scatter(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    names = [n for n in res["methods"] if n != "pbrf"]
    if not names:
        return
    ref = np.asarray(res["methods"]["pbrf"]["influences"], dtype=np.float64)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):  # the grid's last row may have spare axes
        r = res["methods"][name]
        v = np.asarray(r["influences"], dtype=np.float64)
        ok = np.isfinite(v)
        ax.scatter(ref[ok], v[ok], s=10, alpha=0.7)
        p, s = r["pearson"], r["spearman"]
        ax.set_title(f"{name}\nPearson {p:.2f}, Spearman {s:.2f}" if p is not None else name, fontsize=9)
        ax.set_xlabel("pbrf influence", fontsize=8)
        ax.set_ylabel(f"{name}", fontsize=8)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
        ax.axhline(0, lw=0.5, c="gray")
        ax.axvline(0, lw=0.5, c="gray")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Influence on M vs pbrf: {res['config']['dataset']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- mislabeled
@dataclasses.dataclass(kw_only=True)
class MislabeledConfig(InfluenceBaseConfig):
    """Options of :func:`run_mislabeled`, complete and checked once constructed.

    Fields left at ``None`` take the defaults of its size (``quick`` or not). The batch size and the solver
    tolerances default to other values than :class:`InfluenceExperimentConfig`'s (every training example is
    a query).

    Attributes:
        dataset: ``fashion-mnist`` or ``mnist-sample``.
        methods: method names (each ranks the training set by self-influence).
        noise: fraction of training labels flipped to another class, in (0, 1).
        batch_size: training batch size.
        rtol: PBRF stopping tolerance.
        max_iter: the PBRF solver's iteration cap.
        cg_rtol: conjugate-gradient tolerance of the classical influence.
    """

    noise: float = 0.1
    batch_size: int = 64
    rtol: float = 1e-6
    max_iter: int = 500
    cg_rtol: float = 1e-6

    def _defaults(self) -> dict[str, Any]:
        """The defaults of the full run, or of the smaller ``quick`` one."""
        q = self.quick
        # quick: 30 epochs as the full run (with 5 the under-trained network made most PBRF solves stall at
        # max_iter: 188 s for pbrf,pbrf-laftr,influence instead of 120 s, and a detection AUC 0.70, not 0.92)
        return {"n_train": 1000 if not q else 150, "hidden": (64,) if not q else (16,),
                "epochs": 30, "lr": 1e-3, "damping": 0.1}

    def _validate(self) -> None:
        """Check the data set, the shared fields and the noise (which must flip at least one label)."""
        if self.dataset not in MISLABELED_DATASETS:
            raise UsageError(f"mislabeled detection needs a classification data set: one of "
                             f"{list(MISLABELED_DATASETS)}, got {self.dataset!r}")
        if not (is_number(self.noise) and 0 < self.noise < 1):
            raise UsageError(f"noise must be a fraction in (0, 1), got {self.noise!r}")
        super()._validate()
        assert self.n_train is not None  # _resolve
        if round(self.noise * self.n_train) < 1:
            raise UsageError(f"noise {self.noise!r} flips no label of n_train={self.n_train} examples "
                             f"(round(noise * n_train) = 0); use noise >= {0.5 / self.n_train:.3g}")


def _query_all(meth: Any, name: str, setup_args: tuple[Any, ...], indices: Any, progress: bool, value: str,
               fail_value: float, **query_kw: Any) -> tuple[list[float], dict[str, Any]]:
    """Set up one method and query it at every index, timing both.

    A query that fails numerically (a ``FloatingPointError``: a PBRF without a local minimum,
    :class:`~laftr.errors.NoLocalMinimumError`, or a conjugate-gradient solve that did not converge,
    :class:`~laftr.errors.ConvergenceError`), or whose PBRF solve stopped at its iteration cap
    (status ``max_iter``: not a solution), is recorded as a failure and contributes ``fail_value``; a setup
    that fails numerically (the measurement's solve of ``influence``) fails every query. Returns
    the per-query values (attribute ``value`` of each result) and the method's record: setup and per-query
    wall/CPU seconds, stored floats, failures, solver statistics.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    setup_error = None
    try:
        meth.setup(*setup_args)
    except FloatingPointError as e:
        setup_error = f"setup: {e}"
        log.warning("%s: %s", name, setup_error)
    setup_s, setup_cpu = time.perf_counter() - t0, time.process_time() - c0
    vals, secs, cpus, stats, errors = [], [], [], [], []
    for i in tqdm(indices, disable=not progress or setup_error is not None, desc=name):
        try:
            if setup_error is not None:
                raise FloatingPointError(setup_error)
            r = meth.query(i, **query_kw)
            if r.stats.get("status") == "max_iter":
                raise FloatingPointError(
                    f"the PBRF solve stopped after {r.stats['iterations']} iterations, max|grad| ratio "
                    f"{r.stats['grad_ratio_max']:.3g} above rtol: increase max_iter or the damping")
        except FloatingPointError as e:  # no local minimum, or an unconverged solve
            errors.append({"index": i, "error": str(e)})
            vals.append(fail_value)
            continue
        vals.append(getattr(r, value))
        secs.append(r.seconds)
        cpus.append(r.cpu_seconds)
        stats.append(r.stats)
    return vals, {
        "setup_s": setup_s, "setup_cpu_s": setup_cpu,
        "seconds_per_query": float(np.mean(secs)) if secs else None,
        "cpu_seconds_per_query": float(np.mean(cpus)) if cpus else None,
        "stored_floats": meth.stored_floats(), "failures": errors,
        "solver": _solver_summary(stats), "describe": meth.describe(),
    }


def flip_labels(y: torch.Tensor, fraction: float, num_classes: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip ``round(fraction * N)`` random labels to a uniformly chosen *other* class.

    Returns:
        ``(noisy labels, boolean mask of flipped examples)``.
    """
    if not 0 < fraction < 1:
        raise UsageError(f"noise fraction must be in (0, 1), got {fraction}")
    if num_classes < 2:
        raise UsageError("need at least two classes to flip labels")
    n = y.shape[0]
    k = round(fraction * n)
    if k < 1:
        raise UsageError(f"noise {fraction} flips no label of {n} examples")
    idx = torch.randperm(n, generator=generator)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=generator)
    noisy = y.clone()
    noisy[idx] = (y[idx] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return noisy, mask


def run_mislabeled(config: MislabeledConfig, out_dir: str | Path, force: bool = False,
                   command: str = "") -> dict[str, Any]:
    """Run mislabeled-example detection and write ``results.json``, ``table.md`` and ``curves.png``."""
    cfg = dataclasses.replace(config)  # a copy, resolved and checked again (it may have changed in place)
    # construction filled every setting left at None
    assert cfg.hidden is not None and cfg.epochs is not None
    assert cfg.lr is not None and cfg.damping is not None
    est_opts = resolve_estimator_options(cfg.estimator_options, "classification", cfg.methods)
    folder = RunFolder(out_dir, force=force)
    out = folder.open()
    t_start = time.perf_counter()
    metadata = run_metadata(command, seed=cfg.seed, device="cpu")  # the revision the run started on
    ds, task = load_tables(cfg.dataset, cfg.n_train, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    y_noisy, flipped = flip_labels(ds.y_train, cfg.noise, int(ds.num_classes), gen)
    X = ds.x_train
    model = train_model(X, y_noisy, task, cfg.hidden, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed,
                        cfg.progress, ds.num_classes)
    X64 = X.double()
    N = X.shape[0]
    pcfg = PBRFConfig(damping=cfg.damping, epsilon=cfg.epsilon, rtol=cfg.rtol, max_iter=cfg.max_iter)
    icfg = InfluenceConfig(damping=cfg.damping, cg_rtol=cfg.cg_rtol)
    curves: dict[str, Any] = {}
    results: dict[str, Any] = {}
    fl = flipped.numpy()
    for name in cfg.methods:
        meth = make_method(name, pbrf=pcfg, influence=icfg, estimator_options=est_opts)
        # a diverged response ranks its example first (+inf)
        scores, record = _query_all(meth, name, (model, (X64, y_noisy), task, None), range(N), cfg.progress,
                                    "self_influence", float("inf"), measure=False, self_influence=True)
        x, yv = detection_curve(np.nan_to_num(np.asarray(scores), posinf=np.finfo(np.float64).max), fl)
        curves[name] = (x, yv)
        results[name] = {"auc": curve_area(x, yv), **record, "self_influence": scores}
    # references: training loss (a strong heuristic) and a seeded random ranking (the floor)
    with torch.no_grad():
        losses = per_example_loss(model(X64), y_noisy, task).numpy()
    rand = torch.rand(N, generator=torch.Generator().manual_seed(cfg.seed + 3)).double().numpy()
    refs = {"random": rand, "train-loss": losses}
    for name, s in refs.items():
        x, yv = detection_curve(s, fl)
        curves[name] = (x, yv)
        results[name] = {"auc": curve_area(x, yv), "reference": True}
    results["random"]["expected_auc"] = 0.5
    t_ref = results.get("pbrf", {}).get("cpu_seconds_per_query")
    rows = []
    for name, r in results.items():
        ratio = r["cpu_seconds_per_query"] / t_ref if r.get("cpu_seconds_per_query") and t_ref else None
        r["time_ratio_vs_pbrf"] = ratio
        x, yv = curves[name]
        found_at = {f"found@{p}": float(np.interp(p, x, yv)) for p in (0.1, 0.2)}
        r.update(found_at)
        rows.append({"method": name, "AUC": r["auc"], **found_at,
                     "CPU s/query": r.get("cpu_seconds_per_query"),
                     "time / pbrf": ratio, "stored floats": r.get("stored_floats"),
                     "failed": len(r.get("failures", []))})
    table = markdown_table(rows, floatfmt=".3g")
    res: dict[str, Any] = {
        "metadata": metadata,
        "config": dataclasses.asdict(cfg),
        "estimator_options": est_opts,
        "dataset": {"name": cfg.dataset, "task": task, "n_train": N, "num_flipped": int(flipped.sum()),
                    "train_subset": ds.meta.get("train_subset", "all")},
        "flipped_indices": flipped.nonzero().squeeze(1).tolist(),
        "model": {"hidden": list(cfg.hidden), "num_params": num_params(model),
                  **_model_stats(model, X64, y_noisy, ds.x_test, ds.y_test, task)},
        "methods": results,
        "curves": {k: {"inspected": x[:: max(1, N // 200)].tolist() + [1.0],
                       "found": y[:: max(1, N // 200)].tolist() + [1.0]} for k, (x, y) in curves.items()},
        "table_markdown": table,
        "wall_time_s": time.perf_counter() - t_start,
    }
    write_json_atomic(out / "results.json", res)
    m = res["model"]
    (out / "table.md").write_text("\n".join([
        f"# Mislabeled-example detection: {cfg.dataset}",
        "",
        (f"{res['dataset']['num_flipped']} of {N} training labels flipped (noise {cfg.noise}); MLP "
        f"{m['hidden']} ({m['num_params']:,} parameters), damping {cfg.damping}; examples ranked by "
        f"self-influence. Test accuracy {m['test_accuracy']:.3f}. `random` is the floor (expected AUC 0.5); "
        "`train-loss` ranks by the example's training loss (a heuristic, not an influence method)."),
        "",
        table,
        "",
        f"Command: `{command}` (git {res['metadata']['git_revision']}), wall time {res['wall_time_s']:.0f} "
        "s.",
        "",
    ]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (x, yv) in curves.items():
        style = {"ls": "--", "c": "gray"} if name == "random" else {"ls": ":"} if name == "train-loss" else {}
        ax.plot(x, yv, label=f"{name} (AUC {results[name]['auc']:.3f})", **style)
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(f"{cfg.dataset}: {int(flipped.sum())} flipped of {N}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    folder.commit()
    plt.close(fig)
    return res
