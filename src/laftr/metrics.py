"""Output discrepancies rho(f(x; theta0), f(x; theta)) used by every FSD estimator.

Each metric maps a pair of output batches ``(z0, z)`` of shape ``(B, K)`` to per-example
discrepancies of shape ``(B,)``. ``z0`` is always the reference network's output.

- ``l2``:       1/2 ||z - z0||^2 on logits
- ``mse``:      the same, named for regression heads (Bregman divergence of squared error)
- ``l2-probs``: 1/2 ||softmax(z) - softmax(z0)||^2
- ``kl``:       KL(softmax(z0) || softmax(z)) (Bregman divergence of softmax cross-entropy)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _l2(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (z - z0).pow(2).sum(-1)


def _l2_probs(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softmax(z, -1) - F.softmax(z0, -1)).pow(2).sum(-1)


def _kl(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    logp0 = F.log_softmax(z0, -1)
    logp = F.log_softmax(z, -1)
    return (logp0.exp() * (logp0 - logp)).sum(-1)


METRICS: dict[str, Metric] = {"l2": _l2, "mse": _l2, "l2-probs": _l2_probs, "kl": _kl}

#: Metrics that LAFTR's closed form (second-moment propagation) supports.
QUADRATIC_METRICS = frozenset({"l2", "mse"})


def check_metric(name: str) -> str:
    """Return ``name`` if it is a known metric, else raise a ``ValueError`` listing the known ones."""
    if not isinstance(name, str) or name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {sorted(METRICS)}")
    return name


def select_outputs(z: torch.Tensor, outputs: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """Flatten ``z`` to ``(B, K)`` and keep only the output units in ``outputs`` (all when None)."""
    z = z.reshape(z.shape[0], -1)
    if outputs is None:
        return z
    idx = torch.as_tensor(outputs, dtype=torch.long, device=z.device)
    if idx.ndim != 1 or idx.numel() == 0:
        raise ValueError("outputs must be a non-empty 1-d list of output indices")
    if int(idx.max()) >= z.shape[1] or int(idx.min()) < -z.shape[1]:
        raise ValueError(f"outputs {idx.tolist()} out of range for a model with {z.shape[1]} outputs")
    return z.index_select(1, idx % z.shape[1])


def discrepancy(
    z0: torch.Tensor,
    z: torch.Tensor,
    metric: str = "l2",
    outputs: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example discrepancy ``rho(z0, z)`` of shape ``(B,)``.

    Args:
        z0: reference outputs (the network at theta0), shape ``(B, ...)``.
        z: outputs of the other network, same shape.
        metric: one of ``l2``, ``mse``, ``l2-probs``, ``kl``.
        outputs: optional subset of output units (multi-head tasks); softmax metrics renormalize
            over that subset.
    """
    fn = METRICS[check_metric(metric)]
    if z0.shape != z.shape:
        raise ValueError(f"output shapes differ: {tuple(z0.shape)} vs {tuple(z.shape)}")
    return fn(select_outputs(z0, outputs), select_outputs(z, outputs))
