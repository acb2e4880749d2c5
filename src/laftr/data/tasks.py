"""Task streams for continual learning: split (multi-head) and permuted (single-head) benchmarks.

A :class:`TaskStream` is a list of :class:`Task` objects over one output layer. Every task names the
output units it answers with (``outputs``); its labels are stored as *local* targets, i.e. indices into
``outputs``, so the task's loss is ``cross_entropy(logits[:, outputs], target)`` for split and permuted
tasks alike:

- split: task ``t`` uses its own classes and its own output units (multi-head);
- permuted: every task uses all ten outputs (single head); task ``t`` applies a fixed pixel permutation
  (the first task is unpermuted). The permutation is applied on the fly, batch by batch, so ten
  permuted copies of a data set cost no memory;
- Split CIFAR: all of CIFAR-10, then CIFAR-100 in five ten-class splits, on 60 output units.

Hyperparameters must be chosen on a validation split carved from the *training* data: with
``split="val"`` each task trains on its training examples minus a held-out fraction and is evaluated
on that held-out part; with ``split="test"`` it trains on all of its training examples and is evaluated
on the test set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DatasetNotFoundError
from .datasets import Dataset, PathLike, load_cifar10, load_cifar100

log = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "Task",
    "TaskStream",
    "permuted_tasks",
    "split_cifar_tasks",
    "split_tasks",
]

SPLITS = ("test", "val")


@dataclass
class Task:
    """One task of a continual-learning stream.

    Attributes:
        name: e.g. ``"classes 0,1"`` or ``"permutation 3"``.
        outputs: output units of the network this task answers with (its head).
        x_train: training inputs.
        y_train: training targets, local (indices into ``outputs``).
        x_eval: evaluation inputs (test set, or the validation part of the training data when the stream
            was built with ``split="val"``).
        y_eval: evaluation targets, local (indices into ``outputs``).
        perm: optional pixel permutation applied to flattened inputs (permuted benchmarks).
        classes: the original class label of each local target (``classes[target]``).
    """

    name: str
    outputs: list[int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    perm: torch.Tensor | None = None
    classes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Check the lengths, that both splits have examples, and that targets are in range."""
        if len(self.x_train) != len(self.y_train) or len(self.x_eval) != len(self.y_eval):
            raise ValueError(f"task {self.name!r}: inputs and targets differ in length")
        if len(self.x_train) == 0:
            raise ValueError(f"task {self.name!r} has no training examples")
        if len(self.x_eval) == 0:
            raise ValueError(f"task {self.name!r} has no evaluation examples")
        k = len(self.outputs)
        for what, y in (("train", self.y_train), ("eval", self.y_eval)):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
                raise ValueError(f"task {self.name!r}: {what} targets outside 0..{k - 1}")

    @property
    def n_train(self) -> int:
        """The number of training examples."""
        return len(self.x_train)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-example input shape."""
        return tuple(self.x_train.shape[1:])

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the task's input transformation (its permutation, if any) to a batch."""
        if self.perm is None:
            return x
        flat = x.reshape(x.shape[0], -1)
        return flat[:, self.perm.to(x.device)].reshape(x.shape)

    def train_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs (transformed) and local targets at ``idx``."""
        return self.transform(self.x_train[idx]), self.y_train[idx]

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All training inputs (transformed, materialized) and local targets, e.g. to fit an estimator."""
        return self.transform(self.x_train), self.y_train

    def eval_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation inputs (transformed) and local targets, in order."""
        for i in range(0, len(self.x_eval), batch_size):
            yield self.transform(self.x_eval[i : i + batch_size]), self.y_eval[i : i + batch_size]


@dataclass
class TaskStream:
    """A sequence of tasks sharing one network.

    Attributes:
        name: benchmark name, e.g. ``"split-fmnist"``.
        tasks: the tasks, in training order.
        num_outputs: width of the network's output layer (all heads together).
        multi_head: whether tasks use disjoint output units.
        split: ``"test"`` (evaluate on test data) or ``"val"`` (evaluate on held-out training data).
        meta: how the stream was built (sizes, seeds), for result files.
    """

    name: str
    tasks: list[Task]
    num_outputs: int
    multi_head: bool
    split: str = "test"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check that there are tasks, of one input shape, whose outputs fit the output layer."""
        if not self.tasks:
            raise ValueError(f"stream {self.name!r} has no tasks")
        shapes = {t.input_shape for t in self.tasks}
        if len(shapes) != 1:
            raise ValueError(f"stream {self.name!r}: tasks have different input shapes {sorted(shapes)}")
        for t in self.tasks:
            if max(t.outputs) >= self.num_outputs or min(t.outputs) < 0:
                raise ValueError(f"task {t.name!r} uses outputs {t.outputs} beyond 0..{self.num_outputs - 1}")

    def __len__(self) -> int:
        """The number of tasks."""
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        """The tasks in training order."""
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        """Task ``i`` (in training order)."""
        return self.tasks[i]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-example input shape shared by the tasks."""
        return self.tasks[0].input_shape

    def describe(self) -> dict[str, Any]:
        """Sizes and construction details, JSON-able."""
        return {
            "name": self.name,
            "num_tasks": len(self.tasks),
            "num_outputs": self.num_outputs,
            "multi_head": self.multi_head,
            "split": self.split,
            "input_shape": list(self.input_shape),
            "tasks": [
                {"name": t.name, "outputs": t.outputs, "classes": t.classes, "n_train": t.n_train,
                 "n_eval": len(t.x_eval)}
                for t in self.tasks
            ],
            **self.meta,
        }


# ----------------------------------------------------------------------------------------------------
# helpers


def _check_split(split: str, val_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _check_limit(name: str, n: int | None) -> None:
    if n is not None and n < 1:
        raise ValueError(f"{name} must be a positive number of examples or None, got {n}")


def _take(idx: torch.Tensor, n: int | None, gen: torch.Generator) -> torch.Tensor:
    """A seeded random subset of ``idx`` of size ``n`` (all of it when ``n`` is None), in original order."""
    if n is None or n >= len(idx):
        return idx
    return idx[torch.randperm(len(idx), generator=gen)[:n]].sort().values


def _train_val_indices(
    y: torch.Tensor, idx: torch.Tensor, val_fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of training indices ``idx`` into (train, validation)."""
    tr, va = [], []
    for c in y[idx].unique().tolist():
        ci = idx[y[idx] == c]
        ci = ci[torch.randperm(len(ci), generator=gen)]
        k = max(1, round(val_fraction * len(ci))) if len(ci) > 1 else 0
        va.append(ci[:k])
        tr.append(ci[k:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values


def _class_task(
    ds: Dataset, classes: Sequence[int], outputs: list[int], split: str, val_fraction: float,
    n_train: int | None, n_eval: int | None, gen: torch.Generator, name: str,
) -> Task:
    classes = [int(c) for c in classes]
    lut = torch.full((int(max(classes)) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    train_idx = torch.nonzero(torch.isin(ds.y_train, torch.tensor(classes))).flatten()
    if len(train_idx) == 0:
        raise ValueError(f"{ds.name}: no training examples of classes {classes}")
    if split == "val":
        train_idx, eval_idx = _train_val_indices(ds.y_train, train_idx, val_fraction, gen)
        x_ev_src, y_ev_src = ds.x_train, ds.y_train
    else:
        eval_idx = torch.nonzero(torch.isin(ds.y_test, torch.tensor(classes))).flatten()
        x_ev_src, y_ev_src = ds.x_test, ds.y_test
    train_idx = _take(train_idx, n_train, gen)
    eval_idx = _take(eval_idx, n_eval, gen)
    if len(eval_idx) == 0:
        raise ValueError(f"{ds.name}: no {'validation' if split == 'val' else 'test'} examples "
                         f"of classes {classes}")
    return Task(
        name=name,
        outputs=list(outputs),
        x_train=ds.x_train[train_idx],
        y_train=lut[ds.y_train[train_idx]],
        x_eval=x_ev_src[eval_idx],
        y_eval=lut[y_ev_src[eval_idx]],
        classes=classes,
    )


# ----------------------------------------------------------------------------------------------------
# public builders


def split_tasks(
    ds: Dataset,
    class_groups: Sequence[Sequence[int]] | None = None,
    *,
    name: str | None = None,
    split: str = "test",
    val_fraction: float = 0.1,
    n_train: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
) -> TaskStream:
    """Split a classification data set into multi-head tasks, one per group of classes.

    Task ``t`` answers with its own output units: the classes of all groups, laid out in order (for the
    default pairs ``{0,1}, {2,3}, ...`` task ``t`` uses outputs ``2t, 2t+1``).

    Args:
        ds: the data set (e.g. ``load_dataset("fashion-mnist")``).
        class_groups: classes of each task; default consecutive pairs ``[[0, 1], [2, 3], ...]``.
        name: stream name (default ``"split-<dataset>"``).
        split: ``"test"`` or ``"val"`` (hold out ``val_fraction`` of each class's training examples and
            evaluate on them; for hyperparameter search).
        val_fraction: fraction of training examples held out when ``split="val"``.
        n_train: keep at most this many training examples per task (a seeded random subset).
        n_eval: keep at most this many evaluation examples per task.
        seed: seed of the validation split and of subsampling.

    Raises:
        ValueError: a group is empty or repeats a class, a class has no examples, bad split/fraction.
    """
    _check_split(split, val_fraction)
    _check_limit("n_train", n_train)
    _check_limit("n_eval", n_eval)
    if ds.num_classes is None:
        raise ValueError(f"{ds.name} is a regression data set; split tasks need classes")
    if class_groups is None:
        k = ds.num_classes
        class_groups = [[c, c + 1] for c in range(0, k - 1, 2)]
    groups = [[int(c) for c in g] for g in class_groups]
    flat = [c for g in groups for c in g]
    if not groups or any(len(g) < 2 for g in groups):
        raise ValueError(f"every task needs at least two classes, got {groups}")
    if len(set(flat)) != len(flat):
        raise ValueError(f"class groups overlap: {groups}")
    if min(flat) < 0 or max(flat) >= ds.num_classes:
        raise ValueError(f"classes must be in 0..{ds.num_classes - 1}, got {groups}")
    gen = torch.Generator().manual_seed(seed)
    tasks, start = [], 0
    for g in groups:
        outputs = list(range(start, start + len(g)))
        start += len(g)
        tasks.append(_class_task(ds, g, outputs, split, val_fraction, n_train, n_eval, gen,
                                 "classes " + ",".join(map(str, g))))
    stream = TaskStream(
        name=name or f"split-{ds.name}", tasks=tasks, num_outputs=start, multi_head=True, split=split,
        meta={"dataset": ds.name, "class_groups": groups, "val_fraction": val_fraction, "n_train": n_train,
              "n_eval": n_eval, "seed": seed},
    )
    log.info("%s: %d tasks, %s training examples", stream.name, len(tasks), [t.n_train for t in tasks])
    return stream


def permuted_tasks(
    ds: Dataset,
    num_tasks: int = 10,
    *,
    name: str | None = None,
    split: str = "test",
    val_fraction: float = 0.1,
    n_train: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
    first_identity: bool = True,
) -> TaskStream:
    """Permuted tasks: the same classes under a fixed random pixel permutation per task, single head.

    Every task draws its own training subset (when ``n_train`` is set) and its own permutation from a
    generator seeded by ``seed``; the first task is the unpermuted data set when ``first_identity``.

    Raises:
        ValueError: ``num_tasks < 1``, bad split/fraction, or a regression data set.
    """
    _check_split(split, val_fraction)
    _check_limit("n_train", n_train)
    _check_limit("n_eval", n_eval)
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if ds.num_classes is None:
        raise ValueError(f"{ds.name} is a regression data set; permuted tasks need classes")
    gen = torch.Generator().manual_seed(seed)
    d = int(torch.tensor(ds.input_shape).prod())
    classes = list(range(ds.num_classes))
    outputs = list(range(ds.num_classes))
    all_train = torch.arange(ds.n_train)
    if split == "val":
        tr_idx, ev_idx = _train_val_indices(ds.y_train, all_train, val_fraction, gen)
        x_ev, y_ev = ds.x_train, ds.y_train
    else:
        tr_idx, ev_idx = all_train, torch.arange(ds.n_test)
        x_ev, y_ev = ds.x_test, ds.y_test
    tasks = []
    for t in range(num_tasks):
        perm = None if (t == 0 and first_identity) else torch.randperm(d, generator=gen)
        ti = _take(tr_idx, n_train, gen)
        ei = _take(ev_idx, n_eval, gen)
        tasks.append(Task(
            name="identity" if perm is None else f"permutation {t}",
            outputs=outputs,
            x_train=ds.x_train[ti] if len(ti) < ds.n_train else ds.x_train,
            y_train=ds.y_train[ti] if len(ti) < ds.n_train else ds.y_train,
            x_eval=x_ev[ei],
            y_eval=y_ev[ei],
            perm=perm,
            classes=classes,
        ))
    stream = TaskStream(
        name=name or f"permuted-{ds.name}", tasks=tasks, num_outputs=len(outputs), multi_head=False,
        split=split, meta={"dataset": ds.name, "num_tasks": num_tasks, "val_fraction": val_fraction,
                           "n_train": n_train, "n_eval": n_eval, "seed": seed,
                           "first_identity": first_identity},
    )
    log.info("%s: %d tasks of %d training examples", stream.name, num_tasks, tasks[0].n_train)
    return stream


def split_cifar_tasks(
    data_dir: PathLike | None = None,
    *,
    cifar10: Dataset | None = None,
    cifar100: Dataset | None = None,
    num_cifar100_tasks: int = 5,
    split: str = "test",
    val_fraction: float = 0.1,
    n_train: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
) -> TaskStream:
    """Split CIFAR (FROMP / LAFTR papers): all of CIFAR-10, then CIFAR-100 in ten-class splits, multi-head.

    Task 0 uses outputs 0-9 (CIFAR-10 classes); task ``j >= 1`` uses outputs ``10j .. 10j+9`` for CIFAR-100
    fine classes ``10(j-1) .. 10(j-1)+9``. With the defaults that is 6 tasks on 60 outputs.

    Args:
        data_dir: a folder holding both ``cifar-10-batches-py/`` and ``cifar-100-python/`` (the extracted
            python archives); ignored for a data set passed directly.
        cifar10: CIFAR-10 already loaded (instead of ``data_dir``).
        cifar100: CIFAR-100 already loaded (instead of ``data_dir``).
        num_cifar100_tasks: number of ten-class CIFAR-100 tasks (1..10).
        split: ``"test"`` or ``"val"``, as in :func:`split_tasks`.
        val_fraction: as in :func:`split_tasks`.
        n_train: as in :func:`split_tasks`.
        n_eval: as in :func:`split_tasks`.
        seed: as in :func:`split_tasks`.

    Raises:
        DatasetNotFoundError: the CIFAR files are missing (the message names them).
    """
    _check_split(split, val_fraction)
    if not 1 <= num_cifar100_tasks <= 10:
        raise ValueError(f"num_cifar100_tasks must be in 1..10, got {num_cifar100_tasks}")
    if (cifar10 is None or cifar100 is None) and data_dir is None:
        raise DatasetNotFoundError(
            "split-cifar: no data_dir given; pass a folder holding cifar-10-batches-py/ and "
            "cifar-100-python/ (from cifar-10-python.tar.gz and cifar-100-python.tar.gz, "
            "https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
    # data_dir is not None where it is used (checked above; mypy does not follow the condition)
    c10 = cifar10 if cifar10 is not None else load_cifar10(data_dir)  # type: ignore[arg-type]
    c100 = cifar100 if cifar100 is not None else load_cifar100(data_dir)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    tasks = [_class_task(c10, list(range(10)), list(range(10)), split, val_fraction, n_train, n_eval, gen,
                         "cifar10")]
    for j in range(num_cifar100_tasks):
        cls = list(range(10 * j, 10 * j + 10))
        tasks.append(_class_task(c100, cls, list(range(10 * (j + 1), 10 * (j + 2))), split, val_fraction,
                                 n_train, n_eval, gen, f"cifar100 classes {cls[0]}-{cls[-1]}"))
    return TaskStream(
        name="split-cifar", tasks=tasks, num_outputs=10 * (num_cifar100_tasks + 1), multi_head=True,
        split=split, meta={"dataset": "cifar10+cifar100", "num_cifar100_tasks": num_cifar100_tasks,
                           "val_fraction": val_fraction, "n_train": n_train, "n_eval": n_eval, "seed": seed},
    )

