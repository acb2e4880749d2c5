"""Output discrepancies rho(f(x; theta0), f(x; theta)) used by every FSD estimator.

Each metric maps a pair of output batches ``(z0, z)`` of shape ``(B, K)`` to per-example
discrepancies of shape ``(B,)``. ``z0`` is always the reference network's output.

- ``l2``:       1/2 ||z - z0||^2 on logits
- ``mse``:      the same, named for regression heads (Bregman divergence of squared error)
- ``l2-probs``: 1/2 ||softmax(z) - softmax(z0)||^2
- ``kl``:       KL(softmax(z0) || softmax(z)) (Bregman divergence of softmax cross-entropy)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .errors import DataError, UsageError

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _l2(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (z - z0).pow(2).sum(-1)


def _l2_probs(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softmax(z, -1) - F.softmax(z0, -1)).pow(2).sum(-1)


def _kl(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    logp0 = F.log_softmax(z0, -1)
    logp = F.log_softmax(z, -1)
    return (logp0.exp() * (logp0 - logp)).sum(-1)


#: The output discrepancies by name. Each maps a pair of output batches ``(z0, z)`` of shape ``(B, K)``,
#: ``z0`` the reference network's, to per-example discrepancies of shape ``(B,)``. ``l2`` (and ``mse``, its
#: name for regression heads): ``1/2 ||z - z0||^2`` on logits; ``l2-probs``:
#: ``1/2 ||softmax(z) - softmax(z0)||^2``; ``kl``: ``KL(softmax(z0) || softmax(z))``.
METRICS: dict[str, Metric] = {"l2": _l2, "mse": _l2, "l2-probs": _l2_probs, "kl": _kl}

#: Metrics that LAFTR's closed form (second-moment propagation) supports.
QUADRATIC_METRICS = frozenset({"l2", "mse"})


def check_metric(name: str) -> str:
    """Return ``name`` if it is a known metric, else raise a :class:`UsageError` listing the known ones."""
    if not isinstance(name, str) or name not in METRICS:
        raise UsageError(f"unknown metric {name!r}; choose one of {sorted(METRICS)}")
    return name


def check_outputs(outputs: Any, num_outputs: int | None = None) -> list[int] | None:
    """``outputs`` as a list of distinct non-negative ints (None stays None), or a :class:`UsageError`.

    The error names the problem: not a sequence of integers (bools and floats such as 1.5 are refused), empty,
    negative, repeated, or — when ``num_outputs`` is given — not below the model's number of outputs.
    """
    if outputs is None:
        return None
    if isinstance(outputs, torch.Tensor):
        if outputs.ndim != 1 or outputs.dtype.is_floating_point or outputs.dtype == torch.bool:
            raise UsageError(f"outputs must be a 1-d list of integer output indices, got a {outputs.dtype} "
                             f"tensor of shape {tuple(outputs.shape)}")
        outputs = outputs.tolist()
    elif hasattr(outputs, "dtype") and hasattr(outputs, "tolist") and getattr(outputs, "ndim", None) == 1:
        outputs = outputs.tolist()  # a 1-d numpy array (its integer items become ints; floats stay refused)
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
        raise UsageError(f"outputs must be a list of output indices, got {outputs!r}")
    bad = [o for o in outputs if not isinstance(o, numbers.Integral) or isinstance(o, bool)]
    if bad:
        raise UsageError(f"outputs must be integer output indices, got {bad[0]!r} in {list(outputs)}")
    out = [int(o) for o in outputs]
    if not out:
        raise UsageError("outputs must be None (all outputs) or a non-empty list of output indices")
    if min(out) < 0:
        raise UsageError(f"outputs must be non-negative output indices, got {out}")
    if len(set(out)) != len(out):
        raise UsageError(f"outputs repeat an index: {out} (each output unit may be compared once)")
    if num_outputs is not None and max(out) >= num_outputs:
        raise UsageError(f"outputs {out} out of range for a model with {num_outputs} outputs (indices 0.."
                         f"{num_outputs - 1})")
    return out


def check_network_output(z: Any) -> torch.Tensor:
    """``z`` if it is a tensor; otherwise an error that names what the network returned, and the fix."""
    if isinstance(z, torch.Tensor):
        if z.ndim == 0:
            raise UsageError("the network returned one number for the whole batch (a 0-dim tensor): laftr "
                             "compares the outputs of each example, so the network must return them with the "
                             "batch as the first axis, e.g. (B,) or (B, K)")
        return z
    what = type(z).__name__
    keys = list(z.keys())[:5] if isinstance(z, dict) else None
    raise UsageError(
        f"the network returned a {what}"
        + (f" (keys {keys})" if keys is not None else f" of {len(z)}" if isinstance(z, (tuple, list)) else "")
        + ", not a tensor: laftr compares one output tensor per example; wrap the model so that it returns "
        "the one to compare, e.g. laftr.SelectOutput(model, 0) or laftr.SelectOutput(model, 'logits')")


#: words of torch's errors for an op given a tensor of the wrong dtype (``mat1 and mat2 must have the same
#: dtype``, ``expected scalar type Float but found Long``, ``Input type (torch.ByteTensor) and weight
#: type ...``)
_DTYPE_WORDS = ("dtype", "scalar type", "Tensor) and weight type", "ByteTensor", "LongTensor")


def run_network(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, checked to be a tensor (:func:`check_network_output`).

    Integer inputs that an op of a floating network refuses (uint8 pixels into a Linear) raise
    :class:`laftr.DataError` naming the dtype and the fix instead of torch's dtype error.
    """
    try:
        z = model(x)
    except RuntimeError as e:
        if not x.is_floating_point() and any(w in str(e) for w in _DTYPE_WORDS):
            raise DataError(
                f"the network cannot read {x.dtype} inputs ({e}): images or features stored as integers "
                "(uint8 pixels) must be converted to floating point first, e.g. X.float() / 255; token ids "
                "need a network that reads them with an embedding (and, for laftr, input_model='tokens')"
            ) from e
        raise
    return check_network_output(z)


def check_softmax_outputs(z: torch.Tensor, metric: str,
                          outputs: Sequence[int] | torch.Tensor | None = None) -> None:
    """Refuse outputs a softmax metric (``kl``, ``l2-probs``) cannot read as one distribution per example.

    Those metrics read each example's outputs as the logits of one distribution; an output of shape
    ``(B, T, V)`` (a token model's logits at every position) would be one softmax over all ``T * V`` values,
    which is not the per-position distribution it means; and a softmax over one unit (a network with one
    output, a sigmoid classifier or a regression head, or ``outputs`` of one unit) is 1 whatever the network
    does, so every distance would be 0.
    """
    if metric not in ("kl", "l2-probs"):
        return
    compared = len(outputs) if outputs is not None else (int(z[0].numel()) if z.ndim and len(z) else None)
    if compared == 1:
        what = f"outputs={list(outputs)}" if outputs is not None else "a network with one output unit"
        raise DataError(
            f"metric {metric!r} compares softmax distributions, and {what} gives a softmax over one unit: "
            "1 whatever the network does, so every distance would be 0. Use metric='l2' (or 'mse') for one "
            "output (a regression head, a sigmoid's logit), or compare two or more output units")
    if z.ndim > 2:
        raise DataError(
            f"metric {metric!r} reads each example's outputs as the logits of one distribution, and the "
            f"network returns outputs of shape {tuple(z.shape)} (more than one axis per example, e.g. logits "
            "at every position): laftr would take one softmax over all of them. Return one distribution per "
            "example (e.g. the logits of the last position, z[:, -1]), or use metric='l2'")


def select_outputs(z: torch.Tensor, outputs: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """Flatten ``z`` to ``(B, K)`` and keep only the output units in ``outputs``.

    All units when None; ``outputs`` is checked by :func:`check_outputs`.
    """
    z = check_network_output(z)
    z = z.reshape(z.shape[0], -1)
    if outputs is None:
        return z
    idx = torch.as_tensor(check_outputs(outputs, z.shape[1]), dtype=torch.long, device=z.device)
    return z.index_select(1, idx)


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
    z0, z = check_network_output(z0), check_network_output(z)
    a = select_outputs(z0, outputs)  # (checks outputs: one out of range is named first)
    check_softmax_outputs(z0, metric, outputs)
    if z0.shape != z.shape:
        raise DataError(f"output shapes differ: {tuple(z0.shape)} vs {tuple(z.shape)}")
    return fn(a, select_outputs(z, outputs))
