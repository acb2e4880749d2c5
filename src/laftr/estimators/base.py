"""The one interface every function-space-distance estimator implements, and the registry.

Life cycle::

    est = make_estimator("laftr", metric="kl", num_samples=64)
    est.fit(model, train_loader)      # summarize at theta0 = the model's current parameters
    d = est(model)                    # 0-dim tensor, differentiable w.r.t. the model's parameters
    est.stored_floats()               # floats stored beyond theta0
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .._util import Data, arch_signature, check_same_arch, model_device_dtype, param_dict, registrar
from ..errors import OptionError, UsageError
from ..metrics import check_metric

REGISTRY: dict[str, type[FSDEstimator]] = {}


def register(name: str) -> Any:
    """Class decorator: make an estimator available to :func:`make_estimator` under ``name``."""
    return registrar(REGISTRY, "estimator", name)


def available_estimators() -> list[str]:
    """Names accepted by :func:`make_estimator`."""
    return sorted(REGISTRY)


def make_estimator(name: str, **kwargs: Any) -> FSDEstimator:
    """Build an estimator by registry name, e.g. ``make_estimator("laftr", metric="kl", num_samples=64)``.

    Keyword arguments are the fields of that estimator's config dataclass; an unknown one raises
    :class:`laftr.errors.OptionError` (a ``TypeError`` and a ``ValueError``) naming it.
    """
    if name not in REGISTRY:
        raise UsageError(f"unknown estimator {name!r}; choose one of {available_estimators()}")
    return REGISTRY[name](**kwargs)


def check_int(config: Any, name: str, minimum: int | None = None) -> None:
    """Raise :class:`UsageError` unless ``config.<name>`` is an integer (not a bool) of at least ``minimum``."""
    v = getattr(config, name)
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or (minimum is not None and v < minimum):
        need = "an integer" if minimum is None else ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        raise UsageError(f"{name} must be {need}, got {v!r}")


def check_options(cls: type[EstimatorConfig], options: dict[str, Any], who: str) -> None:
    """Raise :class:`OptionError` naming the first option that ``cls`` does not have (and which estimator has
    it, if any)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in options:
        if key in fields:
            continue
        owners = sorted(n for n, est in REGISTRY.items() if key in {f.name for f in dataclasses.fields(est.Config)})
        hint = f"; {key!r} is an option of {', '.join(owners)}" if owners else ""
        raise OptionError(f"{who} has no option {key!r} (its options: {sorted(fields)}){hint}")


@dataclasses.dataclass
class EstimatorConfig:
    """Options shared by all estimators.

    Attributes:
        metric: output discrepancy: ``l2``, ``mse``, ``l2-probs`` or ``kl``.
        seed: seed of every random choice made by ``fit`` and by Monte Carlo evaluation.
        progress: show a progress bar while fitting.
        batch_size: batch size used when ``fit`` is given tensors rather than a loader.
    """

    metric: str = "l2"
    seed: int = 0
    progress: bool = False
    batch_size: int = 256

    def __post_init__(self) -> None:
        check_metric(self.metric)
        check_int(self, "seed")
        check_int(self, "batch_size", minimum=1)


class FSDEstimator:
    """Base class: an estimate of ``E_x rho(f(x; theta0), f(x; theta))`` from a summary stored at theta0.

    Subclasses set ``Config`` (a dataclass deriving from :class:`EstimatorConfig`) and implement
    ``_fit``, ``_distance``, ``stored_floats`` and the ``_state``/``_load_state`` pair.
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[EstimatorConfig]] = EstimatorConfig

    def __init__(self, config: EstimatorConfig | None = None, **kwargs: Any) -> None:
        check_options(self.Config, kwargs, f"estimator {getattr(self, 'name', type(self).__name__)!r}")
        if config is None:
            config = self.Config(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        check_metric(config.metric)
        self.config = config
        self.outputs: list[int] | None = None
        self.theta0: dict[str, torch.Tensor] | None = None
        self.arch: list[list[Any]] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def metric(self) -> str:
        return self.config.metric

    @property
    def fitted(self) -> bool:
        return self.theta0 is not None

    def fit(self, model: nn.Module, data: Data, outputs: Sequence[int] | None = None) -> FSDEstimator:
        """Summarize ``data`` at theta0 = ``model``'s current parameters (copied; the model is not changed).

        Args:
            model: the reference network.
            data: a DataLoader of ``(x, y)`` or ``x`` batches, a tensor of inputs or an ``(X, Y)`` pair.
            outputs: optional output units that the distance compares (multi-head tasks).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.outputs = None if outputs is None else [int(o) for o in outputs]
        if self.outputs is not None and len(self.outputs) == 0:
            raise ValueError("outputs must be None or a non-empty list of output indices")
        self.theta0 = param_dict(model, detach=True)
        self.arch = arch_signature(model)
        was_training = model.training
        model.eval()
        try:
            self._fit(model, data)
        finally:
            model.train(was_training)
        return self

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The estimated distance from theta0 to ``model``'s current parameters (0-dim, differentiable)."""
        return self.distance(model)

    def distance(self, model: nn.Module) -> torch.Tensor:
        """Same as calling the estimator."""
        self._check_ready(model)
        return self._distance(model)

    def stored_floats(self) -> int:
        """Number of floats this estimator stores beyond theta0 (the honest memory cost)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Name, config and memory, for reports."""
        return {"name": self.name, "config": dataclasses.asdict(self.config), "stored_floats": self.stored_floats()}

    # ------------------------------------------------------------------ subclass hooks
    def _fit(self, model: nn.Module, data: Data) -> None:
        raise NotImplementedError

    def _distance(self, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able metadata (beyond config, outputs, theta0, arch) to persist."""
        return {}, {}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`_state`."""

    # ------------------------------------------------------------------ helpers
    def _check_ready(self, model: nn.Module) -> None:
        if self.theta0 is None or self.arch is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, data) first")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_same_arch(self.arch, model)

    def theta0_model(self, like: nn.Module) -> nn.Module:
        """A copy of ``like`` (same architecture) carrying theta0's parameters and buffers, in eval mode.

        Useful after :func:`laftr.load`, e.g. to compute the exact FSD against the stored reference.
        """
        if self.theta0 is None or self.arch is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, data) first")
        check_same_arch(self.arch, like, "the stored theta0")
        model = copy.deepcopy(like)
        with torch.no_grad():
            for n, t in [*model.named_parameters(), *model.named_buffers()]:
                t.copy_(self.theta0[n])
        return model.eval()

    def theta0_on(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """theta0 moved to ``model``'s device and floating dtype (cached; do not modify the tensors in place)."""
        assert self.theta0 is not None
        device, dtype = model_device_dtype(model)
        cache = self.__dict__.setdefault("_theta0_cache", {})
        if cache.get("source") is not self.theta0:  # refitted or loaded since: start afresh
            cache.clear()
            cache["source"] = self.theta0
        key = (str(device), dtype)
        if key not in cache:
            cache[key] = {n: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                          for n, t in self.theta0.items()}
        return cache[key]
