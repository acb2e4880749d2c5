"""The naive parametric baseline: a scaled squared Euclidean distance in weight space."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, cast

import torch
from torch import nn

from .._util import Data, narrowed, wide_dtype
from ..errors import UsageError
from .base import EstimatorConfig, FSDEstimator, register

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WeightConfig(EstimatorConfig):
    """Options of the ``weight`` estimator.

    Attributes:
        scale: the distance is ``scale / 2 * ||theta - theta0||^2``.
    """

    scale: float = 1.0


@register("weight")
class WeightEstimator(FSDEstimator):
    """``1/2 * scale * ||theta - theta0||^2`` over every parameter of theta0.

    It needs no data (``fit`` only records theta0) and stores nothing beyond theta0. The metric and the
    selected outputs do not enter the estimate: weight space knows nothing about outputs. Like the other
    quadratic estimators, the value does not depend on the parameters' ``requires_grad`` flags when it is
    evaluated (a frozen parameter that moved still counts; an all-frozen model gives its value, without
    gradient); gradients reach the parameters that require grad.
    """

    Config = WeightConfig
    uses_network = False  # needs no data: fit neither reads examples nor checks the forward on them
    quadratic = True  # Hessian scale * I

    def __init__(self, config: WeightConfig | None = None, **kwargs: Any) -> None:
        """An unfitted estimator (see :class:`FSDEstimator`); ``scale`` must be finite and non-negative."""
        super().__init__(config, **kwargs)
        scale = cast(WeightConfig, self.config).scale
        if (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                or not (scale >= 0 and scale < float("inf"))):
            raise UsageError(f"scale must be a finite non-negative number, got {scale!r}")

    def _fit(self, model: nn.Module, data: Data) -> None:
        log.info("weight estimator: theta0 recorded (%d parameter tensors)", len(list(model.parameters())))

    def _distance(self, model: nn.Module) -> torch.Tensor:
        # the names and shapes were checked against theta0's (check_same_arch); a name that was a buffer
        # when theta0 was recorded is no parameter of theta0
        p0 = self.theta0_on(model)
        buffers = self._buffer_names or frozenset()
        total = None
        for n, p in model.named_parameters():
            if n in buffers:
                continue
            w = wide_dtype(p.dtype)  # (squares of float16 changes underflow)
            t = (p.to(w) - p0[n].to(w)).pow(2).sum()
            total = t if total is None else total + t
        if total is None:
            raise UsageError("the model has no parameters")
        value = 0.5 * float(cast(WeightConfig, self.config).scale) * total
        return narrowed(value, model)

    def stored_floats(self) -> int:
        """None beyond theta0."""
        return 0

    def _damped_solve(self, vectors: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        scale = float(cast(WeightConfig, self.config).scale)
        return {n: v / (scale + damping) for n, v in vectors.items()}
