"""The estimators that keep a few training inputs (``ntk``, ``subset``) and how those inputs are chosen."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from .._util import EMPTY_DATA, Data, allow_empty_data, iter_batches, model_device_dtype
from ..errors import DataError, UsageError
from ..inputs import hash_keys
from ..metrics import select_outputs
from .base import EstimatorConfig, FSDEstimator

log = logging.getLogger(__name__)

#: How the coreset estimators pick their stored inputs.
SELECTIONS = ("random", "balanced")


def select_coreset(
    data: Data,
    k: int,
    selection: str,
    seed: int,
    batch_size: int = 256,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    distributed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick ``k`` training inputs in one streaming pass, independently of batch size and order.

    Every example gets a seeded hash of its bytes (the same hash as LAFTR's coreset,
    :func:`laftr.inputs.hash_keys`). ``random`` keeps the ``k`` smallest keys. ``balanced`` ranks each
    class's examples by key and takes them round-robin over classes (rank 0 of every class, then rank
    1, ...; ties between classes by key) until ``k`` are taken: equal counts per class when every class
    has enough examples and ``k`` is a multiple of the number of classes, counts differing by at most
    one otherwise, and a class with fewer examples than its share gives the rest to the others.

    With ``distributed``, ``data`` is this rank's shard (possibly empty) of a data set spread over the ranks
    of the initialized ``torch.distributed`` group: every rank keeps its own candidates (the ``k`` smallest
    keys, per class for ``balanced``), they are all-gathered, and the same rule picks from their union. The
    union holds the global bottom-k, so every rank gets the coreset one process picks from all the data.

    Returns:
        ``(X, Y)``: the inputs ``(k', *input_shape)`` on ``device``/``dtype`` (``k' = min(k, number of
        examples)``) and, for ``balanced``, their labels (else None).
    """
    if selection not in SELECTIONS:
        raise UsageError(f"unknown selection {selection!r}; choose one of {list(SELECTIONS)}")
    if int(k) < 1:
        raise UsageError(f"coreset_size must be positive, got {k}")
    balanced = selection == "balanced"

    def local() -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        keys: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        # batches stay on the CPU (where the hash is computed); only the chosen k move to ``device``;
        # iter_batches checks that every batch has the first's per-example shape
        for x, y in tqdm(iter_batches(data, batch_size, None, dtype), disable=not progress, desc="coreset"):
            if balanced:
                if y is None:
                    raise DataError("selection='balanced' needs labels: give (x, y) batches")
                if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
                    raise DataError(f"selection='balanced' needs integer class labels of shape (B,), got "
                                    f"{y.dtype} {tuple(y.shape)}")
                ys.append(y.detach().cpu().long())
            keys.append(hash_keys(x, seed))
            xs.append(x.detach().cpu())
            allk = torch.cat(keys)
            # prune; the k smallest keys overall (random) or per class (balanced) survive
            if len(allk) > 4 * k:
                keep = _bottom_k(allk, torch.cat(ys) if balanced else None, k)
                keys, xs = [allk[keep]], [torch.cat(xs)[keep]]
                if balanced:
                    ys = [torch.cat(ys)[keep]]
        if not keys:  # an empty shard of a distributed fit
            return None, None, None
        allk, X = torch.cat(keys), torch.cat(xs)
        Y = torch.cat(ys) if balanced else None
        keep = _bottom_k(allk, Y, k)
        return allk[keep], X[keep], (None if Y is None else Y[keep])

    if distributed:
        from .. import distributed as dist_

        with allow_empty_data():
            mine = dist_.agree(local, "selecting the coreset")
        allk, X, Y = dist_.gather_rows(list(mine))
        if allk is None or X is None:
            raise DataError(EMPTY_DATA)
    else:
        allk, X, Y = local()
        assert allk is not None and X is not None  # iter_batches refuses empty data
    if Y is not None:
        order = _round_robin(allk, Y, k)
    else:
        order = torch.argsort(allk, stable=True)[:k]
    return X[order].to(device=device), (Y[order] if Y is not None else None)


def _bottom_k(keys: torch.Tensor, y: torch.Tensor | None, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest keys, overall (``y`` None) or within each class."""
    if y is None:
        return torch.argsort(keys, stable=True)[:k]
    keep = []
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        keep.append(idx[torch.argsort(keys[idx], stable=True)[:k]])
    return torch.cat(keep)


def _round_robin(keys: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Order by (rank of the key within its class, key) and keep the first ``k``."""
    rank = torch.empty_like(keys)
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        o = torch.argsort(keys[idx], stable=True)
        rank[idx[o]] = torch.arange(len(idx))
    # lexicographic sort: by key first, then stably by rank
    by_key = torch.argsort(keys, stable=True)
    by_rank = torch.argsort(rank[by_key], stable=True)
    return by_key[by_rank][:k]


@dataclasses.dataclass
class CoresetConfig(EstimatorConfig):
    """Options of the estimators that store a few training inputs (``ntk``, ``subset``).

    Attributes:
        coreset_size: number k of stored inputs (all of them if the data has fewer).
        selection: ``random`` (the k smallest seeded hashes: a uniform sample, independent of batch size
            and order) or ``balanced`` (equal counts per class, round-robin by hash; needs integer labels).
    """

    coreset_size: int = 200
    selection: str = "random"


class CoresetEstimator(FSDEstimator):
    """Base of the estimators that keep ``coreset_size`` training inputs and evaluate on them.

    Stores ``k * d`` floats (d = input size); labels are not kept.
    """

    Config = CoresetConfig

    def __init__(self, config: CoresetConfig | None = None, **kwargs: Any) -> None:
        """An unfitted estimator (see :class:`FSDEstimator`); refuses an unknown ``selection``."""
        super().__init__(config, **kwargs)
        c = cast(CoresetConfig, self.config)
        if c.selection not in SELECTIONS:
            raise UsageError(f"unknown selection {c.selection!r}; choose one of {list(SELECTIONS)}")
        if not isinstance(c.coreset_size, int) or isinstance(c.coreset_size, bool) or c.coreset_size < 1:
            raise UsageError(f"coreset_size must be a positive integer, got {c.coreset_size!r}")
        self.X: torch.Tensor | None = None

    def _fit(self, model: nn.Module, data: Data) -> None:
        c = cast(CoresetConfig, self.config)
        device, dtype = model_device_dtype(model)
        self.X, _ = select_coreset(data, c.coreset_size, c.selection, c.seed, c.batch_size, device, dtype,
                                   c.progress, distributed=self._distributed)
        with torch.no_grad():  # fail now, not at the first evaluation, on a model that cannot run on them
            select_outputs(model(self.X[:1]), self.outputs)
        log.info("%s: stored %d inputs of shape %s", self.name, self.X.shape[0], tuple(self.X.shape[1:]))

    def inputs_on(self, model: nn.Module) -> torch.Tensor:
        """The stored inputs on ``model``'s device and dtype."""
        assert self.X is not None
        device, dtype = model_device_dtype(model)
        return self.X.to(device=device, dtype=dtype if self.X.is_floating_point() else None)

    def stored_floats(self) -> int:
        """The stored inputs' entries."""
        return 0 if self.X is None else int(self.X.numel())

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.X is not None
        return {"x": self.X}, {"num_inputs": int(self.X.shape[0])}

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        X = tensors["x"]
        if X.ndim < 2 or X.shape[0] != int(meta["num_inputs"]):
            raise ValueError("stored inputs do not match the metadata")
        if X.is_floating_point() and not torch.isfinite(X).all():
            raise ValueError("stored inputs contain NaN or infinite values")
        self.X = X
