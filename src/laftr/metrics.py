"""Output discrepancies rho(f(x; theta0), f(x; theta)) used by every FSD estimator.

Each metric maps a pair of output batches ``(z0, z)`` of shape ``(B, K)`` to per-example
discrepancies of shape ``(B,)``. ``z0`` is always the reference network's output.

- ``l2``:       1/2 ||z - z0||^2 on logits
- ``mse``:      the same, named for regression heads (Bregman divergence of squared error)
- ``l2-probs``: 1/2 ||softmax(z) - softmax(z0)||^2
- ``kl``:       KL(softmax(z0) || softmax(z)) (Bregman divergence of softmax cross-entropy)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._util import is_batched
from .errors import DataError, UsageError

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def widened(z0: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """``z0`` and ``z`` in at least float32, and the dtype to return in.

    (In float16 a squared change of 256 overflows, and a sum of many small terms loses its digits; the exact
    FSD keeps each example's discrepancy in the wide dtype for its float64 sum.)
    """
    out = torch.promote_types(z0.dtype, z.dtype)
    work = torch.promote_types(out, torch.float32)
    return z0.to(work), z.to(work), out


def _l2(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    z0, z, out = widened(z0, z)
    return (0.5 * (z - z0).pow(2).sum(-1)).to(out)


def _l2_probs(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    z0, z, out = widened(z0, z)
    return (0.5 * (F.softmax(z, -1) - F.softmax(z0, -1)).pow(2).sum(-1)).to(out)


#: ``1/(k+2)!`` for k = 0..15: the series ``g(c) = expm1(c) - c = c^2 sum_k c^k / (k+2)!``, whose
#: remainder is below float64's rounding for ``|c| <= _KL_SERIES`` (float32 needs the first 8 terms).
_KL_SERIES_COEFFS = tuple(1.0 / math.factorial(k + 2) for k in range(16))
#: ``|c|`` up to which ``g(c)`` is summed from its series; beyond it ``exp(log p0 + c) - p0 (1 + c)`` cancels
#: by a factor of ~10 at most (float32 KLs within 5e-6 relative of the true ones in tests; the textbook
#: form's were up to 60x off on confident examples).
_KL_SERIES = 0.5
#: a bound on ``log p0_k + c_k`` under which no term of ``E_p0[exp(c)]`` overflows, even in float32 summed
#: over ~10^20 classes; an example beyond it has ``KL > _KL_BIG`` and takes the logsumexp form, accurate to
#: rounding relative to such a KL.
_KL_BIG = 40.0


def _kl(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(z0) || softmax(z))`` per example, free of cancellation (see :func:`_kl_general`).

    With ``d = z - z0``, ``m = E_p0[d]`` (held constant) and ``c = d - m`` the KL is ``log E_p0[exp(c)] -
    E_p0[c]``, computed as ``log1p(E_p0[expm1(c)]) - E_p0[c]``: ten plain ops, as fast as the textbook
    form (the general form's series and branches made the metric 3-7x slower, and it is in every step of a
    KL regularizer), 0 at ``z == z0`` with a gradient of exactly 0 there. Its rounding is relative to the
    terms ``p0 c``, not to the log-probabilities, and it works in float64 for float64 outputs and for
    outputs of up to ``_KL_WIDE`` values (where the cost is the ops' overhead), else in float32 (bfloat16 and
    float16 upcast): in float32 within 1e-3 of the KL at a change of the logits of 1e-4 and 3 % at 1e-6,
    where the textbook form was off by 2-8x and 10^4x. Masked (-inf) logits and changes that overflow the
    exponential (an example whose result is not finite) take :func:`_kl_general`, as do values batched by
    ``torch.func.vmap``, where no branch on values is possible.
    """
    if is_batched([z0, z]):
        return _kl_general(z0, z)
    out = torch.promote_types(z0.dtype, z.dtype)
    work = torch.float64 if out == torch.float64 or z.numel() <= _KL_WIDE else torch.float32
    d = z.to(work) - z0.to(work)
    p0 = F.softmax(z0.to(work), -1)
    c = d - (p0 * d).sum(-1, keepdim=True).detach()
    kl = torch.log1p((p0 * torch.expm1(c)).sum(-1)) - (p0 * c).sum(-1)
    if not bool(torch.isfinite(kl.detach()).all()):
        return _kl_general(z0, z)
    return kl.to(out)


#: outputs of up to this many values compute the KL in float64 (see :func:`_kl`)
_KL_WIDE = 1 << 12


def _kl_general(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(z0) || softmax(z))`` per example, free of cancellation, in at least float32.

    The textbook ``sum p0 (log p0 - log p)`` subtracts log-probabilities of size ~1 to find a KL that may be
    1e-9: its rounding (in bfloat16 and float16 larger than the KL, even negative; in float32 a 4.5x
    overestimate at a perturbation of 1e-4) swamps it. With ``d = z - z0`` and ``c = d - E_p0[d]`` the KL
    is ``log E_p0[exp(c)]`` (the log-partition terms cancel exactly), computed here as
    ``log1p(delta + G) - delta`` with ``delta = E_p0[c]`` (0 but for rounding, whose error this form
    cancels to second order) and ``G = E_p0[expm1(c) - c]``, a sum of non-negative terms: no cancellation,
    and exactly 0 with a zero gradient at ``z == z0``. An example whose terms could overflow (some
    ``log p0_k + c_k`` above ``_KL_BIG``: its KL exceeds it) takes ``logsumexp(log p0 + c) - delta``
    instead (huge logits), chosen per example with ``torch.where`` on clamped arguments, so that
    ``torch.func.vmap`` and ``grad`` run it and no gradient is NaN. Classes that ``z0`` gives zero
    probability (``-inf`` logits, a mask) add no term (the textbook form gives ``0 * inf = NaN``), only
    through the mass ``z`` gives them, which lowers ``p`` on the others; a class with ``p0 > 0`` that ``z``
    masks makes the KL ``+inf``. Computed in float64 for float64 outputs, else in float32
    (bfloat16 and float16 outputs too, and under autocast); returned in the outputs' dtype.
    """
    out_dtype = torch.promote_types(z0.dtype, z.dtype)
    work = torch.promote_types(out_dtype, torch.float32)
    z0, z = z0.to(work), z.to(work)
    logp0 = F.log_softmax(z0, -1)
    p0 = logp0.exp()
    seen = logp0 > -math.inf  # classes z0 gives a probability
    lost = seen & (z == -math.inf)  # ... that z gives none: KL = +inf
    d = torch.where(seen & ~lost, z - z0, 0.0)
    m = (p0 * d).sum(-1, keepdim=True)
    c = d - m
    delta = (p0 * c).sum(-1)
    shifted = logp0 + c  # log(p0 exp(c)); -inf on the classes z0 does not see
    # p0 (expm1(c) - c) per class: near 0, where that difference cancels, its value from its series (summed
    # without a graph) and its gradient from expm1(c) - c (p0 expm1(c): no cancellation); elsewhere
    # exp(log p0 + c) - p0 (1 + c), clamped so that neither branch overflows in an example of the other form
    near = c.clamp(-_KL_SERIES, _KL_SERIES)
    coeffs = _KL_SERIES_COEFFS if work == torch.float64 else _KL_SERIES_COEFFS[:8]
    x = near.detach()
    poly = torch.full_like(x, coeffs[-1])
    for coeff in reversed(coeffs[:-1]):
        poly = poly * x + coeff
    direct = torch.expm1(near) - near
    series = (x * x * poly) + (direct - direct.detach())
    far = torch.exp(shifted.clamp(max=_KL_BIG)) - p0 * (1 + c)
    terms = torch.where(c.abs() <= _KL_SERIES, p0 * series, far)
    small = torch.log1p((delta + terms.sum(-1)).clamp(min=-0.5)) - delta
    large = torch.logsumexp(shifted, -1) - delta
    kl = torch.where(shifted.amax(-1) > _KL_BIG, large, small)
    # the mass z gives the classes z0 does not see lowers p on the others: + log(1 + its odds), a softplus of
    # the difference of the logsumexps of z outside and inside them (inside: LSE(z0) + m + log E_p0[exp(c)]);
    # outside them, the other classes count as the dtype's lowest number (not -inf: a row without such mass
    # would give a NaN gradient), and add nothing
    unseen = ~seen & (z > -math.inf)
    outside = torch.logsumexp(torch.where(unseen, z, torch.finfo(work).min), -1)
    inside = z0.amax(-1) - logp0.amax(-1) + m.squeeze(-1) + kl + delta
    kl = kl + F.softplus(outside - inside)
    kl = torch.where(lost.any(-1), math.inf, kl)
    return kl.to(out_dtype)


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
_DTYPE_WORDS = ("dtype", "scalar type", "Tensor) and weight type", "and bias type", "ByteTensor",
                "LongTensor")


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
