"""Flat views of a model's trainable parameters: the vector space the solvers work in."""

from __future__ import annotations

import math

import torch
from torch import nn


class ParamSpace:
    """The trainable parameters of a model as one flat vector (a fixed order of named tensors).

    Args:
        model: the network; its parameters with ``requires_grad`` define the space.
    """

    def __init__(self, model: nn.Module) -> None:
        """The space of ``model``'s trainable parameters (their names, shapes and sizes)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [math.prod(s) for s in self.shapes]
        self.size = sum(self.numels)

    def flatten(self, tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
        """Concatenate a dict (by name) or a list (in order) of tensors into one vector."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a vector into a dict of named tensors of the parameters' shapes."""
        if vec.ndim != 1 or vec.numel() != self.size:
            raise ValueError(f"expected a vector of {self.size} entries, got shape {tuple(vec.shape)}")
        return {n: c.view(s) for n, c, s in zip(self.names, vec.split(self.numels), self.shapes, strict=True)}

    def get(self, model: nn.Module) -> torch.Tensor:
        """The model's current parameters as a detached vector."""
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def set(self, model: nn.Module, vec: torch.Tensor) -> None:
        """Write the vector into the model's parameters (in place, without autograd)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, chunk in self.unflatten(vec).items():
                params[n].copy_(chunk)

    def grads(self, model: nn.Module) -> torch.Tensor:
        """The parameters' ``.grad`` as one vector (zeros where a gradient is missing)."""
        params = dict(model.named_parameters())
        out = []
        for n in self.names:
            p = params[n]
            out.append(torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1))
        return torch.cat(out)

    def params(self, model: nn.Module) -> list[torch.Tensor]:
        """The parameter tensors, in order."""
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]
