"""Small shared helpers: batch iteration over loaders/tensors, parameter snapshots, finiteness checks."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import logging
import math
import numbers
import os
import re
import secrets
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import jvp, linearize

from .errors import DataError, UsageError

log = logging.getLogger(__name__)

#: The message of the error for data without examples.
EMPTY_DATA = "data is empty: no batches to read"

Data = Any  # a DataLoader / iterable of (x, y) or x batches, a tensor X, or a tuple (X, Y)

T = TypeVar("T", bound=type)

#: Whether :func:`iter_batches` may read data without examples (a rank's empty shard in a distributed fit,
#: where the other ranks have the data); set by :func:`allow_empty_data`.
_ALLOW_EMPTY: contextvars.ContextVar[bool] = contextvars.ContextVar("laftr_allow_empty", default=False)


@contextlib.contextmanager
def allow_empty_data(allow: bool = True) -> Iterator[None]:
    """Within this context :func:`iter_batches` yields nothing for empty data instead of raising.

    Used by distributed fits: a rank with an empty shard contributes zeros, and the fit raises the usual
    :class:`DataError` only when every rank's shard is empty.
    """
    token = _ALLOW_EMPTY.set(allow)
    try:
        yield
    finally:
        _ALLOW_EMPTY.reset(token)


def registrar(table: dict[str, Any], what: str, name: str) -> Callable[[T], T]:
    """A class decorator that puts the class into ``table`` under ``name`` (and sets its ``name``).

    A second class under a name already taken is refused (``what`` names the kind of thing, for the message).
    """

    def deco(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{what} name {name!r} is already registered")
        table[name] = cls
        cls.name = name  # type: ignore[attr-defined]  # any registered class gets a name
        return cls

    return deco


def shorten(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters with ``...`` at the end when longer (for messages)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of ``model``'s first floating parameter (CPU / the default dtype if it has none).

    (An integer parameter -- a permutation kept as a frozen ``nn.Parameter`` -- is no floating dtype: taken
    first, it cast the inputs and theta0 to integers.)
    """
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    first = next(iter(model.parameters()), None)
    return (first.device if first is not None else torch.device("cpu")), torch.get_default_dtype()


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to square and sum values of ``dtype`` in: float32 for float16 / bfloat16, else ``dtype``.

    (A parameter change of 2^-14 squares to 2^-28, below float16's smallest number: the weight and diagonal
    Fisher estimates of a float16 network were 0; sums of K-FAC's outer products passed its largest.)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def promoted_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype all of ``model``'s floating parameters promote to (the default dtype if none)."""
    out: torch.dtype | None = None
    for p in model.parameters():
        if p.is_floating_point():
            out = p.dtype if out is None else torch.promote_types(out, p.dtype)
    return torch.get_default_dtype() if out is None else out


def narrowed(value: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``value``, computed in :func:`wide_dtype`, back in a float16 / bfloat16 model's dtype (else as is).

    A model's dtype here is the one its parameters promote to: a float32 network with a bfloat16 layer keeps
    float32 values. (Every parameter is read only where the first floating one is float16 / bfloat16: the
    estimates of other networks, called at every training step, skip the walk.)
    """
    first = model_device_dtype(model)[1]
    if wide_dtype(first) == first:  # (then no promotion is float16 / bfloat16 either)
        return value
    dtype = promoted_dtype(model)
    return value.to(dtype) if wide_dtype(dtype) != dtype else value


def functional_call(module: nn.Module, tensors: Any, args: Any, kwargs: Any = None) -> Any:
    """``torch.func.functional_call``, with every module's own parameters and buffers put back afterwards.

    torch's call does not put them back on a module registered under two names (``self.again = self.sh``):
    ``sh.weight`` was left a plain tensor holding the values passed in, so theta's network lost its
    parameters to theta0's values (subset and ntk on such a network).
    """
    kept = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    try:
        return torch.func.functional_call(module, tensors, args, kwargs)
    finally:
        for m, params, buffers in kept:
            tables: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = (
                (m._parameters, params), (m._buffers, buffers))
            for table, own in tables:
                for k, v in own.items():
                    if table.get(k) is not v:
                        table[k] = v


def _split_batch(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        x, y = batch[0], (batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None)
    elif isinstance(batch, dict) and "x" in batch:
        x, y = batch["x"], batch.get("y")
    else:
        raise DataError(
            f"cannot read batch {index} of type {type(batch).__name__}; expected a tensor of inputs, an "
            "(x, y) tuple or a dict with 'x'"
        )
    if x.ndim == 0:
        raise DataError(f"batch {index} is a 0-dim tensor; a batch of inputs has the examples along dim 0")
    if y is not None and (y.ndim == 0 or y.shape[0] != x.shape[0]):
        raise DataError(
            f"batch {index} has {x.shape[0]} inputs but labels of shape {tuple(y.shape)}: "
            "give one label per input"
        )
    return x, y


def _pair(data: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether a tuple of two tensors is an ``(X, Y)`` pair (True) or two batches of inputs.

    Two batches of inputs are refused as ambiguous. A pair's ``Y`` is 1-D (class labels, scalar targets) or
    has another per-example shape than ``X`` (targets of a multi-output regression); two input batches always
    share their per-example shape.
    """
    X, Y = data
    if X.ndim < 2:
        raise DataError(
            f"a tuple (X, Y) needs X of shape (N, ...) with at least 2 dims, got {tuple(X.shape)}; "
            "pass a list [x1, x2, ...] for several batches of inputs"
        )
    if Y.ndim >= 2 and Y.shape[1:] == X.shape[1:]:
        raise DataError(
            f"ambiguous data: a tuple of two tensors of the same per-example shape {tuple(X.shape[1:])} "
            "could be (inputs, targets) or two batches of inputs; pass a list [x1, x2] for batches, or X "
            "alone (only the classwise input models and balanced coresets read labels, and "
            "they need 1-D labels)"
        )
    if Y.ndim == 0 or Y.shape[0] != X.shape[0]:
        raise DataError(
            f"(X, Y) of unequal lengths: X has {X.shape[0]} examples, Y has shape {tuple(Y.shape)}; give one "
            "label (or target) per example"
        )
    return True


def iter_batches(
    data: Data,
    batch_size: int = 512,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` batches (``y`` may be None) from one of the data forms every laftr function reads.

    The forms:

    * a tensor ``X`` of inputs ``(N, ...)`` — split into batches of ``batch_size``;
    * a **tuple** ``(X, Y)`` of two tensors — inputs and one label (or target) per example; ``Y`` is 1-D or
      has another per-example shape than ``X`` (a tuple of two same-shaped tensors is refused as ambiguous);
    * anything else iterable — a DataLoader, a **list** of batches, a generator — whose items are batches:
      a tensor of inputs, an ``(x, y)`` tuple or list (what a DataLoader yields) or a dict with ``"x"`` (and
      ``"y"``). A list is always a list of batches, never an ``(X, Y)`` pair.

    Every batch must have the per-example shape and kind (floating or integer) of the first. Inputs are moved
    to ``device``; floating inputs also to ``dtype``, while integer and bool inputs (token ids, indices) keep
    their own dtype. Labels are moved to ``device``. Empty data, non-finite inputs and labels that do not
    match the inputs raise :class:`laftr.DataError`.
    """
    if isinstance(data, torch.Tensor):
        if data.ndim == 0:
            raise DataError("data is a 0-dim tensor; give inputs of shape (N, ...)")
        source: Iterable[Any] = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    elif (
        isinstance(data, tuple)
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
        and _pair(data)
    ):
        X, Y = data
        source = ((X[i : i + batch_size], Y[i : i + batch_size]) for i in range(0, len(X), batch_size))
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        source = data
        _warn_padded_shards(data)
    else:
        raise DataError(
            f"data must be a tensor of inputs, an (X, Y) tuple, a list of batches or a DataLoader; "
            f"got {type(data).__name__}"
        )
    first: tuple[tuple[int, ...], bool] | None = None
    seen = False
    for index, batch in enumerate(source):
        x, y = _split_batch(batch, index)
        kind = (tuple(x.shape[1:]), x.is_floating_point())
        if first is None:
            first = kind
        elif kind != first:
            was = f"{'floating' if first[1] else 'integer'} inputs of per-example shape {first[0]}"
            now = f"{'floating' if kind[1] else 'integer'} inputs of per-example shape {kind[0]}"
            hint = ("; a list is read as a list of batches — pass an (X, Y) pair as a tuple"
                    if index == 1 and isinstance(data, list) and len(data) == 2 else "")
            raise DataError(f"inputs change shape or kind between batches: batch 0 has {was}, "
                            f"batch {index} {now}{hint}")
        if x.numel() == 0:
            continue
        seen = True
        if device is not None or dtype is not None:
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        if check_finite and x.is_floating_point() and not torch.isfinite(x).all():
            raise DataError(f"input batch {index} contains NaN or infinite values")
        if y is not None and device is not None:
            y = y.to(device)
        yield x, y
    if not seen and not _ALLOW_EMPTY.get():
        raise DataError(EMPTY_DATA)


_WARNED_SAMPLERS: weakref.WeakSet[Any] = weakref.WeakSet()


def merged_first_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], need: int = 2,
                         limit: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``batches``, the first ones joined until they hold ``need`` distinct examples (or ``limit`` batches).

    A network's first pass over the data finds where each value keeps its examples (sequence-first blocks,
    rows of ``batch * positions``) by running it on distinct examples; a first batch of one example (a loader
    with ``batch_size=1``) cannot show that, and its values were read as if the examples led (K-FAC on a
    sequence-first network took its positions for examples). Sums over examples do not depend on how the
    examples are batched.
    """
    it = iter(batches)
    pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    x = None
    for batch in it:
        pending.append(batch)
        x = torch.cat([b[0] for b in pending]) if len(pending) > 1 else batch[0]
        if len(pending) >= limit or _distinct(x, need):
            break
    if x is not None:
        ys = [b[1] for b in pending]
        yield x, (None if any(v is None for v in ys) else torch.cat([v for v in ys if v is not None]))
    yield from it


def _distinct(x: torch.Tensor, need: int) -> bool:
    """Whether ``x`` holds at least ``need`` distinct examples (looking at its first 64)."""
    flat = x[:64].reshape(min(64, x.shape[0]), -1)
    seen: list[torch.Tensor] = []
    for row in flat:
        if not any(torch.equal(row, s) for s in seen):
            seen.append(row)
            if len(seen) >= need:
                return True
    return False


def _warn_padded_shards(data: Any) -> None:
    """Warn when a DataLoader's ``DistributedSampler`` repeats examples to even out the ranks' shards."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = getattr(data, "sampler", None) if isinstance(data, DataLoader) else None
    if not isinstance(sampler, DistributedSampler):
        return
    extra = sampler.total_size - len(sampler.dataset)  # type: ignore[arg-type]
    if not sampler.drop_last and extra > 0 and sampler not in _WARNED_SAMPLERS:
        _WARNED_SAMPLERS.add(sampler)  # (once per sampler: the data is read several times)
        warnings.warn(f"the DataLoader's DistributedSampler repeats {extra} example(s) so that every rank "
                      f"gets as many (drop_last=False): a distributed fit counts them twice. Shard without "
                      f"padding (e.g. a Subset of the indices rank::world_size) or pass drop_last=True to "
                      f"the sampler (which leaves them out)", UserWarning, stacklevel=3)


def resolve_device(device: str | torch.device | None, what: str = "device") -> torch.device | None:
    """``device`` as a :class:`torch.device` (None stays None), or a :class:`UsageError`.

    The error says in the user's terms what is wrong: a name torch does not know, ``meta`` (it holds no
    values), or CUDA / a GPU index this machine does not have.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise UsageError(f"{what} must be a device name such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown {what} {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "meta":
        raise UsageError(f"{what} 'meta' holds no values: laftr needs real tensors (use 'cpu' or 'cuda')")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{what} {device!r} asks for CUDA, which this PyTorch build or "
                             "machine does not have")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{what} {device!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


#: how to run a network of several inputs (the end of the error that refuses one)
SEVERAL_INPUTS_FIX = ("laftr supports networks of one input tensor: compute the others from it, or pack them "
                      "into it, with laftr.WithInputs (e.g. WithInputs(model, attention_mask=lambda ids: "
                      "ids != pad_id))")


def check_runnable(model: nn.Module, what: str = "model") -> None:
    """Refuse a model laftr cannot run on one input tensor.

    It is not an ``nn.Module`` (a plain function), its parameters or buffers live on the ``meta`` device
    (shapes without values) or are a lazy module's not yet made, or its ``forward`` needs more than one
    argument.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a signature (a builtin): torch reports what it needs
        sig = None
    if sig is not None:
        required = [p.name for p in sig.parameters.values() if p.default is inspect.Parameter.empty
                    and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if len(required) > 1:
            raise UsageError(f"{what}'s forward takes more than one required input ({required[1]!r}); "
                             + SEVERAL_INPUTS_FIX)
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if nn.parameter.is_lazy(t):
            raise UsageError(
                f"{what}'s {n!r} belongs to a lazy module (nn.LazyLinear, nn.LazyConv2d, ...) that has not "
                "run yet, so it has no shape nor values; run the model on one batch (model(x)) before using "
                "it")
        if t.is_meta:
            raise UsageError(
                f"{what}'s {n!r} is on the 'meta' device (a shape without values); materialize the model "
                "first, e.g. model.to_empty(device='cpu') and load its weights"
            )


def eigh_on_host(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(sym)`` solved on the CPU, returned on ``sym``'s device.

    Eigenvectors are fixed only up to sign (and to a rotation within a repeated eigenvalue), and a GPU solver
    picks differently from LAPACK, so a sampling factor built on the GPU turns the same noise into other
    samples. Solving on the CPU makes a summary's samples depend on its numbers and its seed alone, not on the
    device where it was fitted or loaded. The matrices here are small (input covariances, 2x2 gate laws) and
    each is solved once per summary and device.
    """
    evals, evecs = torch.linalg.eigh(sym.cpu())
    return evals.to(sym.device), evecs.to(sym.device)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer, Python's or NumPy's (not a bool: ``True`` would pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (:func:`is_integer`) >= ``minimum``, else a UsageError."""
    if not is_integer(value) or (minimum is not None and value < minimum):
        need = "an integer" if minimum is None else ("a positive integer" if minimum == 1
                                                     else f"an integer >= {minimum}")
        raise UsageError(f"{name} must be {need}, got {value!r}")
    return int(value)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device``'s type now (None: autocast is off there).

    Values an estimator keeps from one evaluation for the next (theta0's outputs or moments) are kept per
    autocast state: those computed under autocast hold its precision.
    """
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def in_func_transform() -> bool:
    """Whether the code runs inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...).

    A function traced there (``torch.func.linearize``) belongs to that transform: an estimator neither reads
    nor keeps such caches inside one.
    """
    return torch._C._functorch.maybe_current_level() is not None


def is_batched(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is batched by ``torch.func.vmap`` (one value per parameter set).

    A Python branch on its value (``torch.equal``, ``bool(...)``) is then not defined, and the caller takes
    the path that is right for every set.
    """
    functorch = torch._C._functorch
    for t in tensors:
        while functorch.is_functorch_wrapped_tensor(t):  # a grad level may wrap a vmap level
            if functorch.is_batchedtensor(t):
                return True
            t = functorch.get_unwrapped(t)
    return False


@contextlib.contextmanager
def eval_mode(*models: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block (when ``enabled``).

    Afterwards each submodule gets its own mode back (a BatchNorm frozen in eval mode inside a model in
    training stays frozen; ``model.train(was)`` would turn it back on).
    """
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        if enabled:
            for model in models:
                model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def param_dict(model: nn.Module, detach: bool = False) -> dict[str, torch.Tensor]:
    """Named parameters and buffers of ``model`` (optionally detached clones)."""
    out: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        out[n] = p.detach().clone() if detach else p
    for n, b in model.named_buffers():
        out[n] = b.detach().clone() if detach else b
    return out


def arch_signature(model: nn.Module) -> list[list[Any]]:
    """``[[name, shape], ...]`` for every parameter and buffer: what must match between theta0 and theta."""
    sig = [[n, list(p.shape)] for n, p in model.named_parameters()]
    sig += [[n, list(b.shape)] for n, b in model.named_buffers()]
    return sig


def values_digest(model: nn.Module) -> str:
    """A SHA-256 of the values of every parameter and buffer (with their names): equal only for equal values.

    Used to check that the ranks of a process group hold the same network (one whose weights were loaded on
    rank 0 only, or fitted before DistributedDataParallel broadcast them, differs).
    """
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_arch(expected: list[list[Any]], model: nn.Module, what: str = "the fitted model") -> None:
    """Raise ``ValueError`` naming the first parameter whose name or shape differs from ``expected``."""
    got = arch_signature(model)
    exp = {n: tuple(s) for n, s in expected}
    have = {n: tuple(s) for n, s in got}
    for n, s in exp.items():
        if n not in have:
            raise ValueError(f"architecture mismatch with {what}: parameter {n!r} is missing from this model")
        if have[n] != s:
            raise ValueError(
                f"architecture mismatch with {what}: parameter {n!r} has shape "
                f"{list(have[n])}, expected {list(s)}"
            )
    extra = [n for n in have if n not in exp]
    if extra:
        raise ValueError(f"architecture mismatch with {what}: unexpected parameter {extra[0]!r}")


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named parameters that require grad."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def unwritable(folder: str | os.PathLike[str]) -> str | None:
    """Why no file can be created in ``folder`` (an existing folder), or None if one can.

    Tried by creating (and removing) an empty file there: permissions and read-only file systems alike, for
    root too, before a run does its work (a fit ended in a traceback when its summary could not be written).
    """
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except FileNotFoundError:  # (an existing folder that holds no files of one's own: /proc)
        return "it takes no new files"
    except OSError as e:
        return e.strerror or str(e)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, then a rename).

    The file gets the mode an ordinary ``open(path, "wb")`` would give it (``0o666`` less the umask): the
    temporary file is created with that mode by the operating system, so the umask is never read or changed.

    Raises:
        IsADirectoryError: ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"could not create a temporary file next to {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the platform allows it (best effort)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def probe_direction(primals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fixed pseudo-random direction shaped like ``primals``, seeded per entry (the same on every call).

    A traced linear map is checked once on it.
    """
    return {n: torch.randn(p.shape, generator=torch.Generator(p.device).manual_seed(i), dtype=p.dtype,
                           device=p.device)
            for i, (n, p) in enumerate(primals.items())}


def tangent_map(f: Callable[[dict[str, torch.Tensor]], torch.Tensor], primals: dict[str, torch.Tensor],
                what: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``v -> J v``, the Jacobian-vector product of ``f`` at ``primals``, for many ``v``.

    ``torch.func.linearize`` traces ``f``'s forward-mode pass once, so a product skips the primal pass and
    the per-call ``torch.func`` bookkeeping (about a third of a ``jvp``'s time on an MLP); the result is
    differentiable in ``v``. Where ``f`` cannot be traced, or has an op without forward-mode AD, a plain
    ``torch.func.jvp`` per product: the same values (that fallback raises what ``jvp`` raises, e.g.
    ``NotImplementedError``). ``what`` names the products in the log line of the fallback. Inside a
    ``torch.func`` transform the plain products (a traced map is not differentiable there: the transform's
    gradient through it is zero).
    """
    def plain(v: dict[str, torch.Tensor]) -> torch.Tensor:
        return jvp(f, (primals,), (v,))[1]

    if in_func_transform():
        return plain
    try:
        with warnings.catch_warnings():  # the tracer warns about its own nodes and its use of torch.jit
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            _, lin = linearize(f, primals)
            # a traced map can be wrong where jvp is right (circular padding: the trace reads the padded
            # borders wrongly): checked once against a plain product on a fixed direction
            probe = probe_direction(primals)
            traced, exact = lin(probe), plain(probe)
        scale = float(exact.abs().max().clamp_min(1e-30))
        if not torch.allclose(traced, exact, rtol=1e-4, atol=1e-6 * scale):
            log.info("%s without linearize: its traced product differs from jvp's (max %.3g vs %.3g)", what,
                     float((traced - exact).abs().max()), float(exact.abs().max()))
            return plain
        return lin
    except Exception as e:  # noqa: BLE001 (any tracing failure: the untraced products are exact too)
        log.info("%s without linearize (%s: %s)", what, type(e).__name__, e)
        return plain


# ---------------------------------------------------------------------------------------------- model vs data
#: Words of torch's messages when an op gets an input of the wrong shape or dtype.
_SHAPE_WORDS = ("shape", "size", "dimension", "expected", "dtype", "channels", "same type", "scalar type",
                "must match")


def is_shape_error(e: BaseException) -> bool:
    """Whether torch's error ``e`` says an op got an input of the wrong shape or dtype (a data mismatch)."""
    return any(w in str(e).lower() for w in _SHAPE_WORDS)


#: torch's words when a layer gets an input of the wrong size: narrower than :func:`is_shape_error`, so that
#: an estimator's fit refuses data that does not fit and leaves an op's bad constant arguments to its rule
_INPUT_SIZE_ERROR = re.compile(r"shapes cannot be multiplied|size of tensor a .* must match|expected input\[|"
                               r"Expected .*input.* to have .* channels|input.*dimension", re.IGNORECASE)


def is_input_size_error(e: BaseException) -> bool:
    """Whether torch's error ``e`` says a layer got an input of the wrong size (the data does not fit)."""
    return isinstance(e, RuntimeError) and _INPUT_SIZE_ERROR.search(str(e)) is not None


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first submodule (in registration order) that holds parameters of its own, with its name."""
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            return name or type(model).__name__, mod
    return None


def layer_expects(layer: nn.Module) -> str:
    """What inputs ``layer`` takes, in words (for messages)."""
    if isinstance(layer, nn.Linear):
        return f"inputs whose last dimension is {layer.in_features}"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        dims = {nn.Conv1d: "L", nn.Conv2d: "H, W", nn.Conv3d: "D, H, W"}[type(layer)]
        return f"examples of shape ({layer.in_channels}, {dims})"
    if isinstance(layer, nn.Embedding):
        return f"integer token ids in [0, {layer.num_embeddings})"
    if isinstance(layer, nn.LayerNorm):
        return f"inputs whose last dimensions are {list(layer.normalized_shape)}"
    return "inputs of another shape"


def data_hint(layer: nn.Module, x: torch.Tensor, model: nn.Module | None = None) -> str:
    """A fix for data ``x`` that the first layer ``layer`` (of ``model``) does not take; ``""`` if none.

    A network that has an ``nn.Flatten`` is not told to add one: its data has another size.
    """
    ex = list(x.shape[1:])
    n = math.prod(ex)
    flattens = model is not None and any(isinstance(m, nn.Flatten) for m in model.modules())
    if isinstance(layer, nn.Linear) and len(ex) >= 2 and flattens:  # (adding nn.Flatten() was the hint)
        return (f" The network flattens the examples to {n} values; its first Linear layer takes "
                f"{layer.in_features}: data of another size or shape than the network was built for.")
    if not x.is_floating_point() and not isinstance(layer, nn.Embedding):
        return (f" The data is {str(x.dtype).removeprefix('torch.')} but the first layer computes with "
                "floats: save float inputs, or start the network with nn.Embedding if they are token ids.")
    if isinstance(layer, nn.Linear) and len(ex) >= 2:
        fits = " (they have as many values as it takes)" if n == layer.in_features else (
            f"; note the examples have {n} values and the layer takes {layer.in_features}")
        return (f" The examples are {len(ex)}-dimensional: a network of flat vectors needs nn.Flatten() "
                f"first (before the first layer){fits}.")
    if isinstance(layer, nn.Linear) and len(ex) == 1 and ex[0] != layer.in_features:
        return f" The data has {ex[0]} features per example, the layer takes {layer.in_features}."
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and len(ex) <= 1:
        return " The examples are flat vectors: save them with their channel and spatial dimensions."
    if isinstance(layer, nn.Embedding) and x.is_floating_point():
        return " Token ids must be an integer tensor (e.g. x.long())."
    return ""
