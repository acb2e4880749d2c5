"""The regularized continual-learning loop, generic over FSD estimators.

For task t the loss is ``CE_t(theta) + lam * mean_{j<t} D_j(theta_j, theta)`` (METHOD.md section 4), with
``D_j`` the estimator fitted on task j's training data at theta_j, restricted to task j's outputs. After
each task the network is evaluated on every task's evaluation set, filling one row of the accuracy matrix.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._util import resolve_device
from ..data.tasks import Task, TaskStream
from ..errors import LaftrError, UsageError
from ..estimators.base import FSDEstimator, check_int, make_estimator
from ..training import head_loss, train
from .methods import METHODS, MethodSpec
from .metrics import average_accuracy, backward_transfer
from .regularizer import FSDRegularizer

log = logging.getLogger(__name__)

__all__ = ["RunResult", "TrainConfig", "evaluate_task", "match_memory", "run_method", "train_task"]


@dataclass
class TrainConfig:
    """Optimization schedule, identical for every method of a benchmark.

    Attributes:
        epochs: epochs per task.
        batch_size: training batch size.
        lr: Adam learning rate (a fresh optimizer per task).
        weight_decay: decoupled weight decay; above 0 the optimizer is AdamW with it, at 0 plain Adam.
        eval_batch_size: batch size of evaluation.
        device: ``cpu``, ``cuda``, ... (None: CUDA if available, else CPU).
        progress: progress bars per task and epoch.
    """

    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 1000
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        """Check the schedule's sizes, device, learning rate and weight decay."""
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_int(self, name, minimum=1)
        resolve_device(self.device, "device")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a positive number, got {self.lr!r}")
        wd = self.weight_decay
        if isinstance(wd, bool) or not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise UsageError(f"weight_decay must be a finite number >= 0, got {wd!r}")

    def optimizer(self, params: Any) -> torch.optim.Optimizer:
        """A fresh optimizer for one task: Adam, or AdamW when ``weight_decay`` is above 0."""
        if self.weight_decay > 0:
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=float(self.weight_decay))
        return torch.optim.Adam(params, lr=self.lr)

    def resolved_device(self) -> torch.device:
        """The device to train on: ``device``, or CUDA when available and ``device`` is None."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = resolve_device(self.device, "device")
        assert dev is not None
        return dev


@dataclass
class RunResult:
    """One method, one seed, one stream.

    Attributes:
        acc_matrix: ``A[i][j]``, accuracy on task j's evaluation set after training task i (all j, also
            tasks not yet trained).
        stored_floats: floats stored beyond theta_j for each task (0 for fine-tuning; the task's
            training inputs for ``joint``).
        wall_time_s: total seconds; ``timings`` splits it into train / fit / eval.
        cpu_time_s: CPU seconds of this process over the run (all its threads): with one thread, a cost that
            the machine's other load does not inflate.
        history: per task, per epoch mean training loss and mean penalty.
        details: resolved method settings (e.g. the k chosen for memory matching).
    """

    method: str
    seed: int
    acc_matrix: list[list[float]]
    stored_floats: list[int]
    wall_time_s: float
    timings: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, list[float]]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    cpu_time_s: float | None = None

    @property
    def final_avg_acc(self) -> float:
        """Mean accuracy over all tasks after the last one (:func:`laftr.continual.average_accuracy`)."""
        return average_accuracy(self.acc_matrix)

    @property
    def bwt(self) -> float:
        """Backward transfer (:func:`laftr.continual.backward_transfer`)."""
        return backward_transfer(self.acc_matrix)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict, with ``final_avg_acc`` and ``bwt`` added."""
        d = dataclasses.asdict(self)
        d["final_avg_acc"] = self.final_avg_acc
        d["bwt"] = self.bwt
        return d


@torch.no_grad()
def evaluate_task(model: nn.Module, task: Task, device: torch.device, batch_size: int = 1000) -> float:
    """Accuracy of the argmax over the task's output units on its evaluation set."""
    was = model.training
    model.eval()
    correct, n = 0, 0
    outs = torch.tensor(task.outputs, device=device)
    try:
        for x, y in task.eval_batches(batch_size):
            x, y = x.to(device), y.to(device)
            pred = model(x).index_select(1, outs).argmax(1)
            correct += int((pred == y).sum())
            n += len(y)
    finally:
        model.train(was)
    return correct / n


#: offset of the seed of the stream that draws ``fit_examples`` subsets (apart from the training stream)
FIT_SUBSET_STREAM = 7_000_003


def fit_data(task: Task, k: int | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's training inputs and labels to fit an estimator on: all, or ``k`` of them at random.

    The subset (drawn from ``gen``) keeps the examples in their original order. The labels are the network's
    output units (what an estimator's ``fit`` reads, e.g. ``fisher="empirical"``), not local targets.
    """
    if k is None or k >= task.n_train:
        x, y = task.train_data()
    else:
        x, y = task.train_batch(torch.randperm(task.n_train, generator=gen)[:k].sort().values)
    return x, unit_labels(task, y)


def unit_labels(task: Task, y: torch.Tensor) -> torch.Tensor:
    """The task's local targets (indices into ``task.outputs``) as the network's output units."""
    return torch.as_tensor(task.outputs, dtype=torch.long, device=y.device)[y]


def _estimator_config(spec: MethodSpec, seed: int, task_index: int) -> dict[str, Any]:
    cfg = dict(spec.config)
    cfg.setdefault("seed", 1000 * seed + task_index)
    return cfg


def check_estimator_options(spec: MethodSpec) -> None:
    """Build ``spec``'s estimator (unfitted), so that a bad option value is refused before the run starts.

    (``laftr[num_samples=8.0]`` was refused when its method's turn came, after the methods before it had run.)
    """
    if spec.kind != "fsd" or spec.estimator is None:
        return
    try:
        make_estimator(spec.estimator, **_estimator_config(spec, 0, 0))
    except LaftrError as e:
        raise UsageError(f"method {spec.name!r}: {e}") from e


def match_memory(spec: MethodSpec, reference: MethodSpec, model: nn.Module, stream: TaskStream,
                 n_fit: int = 256) -> MethodSpec:
    """Resolve ``coreset_size`` of a memory-matched method: ``round(floats(reference) / input_dim)``.

    The reference estimator's stored floats are measured by fitting it on the first ``n_fit`` training
    examples of task 0 (its memory depends on the network and input size, not on the amount of data).
    """
    if reference.kind != "fsd" or reference.estimator is None:
        raise ValueError(f"cannot match memory to method {reference.name!r}: it stores no summary")
    task = stream[0]
    est = make_estimator(reference.estimator, **_estimator_config(reference, 0, 0))
    x, y = task.train_batch(torch.arange(min(n_fit, task.n_train)))
    est.fit(model, (x, unit_labels(task, y)), outputs=task.outputs)
    floats = int(est.stored_floats())
    d = math.prod(stream.input_shape)
    k = max(1, round(floats / d))
    log.info("%s: %s stores %d floats per task -> k = %d inputs of dimension %d", spec.name, reference.name,
             floats, k, d)
    return dataclasses.replace(spec, config={**spec.config, "coreset_size": k}, match_memory=None)


def train_task(
    model: nn.Module, tasks: list[Task], cfg: TrainConfig, gen: torch.Generator, device: torch.device,
    reg: FSDRegularizer | None = None, desc: str = "train",
) -> dict[str, list[float]]:
    """Adam (AdamW with ``cfg.weight_decay``) for ``cfg.epochs`` epochs over the union of ``tasks``.

    ``tasks`` is one task unless joint training; each example is scored on its own task's outputs
    (``laftr.training.head_loss``), and the regularizer's penalty is added once it holds a task. The batch
    order is drawn from ``gen`` (the training loop ``laftr.training.train``, epoch schedule).

    Returns:
        Per epoch, the mean training loss and the mean penalty.
    """
    sizes = [t.n_train for t in tasks]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    outs = [torch.tensor(t.outputs, device=device) for t in tasks]

    def batch_loss(b: torch.Tensor) -> torch.Tensor:
        if len(tasks) == 1:
            x, y = tasks[0].train_batch(b)
            return head_loss(model(x.to(device)), y.to(device), outs[0])
        tid = torch.bucketize(b, offsets[1:], right=True)
        loss = torch.zeros((), device=device)
        for t in tid.unique().tolist():
            x, y = tasks[t].train_batch(b[tid == t] - offsets[t])
            loss = loss + head_loss(model(x.to(device)), y.to(device), outs[t], reduction="sum")
        return loss / len(b)

    penalty = reg.penalty if reg is not None and len(reg) else None
    return train(model, batch_loss, int(offsets[-1]), cfg.optimizer(model.parameters()),
                 batch_size=cfg.batch_size, gen=gen, epochs=cfg.epochs, penalty=penalty,
                 progress=cfg.progress, desc=desc)


def run_method(
    stream: TaskStream,
    spec: MethodSpec,
    model_fn: Callable[[], nn.Module],
    cfg: TrainConfig,
    seed: int = 0,
    memory_reference: MethodSpec | None = None,
) -> RunResult:
    """Train ``model_fn()`` on the tasks of ``stream`` in order with method ``spec``; evaluate after each.

    Args:
        stream: the tasks.
        spec: the method (see :data:`laftr.continual.METHODS`).
        model_fn: builds the network (called once, under ``torch.manual_seed(seed)``, so every method of
            one seed starts from the same initialization).
        cfg: the optimization schedule.
        seed: seed of initialization, batch order, dropout and the estimators' randomness.
        memory_reference: the method whose stored floats a memory-matched method (``match_memory``) copies;
            default the ``laftr`` entry of :data:`METHODS`.

    Returns:
        The :class:`RunResult`.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    device = cfg.resolved_device()
    timings = {"train": 0.0, "fit": 0.0, "eval": 0.0}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = model_fn().to(device)
        gen = torch.Generator().manual_seed(seed)
        details: dict[str, Any] = {}
        if spec.match_memory:
            ref = memory_reference or METHODS[spec.match_memory]
            spec = match_memory(spec, ref, model, stream)
            details["coreset_size"] = spec.config["coreset_size"]
            details["memory_reference"] = ref.name
        reg = None
        if spec.kind == "fsd":
            # every "fsd" entry of METHODS names its estimator, but MethodSpec is public and a spec built by
            # hand may leave it at its default, None
            if spec.estimator is None:
                raise UsageError(f"method {spec.name!r} is of kind 'fsd' but names no estimator")
            estimator: str = spec.estimator
            counter = iter(range(len(stream)))

            def make() -> FSDEstimator:
                return make_estimator(estimator, **_estimator_config(spec, seed, next(counter)))

            reg = FSDRegularizer(make, spec.lam, tasks_per_step=spec.tasks_per_step, seed=seed,
                                 every=spec.penalty_every, refresh=spec.penalty_refresh)
        # fit_examples: each task's subset from its own stream, so that training draws the same as without it
        fit_gen = torch.Generator().manual_seed(seed + FIT_SUBSET_STREAM)
        T = len(stream)
        acc: list[list[float]] = []
        stored: list[int] = []
        history = []
        for t, task in enumerate(stream):
            desc = f"{spec.name} seed {seed} task {t + 1}/{T}"
            t0 = time.perf_counter()
            train_on = list(stream.tasks[: t + 1]) if spec.kind == "joint" else [task]
            history.append(train_task(model, train_on, cfg, gen, device, reg, desc))
            timings["train"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if reg is not None:
                outputs = task.outputs if stream.multi_head else None
                est = reg.after_task(model, fit_data(task, spec.fit_examples, fit_gen), outputs=outputs)
                stored.append(int(est.stored_floats()))
            elif spec.kind == "joint":
                stored.append(int(task.x_train.numel()))
            else:
                stored.append(0)
            timings["fit"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            acc.append([evaluate_task(model, u, device, cfg.eval_batch_size) for u in stream])
            timings["eval"] += time.perf_counter() - t0
            log.info("%s: accuracies %s (average so far %.4f)", desc, [round(a, 4) for a in acc[-1]],
                     average_accuracy([r[: t + 1] for r in acc]))
    wall = time.perf_counter() - t_start
    return RunResult(method=spec.name, seed=seed, acc_matrix=acc, stored_floats=stored, wall_time_s=wall,
                     timings=timings, history=history, details=details,
                     cpu_time_s=time.process_time() - cpu_start)
