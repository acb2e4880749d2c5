"""Reference networks of the experiments: MLPs and the conv net of METHOD.md section 4.

All are plain ``nn.Sequential`` networks that LAFTR traces with torch.fx (ReLU by default; the MLP takes any
activation with a rule and an optional normalization layer). Multi-head
continual learning uses one wide output layer and restricts each task to its own slice of outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
                                           "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}
NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm}
if hasattr(nn, "RMSNorm"):
    NORMS["rmsnorm"] = nn.RMSNorm


def mlp(
    in_features: int = 784,
    hidden: Sequence[int] = (256, 256),
    out_features: int = 10,
    flatten: bool = True,
    activation: str = "relu",
    norm: str | None = None,
) -> nn.Sequential:
    """``[Flatten] - Linear - [Norm] - Activation - ... - Linear``.

    Args:
        in_features: input dimension (784 for 28x28 images).
        hidden: widths of the hidden layers.
        out_features: number of outputs (all heads together for multi-head tasks).
        flatten: start with ``nn.Flatten`` so image tensors can be fed directly.
        activation: ``relu`` (default), ``gelu``, ``tanh``, ``silu``, ``leaky_relu`` or ``elu``.
        norm: None, ``layernorm`` or ``rmsnorm`` after each hidden Linear (before the activation).
    """
    if in_features < 1 or out_features < 1 or any(int(h) < 1 for h in hidden):
        raise ValueError(f"layer sizes must be positive: in {in_features}, hidden {list(hidden)}, out {out_features}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    if norm is not None and norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {sorted(NORMS)} or None")
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    d = int(in_features)
    for h in hidden:
        layers.append(nn.Linear(d, int(h)))
        if norm is not None:
            layers.append(NORMS[norm](int(h)))
        layers.append(ACTIVATIONS[activation]())
        d = int(h)
    layers.append(nn.Linear(d, int(out_features)))
    return nn.Sequential(*layers)


def conv_net(
    in_shape: Sequence[int] = (3, 32, 32),
    out_features: int = 10,
    width: float = 1.0,
    dropout: bool = True,
) -> nn.Sequential:
    """The conv net of the Split CIFAR benchmark (FROMP / LAFTR papers).

    conv32 - conv32 - maxpool - drop .25 - conv64 - conv64 - maxpool - drop .25 - fc512 - drop .5 - head,
    3x3 kernels, the first conv of each pair zero-padded, ReLU after every conv and the fc layer.

    Args:
        in_shape: ``(channels, height, width)`` of one input, e.g. ``(1, 28, 28)`` for Fashion-MNIST.
        out_features: outputs of the head (all tasks' heads together for multi-head).
        width: multiplier of the channel and fc widths (1.0 is the paper's net; smaller for CPU runs).
        dropout: include the dropout layers (they are off whenever LAFTR evaluates the network).
    """
    if len(in_shape) != 3:
        raise ValueError(f"in_shape must be (channels, height, width), got {tuple(in_shape)}")
    c, h, w = (int(v) for v in in_shape)
    c1, c2, fc = max(1, round(32 * width)), max(1, round(64 * width)), max(1, round(512 * width))

    def drop(p: float) -> list[nn.Module]:
        return [nn.Dropout(p)] if dropout else []

    features = nn.Sequential(
        nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c1, 3), nn.ReLU(),
        nn.MaxPool2d(2), *drop(0.25),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c2, 3), nn.ReLU(),
        nn.MaxPool2d(2), *drop(0.25),
        nn.Flatten(),
    )
    with torch.no_grad():
        n_flat = features(torch.zeros(1, c, h, w)).shape[1]
    return nn.Sequential(
        *features,
        nn.Linear(n_flat, fc), nn.ReLU(), *drop(0.5),
        nn.Linear(fc, int(out_features)),
    )


def num_params(model: nn.Module) -> int:
    """Number of parameters (the floats of theta0 that every method keeps)."""
    return sum(p.numel() for p in model.parameters())
