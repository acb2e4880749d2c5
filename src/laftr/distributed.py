"""Fitting and exact FSDs over a ``torch.distributed`` process group: each rank reads its own shard.

Everything a fit accumulates is a float64 *sum* (METHOD.md section 2), so the fit on the union of the ranks'
shards is an all-reduce of the per-rank sums; coresets are the global bottom-k of a seeded hash, chosen from
candidates all-gathered from every rank. The all-reduced tensors are the same on every rank, so every rank
ends with the same fitted estimator.

The helpers here are what :meth:`laftr.FSDEstimator.fit`, :func:`laftr.exact_fsd` and
:func:`laftr.exact_fsd_and_grad` use when ``distributed`` is true (or None and a group is initialized):

- :func:`active` decides whether to reduce;
- :func:`check_consistent` all-gathers a short fingerprint of what each rank fits (estimator, options, graph,
  parameter shapes) and raises :class:`~laftr.errors.UsageError` on *every* rank when they differ;
- :func:`agree` runs a rank's local pass and all-gathers whether it failed, so a rank whose data is bad raises
  its own error and the others raise an error naming it, instead of waiting forever in the next collective;
- :func:`all_reduce_sums` all-reduces a dict of tensors (float64), the keys and shapes agreed first, so a rank
  that saw no data (empty shard) contributes zeros;
- :func:`all_gather_objects` all-gathers picklable objects (variable-length candidates);
- :func:`stream_seed` offsets a seed by a rank, so that ranks draw independent Monte Carlo samples (the
  output vectors of ``fisher="mc"`` in a fit; the samples of ``laftr`` and ``liftr`` when evaluated in a
  group, e.g. as a regularizer under DistributedDataParallel), rank 0 keeping the seed's own stream;
- :func:`unwrap` gives the module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper.

With the NCCL backend, tensors go to the current CUDA device (``torch.cuda.current_device()``, which each
rank must set) for the collective and come back to where they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ._util import shorten
from .errors import UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The seed of rank ``r``'s sample stream is ``seed + STREAM_STRIDE * r`` (a prime, so that the streams of
#: nearby seeds and ranks do not coincide for any small seed).
STREAM_STRIDE = 1_000_003


def initialized() -> bool:
    """Whether a default ``torch.distributed`` process group is initialized."""
    return bool(dist.is_available() and dist.is_initialized())


def active(distributed: bool | None) -> bool:
    """Whether to reduce over the default process group.

    ``None``: when one is initialized (and has more than one rank); ``False``: never; ``True``: a group must
    be initialized (else :class:`UsageError`).
    """
    if distributed is None:
        return initialized() and dist.get_world_size() > 1
    if not isinstance(distributed, bool):
        raise UsageError(f"distributed must be True, False or None, got {distributed!r}")
    if distributed and not initialized():
        raise UsageError("distributed=True needs an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group)")
    return distributed


def rank_and_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default group; ``(0, 1)`` without one."""
    if not initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def stream_seed(seed: int, stream: int) -> int:
    """The seed of sample stream ``stream`` (a rank) of ``seed``: ``seed + STREAM_STRIDE * stream``.

    Stream 0 is the seed itself, so a single process (and rank 0) draws what it always drew.
    """
    return int(seed) + STREAM_STRIDE * int(stream)


def sample_stream(distributed: bool | None) -> int:
    """The sample stream of a Monte Carlo evaluation: this rank when :func:`active`, else 0."""
    return dist.get_rank() if active(distributed) else 0


def unwrap(model: Any) -> Any:
    """The module inside a ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` wrapper.

    Anything else is returned as is. The wrapper's parameters are the module's own (named ``module.<name>``
    or ``_orig_mod.<name>``), so an estimator fitted on the module evaluates the wrapper by evaluating the
    module: the gradient reaches the same parameters. (laftr runs its own trace of the module, not compiled
    code.)
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None),
                                                                     torch.nn.Module):
            model = model._orig_mod  # torch.compile(model)
        else:
            return model


def _comm_device() -> torch.device:
    """Where tensors must be for a collective of the default group (CUDA for NCCL, else the CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (picklable objects; tensors travel through the CPU)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(local: Callable[[], T], what: str) -> T:
    """Run ``local()`` on every rank, then agree on whether any rank failed.

    A rank whose ``local()`` raised re-raises its own error; the other ranks raise a :class:`UsageError`
    naming the failed ranks and their errors. So no rank is left waiting in a later collective.
    """
    error: BaseException | None = None
    result: Any = None
    try:
        result = local()
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows
        error = e
    status = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, s) for r, s in enumerate(status) if s is not None]
    if failed:
        raise UsageError(f"{what} failed on rank(s) {[r for r, _ in failed]}: "
                         + "; ".join(f"rank {r}: {s}" for r, s in failed))
    return result


def prechecked(distributed: Any, checks: Callable[[], T], what: str) -> T:
    """``checks()`` -- a call's checks of its arguments, before its first collective -- agreed over the group.

    When the call takes part in a group (``distributed`` is not False and a group of several ranks is
    initialized; an invalid ``distributed`` counts, so that its refusal is shared), a rank whose arguments are
    refused raises its own error and the others a :class:`UsageError` naming it, instead of waiting in the
    call's first collective until the group's timeout.
    """
    if distributed is not False and initialized() and dist.get_world_size() > 1:
        return agree(checks, what)
    return checks()


def check_consistent(what: str, fingerprint: dict[str, Any]) -> None:
    """Raise :class:`UsageError` on every rank unless all ranks give the same ``fingerprint``.

    ``fingerprint`` is a small JSON-able dict (estimator name, options, graph fingerprint, parameter
    shapes, ...); the message names the first key that differs and the ranks that differ from rank 0.
    """
    allfp = all_gather_objects(fingerprint)
    ref = allfp[0]
    # in a fixed order, so that every rank names the same difference
    keys = list(ref) + [k for fp in allfp for k in fp if k not in ref]
    for key in dict.fromkeys(keys):
        values = [fp.get(key) for fp in allfp]
        bad = [r for r, v in enumerate(values) if v != ref.get(key)]
        if bad:
            raise UsageError(
                f"{what}: the ranks of the process group disagree on {key} ("
                + "; ".join(f"rank {r}: {shorten(repr(v), 120)}" for r, v in _differences(values, [0, *bad]))
                + "); every rank must fit the same network with the same options"
            )


def _differences(values: list[Any], ranks: list[int]) -> list[tuple[int, Any]]:
    """``(rank, value)`` for ``ranks``; of dicts, only the entries that differ from rank 0's."""
    ref = values[0]
    if not all(isinstance(values[r], dict) for r in ranks):
        return [(r, values[r]) for r in ranks]
    differ = [k for k in dict.fromkeys([*ref, *(k for r in ranks for k in values[r])])
              if any(values[r].get(k) != ref.get(k) for r in ranks)]
    return [(r, {k: values[r].get(k) for k in differ}) for r in ranks]


def all_reduce_sums(tensors: dict[str, torch.Tensor], pad: bool = False) -> dict[str, torch.Tensor]:
    """The sum over ranks of every tensor of ``tensors``, in float64, on the CPU, identical on every rank.

    The keys and shapes are agreed first (all-gathered): a key that some rank lacks (an empty shard, a layer
    that saw no data) is zeros there. With ``pad``, tensors of the same key may differ in size along any axis
    (groups, vocabulary) and are padded with zeros at the end to the largest size; without it a shape mismatch
    raises :class:`UsageError` on every rank.
    """
    header = {k: list(v.shape) for k, v in tensors.items()}
    headers = all_gather_objects(header)
    shapes: dict[str, list[int]] = {}
    for r, h in enumerate(headers):
        for k, s in h.items():
            if k not in shapes:
                shapes[k] = list(s)
            elif len(shapes[k]) != len(s) or (not pad and shapes[k] != list(s)):
                raise UsageError(f"the ranks' statistics {k!r} have different shapes ({shapes[k]} and, on "
                                 f"rank {r}, {list(s)}): do all ranks fit the same network on the same "
                                 "inputs?")
            else:
                shapes[k] = [max(a, b) for a, b in zip(shapes[k], s, strict=True)]
    device = _comm_device()
    out: dict[str, torch.Tensor] = {}
    for k in sorted(shapes):
        t = torch.zeros(shapes[k], dtype=torch.float64, device=device)
        if k in tensors:
            v = tensors[k]
            t[tuple(slice(0, n) for n in v.shape)] = v.to(device=device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[k] = t.cpu()
    return out


def gather_rows(rows: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Every rank's tensors of ``rows`` (on the CPU), concatenated along the first axis in rank order.

    A None entry (a rank without them) is skipped; the result's entry is None when every rank gave None.
    """
    local = [None if t is None else t.detach().cpu() for t in rows]
    every = all_gather_objects(local)
    out: list[torch.Tensor | None] = []
    for i in range(len(rows)):
        parts = [t for r in every if (t := r[i]) is not None]
        # (torch.cat promotes dtypes of one kind: int32 and int64 token ids, float32 and float64 rows)
        shapes = {(tuple(t.shape[1:]), t.is_floating_point()) for t in parts}
        if len(shapes) > 1:  # (every rank gets the same list, so every rank raises: none waits)
            ranks = [(r, tuple(t.shape[1:]), str(t.dtype).removeprefix("torch."))
                     for r, row in enumerate(every) if (t := row[i]) is not None]
            raise UsageError("the ranks' examples differ in shape or kind (rank, per-example shape, dtype: "
                             f"{ranks}); every rank must hold examples of one kind")
        out.append(torch.cat(parts) if parts else None)
    return out

