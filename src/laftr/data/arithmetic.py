"""Modular arithmetic: the transformer benchmark of LIFTR.

From Dhawan et al., "Approximating Function Space Distance for Continual Learning in Transformers".

Every example is a sequence of four tokens ``(a, op, b, =)`` with ``a, b`` in ``0..p-1``; its label is the
task's function of ``(a, b)`` modulo ``p``:

- ``add``: ``a + b``;
- ``subtract``: ``a - b``;
- ``quadratic`` (alias ``"x2+xy+y2"``): ``a² + ab + b²``;
- ``random``: a fixed random table ``r[a, b]``, drawn from a generator seeded by ``seed``.

Vocabulary (``p + 5`` tokens): ``0..p-1`` are the numbers, ``p + i`` is the operator token of the ``i``-th
task of :data:`ARITHMETIC_TASKS`, and ``p + 4`` is ``=``. Each task has its own operator token, so one
network can learn several tasks in turn (:func:`arithmetic_tasks`, single head of ``p`` outputs).

Nothing is downloaded: the data are all ``p²`` pairs, split at random into training and test pairs.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch

from .datasets import Dataset
from .tasks import Task, TaskStream, _check_limit, _check_split, _take, _train_val_indices

log = logging.getLogger(__name__)

__all__ = ["ARITHMETIC_TASKS", "SEQ_LEN", "arithmetic_tasks", "arithmetic_vocab", "load_arithmetic"]

ARITHMETIC_TASKS: tuple[str, ...] = ("add", "subtract", "quadratic", "random")
"""The arithmetic tasks, in the order of their operator tokens (``p``, ``p + 1``, ...)."""

SEQ_LEN = 4
"""Tokens per example: ``a, op, b, =``."""

_TASK_ALIASES = {"x2+xy+y2": "quadratic"}


def _task_name(task: str) -> str:
    """Canonical name of ``task`` (case-insensitive; accepts the aliases)."""
    key = task.strip().lower().replace(" ", "") if isinstance(task, str) else None
    key = _TASK_ALIASES.get(key, key)
    if key not in ARITHMETIC_TASKS:
        raise ValueError(
            f"unknown arithmetic task {task!r}; choose one of {', '.join(ARITHMETIC_TASKS)} "
            f"(or the alias {', '.join(_TASK_ALIASES)})"
        )
    return key


def _integer(name: str, value: int, minimum: int | None = None) -> int:
    """``value`` as an int (integers of any kind; no floats, no bools), at least ``minimum``."""
    try:
        out = operator.index(value)
    except TypeError:
        out = None
    if out is None or isinstance(value, bool) or (minimum is not None and out < minimum):
        at_least = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{at_least}, got {value!r}")
    return out


def _check_train_fraction(train_fraction: float) -> None:
    if not isinstance(train_fraction, (int, float)) or not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")


def arithmetic_vocab(p: int = 113) -> dict[str, Any]:
    """Token ids of the arithmetic vocabulary for modulus ``p``.

    Args:
        p: the modulus (numbers are tokens ``0..p-1``).

    Returns:
        ``{"vocab_size": p + 5, "seq_len": 4, "op_tokens": {task: id}, "eq_token": p + 4}``.

    Raises:
        ValueError: ``p`` is not an integer >= 2.
    """
    p = _integer("p", p, 2)
    return {
        "vocab_size": p + len(ARITHMETIC_TASKS) + 1,
        "seq_len": SEQ_LEN,
        "op_tokens": {t: p + i for i, t in enumerate(ARITHMETIC_TASKS)},
        "eq_token": p + len(ARITHMETIC_TASKS),
    }


def _labels(task: str, a: torch.Tensor, b: torch.Tensor, p: int, table: torch.Tensor) -> torch.Tensor:
    """The task's result modulo ``p`` for int64 operands ``a``, ``b``."""
    if task == "add":
        y = a + b
    elif task == "subtract":
        y = a - b
    elif task == "quadratic":
        y = a * a + a * b + b * b
    else:
        return table[a, b]
    return torch.remainder(y, p)


def load_arithmetic(task: str, p: int = 113, train_fraction: float = 0.7, seed: int = 0) -> Dataset:
    """All ``p²`` sequences ``(a, op, b, =)`` of one arithmetic task, split at random into train and test.

    One generator seeded by ``seed`` first draws the ``p x p`` table of the ``random`` task (for every
    task, so the split does not depend on the task) and then the split: for a given ``(p, train_fraction,
    seed)`` every task trains on the same pairs ``(a, b)``, and the ``random`` task is a fixed function of
    ``(p, seed)``. Examples are in the order of ``a * p + b`` within each part.

    Args:
        task: ``"add"``, ``"subtract"``, ``"quadratic"`` (or ``"x2+xy+y2"``) or ``"random"``.
        p: the modulus (113 in the paper); also the number of classes.
        train_fraction: fraction of the ``p²`` pairs in the training part (rounded; at least one pair in
            each part).
        seed: seed of the random table and of the split.

    Returns:
        A :class:`Dataset` named ``"arithmetic-<task>"`` with int64 inputs ``(N, 4)`` and int64 labels in
        ``0..p-1``; ``meta`` holds ``p``, ``task``, ``vocab_size``, ``seq_len``, ``op_token`` (this task's),
        ``op_tokens`` (all tasks'), ``eq_token``, ``train_fraction`` and ``seed``.

    Raises:
        ValueError: unknown task (the message lists the choices), ``p`` not an integer >= 2, or
            ``train_fraction`` outside (0, 1).
    """
    name = _task_name(task)
    p, seed = _integer("p", p, 2), _integer("seed", seed)
    _check_train_fraction(train_fraction)
    vocab = arithmetic_vocab(p)
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, p, (p, p), generator=gen, dtype=torch.int64)
    n = p * p
    perm = torch.randperm(n, generator=gen)
    k = min(max(round(train_fraction * n), 1), n - 1)
    train_idx, test_idx = perm[:k].sort().values, perm[k:].sort().values

    pairs = torch.arange(n, dtype=torch.int64)
    a, b = pairs // p, pairs % p
    x = torch.stack(
        [a, torch.full_like(a, vocab["op_tokens"][name]), b, torch.full_like(a, vocab["eq_token"])], dim=1
    )
    y = _labels(name, a, b, p, table)
    ds = Dataset(
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
        name=f"arithmetic-{name}",
        num_classes=p,
        classes=None,
        meta={
            "p": p,
            "task": name,
            "vocab_size": vocab["vocab_size"],
            "seq_len": SEQ_LEN,
            "op_token": vocab["op_tokens"][name],
            "op_tokens": dict(vocab["op_tokens"]),
            "eq_token": vocab["eq_token"],
            "train_fraction": float(train_fraction),
            "seed": seed,
        },
    )
    log.debug("arithmetic %s mod %d: %d train, %d test pairs", name, p, ds.n_train, ds.n_test)
    return ds


def arithmetic_tasks(
    tasks: Sequence[str] = ("add", "subtract"),
    p: int = 113,
    train_fraction: float = 0.7,
    seed: int = 0,
    split: str = "test",
    val_fraction: float = 0.1,
    n_train: int | None = None,
    *,
    n_eval: int | None = None,
    name: str | None = None,
) -> TaskStream:
    """A continual-learning stream of modular arithmetic tasks on one head of ``p`` outputs (LIFTR).

    Task ``t`` is :func:`load_arithmetic` of ``tasks[t]`` (same ``p``, ``train_fraction`` and ``seed``,
    so all tasks share the training pairs and differ in their operator token and labels). Every task
    answers with all ``p`` outputs (``multi_head=False``); its local targets are the results themselves.

    Args:
        tasks: the tasks in training order, each one of :data:`ARITHMETIC_TASKS` (or ``"x2+xy+y2"``);
            no task may repeat.
        p: the modulus and number of outputs.
        train_fraction: fraction of the ``p²`` pairs used for training (the rest is the test set).
        seed: seed of the random table, the train/test split, the validation split and subsampling.
        split: ``"test"`` (evaluate on the test pairs) or ``"val"`` (hold out ``val_fraction`` of each
            task's training pairs, stratified by label, and evaluate on them).
        val_fraction: fraction of training pairs held out when ``split="val"``.
        n_train: keep at most this many training examples per task (a seeded random subset).
        n_eval: keep at most this many evaluation examples per task.
        name: stream name (default ``"arithmetic"``).

    Returns:
        The :class:`TaskStream`; its ``meta`` holds ``p``, ``task_names`` (not ``tasks``, which
        :meth:`TaskStream.describe` uses for the per-task details), ``vocab_size``, ``seq_len``,
        ``op_tokens``, ``eq_token``, ``train_fraction``, ``val_fraction``, ``n_train``, ``n_eval`` and
        ``seed``.

    Raises:
        ValueError: no tasks, an unknown or repeated task, bad ``p``, fractions, split or limits.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [_task_name(t) for t in tasks]
    if not names:
        raise ValueError(f"tasks must name at least one arithmetic task ({', '.join(ARITHMETIC_TASKS)})")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks repeat a task: {names}")
    p, seed = _integer("p", p, 2), _integer("seed", seed)
    _check_train_fraction(train_fraction)
    _check_split(split, val_fraction)
    _check_limit("n_train", n_train)
    _check_limit("n_eval", n_eval)
    gen = torch.Generator().manual_seed(seed)
    outputs = list(range(p))
    stream_tasks = []
    for t in names:
        ds = load_arithmetic(t, p, train_fraction, seed)
        tr_idx = torch.arange(ds.n_train)
        if split == "val":
            tr_idx, ev_idx = _train_val_indices(ds.y_train, tr_idx, val_fraction, gen)
            x_ev, y_ev = ds.x_train, ds.y_train
        else:
            ev_idx = torch.arange(ds.n_test)
            x_ev, y_ev = ds.x_test, ds.y_test
        tr_idx = _take(tr_idx, n_train, gen)
        ev_idx = _take(ev_idx, n_eval, gen)
        stream_tasks.append(Task(
            name=t,
            outputs=outputs,
            x_train=ds.x_train[tr_idx],
            y_train=ds.y_train[tr_idx],
            x_eval=x_ev[ev_idx],
            y_eval=y_ev[ev_idx],
            classes=list(outputs),
        ))
    vocab = arithmetic_vocab(p)
    stream = TaskStream(
        name=name or "arithmetic", tasks=stream_tasks, num_outputs=p, multi_head=False, split=split,
        meta={"dataset": "arithmetic", "p": p, "task_names": names, "vocab_size": vocab["vocab_size"],
              "seq_len": SEQ_LEN, "op_tokens": vocab["op_tokens"], "eq_token": vocab["eq_token"],
              "train_fraction": float(train_fraction), "val_fraction": val_fraction, "n_train": n_train,
              "n_eval": n_eval, "seed": seed},
    )
    log.info("%s: tasks %s mod %d, %s training examples", stream.name, names, p,
             [t.n_train for t in stream_tasks])
    return stream
