"""EWC's estimator: the diagonal of the Gauss-Newton (Fisher) matrix of the FSD, from per-example gradients.

``D(theta) ~= 1/2 sum_i F_ii (theta_i - theta0_i)^2`` with ``F = E_x[J^T H J]``, J the Jacobian of the
selected outputs w.r.t. the trainable parameters at theta0 and H the metric's output Hessian at z0
(see :mod:`laftr.estimators.curvature`): the second-order Taylor expansion of the FSD, kept diagonal.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from .. import distributed as dist_
from .._util import Data, model_device_dtype, narrowed, wide_dtype
from ..errors import DataError, UsageError
from .base import EstimatorConfig, FSDEstimator, register
from .curvature import check_curvature_config, curvature_batches, reduce_sums, unused_label_samples
from .taps import LayerTaps, find_taps, square_grads

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FisherConfig(EstimatorConfig):
    """Options of the ``diag-fisher`` estimator.

    Attributes:
        fisher: ``mc`` (the "true Fisher": output vectors sampled from the metric's curvature, for ``kl``
            labels drawn from the model's own predictions), ``exact`` (all K columns of the curvature
            factor: the exact Gauss-Newton diagonal; K backward passes per example) or ``empirical``
            (gradients of cross-entropy at the true labels; metric ``kl`` only, needs labels).
        num_label_samples: output vectors sampled per example for ``mc``.
        chunk_size: examples whose per-example gradients are computed at once (memory
            ``chunk_size * samples * parameters`` floats).
    """

    fisher: str = "mc"
    num_label_samples: int = 1
    chunk_size: int = 32

    def unused(self, given: Iterable[str]) -> list[str]:
        """``num_label_samples`` with a Fisher that draws no labels."""
        return unused_label_samples(self.fisher, given)


@register("diag-fisher")
class DiagFisherEstimator(FSDEstimator):
    """Diagonal Gauss-Newton / Fisher (EWC): ``1/2 sum_i F_ii (theta_i - theta0_i)^2``.

    ``F_ii = mean_x sum_s (d/dtheta_i w_s . z(x))^2`` from per-example gradients, where the vectors ``w_s``
    are those of :func:`laftr.estimators.curvature.output_vectors`. The layers K-FAC taps
    (:mod:`laftr.estimators.taps`: ``Linear``/``Conv2d``, ``Embedding``, self-attention projections) get their
    per-example squares from one batched backward pass per output vector (``(g^2)^T (a^2)`` for a layer
    called once with one position per example; the per-example gradient from unfolded patches or positions
    otherwise; for an embedding, ``sum_t onehot(t_t) g_t^T`` accumulated per (example, token) with
    ``index_add``); other parameters (normalization, positional embeddings, ...) use ``torch.func.vmap`` of
    per-example gradients. Batch-norm running
    statistics are buffers, not parameters, and are not included. Stores one float per trainable
    parameter.
    """

    Config = FisherConfig
    renormalized_tables = "refused"
    quadratic = True  # Hessian diag(F)

    def __init__(self, config: FisherConfig | None = None, **kwargs: Any) -> None:
        """An unfitted estimator (see :class:`FSDEstimator`); checks the curvature options."""
        super().__init__(config, **kwargs)
        check_curvature_config(self.config, ("mc", "exact", "empirical"))
        self.diag: dict[str, torch.Tensor] | None = None

    def _covered_params(self) -> frozenset[str] | None:
        """The parameters with a Fisher diagonal (those trainable at fit)."""
        return None if self.diag is None else frozenset(self.diag)

    def _fit(self, model: nn.Module, data: Data) -> None:
        c = cast(FisherConfig, self.config)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise UsageError("the model has no trainable parameters")
        rank = dist_.rank_and_size()[0] if self._distributed else 0

        def local() -> tuple[dict[str, torch.Tensor], int]:
            acc: dict[str, torch.Tensor] = {}
            count = 0
            # tapped layers: per-example squares from one batched backward pass per output vector;
            # any other parameter (batch norm, layer norm, ...): per-example gradients with torch.func.vmap
            with LayerTaps(model, find_taps(model, "fallback", "diag-fisher")) as tapped:
                for x, W in curvature_batches(model, data, c, self.outputs, "diag Fisher", stream=rank):
                    sq = square_grads(model, x, W, names, self.outputs, c.chunk_size, tapped)
                    acc = sq if not acc else {n: acc[n] + sq[n] for n in acc}
                    count += x.shape[0]
            return acc, count

        acc, count = self._local(local, "the Fisher diagonal")
        if self._distributed:
            acc, count = reduce_sums(acc, count, model)
        self.diag = {n: acc[n] / count for n in names if n in acc}  # (the parameters' order, as one process)
        if not all(torch.isfinite(v).all() for v in self.diag.values()):
            raise DataError("the Fisher diagonal is not finite (does the model produce NaN or inf outputs?)")
        log.info("diag-fisher (%s): %d examples, %d parameters", c.fisher, count, self.stored_floats())

    def _distance(self, model: nn.Module) -> torch.Tensor:
        assert self.diag is not None
        device, dtype = model_device_dtype(model)
        w = wide_dtype(dtype)  # (squares of float16 changes underflow)
        p0 = self.theta0_on(model)
        params = dict(model.named_parameters())
        total = None
        for n, f in self.diag.items():
            t = (f.to(device, w) * (params[n].to(w) - p0[n].to(w)).pow(2)).sum()
            total = t if total is None else total + t
        assert total is not None
        return narrowed(0.5 * total, model)

    def stored_floats(self) -> int:
        """One diagonal Fisher entry per parameter."""
        return 0 if self.diag is None else sum(v.numel() for v in self.diag.values())

    def _damped_solve(self, vectors: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        assert self.diag is not None
        return {n: v / (self.diag[n].to(v.device, v.dtype) + damping) if n in self.diag else v / damping
                for n, v in vectors.items()}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.diag is not None
        return {f"F/{n}": v for n, v in self.diag.items()}, {"params": list(self.diag)}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        shapes = {n: s for n, s in self.arch or []}
        diag = {}
        for n in meta["params"]:
            t = tensors[f"F/{n}"]
            if n not in shapes or list(t.shape) != list(shapes[n]):
                raise ValueError(f"Fisher diagonal of {n!r} does not match the stored architecture")
            if not torch.isfinite(t).all():
                raise ValueError(f"Fisher diagonal of {n!r} is not finite")
            diag[n] = t
        self.diag = diag

