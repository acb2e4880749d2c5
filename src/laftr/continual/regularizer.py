"""A function-space regularizer for continual learning that drops into any training loop.

After each task, fit an :class:`~laftr.FSDEstimator` on that task's data at the current parameters
(theta_j) and keep it; while training later tasks, add ``lam * mean_j D_j(theta)`` to the loss::

    reg = FSDRegularizer(lambda: laftr.make_estimator("laftr", metric="kl", num_samples=40), lam=10.0)
    for loader, outputs in tasks:        # e.g. outputs [2, 3]; y: class ids 2 and 3 (the output units)
        for x, y in loader:
            loss = F.cross_entropy(model(x)[:, outputs], y - outputs[0]) + reg.penalty(model)
            ...
        reg.after_task(model, loader, outputs=outputs)

The estimators compare only the outputs each task answers with (multi-head), or all outputs when
``outputs`` is None (single head).

Under ``torch.nn.parallel.DistributedDataParallel`` pass the wrapper (or its ``.module``, the same) to
:meth:`FSDRegularizer.penalty` and add the penalty to the loss before ``backward``: every rank fits the same
estimator on its own shard (``after_task``, reduced over the group) and, with a Monte Carlo estimator, draws
its own samples (the seed's stream of its rank), so DDP's gradient averaging yields the gradient of the
estimate with ``num_samples * world_size`` samples. ``distributed=False`` opts out of both.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..estimators.base import FSDEstimator

log = logging.getLogger(__name__)

__all__ = ["FSDRegularizer"]


def _check_lam(lam: float) -> float:
    try:
        lam = float(lam)
    except (TypeError, ValueError) as e:
        raise UsageError(f"lam must be a number, got {lam!r}") from e
    if not math.isfinite(lam) or lam < 0:
        raise UsageError(f"lam must be a finite number >= 0, got {lam}")
    return lam


def _check_count(name: str, value: Any, allow_none: bool = False) -> Any:
    """``value`` as an ``int`` if it is an integer >= 1, else a UsageError naming ``name``.

    A Python or NumPy integer, not a bool or a float; None passes when ``allow_none``.
    """
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        alt = " or None" if allow_none else ""
        raise UsageError(f"{name} must be an integer >= 1{alt}, got {value!r}")
    return int(value)


class FSDRegularizer:
    """``lam * mean_j D_j(theta)`` over the estimators fitted after previous tasks.

    Args:
        make: builds a fresh, unfitted estimator for each task (e.g. a ``lambda`` around
            :func:`laftr.make_estimator`), or ``None`` to add already-fitted estimators with :meth:`add`.
        lam: weight of the penalty (>= 0).
        tasks_per_step: when set and more tasks are stored, each :meth:`penalty` call averages over this
            many old tasks drawn uniformly without replacement (an unbiased estimate of the mean over all
            of them, for estimators too slow to evaluate for every old task at every step).
        seed: seed of that draw.
        every: apply the penalty on every ``every``-th :meth:`penalty` call only, weighted ``every * lam``
            (zero on the others): the same mean penalty over a run at ``1/every`` of the estimators' cost,
            with more noise per step.
        refresh: estimate the penalty afresh on every ``refresh``-th :meth:`penalty` call only, and on the
            calls in between return its first-order expansion around the parameters it was estimated at,
            ``P_r + g_r . (theta - theta_r)``: every step gets the penalty's gradient ``g_r``, up to
            ``refresh - 1`` steps old, at ``1/refresh`` of the estimators' cost (unlike ``every``, which
            leaves the steps in between unregularized). Holds two copies of the trainable parameters
            (``g_r`` and ``theta_r``). At a fresh call the returned value and gradient are the estimate's.
            With ``every`` or ``refresh``, a call without gradients (under ``torch.no_grad()``, to log the
            penalty) gets a fresh estimate and leaves the schedule and the expansion as they were.
        eval_mode: evaluate the estimators with the model in eval mode (dropout off), restoring the mode of
            each of its submodules.
        distributed: in a ``torch.distributed`` process group (None: when one is initialized), fit each task's
            estimator on the union of the ranks' shards and draw each rank's Monte Carlo samples from its own
            stream (see :meth:`laftr.FSDEstimator.fit` and :meth:`laftr.FSDEstimator.distance`); False: this
            process's data only and the same samples on every rank.
    """

    def __init__(
        self,
        make: Callable[[], FSDEstimator] | None,
        lam: float = 1.0,
        *,
        tasks_per_step: int | None = None,
        seed: int = 0,
        every: int = 1,
        refresh: int = 1,
        eval_mode: bool = True,
        distributed: bool | None = None,
    ) -> None:
        """A regularizer with no task stored yet; see the class for the arguments."""
        if isinstance(make, FSDEstimator) or (make is not None and not callable(make)):
            raise UsageError(f"make must build a fresh estimator for each task, e.g. lambda: "
                             f"laftr.make_estimator('laftr', metric='kl'); got {type(make).__name__} "
                             f"{make!r:.60} (an estimator already fitted goes in with add())")
        self.make = make
        self.lam = _check_lam(lam)
        self.tasks_per_step = _check_count("tasks_per_step", tasks_per_step, allow_none=True)
        self.every = _check_count("every", every)
        self.refresh = _check_count("refresh", refresh)
        if self.every > 1 and self.refresh > 1:
            raise UsageError(f"every={self.every} and refresh={self.refresh} are two ways of estimating the "
                             "penalty on fewer steps; set one of them")
        self._calls = 0
        # refresh > 1: the last fresh estimate's value, gradient and parameters
        self._anchor: tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None = None
        self._since = 0  # calls since that estimate
        self.eval_mode = eval_mode
        if distributed is not None and not isinstance(distributed, bool):
            raise UsageError(f"distributed must be True, False or None, got {distributed!r}")
        self.distributed = distributed
        self.estimators: list[FSDEstimator] = []
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        """The number of stored tasks (fitted estimators)."""
        return len(self.estimators)

    def after_task(self, model: nn.Module, data: Any, outputs: Sequence[int] | None = None) -> FSDEstimator:
        """Fit a new estimator on ``data`` at ``model``'s current parameters and keep it.

        Args:
            model: the network right after training on the task (theta_j).
            data: the task's training data: a DataLoader of ``(x, y)`` batches, or an ``(X, Y)`` pair.
                Labels, where an estimator reads them (class-conditional input models,
                ``fisher="empirical"``), index the network's output units, as for
                :meth:`laftr.FSDEstimator.fit`: class 3 of a head ``outputs=[2, 3]`` is 3, not 1.
            outputs: the output units of the task (multi-head), or None for all outputs.

        Returns:
            The fitted estimator.
        """
        if self.make is None:
            raise RuntimeError("this regularizer was built without an estimator factory; use add()")
        est = self.make()
        if not isinstance(est, FSDEstimator):
            raise TypeError(f"the factory must return an FSDEstimator, got {type(est).__name__}")
        est.fit(model, data, outputs=outputs, distributed=self.distributed)
        self.add(est)
        return est

    def add(self, estimator: FSDEstimator) -> None:
        """Keep an already-fitted estimator (e.g. one loaded with :func:`laftr.load`)."""
        if not isinstance(estimator, FSDEstimator):
            raise UsageError(f"add() takes a fitted laftr estimator, got {type(estimator).__name__}")
        if not estimator.fitted:
            raise UsageError("the estimator is not fitted")
        self.estimators.append(estimator)
        self._anchor = None  # the next penalty is estimated afresh, with this task
        log.info("regularizer: %d tasks stored (%s, %d floats)", len(self.estimators), estimator.name,
                 estimator.stored_floats())

    def distances(self, model: nn.Module, which: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The estimated distance to each stored task (or to the tasks ``which``), differentiable."""
        idx = range(len(self.estimators)) if which is None else which
        modes = [(m, m.training) for m in model.modules()]  # each submodule's own (a frozen BatchNorm's eval)
        if self.eval_mode:
            model.eval()
        try:
            return [self.estimators[j](model, distributed=self.distributed) for j in idx]
        finally:
            for m, training in modes:
                m.training = training

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``lam * mean_j D_j(theta)``: a 0-dim tensor to add to the loss (zero before any task is stored).

        ``model`` may be a ``DistributedDataParallel`` wrapper (see the module docstring). With
        ``refresh > 1`` the returned tensor is the latest fresh estimate's first-order expansion (see the
        class); its gradient reaches the trainable parameters only.
        """
        if not isinstance(model, nn.Module):
            raise UsageError(f"penalty() takes the network (a torch.nn.Module), got {type(model).__name__}")
        if not torch.is_grad_enabled() and (self.every > 1 or self.refresh > 1):
            # a call without gradients (logging the penalty) neither advances the schedule nor becomes the
            # anchor whose gradient the next steps reuse: it gets a fresh estimate of its own
            if not self.estimators or self.lam == 0.0:
                return self._zero(model)
            return self.lam * self._fresh(model)
        skip = False
        if self.estimators and self.every > 1:
            self._calls += 1
            skip = self._calls % self.every != 0
        if not self.estimators or self.lam == 0.0 or skip:
            return self._zero(model)
        if self.refresh > 1:
            self._since += 1
            return self._expanded(model, fresh=self._anchor is None or self._since >= self.refresh)
        return self.every * self.lam * self._fresh(model)

    @staticmethod
    def _zero(model: nn.Module) -> torch.Tensor:
        """A zero penalty on the model's device and in its dtype."""
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device, dtype=None if p is None else p.dtype)

    def _fresh(self, model: nn.Module) -> torch.Tensor:
        """``mean_j D_j(theta)`` over all stored tasks or ``tasks_per_step`` drawn ones, differentiable."""
        n = len(self.estimators)
        which: list[int] | None = None
        if self.tasks_per_step is not None and self.tasks_per_step < n:
            which = torch.randperm(n, generator=self._gen)[: self.tasks_per_step].tolist()
        return torch.stack(self.distances(model, which)).mean()

    def _expanded(self, model: nn.Module, fresh: bool) -> torch.Tensor:
        """The penalty's first-order expansion around the latest fresh estimate (made anew if ``fresh``)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self._anchor is not None and any(
                g.dtype != p.dtype or g.device != p.device
                for g, p in zip(self._anchor[1], params, strict=False)):
            fresh = True  # the model moved to another dtype or device (model.float()): estimate afresh there
        if fresh:
            value = self.lam * self._fresh(model)
            grads: Sequence[torch.Tensor | None] = (
                torch.autograd.grad(value, params, allow_unused=True) if value.requires_grad
                else [None] * len(params))
            self._since = 0
            self._anchor = (value.detach(),
                            [torch.zeros_like(p) if g is None else g.detach()
                             for p, g in zip(params, grads, strict=True)],
                            [p.detach().clone() for p in params])
        assert self._anchor is not None
        value, grads, at = self._anchor
        if len(grads) != len(params) or any(g.shape != p.shape for g, p in zip(grads, params, strict=False)):
            raise UsageError("the model's trainable parameters changed since the penalty was last estimated; "
                             "refresh needs the same parameters on every call")
        step = sum(((g * (p - p0)).sum() for g, p, p0 in zip(grads, params, at, strict=True)),
                   torch.zeros_like(value))
        return value + step

    def stored_floats(self) -> list[int]:
        """Floats stored beyond theta_j for each task."""
        return [int(e.stored_floats()) for e in self.estimators]
