"""The metric's output-space curvature and per-example gradients, shared by ``diag-fisher`` and ``kfac``.

For a metric rho and reference outputs z0 (restricted to the selected output units),
``H = d^2/dz^2 rho(z0, z) at z = z0`` is

- ``l2`` / ``mse``: the identity;
- ``kl``: ``diag(p0) - p0 p0^T`` (p0 = softmax of the selected outputs);
- ``l2-probs``: ``S^2`` with ``S = diag(p0) - p0 p0^T`` (the Jacobian of softmax; the second term of the
  Hessian vanishes at z = z0 because it is multiplied by ``p - p0``).

The Gauss-Newton matrix of the FSD is then ``E_x[J^T H J]`` and ``1/2 dtheta^T (E J^T H J) dtheta`` is
the second-order Taylor expansion of the FSD around theta0. Every curvature estimator works with a set
of output-space vectors ``W`` (``(B, K, S)``, S vectors per example) whose outer products give ``H``:
``W W^T = H`` exactly (``exact``: the columns of a factor ``L``), or in expectation (``mc``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap
from tqdm.auto import tqdm

from .. import distributed as dist_
from .._util import (
    EMPTY_DATA,
    Data,
    functional_call,
    iter_batches,
    merged_first_batches,
    model_device_dtype,
    wide_dtype,
)
from .._util import eval_mode as _eval_mode
from ..errors import DataError, UnsupportedOpError, UsageError
from ..metrics import check_metric, check_softmax_outputs, run_network, select_outputs

log = logging.getLogger(__name__)

#: How output-space vectors are drawn: Monte Carlo ("true Fisher"), all columns of the factor, or the
#: gradients of the loss at the true labels (``kl`` only).
FISHER_KINDS = ("mc", "exact", "empirical")

def unused_label_samples(fisher: str, given: Iterable[str]) -> list[str]:
    """``num_label_samples`` given with a Fisher that draws no labels (see ``EstimatorConfig.unused``)."""
    if "num_label_samples" in given and fisher != "mc":
        return [f"num_label_samples applies to fisher='mc' (sampled labels), not {fisher!r}"]
    return []


def check_fisher_kind(kind: str, metric: str, allowed: Sequence[str] = FISHER_KINDS) -> str:
    """Validate a ``fisher`` option against the metric; returns it."""
    if kind not in allowed:
        raise UsageError(f"unknown fisher {kind!r}; choose one of {list(allowed)}")
    if kind == "empirical" and metric != "kl":
        raise UsageError(
            f"the empirical Fisher uses the gradient of cross-entropy at the true labels, which matches only "
            f"metric 'kl' (got {metric!r}); use fisher='mc' or 'exact'"
        )
    return kind


def output_hessian_factor(z0: torch.Tensor, metric: str) -> torch.Tensor:
    """A factor ``L`` of the metric's output Hessian at ``z = z0``: ``L @ L^T = H`` for every example.

    Args:
        z0: reference outputs of shape ``(B, K)`` (already restricted to the selected output units).
        metric: ``l2``, ``mse``, ``l2-probs`` or ``kl``.

    Returns:
        ``(B, K, K)``: the identity (``l2``/``mse``), ``diag(sqrt p0) - p0 sqrt(p0)^T`` (``kl``; its column
        j is ``sqrt(p0_j) (e_j - p0)``) or the symmetric ``diag(p0) - p0 p0^T`` (``l2-probs``).
    """
    check_metric(metric)
    if z0.ndim != 2:
        raise DataError(f"z0 must have shape (B, K), got {tuple(z0.shape)}")
    B, K = z0.shape
    if metric in ("l2", "mse"):
        return torch.eye(K, dtype=z0.dtype, device=z0.device).expand(B, K, K).clone()
    p = F.softmax(z0, dim=-1)
    if metric == "kl":
        r = p.sqrt()
        return torch.diag_embed(r) - p[:, :, None] * r[:, None, :]
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # l2-probs


def labels_to_positions(y: torch.Tensor, outputs: Sequence[int] | None, num_outputs: int) -> torch.Tensor:
    """Map class labels (indices of the model's outputs) to positions among the selected outputs.

    Raises:
        ValueError: labels that are not integer class indices, or that name an output outside ``outputs``.
    """
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
        raise DataError(f"labels must be integer class indices of shape (B,), got "
                         f"{y.dtype} {tuple(y.shape)}")
    y = y.long()
    if outputs is None:
        if (y < 0).any() or (y >= num_outputs).any():
            raise DataError(f"labels {sorted(set(y.tolist()))} out of range for a model with "
                             f"{num_outputs} outputs")
        return y
    table = torch.full((max(num_outputs, int(y.max()) + 1, max(outputs) + 1),), -1, dtype=torch.long,
                       device=y.device)
    kept = torch.as_tensor(list(outputs), device=y.device) % num_outputs
    table[kept] = torch.arange(len(outputs), device=y.device)
    if (y < 0).any():
        raise DataError("labels must be non-negative class indices")
    pos = table[y]
    if (pos < 0).any():
        bad = sorted(set(y[pos < 0].tolist()))
        raise DataError(f"labels {bad} are not among the compared outputs {list(outputs)}; labels must "
                         "index the model's output units")
    return pos


def output_vectors(
    z0: torch.Tensor,
    metric: str,
    fisher: str,
    num_samples: int,
    generator: torch.Generator | None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output-space vectors ``W`` (``(B, K, S)``) whose outer products ``W W^T`` give the metric's Hessian.

    - ``exact``: ``W = L`` (S = K), so ``W W^T = H`` exactly.
    - ``mc``: S = ``num_samples`` vectors scaled by ``1/sqrt(S)`` with ``E[W W^T] = H``: for ``kl``
      ``e_y - p0`` with labels ``y ~ Categorical(p0)`` drawn from the model (the true Fisher); for the
      other metrics ``L eps`` with ``eps ~ N(0, I)``.
    - ``empirical`` (``kl``): ``p0 - e_y`` at the true labels (positions among the selected outputs).
    """
    B, K = z0.shape
    if fisher == "exact":
        return output_hessian_factor(z0, metric)
    if fisher == "empirical":
        if labels is None:
            raise DataError("the empirical Fisher needs labels: give (x, y) batches")
        p = F.softmax(z0, dim=-1)
        return (p - F.one_hot(labels, K).to(p.dtype))[:, :, None]
    if fisher != "mc":
        raise UsageError(f"unknown fisher {fisher!r}; choose one of {list(FISHER_KINDS)}")
    S = int(num_samples)
    if metric == "kl":
        p = F.softmax(z0, dim=-1)
        y = torch.multinomial(p, S, replacement=True, generator=generator)  # (B, S)
        onehot = F.one_hot(y, K).to(p.dtype).transpose(1, 2)  # (B, K, S)
        return (onehot - p[:, :, None]) / math.sqrt(S)
    L = output_hessian_factor(z0, metric)
    eps = torch.randn((B, K, S), generator=generator, device=z0.device, dtype=z0.dtype)
    return L @ eps / math.sqrt(S)


def _backward_error(model: nn.Module, e: RuntimeError) -> Exception:
    """The error to raise for a failed per-example backward.

    Named where the network's forward changes in place a value its backward needs (autograd's "modified by
    an inplace operation"); ``e`` itself otherwise.
    """
    if "modified by an inplace operation" not in str(e):
        return e
    return UnsupportedOpError(
        f"{type(model).__name__}'s forward changes in place a value that its backward needs "
        f"({str(e).splitlines()[0][:160]}): the network cannot be differentiated by reverse mode, which the "
        "diagonal Fisher and K-FAC do per example (its own loss.backward() fails the same way; Hugging "
        "Face's traced DeBERTa, which fills its softmax output in place, is one); write that op out of "
        "place, or use laftr, ntk or subset, which run their own graph or the network without this backward")


def per_example_square_grads(
    model: nn.Module,
    x: torch.Tensor,
    W: torch.Tensor,
    names: Sequence[str],
    outputs: Sequence[int] | None,
    chunk_size: int = 32,
) -> dict[str, torch.Tensor]:
    """``sum_b sum_s (d/dtheta  W[b, :, s] . z_sel(x_b; theta))^2`` for the parameters in ``names``.

    Each example's gradient is computed on its own (``torch.func.vmap`` of ``jacrev`` over
    ``functional_call``), so the result is a sum of per-example squares, never the square of a batch
    mean. The model must be in the mode wanted (eval) and is not changed.

    Args:
        model: the network (its current parameters and buffers are used).
        x: a batch of inputs ``(B, ...)``.
        W: ``(B, K, S)`` output-space vectors (see :func:`output_vectors`).
        names: the parameters to differentiate.
        outputs: the selected output units.
        chunk_size: examples per vectorized chunk (bounds memory at ``chunk_size * S * P`` floats).

    Returns:
        ``{name: tensor shaped like the parameter}``.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    wrt = {n: params[n] for n in names}
    rest = {n: p for n, p in params.items() if n not in wrt}
    rest.update({n: b.detach() for n, b in model.named_buffers()})

    def one(tp: dict[str, torch.Tensor], xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        z = functional_call(model, (tp, rest), (xb.unsqueeze(0),))
        return select_outputs(z, outputs)[0] @ wb  # (S,)

    vectorized = vmap(jacrev(one), in_dims=(None, 0, 0))

    def looped(tp: dict[str, torch.Tensor], xs: torch.Tensor, ws: torch.Tensor) -> dict[str, torch.Tensor]:
        per = [jacrev(one)(tp, xb, wb) for xb, wb in zip(xs, ws, strict=True)]
        return {n: torch.stack([j[n] for j in per]) for n in tp}

    jac = vectorized
    acc = {n: torch.zeros_like(p, dtype=wide_dtype(p.dtype)) for n, p in wrt.items()}
    with torch.enable_grad():
        for i in range(0, x.shape[0], max(1, int(chunk_size))):
            xs, ws = x[i : i + chunk_size], W[i : i + chunk_size]
            try:
                J = jac(wrt, xs, ws)
            except RuntimeError as e:
                if jac is looped:
                    raise _backward_error(model, e) from e
                # an op whose vmap batching rule fails (PyTorch 2.13's prelu with a shared slope): the same
                # per-example Jacobians one example at a time; an error of the network itself recurs here
                log.info("per-example gradients: torch.func.vmap failed (%s); computing them one example at "
                         "a time", str(e).splitlines()[0][:200])
                jac = looped
                try:
                    J = jac(wrt, xs, ws)
                except RuntimeError as again:
                    raise _backward_error(model, again) from again
            for n in acc:
                acc[n] += J[n].to(acc[n].dtype).pow(2).sum(dim=(0, 1))
    return acc


def check_curvature_config(c: Any, allowed: Sequence[str]) -> None:
    """Validate the fields shared by the curvature estimators' configs.

    That is ``fisher`` and the sample and chunk sizes.
    """
    check_fisher_kind(c.fisher, c.metric, allowed)
    for name in ("num_label_samples", "chunk_size", "batch_size"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")


def curvature_batches(
    model: nn.Module, data: Data, config: Any, outputs: Sequence[int] | None, desc: str, stream: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, W)`` for every batch of ``data``: inputs and their output-space vectors.

    The inputs are on the model's device/dtype; the vectors (:func:`output_vectors`) are for
    ``config.fisher``, drawn from a generator seeded by ``config.seed`` (and ``stream``, a rank of a
    distributed fit, so that ranks draw independent vectors; stream 0 is the seed's own).

    The model must already be in eval mode; it is run once per batch without gradients.
    """
    device, dtype = model_device_dtype(model)
    gen = torch.Generator(device=device).manual_seed(dist_.stream_seed(config.seed, stream))
    for x, y in tqdm(merged_first_batches(iter_batches(data, config.batch_size, device, dtype)),
                     disable=not config.progress, desc=desc):
        with torch.no_grad():
            z = run_network(model, x)
        check_softmax_outputs(z, config.metric, outputs)
        z = z.reshape(z.shape[0], -1)
        z0 = select_outputs(z, outputs)
        if not torch.isfinite(z0).all():
            raise DataError("the model gives NaN or infinite outputs at theta0 on the data: every distance "
                            "from it would be NaN; fit at weights whose outputs on the data are finite")
        labels = None
        if config.fisher == "empirical":
            if y is None:
                raise DataError("fisher='empirical' needs labels: give (x, y) batches")
            labels = labels_to_positions(y, outputs, z.shape[1])
        yield x, output_vectors(z0, config.metric, config.fisher, config.num_label_samples, gen, labels)


def reduce_sums(sums: dict[str, torch.Tensor], count: int, model: nn.Module,
                ) -> tuple[dict[str, torch.Tensor], int]:
    """All-reduce a fit's float64 sums and its example count over the process group (in the model's dtype).

    A rank without examples contributes zeros; when no rank has any, the usual :class:`DataError` is raised.
    """
    from .. import distributed as dist_

    dtype = model_device_dtype(model)[1]
    device = {n: v.device for n, v in sums.items()}
    total = dist_.all_reduce_sums({**{f"s/{n}": v for n, v in sums.items()},
                                   "count": torch.tensor([float(count)])})
    n = int(total.pop("count").item())
    if n == 0:
        raise DataError(EMPTY_DATA)
    where = next(iter(device.values()), model_device_dtype(model)[0])
    return {k[2:]: v.to(device=device.get(k[2:], where), dtype=dtype) for k, v in total.items()}, n


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put ``model`` in eval mode (dropout off, batch norm on running statistics).

    Each submodule's own mode is put back after (``laftr._util.eval_mode``).
    """
    with _eval_mode(model):
        yield model
