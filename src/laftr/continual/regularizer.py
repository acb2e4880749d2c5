"""A function-space regularizer for continual learning that drops into any training loop.

After each task, fit an :class:`~laftr.FSDEstimator` on that task's data at the current parameters
(theta_j) and keep it; while training later tasks, add ``lam * mean_j D_j(theta)`` to the loss::

    reg = FSDRegularizer(lambda: laftr.make_estimator("laftr", metric="kl", num_samples=40), lam=10.0)
    for outputs, loader in tasks:        # e.g. outputs [2, 3]; y: class ids 2 and 3 (the output units)
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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._util import eval_mode, is_integer
from ..errors import UsageError
from ..estimators.base import FSDEstimator

log = logging.getLogger(__name__)

__all__ = ["FSDRegularizer"]

_STATE_FORMAT = "laftr.FSDRegularizer"
_STATE_VERSION = 1
_STATE_KEYS = frozenset({"format", "version", "lam", "tasks_per_step", "every", "refresh", "distributed",
                         "calls", "since", "generator", "estimators", "sample_states", "anchor"})


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool):
        raise UsageError(f"lam must be a number, got {lam!r}")
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
    if not is_integer(value) or value < 1:
        alt = " or None" if allow_none else ""
        raise UsageError(f"{name} must be an integer >= 1{alt}, got {value!r}")
    return int(value)


def _read_anchor(anchor: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """``refresh``'s stored estimate from a state dict (None: none), checked."""
    if anchor is None:
        return None
    ok = (isinstance(anchor, dict) and set(anchor) == {"value", "grads", "params", "device"}
          and isinstance(anchor["value"], torch.Tensor) and anchor["value"].ndim == 0
          and isinstance(anchor["grads"], dict) and isinstance(anchor["params"], dict)
          and anchor["grads"].keys() == anchor["params"].keys()
          and all(isinstance(t, torch.Tensor) for d in (anchor["grads"], anchor["params"])
                  for t in d.values())
          and isinstance(anchor["device"], str))
    if not ok:
        raise UsageError("regularizer state: the refresh anchor is not the dict state_dict() writes")
    if not bool(torch.isfinite(anchor["value"])):
        raise UsageError(f"regularizer state: the refresh anchor's value is {float(anchor['value'])}")
    try:
        dev = torch.device(anchor["device"])
        return (anchor["value"].to(dev), {n: g.to(dev) for n, g in anchor["grads"].items()},
                {n: t.to(dev) for n, t in anchor["params"].items()})
    except (RuntimeError, AssertionError) as e:  # (a device this machine lacks)
        raise UsageError(f"regularizer state: the refresh anchor lives on {anchor['device']!r}, which this "
                         f"machine cannot use ({e})") from None


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
            A call without gradients (under ``torch.no_grad()``, to log the penalty) gets a fresh estimate
            and leaves the schedule, the expansion and the random draws (tasks, samples) as they were: the
            training calls after it are those of a run without it.
        eval_mode: True (the only choice): the estimators evaluate the network's deterministic function, as
            in eval mode (dropout off, batch norm with its running statistics), whatever mode the model is
            in; each submodule's mode is left as it was. False is refused (no estimator can evaluate the
            training-mode function).
        distributed: in a ``torch.distributed`` process group (None: when one is initialized), fit each task's
            estimator on the union of the ranks' shards and draw each rank's Monte Carlo samples from its own
            stream (see :meth:`laftr.FSDEstimator.fit` and :meth:`laftr.FSDEstimator.distance`); False: this
            process's data only and the same samples on every rank.

    The settings ``lam``, ``tasks_per_step``, ``every`` and ``refresh`` may be changed between calls (a
    schedule of ``lam``); they are checked when set. :meth:`state_dict` / :meth:`load_state_dict` checkpoint
    the regularizer mid-run: the stored tasks, the settings and where its random draws and schedules stand,
    so that a resumed run continues with the penalties the uninterrupted one would have had.
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
        self._every = self._refresh = 1
        self.lam = lam
        self.tasks_per_step = tasks_per_step
        self.every = every
        self.refresh = refresh
        self._calls = 0
        # refresh > 1: the last fresh estimate's mean distance (without lam), and its gradient and parameters
        # by the names of the parameters trainable then
        self._anchor: tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self._since = 0  # calls since that estimate
        if eval_mode is not True:
            raise UsageError(f"eval_mode must be True, got {eval_mode!r}: the estimators evaluate the "
                             "network's deterministic (eval-mode) function whatever mode it is in")
        self.eval_mode = True
        if distributed is not None and not isinstance(distributed, bool):
            raise UsageError(f"distributed must be True, False or None, got {distributed!r}")
        self.distributed = distributed
        self.estimators: list[FSDEstimator] = []
        if not is_integer(seed) or not 0 <= seed < 2 ** 63:
            raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
        self._gen: torch.Generator = torch.Generator().manual_seed(int(seed))

    # ------------------------------------------------------------------ settings, checked when set
    @property
    def lam(self) -> float:
        """Weight of the penalty (a finite number >= 0)."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = _check_lam(value)

    @property
    def tasks_per_step(self) -> int | None:
        """How many old tasks each call draws; None draws all of them."""
        return self._tasks_per_step

    @tasks_per_step.setter
    def tasks_per_step(self, value: int | None) -> None:
        self._tasks_per_step = _check_count("tasks_per_step", value, allow_none=True)

    @property
    def every(self) -> int:
        """The penalty on every ``every``-th call only (see the class)."""
        return self._every

    @every.setter
    def every(self, value: int) -> None:
        self._every = self._exclusive("every", _check_count("every", value), self._refresh)

    @property
    def refresh(self) -> int:
        """A fresh estimate on every ``refresh``-th call, its expansion in between (see the class)."""
        return self._refresh

    @refresh.setter
    def refresh(self, value: int) -> None:
        self._refresh = self._exclusive("refresh", _check_count("refresh", value), self._every)
        self._anchor = None

    @staticmethod
    def _exclusive(name: str, value: int, other: int) -> int:
        if value > 1 and other > 1:
            every, refresh = (value, other) if name == "every" else (other, value)
            raise UsageError(f"every={every} and refresh={refresh} are two ways of estimating the penalty on "
                             "fewer steps; set one of them")
        return value

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
        n = len(self.estimators)
        idx = range(n) if which is None else list(which)
        bad = [j for j in idx if not is_integer(j) or not 0 <= j < n]
        if bad:
            raise UsageError(f"which={list(idx)}: {bad[0]!r} is not the index of a stored task "
                             f"(0..{n - 1})" if n else f"which={list(idx)}: no task is stored yet")
        with eval_mode(model, enabled=self.eval_mode):  # each submodule's own mode back after
            return [self.estimators[j](model, distributed=self.distributed) for j in idx]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``lam * mean_j D_j(theta)``: a 0-dim tensor to add to the loss (zero before any task is stored).

        ``model`` may be a ``DistributedDataParallel`` wrapper (see the module docstring). With
        ``refresh > 1`` the returned tensor is the latest fresh estimate's first-order expansion (see the
        class); its gradient reaches the trainable parameters only.
        """
        if not isinstance(model, nn.Module):
            raise UsageError(f"penalty() takes the network (a torch.nn.Module), got {type(model).__name__}")
        if not torch.is_grad_enabled():
            # a call without gradients (logging the penalty) neither advances the schedule nor becomes the
            # anchor whose gradient the next steps reuse, nor moves the draws: a fresh estimate of its own
            if not self.estimators or self.lam == 0.0:
                return self._zero(model)
            return self.lam * self._unmoved(lambda: self._fresh(model))
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

    def _unmoved(self, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``call()`` with the draws of tasks and the estimators' sample streams restored after it.

        A call that logs the penalty (no gradients) does not change what the training calls draw next.
        """
        mine = self._gen.get_state()
        theirs = [e.sample_state() for e in self.estimators]
        try:
            return call()
        finally:
            self._gen.set_state(mine)
            for e, st in zip(self.estimators, theirs, strict=True):
                e.load_sample_state(st)

    def _fresh(self, model: nn.Module) -> torch.Tensor:
        """``mean_j D_j(theta)`` over all stored tasks or ``tasks_per_step`` drawn ones, differentiable."""
        n = len(self.estimators)
        which: list[int] | None = None
        if self.tasks_per_step is not None and self.tasks_per_step < n:
            which = torch.randperm(n, generator=self._gen)[: self.tasks_per_step].tolist()
        return torch.stack(self.distances(model, which)).mean()

    def _expanded(self, model: nn.Module, fresh: bool) -> torch.Tensor:
        """The penalty's first-order expansion around the latest fresh estimate (made anew if ``fresh``).

        Estimated afresh also when the trainable parameters are not those of the fresh estimate (a layer
        frozen or unfrozen since), or moved to another dtype or device. ``lam`` multiplies the expansion as it
        is now (a schedule of ``lam`` takes effect at once).
        """
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self._anchor is not None:
            _, grads, _ = self._anchor
            if grads.keys() != params.keys() or any(
                    g.dtype != p.dtype or g.device != p.device or g.shape != p.shape
                    for g, p in zip(grads.values(), (params[n] for n in grads), strict=True)):
                fresh = True
        if fresh:
            value = self._fresh(model)
            names = list(params)
            got: Sequence[torch.Tensor | None] = (
                torch.autograd.grad(value, [params[n] for n in names], allow_unused=True)
                if value.requires_grad and names else [None] * len(names))
            self._since = 0
            self._anchor = (value.detach(),
                            {n: torch.zeros_like(params[n]) if g is None else g.detach()
                             for n, g in zip(names, got, strict=True)},
                            {n: params[n].detach().clone() for n in names})
        assert self._anchor is not None
        value, grads, at = self._anchor
        step = sum(((g * (params[n] - at[n])).sum() for n, g in grads.items()), torch.zeros_like(value))
        return self.lam * (value + step)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue a run: the stored tasks, the settings and where the draws stand.

        Tensors, numbers and strings only: ``torch.save(reg.state_dict(), f)`` and
        ``torch.load(f, weights_only=True)`` (no code is unpickled). Each stored estimator is its summary
        file's bytes (:func:`laftr.save`'s format, with its checks at load). The factory ``make`` is not
        stored: build the regularizer with it again, then :meth:`load_state_dict`.
        """
        from ..io import to_bytes

        anchor = None
        if self._anchor is not None:
            value, grads, at = self._anchor
            anchor = {"value": value.detach().cpu(), "grads": {n: g.cpu() for n, g in grads.items()},
                      "params": {n: t.cpu() for n, t in at.items()},
                      "device": str(value.device)}
        return {
            "format": _STATE_FORMAT, "version": _STATE_VERSION,
            "lam": self.lam, "tasks_per_step": self.tasks_per_step, "every": self.every,
            "refresh": self.refresh, "distributed": self.distributed,
            "calls": self._calls, "since": self._since, "generator": self._gen.get_state(),
            "estimators": [torch.frombuffer(bytearray(to_bytes(e)), dtype=torch.uint8)
                           for e in self.estimators],
            "sample_states": [e.sample_state() for e in self.estimators],
            "anchor": anchor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the stored tasks (replacing any), the settings and the draws.

        The stored settings (``lam``, ``tasks_per_step``, ``every``, ``refresh``, ``distributed``) replace the
        constructor's; the factory is this regularizer's own (it builds the estimators of later tasks). The
        whole state is checked before any of it is taken: a refused state leaves the regularizer as it was.

        Raises:
            UsageError: ``state`` is not a regularizer's state dict, of another version, or inconsistent.
            laftr.io.SummaryFileError: a stored estimator's bytes are damaged.
        """
        from ..io import from_bytes

        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise UsageError("load_state_dict takes what FSDRegularizer.state_dict() returned (a dict with "
                             f"format {_STATE_FORMAT!r}); got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise UsageError(f"regularizer state of version {state.get('version')!r}; this laftr reads "
                             f"version {_STATE_VERSION}")
        missing, unknown = sorted(_STATE_KEYS - set(state)), sorted(set(state) - _STATE_KEYS)
        if missing or unknown:
            raise UsageError(f"regularizer state without {missing} or with unknown entries {unknown}")
        blobs, samples = state["estimators"], state["sample_states"]
        if not isinstance(blobs, list) or not isinstance(samples, list) or len(blobs) != len(samples):
            raise UsageError("regularizer state: estimators and sample_states must be lists of one length")
        # everything checked into locals first, taken at the end
        estimators = []
        for j, (blob, st) in enumerate(zip(blobs, samples, strict=True)):
            if isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8 and blob.ndim == 1:
                blob = blob.numpy().tobytes()
            if not isinstance(blob, (bytes, bytearray)):
                raise UsageError(f"regularizer state: stored task {j} is a {type(blob).__name__}, not the "
                                 "bytes of a summary (a uint8 tensor)")
            est = from_bytes(bytes(blob), f"stored task {j} of the regularizer state")
            est.load_sample_state(st)
            estimators.append(est)
        lam = _check_lam(state["lam"])
        tasks_per_step = _check_count("tasks_per_step", state["tasks_per_step"], allow_none=True)
        every, refresh = _check_count("every", state["every"]), _check_count("refresh", state["refresh"])
        self._exclusive("every", every, refresh)
        if state["distributed"] is not None and not isinstance(state["distributed"], bool):
            raise UsageError(f"regularizer state: distributed={state['distributed']!r}")
        for key in ("calls", "since"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise UsageError(f"regularizer state: {key}={state[key]!r} is not a count")
        gen = torch.Generator()
        try:
            gen.set_state(state["generator"])
        except (TypeError, RuntimeError) as e:
            raise UsageError(f"regularizer state: the task draw's generator state is unreadable ({e})"
                             ) from None
        anchor = _read_anchor(state["anchor"])
        self.lam, self.tasks_per_step = lam, tasks_per_step
        self._every, self._refresh = every, refresh
        self.distributed = state["distributed"]
        self._gen, self._anchor = gen, anchor
        self._calls, self._since = state["calls"], state["since"]
        self.estimators = estimators

    def stored_floats(self) -> list[int]:
        """Floats stored beyond theta_j for each task."""
        return [int(e.stored_floats()) for e in self.estimators]
