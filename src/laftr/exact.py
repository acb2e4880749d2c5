"""Exact function space distance over a dataset: the ground truth every estimator is scored against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist_
from ._util import (
    EMPTY_DATA,
    Data,
    allow_empty_data,
    arch_signature,
    check_runnable,
    eval_mode,
    iter_batches,
    model_device_dtype,
    values_digest,
)
from .errors import DataError, UsageError
from .graph import PROBE_EXAMPLES, check_deterministic, check_per_example, check_traced_graph
from .metrics import check_metric, check_outputs, discrepancy, run_network, widened


def _reference(model_a: nn.Module, x: torch.Tensor, where: tuple[torch.device, torch.dtype]) -> torch.Tensor:
    """``model_a``'s outputs on ``x`` (no graph), with ``x`` moved to ``model_a``'s device and dtype.

    Only a floating ``x`` changes dtype. So a float32 reference and a float64 model (or models on two devices)
    can be compared.
    """
    with torch.no_grad():
        return run_network(model_a, _moved(x, where))


def _moved(x: torch.Tensor, where: tuple[torch.device, torch.dtype]) -> torch.Tensor:
    """``x`` on the device ``where[0]``; a floating ``x`` in the dtype ``where[1]`` (ids keep theirs)."""
    device, dtype = where
    return x.to(device=device, dtype=dtype if x.is_floating_point() else None)


def _check_deterministic(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor,
                         ref: tuple[torch.device, torch.dtype]) -> None:
    """Refuse random networks and networks that mix the examples of a batch: they have no exact FSD.

    Dropout forced on in eval mode gives draws of one; batch norm without running statistics one per batching.
    """
    check_deterministic(model_a, _moved(x, ref), "model_a")
    check_deterministic(model_b, x, "model_b")
    check_per_example(model_a, _moved(x, ref))
    check_per_example(model_b, x)


class _Probe:
    """The first :data:`~laftr.graph.PROBE_EXAMPLES` examples of a pass, gathered across its first batches.

    The checks of :func:`_check_deterministic` need two examples or more in one batch to see a network that
    mixes them; a loader of batch size 1 (or ``batch_size=1``) gives one per batch, so the check is made once
    on the first examples of the first batches, during the pass (no second pass over the data, which may be a
    one-shot stream), holding no more than those few examples.
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, ref: tuple[torch.device, torch.dtype],
                 grad: bool = False) -> None:
        self.models = (model_a, model_b)
        self.ref = ref
        self.grad = grad  # model_b runs with gradients, model_a without: their functions must agree
        self.xs: list[torch.Tensor] = []
        self.count = 0
        self.done = False

    def add(self, x: torch.Tensor) -> None:
        """Keep the first examples of batch ``x`` until there are enough; then check them (once)."""
        if self.done:
            return
        self.xs.append(x[: PROBE_EXAMPLES - self.count])
        self.count += self.xs[-1].shape[0]
        if self.count >= PROBE_EXAMPLES:
            self.finish()

    def finish(self) -> None:
        """Check the examples kept (at the end of the data if it has fewer than the probe's number)."""
        if self.done or not self.xs:
            return
        self.done = True
        x = self.xs[0] if len(self.xs) == 1 else torch.cat(self.xs)
        self.xs = []
        _check_deterministic(*self.models, x, self.ref)
        if self.grad:  # (TransformerEncoder's fused inference path: 0.046 at model_a == model_b)
            check_traced_graph(self.models[1], x, hooks=False, grad_off=False)


def exact_fsd(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Data,
    metric: str = "l2",
    outputs: Sequence[int] | None = None,
    grad: bool = False,
    batch_size: int = 512,
    progress: bool = False,
    distributed: bool | None = None,
) -> torch.Tensor:
    """``mean_x rho(f(x; model_a), f(x; model_b))`` over every example in ``data``.

    ``model_a`` is the reference (theta0): ``kl`` is ``KL(p_a || p_b)``. Both models are evaluated
    in eval mode (dropout off, batch norm on running statistics) and put back as they were. Each model reads
    the inputs in its own floating dtype and on its own device; the discrepancy is computed from the outputs
    in ``model_b``'s dtype, in at least float32 for each example, and summed over the examples in float64 (a
    float16 or bfloat16 running sum overflows or drifts over a large data set).

    Args:
        model_a: reference network.
        model_b: the other network (same output shape).
        data: loader of ``(x, y)`` or ``x`` batches, a tensor of inputs, or an ``(X, Y)`` pair.
        metric: ``l2``, ``mse``, ``l2-probs`` or ``kl``.
        outputs: optional subset of output units to compare (multi-head tasks).
        grad: keep the graph so the result can be differentiated w.r.t. ``model_b``'s parameters
            (memory grows with the data; meant for small sets).
        batch_size: batch size when ``data`` is a tensor.
        progress: show a progress bar.
        distributed: in a ``torch.distributed`` process group (None: when one is initialized), ``data`` is
            this rank's shard (possibly empty): the float64 sum of the discrepancies and the example count are
            all-reduced, so every rank returns the mean over all the ranks' data. With ``grad``, the gradient
            that flows back is this rank's part (its shard's sum over the global count): sum it over the ranks
            (all-reduce, as DDP does) for the full gradient. False: this process's data only.

    Returns:
        A 0-dim tensor in ``model_b``'s dtype.

    Raises:
        UsageError: in a distributed call, ranks with different models or options (on every rank).
        UnsupportedOpError: a random network, or one that mixes the examples of a batch (checked once, on the
            first examples of the data, gathered across its first batches when they hold fewer, as a loader
            of batch size 1 does).
    """
    def checks() -> bool:
        check_metric(metric)
        check_outputs(outputs)
        check_runnable(model_a, "model_a")
        check_runnable(model_b, "model_b")
        return dist_.active(distributed)

    on = dist_.prechecked(distributed, checks, "exact_fsd")
    if on:
        _check_ranks("exact_fsd", model_a, model_b, metric, outputs, grad=grad)
    device, dtype = model_device_dtype(model_b)
    ref = model_device_dtype(model_a)
    out = dtype  # the outputs' dtype (the value's: a float16 network may return float32 logits)

    def local() -> tuple[torch.Tensor | None, int]:
        nonlocal out
        total = None
        count = 0
        probe = _Probe(model_a, model_b, ref, grad)
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for x, _ in tqdm(iter_batches(data, batch_size, device, dtype), disable=not progress,
                             desc="exact FSD"):
                z0 = _reference(model_a, x, ref)
                z = run_network(model_b, x)
                probe.add(x)  # (after the outputs were found to be tensors of examples)
                out = z.dtype if z.is_floating_point() else dtype
                d = discrepancy(*widened(z0.to(z), z)[:2], metric, outputs).to(torch.float64).sum()
                total = d if total is None else total + d
                count += x.shape[0]
            probe.finish()
        return total, count

    with eval_mode(model_a, model_b), allow_empty_data(on):
        total, count = dist_.agree(local, "exact_fsd") if on else local()
    if on:
        sums = dist_.all_reduce_sums({"total": torch.zeros(1) if total is None else total.detach().reshape(1),
                                      "count": torch.tensor([float(count)])})
        n = sums["count"].item()
        if n == 0:
            raise DataError(EMPTY_DATA)
        value = (sums["total"][0] / n).to(device=device, dtype=out)
        if grad and total is not None:  # this rank's part of the gradient; the value stays the global one
            value = value + ((total - total.detach()) / n).to(out)
        return value
    assert total is not None
    return (total / count).to(out)


def _check_ranks(what: str, model_a: nn.Module, model_b: nn.Module, metric: str,
                 outputs: Sequence[int] | None, **options: Any) -> None:
    """Raise :class:`UsageError` on every rank unless all ranks compare the same networks the same way."""
    dist_.check_consistent(what, {
        "the metric": metric, "outputs": None if outputs is None else list(outputs), "the options": options,
        "model_a's parameters": arch_signature(model_a), "model_b's parameters": arch_signature(model_b),
        "model_b's dtype": str(model_device_dtype(model_b)[1]),
        "model_a's values (a hash)": values_digest(model_a),
        "model_b's values (a hash)": values_digest(model_b)})


def exact_fsd_and_grad(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Data,
    metric: str = "l2",
    outputs: Sequence[int] | None = None,
    batch_size: int = 512,
    progress: bool = False,
    distributed: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The exact FSD and its gradient w.r.t. ``model_b``'s trainable parameters, in one streaming pass.

    Unlike ``exact_fsd(..., grad=True)`` the graph of each batch is freed after its backward pass, so
    memory does not grow with the data. ``model_b``'s ``.grad`` fields are left untouched.

    In a ``torch.distributed`` process group (``distributed=None`` and a group is initialized, or ``True``)
    ``data`` is this rank's shard (possibly empty): the float64 sums of the discrepancies and of the gradients
    and the example count are all-reduced, so every rank returns the distance and the gradient over all the
    ranks' data (the same numbers on every rank). ``distributed=False``: this process's data only.

    The discrepancies are summed in float64 and the gradients in at least float32, each returned in its
    tensor's dtype. A random network, or one that mixes the examples of a batch, is refused as by
    :func:`exact_fsd`.

    Returns:
        ``(distance, {parameter name: gradient})``; the distance is detached.
    """
    def checks() -> bool:
        check_metric(metric)
        check_outputs(outputs)
        check_runnable(model_a, "model_a")
        check_runnable(model_b, "model_b")
        if not any(p.requires_grad for p in model_b.parameters()):
            raise UsageError("model_b has no trainable parameters")
        return dist_.active(distributed)

    on = dist_.prechecked(distributed, checks, "exact_fsd_and_grad")
    names = [n for n, p in model_b.named_parameters() if p.requires_grad]
    params = [p for p in model_b.parameters() if p.requires_grad]
    device, dtype = model_device_dtype(model_b)
    ref = model_device_dtype(model_a)
    if on:
        _check_ranks("exact_fsd_and_grad", model_a, model_b, metric, outputs,
                     trainable=names)
    out = dtype  # the outputs' dtype (the value's)

    def local() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        nonlocal out
        # the gradients summed in at least float32: a float16 sum overflows, a bfloat16 one drifts
        grads = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        probe = _Probe(model_a, model_b, ref, grad=True)
        for x, _ in tqdm(iter_batches(data, batch_size, device, dtype), disable=not progress,
                         desc="exact FSD+grad"):
            z0 = _reference(model_a, x, ref)
            with torch.enable_grad():
                z = run_network(model_b, x)
            probe.add(x)  # (after the outputs were found to be tensors of examples)
            out = z.dtype if z.is_floating_point() else dtype
            with torch.enable_grad():
                d = discrepancy(*widened(z0.to(device=device, dtype=z.dtype), z)[:2], metric, outputs)
                d = d.to(torch.float64).sum()
                gs = torch.autograd.grad(d, params, allow_unused=True)
            for acc, g in zip(grads, gs, strict=True):
                if g is not None:
                    acc.add_(g)
            total += d.detach()
            count += x.shape[0]
        probe.finish()
        return total, grads, count

    with eval_mode(model_a, model_b), allow_empty_data(on):
        total, grads, count = dist_.agree(local, "exact_fsd_and_grad") if on else local()
    if on:
        sums = dist_.all_reduce_sums({"total": total.reshape(1), "count": torch.tensor([float(count)]),
                                      **{f"grad/{i}": g for i, g in enumerate(grads)}})
        n = sums["count"].item()
        if n == 0:
            raise DataError(EMPTY_DATA)
        value = (sums["total"][0] / n).to(device=device, dtype=out)
        return value, {name: (sums[f"grad/{i}"] / n).to(device=p.device, dtype=p.dtype)
                       for i, (name, p) in enumerate(zip(names, params, strict=True))}
    return (total / count).to(out), {n: (g / count).to(p.dtype)
                                       for n, g, p in zip(names, grads, params, strict=True)}
