"""Per-op rules: how each node of a traced network treats the pair of streams (theta0, theta).

Every node of a ``torch.fx`` graph is classified into one :class:`Kind`:

- ``AFFINE``: affine in its single data-dependent input given the parameters (linear, conv, eval batch
  norm, reshapes, average pooling, scaling by a constant, ...). Each stream runs it with its own weights.
- ``SUM``: affine in several data-dependent inputs (add, sub, cat, stack): residual connections.
- ``IDENTITY``: dropout (off when estimating).
- ``SHAPE``: returns a property of a tensor (size, dim, shape), the same in both streams.
- ``GATE``: ReLU and leaky ReLU: linearized as ``a = m * s`` with a gate ``m`` decided by theta0.
- ``MAXPOOL``: max pooling: a selection decided by theta0 (or sampled from stored statistics).

Anything else raises :class:`UnsupportedOpError` naming the node and its op.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn


class UnsupportedOpError(TypeError):
    """A network contains an op that LAFTR cannot linearize (e.g. GELU, attention, training-mode BN)."""


class Kind(enum.Enum):
    AFFINE = "affine"
    SUM = "sum"
    IDENTITY = "identity"
    SHAPE = "shape"
    GATE = "gate"
    MAXPOOL = "maxpool"


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a node is interpreted. ``slope`` is the negative-side slope of a gate (0 for ReLU)."""

    kind: Kind
    slope: float = 0.0
    pool: dict[str, Any] | None = None  # kernel_size, stride, padding, dilation, ceil_mode, dims


AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
)
IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)

_GATE_FUNCS: dict[Any, int | None] = {F.relu: None, torch.relu: None, torch.relu_: None, F.relu_: None}
_LEAKY_FUNCS = {F.leaky_relu, F.leaky_relu_}
_MAXPOOL_FUNCS: dict[Any, int] = {F.max_pool1d: 1, F.max_pool2d: 2}
for _name, _dims in (("_max_pool1d", 1), ("_max_pool2d", 2), ("max_pool1d_with_indices", 1),
                     ("max_pool2d_with_indices", 2)):
    if hasattr(F, _name):
        _MAXPOOL_FUNCS[getattr(F, _name)] = _dims
_MAXPOOL_FUNCS[torch.max_pool1d] = 1
_MAXPOOL_FUNCS[torch.max_pool2d] = 2

SUM_FUNCS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.cat,
             torch.concat, torch.stack}
AFFINE_FUNCS = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.batch_norm, torch.flatten, torch.reshape, torch.squeeze,
    torch.unsqueeze, torch.transpose, torch.permute, torch.mean, torch.sum, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, operator.mul, operator.imul, torch.mul, operator.truediv,
    torch.div, torch.matmul, operator.matmul, operator.getitem, operator.neg, operator.pos, torch.neg, F.pad,
    torch.narrow, torch.chunk, torch.split, torch.squeeze,
}
IDENTITY_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}
SHAPE_FUNCS = {getattr, torch.numel, len}
AFFINE_METHODS = {
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "contiguous", "mean", "sum",
    "add", "sub", "mul", "div", "neg", "t", "chunk", "split", "expand", "expand_as", "view_as", "reshape_as",
    "narrow", "clone", "__getitem__", "add_", "sub_", "mul_", "div_", "unflatten", "movedim",
}
SUM_METHODS = {"add", "sub", "add_", "sub_"}
SHAPE_METHODS = {"size", "dim", "numel", "nelement"}
GATE_METHODS = {"relu", "relu_"}


def describe(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A short human description of a node's op, for error messages."""
    if node.op == "call_module" and gm is not None:
        return f"module {node.target!r} of type {type(gm.get_submodule(str(node.target))).__name__}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"{node.op} {node.target}"


def _unsupported(node: fx.Node, gm: fx.GraphModule, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"node {node.name!r} ({describe(node, gm)}) is not supported by LAFTR: {why}")


def _pool_params(module_or_kwargs: Any, dims: int) -> dict[str, Any]:
    g = (lambda k, d: getattr(module_or_kwargs, k, d)) if isinstance(module_or_kwargs, nn.Module) else (
        lambda k, d: module_or_kwargs.get(k, d))
    k = g("kernel_size", None)
    s = g("stride", None)
    return {
        "kernel_size": k,
        "stride": s if s not in (None, [], ()) else k,
        "padding": g("padding", 0),
        "dilation": g("dilation", 1),
        "ceil_mode": g("ceil_mode", False),
        "dims": dims,
    }


def classify(node: fx.Node, gm: fx.GraphModule) -> Rule:
    """The :class:`Rule` of a ``call_module``/``call_function``/``call_method`` node, or raise."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, IDENTITY_MODULES):
            return Rule(Kind.IDENTITY)
        if isinstance(mod, nn.ReLU):
            return Rule(Kind.GATE, 0.0)
        if isinstance(mod, nn.LeakyReLU):
            return Rule(Kind.GATE, float(mod.negative_slope))
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)):
            if mod.return_indices:
                raise _unsupported(node, gm, "max pooling with return_indices=True")
            return Rule(Kind.MAXPOOL, pool=_pool_params(mod, 1 if isinstance(mod, nn.MaxPool1d) else 2))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if mod.running_mean is None or mod.running_var is None:
                raise _unsupported(node, gm, "batch norm without running statistics is not a per-example affine map")
            return Rule(Kind.AFFINE)
        if isinstance(mod, AFFINE_MODULES):
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode != "zeros":
                raise _unsupported(node, gm, f"padding_mode={mod.padding_mode!r} (only zero padding)")
            return Rule(Kind.AFFINE)
        raise _unsupported(
            node, gm, "no linearization rule for this layer (supported: Linear, Conv, eval BatchNorm, pooling, "
            "reshapes, dropout, ReLU, LeakyReLU)"
        )
    if node.op == "call_function":
        t = node.target
        if t in _GATE_FUNCS:
            return Rule(Kind.GATE, 0.0)
        if t in _LEAKY_FUNCS:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if isinstance(slope, fx.Node):
                raise _unsupported(node, gm, "a leaky ReLU slope computed at run time")
            return Rule(Kind.GATE, float(slope))
        if t in _MAXPOOL_FUNCS:
            names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
            kw = dict(zip(names, node.args[1:]))
            kw.update(node.kwargs)
            if kw.get("return_indices"):
                raise _unsupported(node, gm, "max pooling with return_indices=True")
            return Rule(Kind.MAXPOOL, pool=_pool_params(kw, _MAXPOOL_FUNCS[t]))
        if t in IDENTITY_FUNCS:
            return Rule(Kind.IDENTITY)
        if t is F.batch_norm:
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            if training is not False:
                raise _unsupported(node, gm, "batch norm in training mode (batch statistics)")
        if t in SUM_FUNCS:
            return Rule(Kind.SUM)
        if t in AFFINE_FUNCS:
            return Rule(Kind.AFFINE)
        if t in SHAPE_FUNCS:
            return Rule(Kind.SHAPE)
        raise _unsupported(node, gm, "no linearization rule for this function")
    if node.op == "call_method":
        m = str(node.target)
        if m in GATE_METHODS:
            return Rule(Kind.GATE, 0.0)
        if m in SHAPE_METHODS:
            return Rule(Kind.SHAPE)
        if m in SUM_METHODS:
            return Rule(Kind.SUM)
        if m in AFFINE_METHODS:
            return Rule(Kind.AFFINE)
        raise _unsupported(node, gm, "no linearization rule for this tensor method")
    raise _unsupported(node, gm, f"unexpected node kind {node.op!r}")


def nondata_only_position(node: fx.Node) -> tuple[int, ...]:
    """Argument positions that must not be data-dependent for an affine op to stay affine."""
    if node.op == "call_function" and node.target in (operator.truediv, torch.div):
        return (1,)
    if node.op == "call_method" and node.target in ("div", "div_"):
        return (1,)
    return ()
