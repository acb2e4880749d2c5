"""The measurement ``M(theta)`` whose change the influence methods predict: the loss on fixed test points."""

from __future__ import annotations

import torch
from torch import nn

from .._util import model_device_dtype
from .losses import check_task, infer_task, per_example_loss
from .params import ParamSpace


def check_examples(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """Raise a clear error unless ``(x, y)`` is a non-empty, finite batch of examples of equal length."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{what}: inputs and targets must be tensors, got "
                        f"{type(x).__name__}, {type(y).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{what}: inputs must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: {x.shape[0]} inputs but {y.shape[0]} targets")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{what}: inputs contain NaN or infinite values")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError(f"{what}: targets contain NaN or infinite values")


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
        z = model(self.x.to(device=device, dtype=dtype if self.x.is_floating_point() else None))
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
