"""Ops that are affine in their data input given the parameters: layers, reshapes, sums, pooling by averages.

Each stream runs them exactly with its own parameters in every mode; the closed form applies the op to the
columns of the joint second-moment matrix (:meth:`laftr.graph.MomentMode.affine`), so no op needs a
hand-written matrix. Also here: ops that pass data through unchanged (dropout, off when estimating) and
queries of a tensor's shape.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Pair, Rule, data_pairs, pairs_in, register


class AffineRule(Rule):
    """Affine in one data input: each stream runs the op exactly; the closed form is generic.

    Attributes:
        max_data_inputs: how many data-dependent inputs the op may combine (1 for products and matrix
            products: two data factors would make it bilinear; sums allow any number).
        data_free_positions: argument positions that must not depend on the data (a divisor).
    """

    family: ClassVar[str] = "affine"
    affine: ClassVar[bool] = True
    max_data_inputs: ClassVar[int | None] = 1
    data_free_positions: ClassVar[tuple[int, ...]] = ()

    def check(self, args: Any, kwargs: Any) -> None:
        """Refuse data in places where the op would not be affine in it."""
        data = data_pairs((args, kwargs))
        if self.max_data_inputs is not None and len(data) > self.max_data_inputs:
            raise self.refuse("it combines two data-dependent tensors multiplicatively, so the network is not "
                              "linear in its input once theta0 has fixed its gates")
        for pos in self.data_free_positions:
            if pos < len(args) and any(p.data for p in pairs_in(args[pos])):
                raise self.refuse("it divides by a data-dependent tensor")

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        self.check(args, kwargs)
        return Pair(self.call_streams(mode, args, kwargs), True)

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        return self.forward(mode, args, kwargs)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        return self.forward(mode, args, kwargs)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        self.check(args, kwargs)
        return mode.affine(self, args, kwargs)


class SumRule(AffineRule):
    """Affine in several data inputs at once (residual additions, concatenation)."""

    max_data_inputs = None


class LikeRule(AffineRule):
    """``expand_as`` / ``view_as`` / ``reshape_as``: the second tensor gives only its shape (jointly affine)."""

    max_data_inputs = None


class DivideRule(AffineRule):
    """Division by a constant or a parameter (never by data)."""

    data_free_positions = (1,)


class IdentityRule(Rule):
    """Ops that are the identity when estimating (dropout is off): the data input passes unchanged."""

    family = "identity"
    affine = True

    def _through(self, mode: Any, args: Any, kwargs: Any) -> Any:
        data = data_pairs((args, kwargs))
        if len(data) != 1:
            raise self.refuse("expected exactly one data-dependent input")
        return data[0]

    forward = fit = sample = own = moments = _through


class ShapeRule(Rule):
    """Queries of a tensor's shape (``size``, ``dim``, ``numel``, ``x.shape``): the same in every stream.

    In the closed form the value is taken from a dummy tensor of one example, as every op there works on one
    example at a time.
    """

    family = "shape"

    def _query(self, mode: Any, args: Any, kwargs: Any) -> Any:
        a, k = mode.concrete((args, kwargs), 0)
        return self.call(mode.params[0], a, k)

    forward = fit = sample = own = moments = _query


_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"})
_AFFINE_ATTRS = frozenset({"T", "mT"})


@register(getattr)
class GetattrRule(Rule):
    """``getattr(x, name)`` as torch.fx records ``x.shape`` or ``x.T``: a shape query or a transpose."""

    family = "getattr"

    def setup(self) -> None:
        attr = self.node.args[1] if len(self.node.args) > 1 else None
        if attr in _SHAPE_ATTRS:
            self._impl: Rule = ShapeRule(self.node, self.gm)
        elif attr in _AFFINE_ATTRS:
            self._impl = AffineRule(self.node, self.gm)
        else:
            raise self.refuse(f"attribute {attr!r} of a data tensor")
        self.affine = isinstance(self._impl, AffineRule)  # type: ignore[misc]

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        return self._impl.forward(mode, args, kwargs)

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        return self._impl.fit(mode, args, kwargs)

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        return self._impl.sample(mode, args, kwargs)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        return self._impl.own(mode, args, kwargs)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        return self._impl.moments(mode, args, kwargs)


# ---------------------------------------------------------------------------------------------- layers
class TappedLayer(AffineRule):
    """A layer whose input and output the forward mode records when the mode's ``taps`` asks for it (K-FAC and
    diag-Fisher, :mod:`laftr.estimators.taps`)."""

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        out = super().forward(mode, args, kwargs)
        taps = getattr(mode, "taps", None)
        if taps is not None and self.module is not None and taps.wants(self.prefix):
            (x,) = data_pairs((args, kwargs))
            out = Pair(tuple(taps.record(self.prefix, xi, o) for xi, o in zip(x.vals, out.vals)), True)
        return out


@register(nn.Linear, F.linear)
class LinearRule(TappedLayer):
    """``nn.Linear`` / ``F.linear``."""

    family = "linear"


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d)
class ConvRule(TappedLayer):
    """Convolutions (every padding mode: zeros, reflect, replicate and circular padding are linear too)."""

    family = "conv"


@register(nn.modules.batchnorm._BatchNorm, F.batch_norm)
class BatchNormRule(AffineRule):
    """Batch norm on its running statistics (eval mode): a per-channel affine map."""

    family = "batch_norm"

    def setup(self) -> None:
        if self.module is not None:
            if self.module.running_mean is None or self.module.running_var is None:
                raise self.refuse("batch norm without running statistics is not a per-example affine map")
        else:
            training = self.const_arg(5, "training", False)
            if training is not False:
                raise self.refuse("batch norm in training mode (batch statistics)")


# ---------------------------------------------------------------------------------------------- plain ops
_AFFINE_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Upsample,
)
# (products, matmul and einsum: laftr.rules.attention's ProductRule, affine with one data factor)
_AFFINE_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute, torch.mean,
    torch.sum, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, operator.getitem,
    operator.neg, operator.pos, torch.neg, F.pad, torch.narrow, torch.chunk, torch.split, torch.movedim,
    torch.swapaxes, torch.t, torch.unbind, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle,
)
_AFFINE_METHODS = (
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "contiguous", "mean", "sum",
    "neg", "t", "chunk", "split", "expand", "narrow", "unbind", "clone", "unflatten", "movedim", "swapaxes",
)
_SUM_FUNCTIONS = (operator.add, operator.sub, torch.add, torch.sub, torch.cat, torch.concat, torch.stack)
_SUM_METHODS = ("add", "sub", "add_", "sub_")
_DIV = (operator.truediv, torch.div, "div", "div_")
_IDENTITY = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
             F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout)
_SHAPE = (torch.numel, len, "size", "dim", "numel", "nelement")

# (``x += y`` reaches torch.fx as operator.add: a Proxy has no in-place operators)
register(*_AFFINE_MODULES, *_AFFINE_FUNCTIONS, *_AFFINE_METHODS)(AffineRule)
register(*_SUM_FUNCTIONS, *_SUM_METHODS)(SumRule)
register(*_DIV)(DivideRule)
register("expand_as", "view_as", "reshape_as")(LikeRule)
register(*_IDENTITY)(IdentityRule)
register(*_SHAPE)(ShapeRule)
