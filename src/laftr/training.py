"""The training loop of every experiment in the library: the demo, continual learning, fsd-bench, influence.

:func:`train` runs gradient steps on a loss given as a function of a batch's example indices, adds an optional
penalty (a continual-learning regularizer, a trajectory's proximity term), calls an optional hook after each
step (a learning-rate schedule, snapshots) and shows a progress bar. The batch order comes from a seeded
generator, in one of three schedules (:func:`batch_order`):

* ``epochs``: each epoch one permutation of the ``n`` examples, cut into batches of ``batch_size`` (the last
  one may be shorter);
* ``steps``: that many batches of exactly ``batch_size``, a fresh permutation whenever the current one has
  fewer examples left;
* ``full_batch``: every example in every step (no permutation is drawn).

:func:`head_loss` is the classification loss of a multi-head network: cross-entropy over one task's output
units.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["batch_order", "head_loss", "train"]


def head_loss(logits: torch.Tensor, y: torch.Tensor, outputs: torch.Tensor | Sequence[int] | None = None,
              reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the output units ``outputs`` (a task's head; None: every unit).

    Args:
        logits: ``(B, K)`` network outputs.
        y: ``(B,)`` targets, indices into ``outputs`` (local labels).
        outputs: the head's output units, as a tensor or a list.
        reduction: ``"mean"`` or ``"sum"`` over the batch.
    """
    if outputs is not None:
        if not isinstance(outputs, torch.Tensor):
            outputs = torch.as_tensor(list(outputs), device=logits.device)
        logits = logits.index_select(1, outputs)
    return F.cross_entropy(logits, y, reduction=reduction)


def batch_order(n: int, batch_size: int, gen: torch.Generator | None, *, epochs: int | None = None,
                steps: int | None = None, full_batch: bool = False,
                ) -> Iterator[tuple[int, Iterator[torch.Tensor]]]:
    """The batches of ``n`` examples: per epoch (one pass for ``steps``) its batch count and its batches.

    Exactly one of ``epochs`` and ``steps`` is given; ``full_batch`` needs ``epochs``. Each permutation is
    drawn from ``gen`` when it is needed (an epoch's at its start, the ``steps`` schedule's when the current
    one runs out), so a penalty drawing from the same generator between steps keeps its place in the stream.

    Raises:
        UsageError: both or neither of ``epochs`` and ``steps``; a bad size; a schedule without a generator.
    """
    if (epochs is None) == (steps is None):
        raise UsageError("give the schedule as epochs or as steps, not both or neither")
    if n < 1 or batch_size < 1:
        raise UsageError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    if full_batch:
        if epochs is None:
            raise UsageError("full_batch trains for a number of epochs, not steps")
        for _ in range(epochs):
            yield 1, iter([torch.arange(n)])
        return
    if gen is None:
        raise UsageError("a shuffled schedule needs a torch.Generator (the seed of the batch order)")
    if epochs is not None:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            yield -(-n // batch_size), (perm[i : i + batch_size] for i in range(0, n, batch_size))
        return
    assert steps is not None  # with batch_size > n every step is a fresh permutation of all n examples

    def run(steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        perm, pos = torch.randperm(n, generator=gen), 0
        for _ in range(steps):
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            yield perm[pos : pos + batch_size]
            pos += batch_size

    yield steps, run(steps, gen)


def train(
    model: nn.Module,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    gen: torch.Generator | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    full_batch: bool = False,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = False,
    desc: str = "train",
) -> dict[str, list[float]]:
    """Train ``model`` on ``batch_loss`` (plus ``penalty``) in the schedule of :func:`batch_order`.

    Each step: ``loss = batch_loss(idx)`` for the batch's example indices ``idx``, ``total = loss +
    penalty(model)``, zero the gradients, ``total.backward()``, ``optimizer.step()``, then ``on_step(step)``
    (steps count from 1). The model is in training mode throughout (and left so).

    Args:
        model: the network (put in training mode).
        batch_loss: the task loss of a batch, from its example indices (the caller moves data to the device).
        n: the number of training examples.
        optimizer: over the model's parameters.
        batch_size: examples per batch.
        gen: seed of the batch order (not needed for ``full_batch``).
        epochs: passes over the data; or
        steps: the number of batches.
        full_batch: every example in every step.
        penalty: added to each step's loss (a 0-dim tensor); its mean per epoch goes to the history.
        on_step: called after each optimizer step with the step number.
        progress: a progress bar per epoch.
        desc: the progress bar's and the log's label.

    Returns:
        ``{"loss": [...], "penalty": [...]}``: the mean batch loss and penalty of each epoch (one entry for a
        ``steps`` schedule).

    Raises:
        FloatingPointError: the loss became NaN or infinite (a learning rate or penalty weight too large).
    """
    hist: dict[str, list[float]] = {"loss": [], "penalty": []}
    model.train()
    passes = epochs if epochs is not None else 1
    step = 0
    for ep, (count, batches) in enumerate(batch_order(n, batch_size, gen, epochs=epochs, steps=steps,
                                                      full_batch=full_batch)):
        tot, tot_pen = 0.0, 0.0
        label = f"{desc} epoch {ep + 1}/{passes}" if epochs is not None else desc
        bar = tqdm(batches, total=count, desc=label, disable=not progress, leave=False, unit="batch")
        for idx in bar:
            loss = batch_loss(idx)
            total = loss
            if penalty is not None:
                pen = penalty(model)
                total = loss + pen
                tot_pen += float(pen.detach())
            if not torch.isfinite(total):
                raise FloatingPointError(f"{desc}: the loss became {float(total)} (learning rate or penalty "
                                         "weight too large?)")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            step += 1
            if on_step is not None:
                on_step(step)
            tot += float(loss.detach())
        bar.close()
        hist["loss"].append(tot / count)
        hist["penalty"].append(tot_pen / count)
        log.info("%s: loss %.4f penalty %.4g", label, hist["loss"][-1], hist["penalty"][-1])
    return hist
