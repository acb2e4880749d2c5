"""``laftr fsd-bench``: how closely each FSD estimator tracks the exact FSD, with its memory and time.

Protocol (docs/fsd-bench.md):

1. theta0: a network trained on task A (images: by default Fashion-MNIST classes 0-4, multi-head: task A's
   loss and distances use output units 0-4 only; ``--arch transformer``: modular addition mod 113 on one head
   of all 113 outputs).
2. Every estimator is fitted ONCE at theta0 on task A's training inputs; the exact FSD is over the same
   inputs.
3. Many thetas from diverse continuations of theta0 (another task, permuted pixels or other arithmetic tasks,
   random labels, more training on task A, function-space-regularized training on another task), each at
   several checkpoints, so the exact FSD spans orders of magnitude. A trajectory with ``track_epochs`` records
   a theta at the end of every epoch (LIFTR's protocol: estimate vs exact while the second task trains) and
   gets its own section in the report.
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
from torch import nn
from tqdm.auto import tqdm

from .. import available_estimators, exact_fsd, make_estimator
from .._util import trainable_params
from ..config import ExperimentConfig
from ..errors import LaftrError, UsageError
from ..exact import exact_fsd_and_grad
from ..metrics import QUADRATIC_METRICS, check_metric, discrepancy
from ..models import conv_net, lstm, mlp, num_params, transformer, vit
from ..report import RunFolder, markdown_table, pyplot, run_metadata, write_json_atomic
from ..specs import Spec, check_keys, config_keys, format_spec, parse_spec
from ..stats import agreement
from ..training import head_loss, train

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- architectures
@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What the benchmark does differently for one network.

    Attributes:
        inputs: ``images`` (float images; task A / task B class layout) or ``tokens`` (modular arithmetic: one
            head, every task answers with all outputs).
        closed_form: add the ``laftr-exact*`` rows (MLPs: no max pooling, no attention, states small enough).
        maxpool: add LAFTR's max-pool variants (``laftr-pool-*``).
        kfac_unsupported: K-FAC's ``unsupported`` option: ``error`` (every trainable parameter sits in a
            Linear/Conv2d layer) or ``diag`` (LayerNorm, embeddings, class token, positional embedding and
            attention projections without Kronecker factors get their diagonal Gauss-Newton term).
        liftr: add the ``liftr`` rows when an estimator of that name is registered.
        description: the network in words (CLI help, report).
    """

    inputs: str
    closed_form: bool
    maxpool: bool
    kfac_unsupported: str
    liftr: bool
    description: str


ARCH_SPECS: dict[str, ArchSpec] = {
    "mlp": ArchSpec("images", True, False, "error", False, "784-256-256-10 ReLU MLP"),
    "cnn": ArchSpec("images", False, True, "error", False,
                    "the Split-CIFAR conv net (ReLU, max pooling), half width"),
    "mlp-gelu": ArchSpec("images", True, False, "diag", False, "784-512-512-10 MLP, LayerNorm + GELU"),
    "vit": ArchSpec("images", False, False, "diag", True,
                    "ViT: 7x7 patches, d_model 64, 4 heads, 2 pre-LN blocks, GELU MLP 128, class token"),
    "transformer": ArchSpec("tokens", False, False, "diag", True,
                            "pre-LN decoder: d_model 128, 4 heads, 2 blocks, GELU MLP 512, "
                            "causal, last-token readout"),
    "lstm": ArchSpec("tokens", False, False, "diag", True,
                     "token embedding 128, 2-layer LSTM 128, last-position readout"),
}
ARCHS = tuple(ARCH_SPECS)
TOKEN_DATASETS = ("arithmetic",)
"""Data sets of token sequences: they go with the token networks (``--arch transformer``, ``lstm``) only."""

MODEL_SIZES: dict[str, dict[str, int]] = {
    "transformer": {"d_model": 128, "heads": 4, "blocks": 2, "d_mlp": 512},
    "vit": {"d_model": 64, "heads": 4, "blocks": 2, "d_mlp": 128},
    "lstm": {"d_model": 128, "blocks": 2},
}
"""Default sizes of the transformer networks (config fields left ``None`` take these)."""

# ------------------------------------------------------------------------------------------- continuations
@dataclasses.dataclass(frozen=True)
class TrajectoryKind:
    """What one kind of continuation trains on.

    Attributes:
        task: the task of the loaded data it trains on (images: ``A``, ``B``, ``permuted``; arithmetic:
            ``add``, ``subtract``, ``quadratic``, ``random``).
        doc: one line for the docs and the config's validation message.
        random_labels: labels drawn uniformly from the task's classes instead of the true ones.
        regularized: add ``lam`` x the exact KL FSD to theta0 on a random task-A minibatch (a replay
            regularizer that stays close to theta0).
    """

    task: str
    doc: str
    random_labels: bool = False
    regularized: bool = False


IMAGE_KINDS: dict[str, TrajectoryKind] = {
    "task-B": TrajectoryKind("B", "task B's classes on their own output units"),
    "permuted": TrajectoryKind("permuted", "all classes, pixels under a fixed permutation, all outputs"),
    "random-labels": TrajectoryKind("A", "task A's inputs with random task-A labels", random_labels=True),
    "task-A": TrajectoryKind("A", "more training on task A itself"),
    "task-B+reg": TrajectoryKind("B", "task B plus lam x exact KL FSD to theta0 on a task-A minibatch",
                                 regularized=True),
}
ARITHMETIC_KINDS: dict[str, TrajectoryKind] = {
    "subtract": TrajectoryKind("subtract", "the subtract task (a - b mod p; its own operator token)"),
    "quadratic": TrajectoryKind("quadratic", "the quadratic task (a^2 + ab + b^2 mod p)"),
    "random": TrajectoryKind("random", "the random task (a fixed random table r[a, b])"),
    "add": TrajectoryKind("add", "more training on add (task A) itself"),
    "subtract+reg": TrajectoryKind("subtract",
                                   "subtract plus lam x exact KL FSD to theta0 on an add minibatch",
                                   regularized=True),
}
KINDS = tuple(IMAGE_KINDS)
"""Trajectory kinds of the image data sets (see :data:`ARITHMETIC_KINDS` for modular arithmetic)."""


def trajectory_kinds(dataset: str) -> dict[str, TrajectoryKind]:
    """The trajectory kinds available on ``dataset``."""
    return ARITHMETIC_KINDS if dataset in TOKEN_DATASETS else IMAGE_KINDS


OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclasses.dataclass
class Trajectory:
    """One continuation of theta0; every checkpoint (in optimizer steps) becomes a theta.

    Attributes:
        kind: what it trains on, one of :data:`IMAGE_KINDS` (``task-B``: task B's classes on their own
            outputs, ``permuted``: all classes, pixels under a fixed permutation, all outputs,
            ``random-labels``: task A's inputs, random task-A labels, ``task-A``: more training on task A
            itself, ``task-B+reg``: task B plus ``lam`` times the exact KL FSD to theta0 on a random task-A
            minibatch) or, for modular arithmetic, of :data:`ARITHMETIC_KINDS` (``subtract``, ``quadratic``,
            ``random``, ``add``, ``subtract+reg``).
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        lr: learning rate.
        checkpoints: steps (batches) after which theta is recorded.
        lam: weight of the replay regularizer (``+reg`` kinds only).
        weight_decay: the optimizer's weight decay.
        track_epochs: if positive, theta is recorded at the end of each of this many epochs instead of at
            ``checkpoints`` (LIFTR's protocol); the report follows the estimates along this trajectory.
    """

    kind: str
    optimizer: str
    lr: float
    checkpoints: list[int]
    lam: float = 0.0
    weight_decay: float = 0.0
    track_epochs: int = 0

    def label(self) -> str:
        """A short description for plots and tables: kind, optimizer, learning rate (and decay, lambda)."""
        lam = f" lam={self.lam:g}" if self.kind.endswith("+reg") else ""
        wd = f" wd={self.weight_decay:g}" if self.weight_decay else ""
        return f"{self.kind} {self.optimizer} lr={self.lr:g}{wd}{lam}"

    def steps(self, n_train: int, batch_size: int) -> list[int]:
        """The steps at which theta is recorded, for a task of ``n_train`` examples."""
        if self.track_epochs > 0:
            per_epoch = max(1, n_train // batch_size)  # :func:`_train` drops the last partial batch
            return [e * per_epoch for e in range(1, self.track_epochs + 1)]
        return sorted(set(self.checkpoints))


def default_trajectories(quick: bool = False, dataset: str = "fashion-mnist") -> list[Trajectory]:
    """The continuations of the benchmark.

    Images: 44 thetas (11 trajectories x 4 checkpoints), or 10 with ``quick``. Modular arithmetic: 44 thetas
    (subtract at 3 learning rates, quadratic and random at 2, add with SGD at 2, subtract+reg at lam 1 and 10;
    4 checkpoints each) plus LIFTR's protocol, subtract with AdamW (lr 1e-3, weight decay 0.1) recorded after
    every epoch for 10 epochs; ``quick``: 10 + 4.
    """
    if dataset in TOKEN_DATASETS:
        tracked = Trajectory("subtract", "adamw", 1e-3, [], weight_decay=0.1, track_epochs=4 if quick else 10)
        if quick:
            ck = [3, 30]
            return [Trajectory("subtract", "adam", 1e-3, ck), Trajectory("quadratic", "adam", 1e-3, ck),
                    Trajectory("random", "adam", 1e-3, ck), Trajectory("add", "sgd", 0.1, ck),
                    Trajectory("subtract+reg", "adam", 1e-3, ck, lam=10.0), tracked]
        ck = [2, 10, 50, 250]
        return [
            *(Trajectory("subtract", "adam", lr, ck) for lr in (3e-4, 1e-3, 3e-3)),
            *(Trajectory("quadratic", "adam", lr, ck) for lr in (1e-3, 3e-3)),
            *(Trajectory("random", "adam", lr, ck) for lr in (1e-4, 1e-3)),
            *(Trajectory("add", "sgd", lr, ck) for lr in (0.01, 0.1)),
            *(Trajectory("subtract+reg", "adam", 1e-3, ck, lam=lam) for lam in (1.0, 10.0)),
            tracked,
        ]
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


def near_trajectories(dataset: str = "fashion-mnist") -> list[Trajectory]:
    """44 thetas that stay near theta0, for data sets where the default thetas are almost all far.

    The kinds of :func:`default_trajectories` at 10-100x smaller learning rates, checkpoints after 1, 3, 10
    and 30 steps, and the replay-regularized runs at lam 10 and 100 (the regime a function-space regularizer
    keeps a network in). On modular arithmetic, where one Adam step at lr 1e-3 already erases the learned
    task, the default thetas are almost all far; these are not. LIFTR's protocol is kept: a tracked
    replay-regularized subtract run recorded after each of 5 epochs (54 thetas in all).
    """
    ck = [1, 3, 10, 30]
    if dataset in TOKEN_DATASETS:
        return [
            *(Trajectory("subtract", "adam", lr, ck) for lr in (1e-5, 3e-5, 1e-4)),
            *(Trajectory("quadratic", "adam", lr, ck) for lr in (3e-5, 1e-4)),
            *(Trajectory("random", "adam", lr, ck) for lr in (1e-5, 1e-4)),
            *(Trajectory("add", "sgd", lr, ck) for lr in (1e-3, 1e-2)),
            *(Trajectory("subtract+reg", "adam", 1e-4, ck, lam=lam) for lam in (10.0, 100.0)),
            Trajectory("subtract+reg", "adam", 1e-4, [], lam=10.0, track_epochs=5),
        ]
    return [
        *(Trajectory("task-B", "adam", lr, ck) for lr in (1e-5, 3e-5, 1e-4)),
        *(Trajectory("permuted", "adam", lr, ck) for lr in (3e-5, 1e-4)),
        *(Trajectory("random-labels", "adam", lr, ck) for lr in (1e-5, 1e-4)),
        *(Trajectory("task-A", "sgd", lr, ck) for lr in (1e-3, 1e-2)),
        *(Trajectory("task-B+reg", "adam", 1e-4, ck, lam=lam) for lam in (10.0, 100.0)),
    ]


THETA_SETS: dict[str, Callable[[str], list[Trajectory]]] = {"near": near_trajectories}
"""Named sets of continuations besides the default (``--thetas``)."""


@dataclasses.dataclass
class FsdBenchConfig(ExperimentConfig):
    """Settings of one benchmark run (all recorded in results.json), complete and checked once constructed.

    Construction fills the tasks and model sizes left at ``None`` with the defaults of the data set and
    ``arch``, then checks every setting (:class:`~laftr.errors.UsageError` naming the first bad one);
    :meth:`for_arch` starts from the defaults of a network (and ``quick``).

    Attributes:
        dataset: a classification data set known to :func:`laftr.data.load_dataset` (images), or
            ``arithmetic`` (modular arithmetic token sequences; ``arch`` must be ``transformer`` or ``lstm``).
        data_dir: where its files are (when the loader needs one).
        arch: ``mlp`` (784-hidden-10, ReLU), ``mlp-gelu`` (784-512-512-10 with LayerNorm after each hidden
            Linear and GELU), ``cnn`` (the conv net of METHOD.md section 4, scaled by ``width``), ``vit`` (a
            small vision transformer), ``transformer`` (a pre-LayerNorm decoder over token sequences) or
            ``lstm`` (an embedding, a stacked LSTM and a readout of the last position); see
            :data:`ARCH_SPECS`.
        hidden: MLP hidden widths (``mlp-gelu``: 512, 512 unless given).
        width: channel/fc multiplier of the conv net.
        d_model: width of the residual stream of ``vit`` / ``transformer``, the embedding and hidden width of
            ``lstm`` (None: :data:`MODEL_SIZES`).
        heads: attention heads (None: :data:`MODEL_SIZES`).
        blocks: transformer blocks, LSTM layers (None: :data:`MODEL_SIZES`).
        d_mlp: hidden width of each block's GELU MLP (None: :data:`MODEL_SIZES`).
        patch: side of the ViT's square patches.
        p: modulus of the arithmetic tasks (also the number of outputs).
        train_fraction: fraction of the ``p^2`` pairs in each arithmetic task's training part.
        task_a: task A's classes (theta0's task, and the outputs compared); None: 0-4 on images, and empty for
            arithmetic, where task A is ``add`` on all ``p`` outputs.
        task_b: task B's classes (a continuation task); None: 5-9 on images, empty for arithmetic.
        n_fit: task-A training examples used for theta0, the estimators' fit and the exact FSD (None: all).
        n_other: examples of each continuation task.
        epochs_a: epochs of training on task A.
        batch_size: batch size of every training run.
        lr_a: Adam learning rate on task A.
        schedule_a: learning-rate schedule on task A: ``constant`` or ``cosine`` (linear warm-up over the
            first epoch, then a cosine decay to 0).
        metrics: output discrepancies compared.
        methods: method labels to run (None: all of :func:`method_specs`): named rows (:data:`ROW_SPECS`,
            ``subset-K``, ``ntk-K``) or estimator specs such as ``laftr[num_samples=400]`` (labelled by their
            canonical text).
        coreset_sizes: k of the coreset baselines (``subset``, ``ntk``); the k matching LAFTR's memory is
            added.
        num_samples: Monte Carlo samples of the LAFTR (and LIFTR) estimators.
        rank: rank of LAFTR's low-rank input model.
        components: mixture components of ``laftr-mixture`` (no labels used).
        laftr_coreset: stored inputs of LAFTR's coreset input model.
        eval_calls: calls averaged for a stochastic estimator's estimate.
        trajectories: the continuations (None: :func:`default_trajectories` for the data set).
        seed: seed of everything (also of the arithmetic tasks' random table and train/test split).
        threads: torch threads (None: leave as is).
        progress: progress bars.
        quick: the settings came from :meth:`quick` (recorded).
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    arch: str = "mlp"
    hidden: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    width: float = 0.5
    d_model: int | None = None
    heads: int | None = None
    blocks: int | None = None
    d_mlp: int | None = None
    patch: int = 7
    p: int = 113
    train_fraction: float = 0.7
    task_a: list[int] | None = None
    task_b: list[int] | None = None
    n_fit: int | None = None
    n_other: int = 10000
    epochs_a: int = 3
    batch_size: int = 128
    lr_a: float = 1e-3
    schedule_a: str = "constant"
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

    def _resolve(self) -> None:
        """Fill the tasks and the model sizes left at None with the defaults of the data set and ``arch``."""
        tokens = self.dataset in TOKEN_DATASETS
        self._fill({"task_a": [] if tokens else [0, 1, 2, 3, 4], "task_b": [] if tokens else [5, 6, 7, 8, 9]})
        self._fill(MODEL_SIZES.get(self.arch, {}))

    @property
    def tokens(self) -> bool:
        """Whether the data are token sequences (modular arithmetic)."""
        return self.dataset in TOKEN_DATASETS

    @classmethod
    def for_arch(cls, arch: str, quick: bool = False, **overrides: Any) -> FsdBenchConfig:
        """A config of ``arch``'s defaults, shrunk to a sub-two-minute run with ``quick``.

        ``overrides`` win (``None`` values are ignored); the config is resolved and checked like any.
        """
        base: dict[str, Any] = {"arch": arch, "quick": quick}
        if arch == "cnn":
            base.update(n_fit=6000, n_other=6000, epochs_a=2, coreset_sizes=[10, 40, 200, 1000])
        if arch == "mlp-gelu":
            base.update(hidden=[512, 512])
        if arch == "vit":
            base.update(n_fit=12000, n_other=12000, epochs_a=10)
        spec = ARCH_SPECS.get(arch)  # an unknown one is refused by the config's own check
        if spec is not None and spec.inputs == "tokens":
            base.update(dataset="arithmetic", epochs_a=30, schedule_a="cosine", lr_a=1e-3)
        if quick:
            base.update(coreset_sizes=[10, 40], num_samples=32, eval_calls=2, rank=5, laftr_coreset=40)
            # tiny transformers gain nothing from threads and lose much on a busy machine: one thread
            if arch == "transformer":
                base.update(p=23, d_model=32, heads=2, blocks=1, d_mlp=64, epochs_a=60, batch_size=64,
                            lr_a=3e-3, n_other=400, threads=1)
            elif arch == "lstm":
                base.update(p=23, d_model=32, blocks=1, epochs_a=60, batch_size=64, lr_a=3e-3, n_other=400,
                            threads=1)
            elif arch == "vit":
                base.update(n_fit=600, n_other=600, d_model=16, heads=2, blocks=1, d_mlp=32, epochs_a=2,
                            threads=1)
            else:
                base.update(n_fit=1500 if arch == "mlp" else 600, n_other=1500 if arch == "mlp" else 600,
                            hidden=[64, 64], width=0.25, epochs_a=2)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def _check_token_input_models(self, adhoc: list[tuple[str, Spec]]) -> None:
        """On token sequences, refuse an estimator spec that would draw from a Gaussian input model.

        ``adhoc``: each estimator-spec method's text and parsed spec (the named rows carry their token
        settings). Checked before any training, so the mistake costs nothing (it used to surface after theta0
        and every continuation were trained).
        """
        for m, parsed in adhoc:
            name = _gaussian_input_model(parsed)
            if name is not None:
                raise UsageError(f"method {m!r} draws from the {name!r} input model, a Gaussian over "
                                 f"floating inputs, but {self.dataset} is token sequences: give it "
                                 "input_model=tokens (or tokens-classwise, tokens-mixture, coreset)")

    def _check_selected_rows(self) -> None:
        """Every method the user named gives a row on this network for some metric of the run.

        A named row that this network does not have (``laftr-exact`` on a transformer), or one whose estimator
        supports none of the run's metrics (``laftr-exact`` with ``--metrics kl``), is refused here, before
        any work, rather than silently left out of the tables. The options of estimator specs are checked by
        building each estimator once (a bad value is named now, not after theta0 is trained).
        """
        rows = {r.label: r for r in method_specs(self)}
        selected = _selected(self)
        for row in rows.values():
            metrics = [m for m in self.metrics if row.metrics is None or m in row.metrics]
            if (row.label in selected or row.spec in selected) and metrics:
                try:
                    make_estimator(row.estimator, **{**row.options, "metric": metrics[0]})
                except (LaftrError, TypeError, ValueError) as e:
                    raise UsageError(f"method {row.label!r}: {e}") from e
        for m in self.methods or []:
            if re.fullmatch(r"(subset|ntk)-\d+", m):
                continue
            parsed = _adhoc_spec(m)
            found = rows.get(m) if parsed is None else rows.get(parsed.text, rows.get(m))
            if found is None:
                raise UsageError(f"method {m!r} has no row on --arch {self.arch} "
                                 f"({ARCH_SPECS[self.arch].description}): its rows are "
                                 f"{sorted(r for r in rows if not r.endswith(_MATCHED_TAG))}")
            if found.metrics is not None and not set(found.metrics) & set(self.metrics):
                raise UsageError(f"method {m!r} ({found.estimator}) supports the metrics "
                                 f"{', '.join(found.metrics)} only, and the run has "
                                 f"{', '.join(self.metrics)}: add one to --metrics or drop the method")

    def _validate(self) -> None:
        """Raise a :class:`~laftr.errors.UsageError` (a ValueError) naming the first bad setting."""
        if self.arch not in ARCHS:
            raise UsageError(f"unknown arch {self.arch!r}; choose one of {list(ARCHS)}")
        spec = ARCH_SPECS[self.arch]
        if spec.inputs == "tokens" and not self.tokens:
            raise UsageError(f"--arch {self.arch} takes token sequences: use --dataset "
                             f"{' or '.join(TOKEN_DATASETS)} (got {self.dataset!r})")
        if spec.inputs != "tokens" and self.tokens:
            raise UsageError(f"--dataset {self.dataset} is token sequences: it needs a token network, --arch "
                             f"transformer or lstm (--arch {self.arch} takes images)")
        for m in self.metrics:
            check_metric(m)
        if not self.metrics:
            raise UsageError("no metrics given")
        if len(set(self.metrics)) != len(self.metrics):
            raise UsageError(f"metrics {self.metrics} name one twice")
        assert self.task_a is not None and self.task_b is not None
        if self.tokens:
            if self.task_a or self.task_b:
                raise UsageError("task_a / task_b choose image classes; on arithmetic task A is 'add' on all "
                                 "p outputs and the continuations are trajectory kinds: leave them empty")
        elif set(self.task_a) & set(self.task_b) or not self.task_a or not self.task_b:
            raise UsageError(f"task A {self.task_a} and task B {self.task_b} must be disjoint, non-empty")
        if any(k < 1 for k in self.coreset_sizes) or self.num_samples < 1 or self.eval_calls < 1:
            raise UsageError("coreset sizes, num_samples and eval_calls must be positive")
        if self.n_fit is not None and self.n_fit < 10:
            raise UsageError("n_fit must be at least 10 examples")
        if self.schedule_a not in ("constant", "cosine"):
            raise UsageError(f"unknown schedule_a {self.schedule_a!r}; choose 'constant' or 'cosine'")
        for key in ("d_model", "heads", "blocks", "d_mlp", "patch", "p", "epochs_a", "batch_size", "n_other"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UsageError(f"{key} must be a positive integer, got {v!r}")
        if self.p < 2:
            raise UsageError(f"the modulus p must be at least 2, got {self.p}")
        if not 0.0 < self.train_fraction < 1.0:
            raise UsageError(f"train_fraction must be in (0, 1), got {self.train_fraction!r}")
        if self.methods is not None:
            static = _named_labels(self.coreset_sizes)
            adhoc = [(m, _adhoc_spec(m)) for m in self.methods
                     if m not in static and not re.fullmatch(r"(subset|ntk)-\d+", m)]
            bad = [m for m, parsed in adhoc if parsed is None]
            if bad or not self.methods:
                raise UsageError(f"unknown method(s) {bad}; known: {sorted(static)} and subset-K / ntk-K, or "
                                 f"a spec of an estimator ({', '.join(available_estimators())}) such as "
                                 "laftr[num_samples=400]")
            if ARCH_SPECS[self.arch].inputs == "tokens":
                self._check_token_input_models([(m, p) for m, p in adhoc if p is not None])
            self._check_selected_rows()
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise UsageError(f"threads must be a positive integer (or None: torch's choice), got "
                             f"{self.threads!r}")
        kinds = trajectory_kinds(self.dataset)
        for t in self.trajectories or []:
            if t.kind not in kinds:
                raise UsageError(f"unknown trajectory kind {t.kind!r} on {self.dataset}; choose "
                                 f"one of {list(kinds)}")
            if (t.optimizer not in OPTIMIZERS or t.lr <= 0 or t.weight_decay < 0 or t.lam < 0
                    or not isinstance(t.track_epochs, int) or t.track_epochs < 0
                    or (t.track_epochs == 0 and (not t.checkpoints or min(t.checkpoints) < 1))):
                raise UsageError(f"bad trajectory {t}: optimizer one of {list(OPTIMIZERS)}, lr > 0, lam and "
                                 "weight_decay >= 0, and checkpoints >= 1 (or track_epochs > 0)")


# ------------------------------------------------------------------------------------------- methods
ROW_SPECS: dict[str, dict[str, str]] = {
    "laftr": {
        "laftr": "laftr[num_samples={S},input_model=gaussian]",
        "laftr-shared-masks": "laftr[num_samples={S},input_model=gaussian,shared_masks=True]",
        "laftr-diag": "laftr[num_samples={S},input_model=diag]",
        "laftr-lowrank": "laftr[num_samples={S},input_model=lowrank,rank={rank}]",
        "laftr-classwise": "laftr[num_samples={S},input_model=classwise]",
        "laftr-mixture": "laftr[num_samples={S},input_model=mixture,components={components}]",
        "laftr-mixture-diag": "laftr[num_samples={S},input_model=mixture,components={components},"
                              "component_cov=diag]",
        "laftr-relu": "laftr[num_samples={S},input_model=gaussian,gates=relu]",
        "laftr-coreset": "laftr[num_samples={S},input_model=coreset,coreset_size={coreset}]",
    },
    "laftr-tokens": {
        "laftr": "laftr[num_samples={S},vocab_size={vocab},input_model=tokens]",
        "laftr-relu": "laftr[num_samples={S},vocab_size={vocab},input_model=tokens,gates=relu]",
        "laftr-classwise": "laftr[num_samples={S},vocab_size={vocab},input_model=tokens-classwise]",
        "laftr-mixture": "laftr[num_samples={S},vocab_size={vocab},input_model=tokens-mixture,"
                         "components={components}]",
        "laftr-coreset": "laftr[num_samples={S},input_model=coreset,coreset_size={coreset}]",
    },
    "laftr-exact": {
        "laftr-exact": "laftr-exact[input_model=gaussian]",
        "laftr-exact-diag": "laftr-exact[input_model=diag]",
        "laftr-exact-mumu": "laftr-exact[input_model=gaussian,mu_outer=True]",
    },
    "maxpool": {
        "laftr-pool-separate": "laftr[num_samples={S},input_model=gaussian,maxpool=separate]",
        "laftr-pool-sample": "laftr[num_samples={S},input_model=gaussian,maxpool=sample]",
    },
    "liftr": {
        "liftr": "liftr[num_samples={S},input_cov=full]",
        "liftr-diag": "liftr[num_samples={S},input_cov=diag]",
    },
    "liftr-tokens": {
        "liftr": "liftr[num_samples={S},input_model=tokens,vocab_size={vocab},input_cov=full]",
        "liftr-diag": "liftr[num_samples={S},input_model=tokens,vocab_size={vocab},input_cov=diag]",
    },
    "parametric": {
        "weight": "weight",
        "diag-fisher": "diag-fisher[fisher=mc]",
        "kfac": "kfac[fisher=mc]",
    },
    "parametric-diag": {
        "weight": "weight",
        "diag-fisher": "diag-fisher[fisher=mc]",
        "kfac": "kfac[fisher=mc,unsupported=diag]",
    },
    "coreset": {
        "subset-{k}": "subset[coreset_size={k}]",
        "ntk-{k}": "ntk[coreset_size={k}]",
    },
}
"""Every named row of the benchmark: per group, row name -> spec text (the ``laftr.specs`` grammar).

The texts carry the run's settings as ``str.format`` fields: ``{S}`` ``num_samples``, ``{rank}``,
``{components}``, ``{coreset}`` (``laftr_coreset``), ``{vocab}`` (the token vocabulary size, ``p + 5``) and,
in the ``coreset`` group, ``{k}`` (each coreset size). A run's rows are these groups in this order, as its
network has them (:class:`ArchSpec`): ``laftr`` on images or ``laftr-tokens`` on token sequences (per-position
categorical input models and a coreset of real sequences); ``laftr-exact`` (``closed_form``: the closed form
tracks joint second moments, MLP-sized states without max pooling); ``maxpool`` (theta0's argmax is the
default; each stream its own max, or sampled); ``liftr`` / ``liftr-tokens`` (when an estimator ``liftr`` is
registered and the network asks for it: every anchored op's input with its full covariance over the last
axis, or with its variances only; on images the network input is modelled by ``liftr``'s default);
``parametric`` or ``parametric-diag`` (K-FAC has Kronecker factors for Linear/Conv2d layers only; where the
network has other parameters, such as LayerNorm or embeddings, they get their diagonal term); ``coreset`` for
every coreset size.
"""

_MATCHED_TAG = " (=laftr memory)"
_RESERVED_KEYS = {"metric": "the benchmark sets it per metric", "seed": "the benchmark's --seed sets it"}


def _row_kind(estimator: str) -> tuple[str, bool, tuple[str, ...] | None]:
    """The family, stochasticity and supported metrics (None: all) of a row of ``estimator``."""
    quadratic = tuple(sorted(QUADRATIC_METRICS))
    kinds: dict[str, tuple[str, bool, tuple[str, ...] | None]] = {
        "laftr": ("laftr", True, None), "laftr-exact": ("laftr", False, quadratic),
        "liftr": ("liftr", True, None), "liftr-exact": ("liftr", False, quadratic),
        "weight": ("parametric", False, None), "diag-fisher": ("parametric", False, None),
        "kfac": ("parametric", False, None),
        "subset": ("coreset", False, None), "ntk": ("coreset", False, None),
    }
    return kinds.get(estimator, ("other", False, None))


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """A row of the benchmark: an estimator name with its options (made from a spec by :meth:`from_spec`).

    ``family`` is ``laftr``, ``liftr``, ``parametric`` or ``coreset`` (``other`` for any other estimator);
    ``metrics`` limits the metrics it supports; a ``stochastic`` row's estimate averages ``eval_calls`` calls.
    """

    label: str
    estimator: str
    options: dict[str, Any]
    family: str
    metrics: tuple[str, ...] | None = None
    stochastic: bool = False

    @property
    def spec(self) -> str:
        """The row's spec text, ``estimator[key=value,...]`` (recorded in ``results.json``)."""
        return format_spec(self.estimator, self.options)

    @classmethod
    def from_spec(cls, label: str, spec: str | Spec) -> BenchRow:
        """The row ``label`` of a spec (text or parsed); family, stochasticity, metrics by its estimator."""
        parsed = parse_spec(spec, what="method") if isinstance(spec, str) else spec
        family, stochastic, metrics = _row_kind(parsed.base)
        return cls(label, parsed.base, parsed.options, family, metrics=metrics, stochastic=stochastic)


MethodSpec = BenchRow
"""The old name of :class:`BenchRow` (kept for code that imports it)."""


def _gaussian_input_model(row: Spec) -> str | None:
    """The Gaussian input model a spec's estimator would draw from (its option or its default), or None."""
    from ..estimators.base import REGISTRY
    from ..inputs import INPUT_MODELS, GaussianFamily

    fields = {f.name: f for f in dataclasses.fields(REGISTRY[row.base].Config)}
    if "input_model" not in fields:
        return None
    name = dict(row.overrides).get("input_model", fields["input_model"].default)
    model = INPUT_MODELS.get(name) if isinstance(name, str) else None
    return name if model is not None and issubclass(model, GaussianFamily) else None


def _adhoc_spec(text: str) -> Spec | None:
    """``text`` as a spec of a registered estimator, or None when its name is not one.

    Raises:
        UsageError: a malformed spec, or an option the estimator does not have (or that the benchmark sets).
    """
    parsed = parse_spec(text, what="method")
    if parsed.base not in available_estimators():
        return None
    from ..estimators.base import REGISTRY

    check_keys(parsed, config_keys(REGISTRY[parsed.base].Config), who=f"estimator {parsed.base!r}",
               reserved=_RESERVED_KEYS)
    return parsed


def row_groups(cfg: FsdBenchConfig) -> list[str]:
    """The groups of :data:`ROW_SPECS` that a run of ``cfg`` has, in order (``coreset`` last)."""
    return _arch_groups(cfg.arch)


def _arch_groups(name: str) -> list[str]:
    """The groups of :data:`ROW_SPECS` that a run on network ``name`` has, in order (``coreset`` last)."""
    arch = ARCH_SPECS[name]
    tokens = arch.inputs == "tokens"
    groups = ["laftr-tokens" if tokens else "laftr"]
    if arch.closed_form:
        groups.append("laftr-exact")
    if arch.maxpool:
        groups.append("maxpool")
    if arch.liftr and "liftr" in available_estimators():
        groups.append("liftr-tokens" if tokens else "liftr")
    groups.append("parametric-diag" if arch.kfac_unsupported == "diag" else "parametric")
    return [*groups, "coreset"]


def _named_labels(coreset_sizes: Sequence[int]) -> set[str]:
    """Every row label that :func:`method_specs` gives on some network, before the ``methods`` filter.

    The named rows of every network's groups, and the coreset rows of ``coreset_sizes``.
    """
    named = {label for arch in ARCHS for group in _arch_groups(arch)[:-1] for label in ROW_SPECS[group]}
    return named | {label.format(k=k) for k in coreset_sizes for label in ROW_SPECS["coreset"]}


def _row_fields(cfg: FsdBenchConfig) -> dict[str, Any]:
    fields: dict[str, Any] = {"S": cfg.num_samples, "rank": cfg.rank, "components": cfg.components,
                              "coreset": cfg.laftr_coreset}
    if ARCH_SPECS[cfg.arch].inputs == "tokens":
        fields["vocab"] = _token_input_options(cfg)["vocab_size"]
    return fields


def method_specs(cfg: FsdBenchConfig, matched_k: Sequence[int] = ()) -> list[BenchRow]:
    """Every row of the benchmark for ``cfg`` (before the ``methods`` filter), made from :data:`ROW_SPECS`.

    ``matched_k`` adds coreset baselines whose memory matches LAFTR's (``k = stored floats / input dim``, the
    input dim being the numbers stored per example: pixels, or token ids per sequence). The estimator specs
    among ``cfg.methods`` (``laftr[num_samples=400]``) follow, labelled by their canonical text.
    """
    fields = _row_fields(cfg)
    rows: list[BenchRow] = []
    groups = row_groups(cfg)
    for group in groups[:-1]:
        rows += [BenchRow.from_spec(label, text.format(**fields)) for label, text in ROW_SPECS[group].items()]
    asked = _asked_coreset_sizes(cfg)
    for k in sorted(set(cfg.coreset_sizes) | set(matched_k) | asked):
        tag = _MATCHED_TAG if k in matched_k and k not in cfg.coreset_sizes else ""
        rows += [BenchRow.from_spec(label.format(k=k) + tag, text.format(k=k, **fields))
                 for label, text in ROW_SPECS["coreset"].items()]
    named = {r.label for r in rows}
    every_named = {label for group, labels in ROW_SPECS.items() if group != "coreset" for label in labels}
    for m in cfg.methods or []:
        if m in named or re.fullmatch(r"(subset|ntk)-\d+", m):
            continue
        if m in every_named and not _runs_here(cfg, m):
            # a named row of another network that cannot run here (laftr-exact on a transformer): no row (the
            # config refuses it by name); an estimator's name (liftr on an MLP) is its row with its defaults
            continue
        parsed = _adhoc_spec(m)
        if parsed is not None and parsed.text not in named:
            rows.append(BenchRow.from_spec(parsed.text, parsed))
            named.add(parsed.text)
    return rows


def _asked_coreset_sizes(cfg: FsdBenchConfig) -> set[int]:
    """The sizes of the coreset methods ``cfg.methods`` names with one (``subset-200``, ``ntk-40``)."""
    return {int(m.split("-")[1]) for m in cfg.methods or [] if re.fullmatch(r"(subset|ntk)-\d+", m)}


def _runs_here(cfg: FsdBenchConfig, name: str) -> bool:
    """Whether ``name`` is an estimator that runs on ``cfg``'s network with its defaults.

    The closed forms need a network without attention or max pooling.
    """
    closed = {"laftr-exact", "liftr-exact"}
    return name in available_estimators() and (name not in closed or ARCH_SPECS[cfg.arch].closed_form)


def _selected(cfg: FsdBenchConfig) -> set[str]:
    """The labels ``cfg.methods`` selects (estimator specs by their canonical text)."""
    out = set()
    for m in cfg.methods or []:
        parsed = None if re.fullmatch(r"(subset|ntk)-\d+", m) else _adhoc_spec(m)
        out.add(m)
        if parsed is not None:
            out.add(parsed.text)
    return out


def _token_input_options(cfg: FsdBenchConfig) -> dict[str, Any]:
    """The per-position categorical input model over the arithmetic vocabulary (``p + 5`` token ids)."""
    from ..data.arithmetic import arithmetic_vocab

    return {"input_model": "tokens", "vocab_size": arithmetic_vocab(cfg.p)["vocab_size"]}


# ------------------------------------------------------------------------------------------ data and training
@dataclasses.dataclass
class _Task:
    """Training inputs and labels of one task, and the output units its loss uses (None: all)."""

    x: torch.Tensor
    y: torch.Tensor
    outputs: list[int] | None


@dataclasses.dataclass
class _Data:
    """The task layout of a run.

    Task A (theta0's task: the fit, the exact FSD and the compared outputs), the tasks the continuations train
    on (by :attr:`TrajectoryKind.task`), task A's held-out examples if any, the number of outputs and, for
    token sequences, the vocabulary size.
    """

    name: str
    a: _Task
    tasks: dict[str, _Task]
    n_out: int
    test_a: _Task | None = None
    vocab_size: int | None = None


def _load(cfg: FsdBenchConfig, gen: torch.Generator) -> _Data:
    return _load_arithmetic(cfg, gen) if cfg.tokens else _load_images(cfg, gen)


def _load_images(cfg: FsdBenchConfig, gen: torch.Generator) -> _Data:
    """Task A and task B (class subsets, their own output units) and all classes under a pixel permutation."""
    from ..data import load_dataset

    assert cfg.task_a is not None and cfg.task_b is not None
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    if ds.task != "classification":
        raise UsageError(f"fsd-bench needs a classification data set; {ds.name} is {ds.task}")
    if ds.num_classes is not None and max(cfg.task_a + cfg.task_b) >= ds.num_classes:
        raise UsageError(f"{ds.name} has {ds.num_classes} classes; tasks {cfg.task_a} / "
                         f"{cfg.task_b} do not fit")

    def pick(classes: list[int], n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.nonzero(torch.isin(ds.y_train, torch.tensor(classes))).flatten()
        if len(idx) == 0:
            raise UsageError(f"{ds.name} has no training examples of classes {classes}")
        if n is not None and n < len(idx):
            idx = idx[torch.randperm(len(idx), generator=gen)[:n]].sort().values
        return ds.x_train[idx], ds.y_train[idx]

    xa, ya = pick(cfg.task_a, cfg.n_fit)
    xb, yb = pick(cfg.task_b, cfg.n_other)
    xp, yp = pick(sorted(set(range(ds.num_classes or 10))), cfg.n_other)
    perm = torch.randperm(xp[0].numel(), generator=gen)
    xp = xp.reshape(len(xp), -1)[:, perm].reshape(xp.shape)
    a = _Task(xa, ya, list(cfg.task_a))
    tasks = {"A": a, "B": _Task(xb, yb, list(cfg.task_b)), "permuted": _Task(xp, yp, None)}
    return _Data(ds.name, a, tasks, n_out=max(max(cfg.task_a + cfg.task_b) + 1, int(yp.max()) + 1))


def _load_arithmetic(cfg: FsdBenchConfig, gen: torch.Generator) -> _Data:
    """The arithmetic layout: task A is ``add``, the other tasks train the continuations.

    Task A has its training pairs (at most ``n_fit``); every other arithmetic task gives its training pairs
    (at most ``n_other``) for the continuations; all tasks are on all ``p`` outputs.
    """
    from ..data.arithmetic import ARITHMETIC_TASKS, load_arithmetic

    def pick(x: torch.Tensor, y: torch.Tensor, n: int | None) -> _Task:
        if n is not None and n < len(x):
            idx = torch.randperm(len(x), generator=gen)[:n].sort().values
            x, y = x[idx], y[idx]
        return _Task(x, y, None)

    sets = {t: load_arithmetic(t, p=cfg.p, train_fraction=cfg.train_fraction, seed=cfg.seed)
            for t in ARITHMETIC_TASKS}
    add = sets["add"]
    a = pick(add.x_train, add.y_train, cfg.n_fit)
    tasks = {"add": a, **{t: pick(sets[t].x_train, sets[t].y_train, cfg.n_other) for t in ARITHMETIC_TASKS
                          if t != "add"}}
    return _Data(f"arithmetic mod {cfg.p}", a, tasks, n_out=cfg.p, test_a=_Task(add.x_test, add.y_test, None),
                 vocab_size=int(add.meta["vocab_size"]))


def _sizes(cfg: FsdBenchConfig) -> tuple[int, int, int, int]:
    """``(d_model, heads, blocks, d_mlp)`` of ``vit`` / ``transformer``.

    Constructing the :class:`FsdBenchConfig` fills those left at None from :data:`MODEL_SIZES`.
    """
    d_model, heads, blocks, d_mlp = cfg.d_model, cfg.heads, cfg.blocks, cfg.d_mlp
    assert d_model is not None and heads is not None and blocks is not None and d_mlp is not None
    return d_model, heads, blocks, d_mlp


def _build(cfg: FsdBenchConfig, data: _Data) -> nn.Module:
    in_shape = tuple(data.a.x.shape[1:])
    n_out = data.n_out
    if cfg.arch == "mlp":
        return mlp(math.prod(in_shape), cfg.hidden, n_out)
    if cfg.arch == "mlp-gelu":
        return mlp(math.prod(in_shape), cfg.hidden, n_out, activation="gelu", norm="layernorm")
    if cfg.arch == "transformer":
        if data.vocab_size is None or len(in_shape) != 1:
            raise UsageError(f"--arch transformer needs token sequences (N, T); got "
                             f"inputs of shape {in_shape}")
        d_model, heads, blocks, d_mlp = _sizes(cfg)
        return transformer(data.vocab_size, in_shape[0], n_out, attention="manual", d_model=d_model,
                           heads=heads, blocks=blocks, d_mlp=d_mlp)
    if cfg.arch == "lstm":
        if data.vocab_size is None or len(in_shape) != 1:
            raise UsageError(f"--arch lstm needs token sequences (N, T); got inputs of shape {in_shape}")
        assert cfg.d_model is not None and cfg.blocks is not None
        return lstm(data.vocab_size, n_out, d_model=cfg.d_model, layers=cfg.blocks)
    if cfg.arch == "vit":
        if len(in_shape) != 3 or in_shape[1] != in_shape[2] or in_shape[1] % cfg.patch:
            raise UsageError(f"--arch vit needs square images (C, H, W) whose side is a multiple of the "
                             f"patch size {cfg.patch}; {data.name} has inputs of shape {in_shape}")
        d_model, heads, blocks, d_mlp = _sizes(cfg)
        return vit(image_size=in_shape[1], patch=cfg.patch, channels=in_shape[0], out_features=n_out,
                   d_model=d_model, heads=heads, blocks=blocks, d_mlp=d_mlp)
    try:
        return conv_net(in_shape, n_out, width=cfg.width)
    except ValueError as e:
        raise UsageError(f"--arch cnn on {data.name}: {e}") from None


def _head_ce(logits: torch.Tensor, y: torch.Tensor, classes: Sequence[int] | None) -> torch.Tensor:
    """Cross-entropy over the head ``classes`` with ``y`` the original class labels."""
    if classes is None:
        return head_loss(logits, y)
    lut = torch.full((int(max(classes)) + 1,), -1, dtype=torch.long, device=y.device)
    lut[torch.as_tensor(list(classes), device=y.device)] = torch.arange(len(classes), device=y.device)
    return head_loss(logits, lut[y], classes)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: Sequence[int] | None, steps: int,
           opt: torch.optim.Optimizer, batch_size: int, gen: torch.Generator,
           extra: Callable[[nn.Module], torch.Tensor] | None = None,
           on_step: Callable[[int], None] | None = None,
           ) -> None:
    """``steps`` batches of :func:`laftr.training.train` on the head loss (plus ``extra``), then eval mode."""
    train(model, lambda b: _head_ce(model(x[b]), y[b], classes), len(x), opt, batch_size=batch_size, gen=gen,
          steps=steps, penalty=extra, on_step=on_step, desc="fsd-bench")
    model.eval()


def _train_theta0(cfg: FsdBenchConfig, model: nn.Module, data: _Data, gen: torch.Generator) -> None:
    """Adam on task A for ``epochs_a`` epochs, at a constant learning rate or with warm-up + cosine decay."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr_a)
    per_epoch = math.ceil(len(data.a.x) / cfg.batch_size)
    steps = cfg.epochs_a * per_epoch
    on_step = None
    if cfg.schedule_a == "cosine":
        def factor(s: int) -> float:
            return min(1.0, (s + 1) / per_epoch) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

        def on_step(_step: int) -> None:
            sched.step()

    _train(model, data.a.x, data.a.y, data.a.outputs, steps, opt, cfg.batch_size, gen, on_step=on_step)


def _optimizer(t: Trajectory, model: nn.Module) -> torch.optim.Optimizer:
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def _task_of(t: Trajectory, cfg: FsdBenchConfig, data: _Data, model0: nn.Module, gen: torch.Generator,
             ) -> tuple[torch.Tensor, torch.Tensor, list[int] | None,
                        Callable[[nn.Module], torch.Tensor] | None]:
    """Training inputs, labels, output units and extra loss term of a trajectory."""
    kind = trajectory_kinds(cfg.dataset)[t.kind]
    task = data.tasks[kind.task]
    x, y, outputs = task.x, task.y, task.outputs
    if kind.random_labels:
        classes = outputs if outputs is not None else list(range(data.n_out))
        y = torch.tensor(classes)[torch.randint(len(classes), (len(x),), generator=gen)]
    if not kind.regularized:
        return x, y, outputs, None
    xa, outputs_a = data.a.x, data.a.outputs

    def extra(m: nn.Module) -> torch.Tensor:
        b = torch.randint(len(xa), (cfg.batch_size,), generator=gen)
        with torch.no_grad():
            z0 = model0(xa[b])
        return t.lam * discrepancy(z0, m(xa[b]), "kl", outputs_a).mean()

    return x, y, outputs, extra


def _continuations(cfg: FsdBenchConfig, model0: nn.Module, data: _Data, gen: torch.Generator,
                   ) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """``[(theta description, state dict), ...]`` for every checkpoint of every trajectory."""
    out: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
    trajs = cfg.trajectories if cfg.trajectories is not None else default_trajectories(cfg.quick, cfg.dataset)
    for ti, t in enumerate(tqdm(trajs, desc="continuations", disable=not cfg.progress)):
        model = copy.deepcopy(model0).requires_grad_(True)
        opt = _optimizer(t, model)
        x, y, classes, extra = _task_of(t, cfg, data, model0, gen)
        steps = t.steps(len(x), cfg.batch_size)

        def snap(step: int, t: Trajectory = t, model: nn.Module = model, ti: int = ti,
                 steps: list[int] = steps) -> None:
            if step in steps:
                desc = {"trajectory": ti, "label": t.label(), "kind": t.kind, "optimizer": t.optimizer,
                        "lr": t.lr,
                        "lam": t.lam, "steps": step}
                if t.weight_decay:
                    desc["weight_decay"] = t.weight_decay
                if t.track_epochs:
                    desc.update(tracked=True, epoch=steps.index(step) + 1)
                out.append((desc, {k: v.detach().clone() for k, v in model.state_dict().items()}))

        _train(model, x, y, classes, max(steps), opt, cfg.batch_size, gen, extra, snap)
    return out


# ------------------------------------------------------------------------------------------- statistics
def _flat(grads: dict[str, torch.Tensor] | Sequence[torch.Tensor | None],
          like: Sequence[torch.Tensor]) -> torch.Tensor:
    vals = list(grads.values()) if isinstance(grads, dict) else list(grads)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                      for g, p in zip(vals, like, strict=True)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of an estimate's gradient ``a`` with the exact FSD's ``b``.

    0 where the estimate's gradient is zero and the exact one is not (it points nowhere: a regularizer gets no
    direction; dropped as NaN, it left the median to the other thetas); NaN where the exact one is zero.
    """
    na, nb = a.norm(), b.norm()
    if nb == 0:
        return float("nan")
    if na == 0:
        return 0.0
    return float(a @ b / (na * nb))


def _is_gate(mod: nn.Module) -> bool:
    from ..rules import GateRule, module_rule

    rule = module_rule(mod)
    return rule is not None and issubclass(rule, GateRule)


@torch.no_grad()
def _pattern_change(model0: nn.Module, model: nn.Module, x: torch.Tensor, batch: int = 1000) -> float:
    """Fraction of (example, hidden unit) pairs whose activation pattern differs between theta0 and theta.

    The pattern is the sign of the pre-activation of every activation module (ReLU on/off). NaN (not
    measured) for a network with no activation module (an LSTM's gates are inside it): every theta was
    "near" there, and the split said nothing.
    """
    acts: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def hooks(m: nn.Module, key: str) -> list[Any]:
        def record(_m: nn.Module, inp: tuple[torch.Tensor, ...], _o: Any) -> None:
            acts[key].append((inp[0] > 0).flatten(1))

        return [mod.register_forward_hook(record) for mod in m.modules() if _is_gate(mod)]

    hs = hooks(model0, "a") + hooks(model, "b")
    diff = tot = 0
    try:
        for i in range(0, len(x), batch):
            acts["a"].clear()
            acts["b"].clear()
            model0(x[i: i + batch])
            model(x[i: i + batch])
            for u, v in zip(acts["a"], acts["b"], strict=True):
                diff += int((u != v).sum())
                tot += u.numel()
    finally:
        for h in hs:
            h.remove()
    return diff / tot if tot else float("nan")


# ------------------------------------------------------------------------------------------- the run
def _check_sizes(cfg: FsdBenchConfig, n: int) -> None:
    """Refuse a coreset method named with a size beyond task A's ``n`` training examples.

    Its row would be labelled with the size asked for and keep all ``n``. (``n_fit`` is an upper bound, as
    documented: ``results.json`` records the examples used under ``theta0.n_fit``.)
    """
    # (a method named with its size; the default sizes' rows keep all examples where there are fewer)
    asked = _asked_coreset_sizes(cfg)
    big = sorted(k for k in asked if k > n)
    if big:
        raise UsageError(f"coreset size(s) {big} but task A has {n:,} training examples: a coreset keeps at "
                         "most all of them")


def run_fsd_bench(cfg: FsdBenchConfig, out_dir: str | Path, force: bool = False,
                  command: str = "laftr fsd-bench") -> dict[str, Any]:
    """Run the benchmark and write ``results.json``, ``table.md``, ``scatter.png`` and ``memory.png``.

    ``trajectory.png`` is written too when a trajectory is tracked epoch by epoch, as on arithmetic.

    Raises:
        ValueError: a bad setting (see :meth:`FsdBenchConfig.validate`) or data set.
        laftr.errors.OutDirError: ``out_dir`` exists and is not empty (and ``force`` is False).
    """
    cfg.validate()
    folder = RunFolder(out_dir, force=force)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    metadata = run_metadata(command, cfg.seed)  # the revision and machine the run started on
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = _load(cfg, gen)
    xa, ya, outputs_a = data.a.x, data.a.y, data.a.outputs
    _check_sizes(cfg, len(xa))
    model0 = _build(cfg, data)
    out = folder.open()  # (after the data and the network: a refused size leaves nothing behind)
    in_shape = tuple(xa.shape[1:])
    timings: dict[str, float] = {}

    # theta0 on task A
    t0 = time.perf_counter()
    _train_theta0(cfg, model0, data, gen)
    timings["train_theta0_s"] = time.perf_counter() - t0
    acc_a = _accuracy(model0, xa, ya, outputs_a)
    theta0_info: dict[str, Any] = {"params": num_params(model0), "task_a_train_accuracy": acc_a}
    if data.test_a is not None:
        theta0_info["task_a_test_accuracy"] = _accuracy(model0, data.test_a.x, data.test_a.y, outputs_a)
        theta0_info["n_test"] = len(data.test_a.x)
    log.info("theta0: %s, %d params, task-A accuracy %s", cfg.arch, num_params(model0), theta0_info)

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
        row["weight_distance"] = float(sum((sd[n] - p0.detach()).pow(2).sum()
                                           for n, p0 in model0.named_parameters()).sqrt())
        row["pattern_change"] = _pattern_change(model0, live, xa)
        row["exact"] = {}
        for m in cfg.metrics:
            te, ce = time.perf_counter(), time.process_time()
            d, g = exact_fsd_and_grad(model0, live, xa, metric=m, outputs=outputs_a, batch_size=1000)
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
    exact_fsd(model0, live, xa, metric=cfg.metrics[0], outputs=outputs_a, batch_size=1000)
    timings["exact_fsd_forward_ms"] = (time.perf_counter() - te) * 1e3
    timings["exact_fsd_forward_cpu_ms"] = (time.process_time() - ce) * 1e3

    # the methods: LAFTR's memory decides the matched coreset sizes (d_in: numbers stored per example)
    d_in = math.prod(in_shape)
    if cfg.tokens:
        probes = [make_estimator("laftr", input_model="tokens", vocab_size=data.vocab_size, num_samples=1)]
    else:
        probes = [make_estimator("laftr", input_model=im, num_samples=1) for im in ("gaussian", "diag")]
    matched = sorted({max(1, round(e.fit(model0, xa[:50]).stored_floats() / d_in)) for e in probes})
    specs = method_specs(cfg, matched)
    if cfg.methods is not None:
        wanted = _selected(cfg)
        specs = [s for s in specs if s.label.removesuffix(_MATCHED_TAG) in wanted]
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
        "theta0": {**theta0_info, "n_fit": len(xa), "input_dim": d_in, "outputs": outputs_a},
        "matched_coreset_k": matched,
        "timings": timings,
        "methods": results,
        "thetas": theta_rows,
        "metadata": metadata,
    }
    res["exact_range"] = {m: [min(v), max(v)] for m, v in exact.items()}
    tracked = trajectory_sections(res)
    if tracked:
        res["trajectory"] = tracked
    write_json_atomic(out / "results.json", res)
    (out / "table.md").write_text(render_table(res), encoding="utf-8")
    plot_scatter(res, out / "scatter.png")
    plot_memory(res, out / "memory.png")
    if tracked:
        plot_trajectory(res, out / "trajectory.png")
    folder.commit()
    return res


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: Sequence[int] | None) -> float:
    """Accuracy of the argmax over ``classes`` (None: over all outputs)."""
    with torch.no_grad():
        if classes is None:
            pred = torch.cat([model(x[i: i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
            return float((pred == y).float().mean())
        pred = torch.cat([model(x[i: i + 1000])[:, list(classes)].argmax(1) for i in range(0, len(x), 1000)])
    return float((torch.tensor(classes)[pred] == y).float().mean())


def _time_train_step(model0: nn.Module, data: _Data, cfg: FsdBenchConfig,
                     reps: int = 20) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one Adam step on a batch of 128."""
    m = copy.deepcopy(model0).requires_grad_(True)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x, y = data.a.x[:128], data.a.y[:128]
    ts, cs = [], []
    for _ in range(reps + 2):
        t, c = time.perf_counter(), time.process_time()
        loss = _head_ce(m(x), y, data.a.outputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return statistics.median(ts[2:]), statistics.median(cs[2:])


def _run_method(spec: BenchRow, metric: str, cfg: FsdBenchConfig, model0: nn.Module, live: nn.Module,
                params: list[torch.Tensor], data: _Data,
                thetas: list[tuple[dict[str, Any], dict[str, torch.Tensor]]], exact: list[float],
                exact_grads: list[torch.Tensor], theta_rows: list[dict[str, Any]]) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    est = make_estimator(spec.estimator, metric=metric, seed=cfg.seed, **spec.options)
    est.fit(model0, (data.a.x, data.a.y), outputs=data.a.outputs)
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    calls = cfg.eval_calls if spec.stochastic else 1
    live.load_state_dict(model0.state_dict())
    # warm-up (tracing, cached input models), not timed; 0 for a sane method
    at_theta0 = float(est(live).detach())
    values, cosines, times, cpu, rel_sd = [], [], [], [], []
    for (_, sd), g_exact in zip(thetas, exact_grads, strict=True):
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
    for row, v in zip(theta_rows, values, strict=True):
        row.setdefault("estimates", {}).setdefault(spec.label, {})[metric] = v
    far = [r["pattern_change"] for r in theta_rows]
    known = [f for f in far if not math.isnan(f)]  # (no activation module: no split)
    cut = statistics.median(known) if known else math.nan
    near_idx = [i for i, f in enumerate(far) if f <= cut]
    far_idx = [i for i, f in enumerate(far) if f > cut]
    out = {
        "method": spec.label,
        "spec": spec.spec,
        "estimator": spec.estimator,
        "options": spec.options,
        "family": spec.family,
        "metric": metric,
        "stored_floats": int(est.stored_floats()),
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu_s,
        "ms_eval_backward": statistics.median(times) * 1e3,
        "cpu_ms_eval_backward": statistics.median(cpu) * 1e3,
        "median_grad_cosine": (float(np.nanmedian(cosines)) if cosines and not all(map(math.isnan, cosines))
                               else float("nan")),
        "grad_cosines_undefined": sum(map(math.isnan, cosines)),  # (the exact gradient was zero, or NaN)
        "single_call_rel_sd": statistics.median(rel_sd) if rel_sd else 0.0,
        "at_theta0": at_theta0,
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
def trajectory_sections(res: dict[str, Any]) -> list[dict[str, Any]]:
    """LIFTR's protocol: the exact FSD and the estimates along every trajectory tracked epoch by epoch.

    Each section has the values at each epoch and their agreement along that trajectory alone (Spearman,
    Pearson of logs, median |log ratio|, median gradient cosine).
    """
    thetas = res["thetas"]
    sections = []
    for ti in sorted({r["trajectory"] for r in thetas if r.get("tracked")}):
        idx = [i for i, r in enumerate(thetas) if r["trajectory"] == ti]
        sec: dict[str, Any] = {
            "trajectory": ti, "label": thetas[idx[0]]["label"], "theta_indices": idx,
            "epochs": [thetas[i]["epoch"] for i in idx], "steps": [thetas[i]["steps"] for i in idx],
            "exact": {m: [thetas[i]["exact"][m] for i in idx] for m in res["config"]["metrics"]},
            "methods": [],
        }
        for r in res["methods"]:
            est = [r["estimates"][i] for i in idx]
            cos = [r["grad_cosines"][i] for i in idx]
            sec["methods"].append({
                "method": r["method"], "family": r["family"], "metric": r["metric"], "estimates": est,
                **agreement(est, sec["exact"][r["metric"]]),
                "median_grad_cosine": (float(np.nanmedian(cos)) if cos and not all(map(math.isnan, cos))
                                       else float("nan")),
            })
        sections.append(sec)
    return sections


def _render_trajectory(sec: dict[str, Any]) -> list[str]:
    """Markdown of one tracked trajectory: per metric, one row per method.

    Of the coreset sweep, only its end points are shown.
    """
    shown = _scatter_methods({"methods": sec["methods"]})
    lines = [f"## trajectory: {sec['label']}, estimate vs exact at every epoch (LIFTR's protocol)", "",
             ("Agreement along this trajectory alone; the columns e1, e2, ... are the estimates after each "
              "epoch (the first row is the exact FSD)."), ""]
    cols = ["method", "spearman", "pearson_log", "median_abs_log_ratio", "median_grad_cosine",
            *(f"e{e}" for e in sec["epochs"])]
    for metric, ex in sec["exact"].items():
        rows: list[dict[str, Any]] = [{"method": "exact",
                                       **{f"e{e}": v for e, v in zip(sec["epochs"], ex, strict=True)}}]
        for r in sec["methods"]:
            if r["metric"] == metric and r["method"] in shown:
                rows.append({**r, **{f"e{e}": v for e, v in zip(sec["epochs"], r["estimates"], strict=True)}})
        lines += [f"### metric `{metric}`", "", markdown_table(rows, cols, floatfmt=".3g"), ""]
    return lines


TABLE_COLUMNS = ["method", "stored_floats", "pearson_log", "spearman", "median_abs_log_ratio",
                 "median_abs_log_ratio_near", "median_abs_log_ratio_far", "median_grad_cosine",
                 "cpu_ms_eval_backward", "ms_eval_backward", "fit_s"]


def render_table(res: dict[str, Any]) -> str:
    """Markdown: one table per metric, methods ordered by stored floats.

    Then, for every trajectory tracked epoch by epoch, the estimates along it.
    """
    t = res["timings"]
    th = res["theta0"]
    if res["config"]["task_a"]:
        task = (f"theta0 trained on classes {res['config']['task_a']} (train accuracy "
                f"{th['task_a_train_accuracy']:.3f}); {len(res['thetas'])} thetas; exact FSD over "
                f"{th['n_fit']:,} task-A training inputs.")
    else:
        test = f", test accuracy {th['task_a_test_accuracy']:.3f}" if "task_a_test_accuracy" in th else ""
        task = (f"theta0 trained on task A = add (train accuracy {th['task_a_train_accuracy']:.3f}{test}); "
                f"{len(res['thetas'])} thetas; exact FSD over {th['n_fit']:,} task-A training sequences, all "
                f"{res['config']['p']} outputs compared.")
    lines = [
        f"# fsd-bench: {res['dataset']}, {res['arch']} ({th['params']:,} parameters)",
        "",
        task,
        (f"Reference costs (process CPU time; wall in parentheses): one training step (batch 128) "
         f"{t['train_step_cpu_ms']:.2f} ms ({t['train_step_ms']:.2f}); exact FSD + gradient over the task-A "
         f"set {t['exact_fsd_and_grad_cpu_ms']:.0f} ms ({t['exact_fsd_and_grad_ms']:.0f}); forward only "
         f"{t['exact_fsd_forward_cpu_ms']:.0f} ms ({t['exact_fsd_forward_ms']:.0f})."),
        ("cpu_ms_eval_backward: process CPU time of one estimator evaluation + backward (median); it is less "
         "affected by other load on the machine than the wall time ms_eval_backward. Run with --threads 1 "
         "the two agree on an idle machine."),
        ("near/far: median |log ratio| over thetas whose activation pattern (sign of every pre-activation) "
         "on task A changed less/more than the median."),
        "",
    ]
    for metric in res["config"]["metrics"]:
        rows = sorted([r for r in res["methods"] if r["metric"] == metric], key=lambda r: (r["stored_floats"],
                                                                                           r["method"]))
        lo, hi = res["exact_range"][metric]
        lines += [f"## metric `{metric}` (exact FSD from {lo:.3g} to {hi:.3g})", "",
                  markdown_table(rows, TABLE_COLUMNS, floatfmt=".3g"), ""]
    for sec in res.get("trajectory", []):
        lines += _render_trajectory(sec)
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
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center left",
               bbox_to_anchor=(1.0, 0.5))


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
    for ax, metric in zip(axes[0], metrics, strict=True):
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
        for k, key in enumerate(("spearman", "median_abs_log_ratio")):
            ax = axes[k][j]
            # (a correlation over one theta is NaN: nothing to plot)
            rows = [r for r in res["methods"] if r["metric"] == metric and np.isfinite(r[key])]
            for fam, ls in (("subset", "-o"), ("ntk", "--s")):
                pts = sorted((max(r["stored_floats"], 1), r[key]) for r in rows
                             if r["family"] == "coreset" and r["estimator"] == fam)
                if pts:
                    ax.plot(*zip(*pts, strict=True), ls, color="gray" if fam == "subset" else "black", ms=4,
                            label=f"{fam} (k sweep)")
            for r in rows:
                if r["family"] != "coreset":
                    color, marker = style[r["method"]]
                    ax.scatter(max(r["stored_floats"], 1), r[key], color=color, marker=marker,
                               label=r["method"], zorder=3)
            if rows:
                ax.set_xscale("log")
            if key == "median_abs_log_ratio" and any(r[key] > 0 for r in rows):  # (all 0: exact rows only)
                ax.set_yscale("log")
            ax.set_xlabel("stored floats beyond theta0 (log; 1 = none)")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(metric)
    fig.tight_layout()
    _legend(fig, axes)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_trajectory(res: dict[str, Any], path: Path) -> None:
    """Estimate and exact FSD against the epoch of every tracked trajectory, one panel per metric.

    The values are on a log scale.
    """
    plt = pyplot()
    secs = res.get("trajectory", [])
    metrics = res["config"]["metrics"]
    names = _scatter_methods(res)
    style = _styles(names)
    fig, axes = plt.subplots(max(len(secs), 1), len(metrics),
                             figsize=(5.2 * len(metrics), 4.5 * max(len(secs), 1)), squeeze=False)
    for row, sec in zip(axes, secs, strict=False):  # no section: one empty row of axes
        for ax, metric in zip(row, metrics, strict=True):
            ax.plot(sec["epochs"], np.maximum(sec["exact"][metric], 1e-12), "k-", lw=2.5, label="exact",
                    zorder=3)
            for r in sec["methods"]:
                if r["metric"] != metric or r["method"] not in style:
                    continue
                color, marker = style[r["method"]]
                ax.plot(sec["epochs"], np.maximum(r["estimates"], 1e-12), "-", color=color, marker=marker,
                        ms=4, lw=1, label=r["method"], alpha=0.85)
            ax.set_yscale("log")
            ax.set_xlabel("epoch of the continuation")
            ax.set_ylabel(f"FSD ({metric})")
            ax.set_title(f"{sec['label']}: {metric}", fontsize=9)
    fig.tight_layout()
    _legend(fig, axes)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
