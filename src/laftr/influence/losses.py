"""Training losses of the influence experiments and their Bregman divergences in output space.

Two tasks:

- ``regression``: ``L(z, y) = 1/2 ||z - y||^2`` (summed over outputs); its Bregman divergence in output
  space is ``D_B(z, zs) = 1/2 ||z - zs||^2`` (the ``mse`` metric).
- ``classification``: softmax cross-entropy ``L(z, y) = logsumexp(z) - z_y``; its Bregman divergence is
  ``KL(softmax(zs) || softmax(z))`` (the ``kl`` metric).

The output-space Hessian of ``D_B`` at ``z = zs`` (identity, or ``diag(p) - p p^T``) is what the
Gauss-Newton matrix of the classical influence function uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DataError, UsageError

TASKS = ("regression", "classification")

#: Bregman divergence (a name in :data:`laftr.METRICS`) of each task's loss.
BREGMAN_METRIC = {"regression": "mse", "classification": "kl"}

#: Metric names an FSD estimator may use for each task (``l2`` and ``mse`` are the same function).
COMPATIBLE_METRICS = {"regression": frozenset({"mse", "l2"}), "classification": frozenset({"kl"})}


def check_task(task: str) -> str:
    """Return ``task`` if known, else raise :class:`~laftr.errors.UsageError` (a ``ValueError``)."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return task


def infer_task(y: torch.Tensor) -> str:
    """``classification`` for integer class labels of shape ``(N,)``, ``regression`` for float ``(N, K)``.

    Bool targets are refused (``check_not_bool``).
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(y).__name__}")
    check_not_bool(y)
    if y.is_floating_point():
        if y.ndim != 2:
            hint = (" (floating targets are read as regression; class labels stored as floats, from numpy "
                    "or pandas, need y.long(); a single regression target needs y[:, None])"
                    if y.ndim == 1 else "")
            raise DataError(f"regression targets must have shape (N, K), got {tuple(y.shape)}{hint}")
        return "regression"
    if y.ndim != 1:
        raise DataError(f"class labels must have shape (N,), got {tuple(y.shape)}")
    return "classification"


def check_not_bool(y: torch.Tensor) -> None:
    """Refuse bool targets (:class:`~laftr.errors.DataError`).

    They are neither class indices nor regression targets as stored: ``y.long()`` makes them the classes 0
    and 1 (a network with two outputs), ``y.double()[:, None]`` one regression target.
    """
    if y.dtype == torch.bool:
        raise DataError("targets are bool: convert them, y.long() for the classes 0 and 1 (a network with "
                        "two outputs) or y.double()[:, None] for one regression target")


def per_example_loss(z: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """The training loss of each example, shape ``(B,)``.

    Args:
        z: network outputs ``(B, K)``.
        y: targets: ``(B, K)`` floats (regression) or ``(B,)`` class indices (classification) of any integer
            dtype (``int64``, ``int32``, ``uint8``, ...; bool is refused: ``check_not_bool``).
        task: ``regression`` or ``classification``.
    """
    check_task(task)
    check_not_bool(y)
    z = z.reshape(z.shape[0], -1)
    if task == "regression":
        if y.shape != z.shape:
            raise DataError(f"regression targets of shape {tuple(y.shape)} do not match "
                            f"outputs {tuple(z.shape)}")
        return 0.5 * (z - y.to(z.dtype)).pow(2).sum(-1)
    if y.ndim != 1 or y.shape[0] != z.shape[0] or y.is_floating_point() or y.is_complex():
        raise DataError(f"class labels must be integers of shape ({z.shape[0]},), got "
                        f"{tuple(y.shape)} {y.dtype}")
    lo, hi = (int(v) for v in torch.aminmax(y)) if len(y) else (0, 0)
    if lo < 0 or hi >= z.shape[1]:
        bad = lo if lo < 0 else hi
        raise DataError(f"class label {bad} but the network has {z.shape[1]} outputs: labels index them "
                        f"(0..{z.shape[1] - 1})")
    # cross_entropy takes int64 (or uint8) class indices only; int32/int16 labels (numpy, pandas) index too
    return F.cross_entropy(z, y.to(device=z.device, dtype=torch.long), reduction="none")


def output_hessian_product(zs: torch.Tensor, v: torch.Tensor, task: str) -> torch.Tensor:
    """``H(zs) v`` per example, with ``H`` the output-space Hessian of the Bregman divergence at ``zs``.

    Identity for squared error; ``diag(p) - p p^T`` with ``p = softmax(zs)`` for cross-entropy.
    """
    check_task(task)
    if task == "regression":
        return v
    p = F.softmax(zs, dim=-1)
    return p * v - p * (p * v).sum(-1, keepdim=True)
