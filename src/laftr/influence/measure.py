"""The measurement ``M(theta)`` whose change the influence methods predict: the loss on fixed test points."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._util import data_hint, first_layer, is_shape_error, iter_batches, layer_expects, model_device_dtype
from ..errors import DataError
from ..metrics import check_network_output
from .losses import check_not_bool, check_task, infer_task, per_example_loss
from .params import ParamSpace


def check_examples(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """Raise a clear error unless ``(x, y)`` is a non-empty, finite batch of examples of equal length.

    Non-tensors are a ``TypeError``; bad shapes, non-finite values and bool targets a
    :class:`~laftr.errors.DataError` (a ``ValueError``).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{what}: inputs and targets must be tensors, got "
                        f"{type(x).__name__}, {type(y).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"{what}: inputs must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise DataError(f"{what}: {x.shape[0]} inputs but targets of shape {tuple(y.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"{what}: inputs contain NaN or infinite values")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise DataError(f"{what}: targets contain NaN or infinite values")
    check_not_bool(y)


#: The training data forms the influence methods accept (for messages).
TRAIN_FORMS = ("an (X, Y) tuple of tensors, or batches of inputs with targets: a DataLoader, a list of "
               "(x, y) batches, dicts with 'x' and 'y'")


def training_tensors(train: Any, what: str = "training data") -> tuple[torch.Tensor, torch.Tensor]:
    """The training data as one ``(X, Y)`` pair of tensors (batches concatenated).

    Accepted: an ``(X, Y)`` tuple of two tensors, or any data form of laftr whose batches carry targets
    (:func:`laftr._util.iter_batches`: a DataLoader, a list of ``(x, y)`` batches, dicts with ``"x"`` and
    ``"y"``). The influence methods need the targets: inputs alone (a tensor, batches without ``y``) are a
    :class:`~laftr.errors.DataError` naming the accepted forms.
    """
    if isinstance(train, tuple) and len(train) == 2 and all(isinstance(t, torch.Tensor) for t in train):
        return train[0], train[1]
    if isinstance(train, torch.Tensor):
        raise DataError(f"{what}: a tensor of inputs alone has no targets; give {TRAIN_FORMS}")
    if isinstance(train, (str, bytes, dict)) or not hasattr(train, "__iter__"):
        raise DataError(f"{what} must be {TRAIN_FORMS}; got {type(train).__name__}")
    xs, ys = [], []
    for i, (x, y) in enumerate(iter_batches(train, check_finite=False)):
        if y is None:
            hint = (" (a list is read as a list of batches: pass an (X, Y) pair as a tuple)"
                    if isinstance(train, list) else "")
            raise DataError(f"{what}: batch {i} has inputs but no targets{hint}; give {TRAIN_FORMS}")
        xs.append(x)
        ys.append(y)
    return (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))


def inputs_for(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``x`` on ``device``; floating inputs in the model's ``dtype``, integer inputs (token ids) in their own.

    The one rule of every influence method (and of laftr, DESIGN.md): an integer input is converted to floats
    by the network (``nn.Embedding`` takes the ids themselves), not here; integer images need ``x.float()``
    (or a network that converts them) first.
    """
    return x.to(device=device, dtype=dtype if x.is_floating_point() else None)


def check_like(x: torch.Tensor, X: torch.Tensor, what: str) -> None:
    """Refuse inputs ``x`` whose per-example shape or kind (floating, integer) differs from training ``X``."""
    if tuple(x.shape[1:]) != tuple(X.shape[1:]) or x.is_floating_point() != X.is_floating_point():
        def kind(t: torch.Tensor) -> str:
            return "floating" if t.is_floating_point() else "integer"

        raise DataError(f"{what} has input shape {tuple(x.shape[1:])} ({kind(x)}), training inputs "
                        f"{tuple(X.shape[1:])} ({kind(X)}): give examples of the training data's shape")


def run_model(model: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """``model(x)``, with torch's error for inputs the network does not take as a :class:`DataError`.

    The message names the examples' shape and dtype, what the first layer takes and, where evident, the fix.
    """
    try:
        return check_network_output(model(x))  # (a tuple or dict of outputs, a 0-dim total: named)
    except RuntimeError as e:
        if not is_shape_error(e):
            raise
        found = first_layer(model)
        expects = "" if found is None else f" Its first layer ({found[0]}) takes {layer_expects(found[1])}."
        raise DataError(
            f"{what}: the network does not run on examples of shape {tuple(x.shape[1:])}, dtype "
            f"{str(x.dtype).removeprefix('torch.')} ({str(e).splitlines()[0]}).{expects}"
            + ("" if found is None else data_hint(found[1], x, model))) from e


class Measurement:
    """``M(theta) = mean_j L(f(x_j; theta), y_j)`` over a fixed set of (test) points.

    Args:
        x: inputs ``(n, ...)``.
        y: targets ``(n, K)`` (regression) or ``(n,)`` class labels.
        task: ``regression`` or ``classification``; inferred from ``y`` when None.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, task: str | None = None) -> None:
        """Measurement points ``(x, y)``; the task is inferred from ``y`` when not given."""
        check_examples(x, y, "measurement points")
        self.task = check_task(task) if task is not None else infer_task(y)
        self.x, self.y = x, y

    def __len__(self) -> int:
        """The number of measurement points."""
        return int(self.x.shape[0])

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """``M`` at the model's current parameters (differentiable, 0-dim)."""
        device, dtype = model_device_dtype(model)
        z = run_model(model, inputs_for(self.x, device, dtype), "measurement points")
        return per_example_loss(z, self.y.to(device), self.task).mean()

    def grad(self, model: nn.Module, space: ParamSpace | None = None) -> torch.Tensor:
        """``grad_theta M`` as a flat vector over the model's trainable parameters."""
        space = space or ParamSpace(model)
        was = model.training
        model.eval()
        try:
            with torch.enable_grad():
                gs = torch.autograd.grad(self(model), space.params(model), allow_unused=True)
        finally:
            model.train(was)
        return space.flatten([torch.zeros_like(p) if g is None else g
                              for g, p in zip(gs, space.params(model), strict=True)])
