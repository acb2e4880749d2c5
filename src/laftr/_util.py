"""Small shared helpers: batch iteration over loaders/tensors, parameter snapshots, finiteness checks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

Data = Any  # a DataLoader / iterable of (x, y) or x batches, a tensor X, or a tuple (X, Y)

T = TypeVar("T", bound=type)


def registrar(table: dict[str, Any], what: str, name: str) -> Callable[[T], T]:
    """A class decorator that puts the class into ``table`` under ``name`` (and sets its ``name``), refusing a
    second class under a name already taken (``what`` names the kind of thing, for the message)."""

    def deco(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{what} name {name!r} is already registered")
        table[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of ``model``'s first parameter (CPU/float32 if it has none)."""
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"], batch.get("y")
    raise TypeError(
        f"cannot read a batch of type {type(batch).__name__}; expected a tensor, an (x, y) tuple or a dict with 'x'"
    )


def iter_batches(
    data: Data,
    batch_size: int = 512,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` batches (``y`` may be None) from a loader, a tensor or an ``(X, Y)`` pair.

    Inputs are moved to ``device``; floating inputs also to ``dtype``, while integer and bool inputs (token
    ids, indices) keep their own dtype. Labels are moved to ``device``. Non-finite inputs raise ``ValueError``.
    """
    if isinstance(data, torch.Tensor):
        source: Iterable[Any] = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    elif (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
        and data[0].shape[:1] == data[1].shape[:1]
        and data[0].ndim >= 2
    ):
        X, Y = data
        source = ((X[i : i + batch_size], Y[i : i + batch_size]) for i in range(0, len(X), batch_size))
    elif isinstance(data, Iterable):
        source = data
    else:
        raise TypeError(f"data must be a DataLoader, an iterable of batches, a tensor or (X, Y); got {type(data).__name__}")
    seen = False
    for batch in source:
        x, y = _split_batch(batch)
        if x.numel() == 0:
            continue
        seen = True
        if device is not None or dtype is not None:
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        if check_finite and x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError("input batch contains NaN or infinite values")
        if y is not None and device is not None:
            y = y.to(device)
        yield x, y
    if not seen:
        raise ValueError("data is empty: no batches to read")


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
                f"architecture mismatch with {what}: parameter {n!r} has shape {list(have[n])}, expected {list(s)}"
            )
    extra = [n for n in have if n not in exp]
    if extra:
        raise ValueError(f"architecture mismatch with {what}: unexpected parameter {extra[0]!r}")


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named parameters that require grad."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
