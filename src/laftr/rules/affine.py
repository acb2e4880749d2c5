"""Ops that are affine in their data input given the parameters: layers, reshapes, sums, pooling by averages.

Each stream runs them exactly with its own parameters in every mode; the closed form applies the op to the
columns of the joint second-moment matrix (:meth:`laftr.graph.MomentMode.affine`), so no op needs a
hand-written matrix. Also here: ops that pass data through unchanged (dropout, off when estimating) and
queries of a tensor's shape.
"""

from __future__ import annotations

import math
import operator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from .base import Pair, Rule, changing_pairs, data_pairs, out_of_place_method, pairs_in, register


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
        """Refuse data in places where the op would not be affine in it.

        Values computed from the network input alone (``fixed``: a mask, the number of unpadded tokens) are
        the same in every stream and do not change with the parameters, so they count as constants here.
        """
        data = changing_pairs((args, kwargs))
        if self.max_data_inputs is not None and len(data) > self.max_data_inputs:
            raise self.refuse("it combines two data-dependent tensors multiplicatively, so the network is "
                              "not linear in its input once theta0 has fixed its gates")
        for pos in self.data_free_positions:
            if pos < len(args) and changing_pairs(args[pos]):
                raise self.refuse("it divides by a data-dependent tensor")

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream runs the op exactly, after refusing data where it would not be affine."""
        self.check(args, kwargs)
        return Pair(self.call_streams(mode, args, kwargs), True)

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The op is affine in its data: Monte Carlo runs it exactly in every stream."""
        return self.forward(mode, args, kwargs)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The op is affine in its data: it is its own linearization at theta0."""
        return self.forward(mode, args, kwargs)

    def sample_separable(self, mode: Any) -> bool:
        """True: every stream runs the op exactly."""
        return True

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The generic closed form: the op applied to the columns of the joint moment state."""
        self.check(args, kwargs)
        return mode.affine(self, args, kwargs)


class SumRule(AffineRule):
    """Affine in several data inputs at once (residual additions, concatenation)."""

    max_data_inputs = None


class LikeRule(AffineRule):
    """``expand_as`` / ``view_as`` / ``reshape_as``: the second tensor gives only its shape.

    The op is jointly affine in both.
    """

    max_data_inputs = None


class DivideRule(AffineRule):
    """Division by a constant or a parameter (never by data).

    A rounded division (``torch.div(h, 2, rounding_mode="floor")``) is piecewise constant, not affine: refused
    (of the input alone it is evaluated exactly, as masks are).
    """

    data_free_positions = (1,)

    def setup(self) -> None:
        """Refuse a rounded division."""
        if self.const_arg(None, "rounding_mode") is not None:
            raise self.refuse("a rounded division (rounding_mode) is piecewise constant, not affine: no rule")


class GatherRule(AffineRule):
    """``torch.gather`` / ``take_along_dim`` of data: a selection, linear in the data.

    Each stream gathers at its indices, as indexing does: a constant, a buffer, or computed from the network
    input alone (DeBERTa's relative positions, clamped and expanded over the batch), the same in every
    stream, make it an affine map; those of a ``topk`` / ``argmax`` of data are each stream's own, as the
    indices such ops return always are. The closed form, which applies an op to the columns of its joint
    state at once, cannot give each column the indices of one example: refused.
    """

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Refused: the closed form has no per-example indices to gather with."""
        raise self.refuse("the closed form has no rule for a gather (its indices are per example); use the "
                          "Monte Carlo estimators (laftr, liftr)")


class SelectRule(SumRule):
    """``masked_fill`` and ``where`` with a mask that is the same in every stream.

    The mask is a constant or buffer (a causal mask) or a value computed from the network input alone (a
    padding mask, ``tokens == pad``). Every output entry is then an entry of one data input or a constant,
    picked the same way in both streams, so the op is affine in its data and each stream runs it exactly
    (``-inf`` fills included: the softmax after it sees them in both streams). A mask that depends on the
    parameters would be a gate (``h.masked_fill(h < 0, 0)`` is a ReLU) and is refused (usually already at the
    comparison that makes it). A mask of trainable parameters alone (a learned pattern ``self.g > 0``) is
    each stream's own, an exact selection in each; a softmax linearized downstream refuses logits whose
    hidden keys differ from theta0's (:func:`laftr.rules.attention.linearized_softmax`). The closed form
    needs finite fills.
    """

    # per target: the (position, keyword) of the mask (a data-dependent fill value would be a reduction over
    # the batch, refused before any rule runs)
    _MASK_AT: ClassVar[dict[Any, tuple[int, str]]] = {
        "masked_fill": (1, "mask"), torch.masked_fill: (1, "mask"), torch.where: (0, "condition"),
        "where": (1, "condition"),
    }

    def _mask_at(self) -> tuple[int, str]:
        t = self.node.target
        return self._MASK_AT[out_of_place_method(t) if isinstance(t, str) else t]

    def check(self, args: Any, kwargs: Any) -> None:
        """Refuse a mask that can differ between streams."""
        pos, key = self._mask_at()
        mask = args[pos] if pos < len(args) else kwargs.get(key)
        if any(p.data and not p.fixed for p in pairs_in(mask)):
            raise self.refuse("its mask depends on the network's parameters (e.g. h > 0), which makes it a "
                              "gate with no stored law; use an activation (relu) or compute the mask from "
                              "the input or a buffer")

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The generic affine closed form, for finite fills only."""
        self.check(args, kwargs)
        for v in tree_flatten((args, kwargs))[0]:
            finite = (not isinstance(v, float) or math.isfinite(v)) and (
                not isinstance(v, torch.Tensor) or not v.is_floating_point() or bool(torch.isfinite(v).all()))
            if not finite:
                raise self.refuse("the closed form needs finite fill values (an -inf mask belongs to "
                                  "attention, which has no closed form); use the Monte Carlo estimator")
        return mode.affine(self, args, kwargs)


class ReshapeRule(AffineRule):
    """Ops that only reshape or copy their data input, keeping the order of its entries.

    ``view``, ``reshape``, ``flatten``, ``squeeze``, ``contiguous``, ``nn.Flatten``, ... The closed form gives
    the output its input's block of the joint state under the new shape: nothing is computed or stored, and
    what is known about the block's structure (a diagonal input covariance) is kept.
    """

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The input's block under the op's output shape (see :meth:`laftr.graph.MomentMode.reshape`)."""
        self.check(args, kwargs)
        return mode.reshape(self, args, kwargs)


class ComplexViewRule(AffineRule):
    """``torch.view_as_complex`` / ``view_as_real``: the same numbers seen as complex pairs or real pairs.

    A view, linear over the reals: each stream runs it exactly (Meta LLaMA's rotary embeddings,
    ``view_as_real(view_as_complex(q) * freqs_cis)``, are then a fixed linear map of ``q``, as the real
    ``rotate_half`` spelling is). The closed form keeps real moments only: refused.
    """

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Refused: the closed form's moment state is real."""
        raise self.refuse("the closed form keeps real moments only; use the Monte Carlo estimators (laftr, "
                          "liftr), or write the rotation with real tensors (rotate_half)")


class CastRule(ReshapeRule):
    """Casts: ``x.to(dtype)``, ``.float()``, ``.double()``, ``.half()``, ``.bfloat16()``, ``.type_as(t)``.

    And ``x.type(dtype)`` (Hugging Face's GPT-2 attention).

    A change of floating dtype (or device): the values up to rounding. Each stream runs it exactly, so a block
    that upcasts its softmax and casts back (``F.softmax(s, -1, dtype=torch.float32).to(q.dtype)``, as Hugging
    Face's attention does) runs as written; the closed form keeps the value's block (its own dtype). A cast of
    data to an integer or boolean dtype is refused: it is not differentiable.
    """

    family = "cast"
    max_data_inputs = None  # ``x.to(t)`` / ``x.type_as(t)``: ``t`` gives only its dtype

    def setup(self) -> None:
        """Refuse a cast to a dtype that is not floating."""
        named = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}
        dtypes = [a for a in (*self.node.args[1:], *self.node.kwargs.values()) if isinstance(a, torch.dtype)]
        if isinstance(self.node.target, str) and self.node.target in named:
            dtypes.append(named[self.node.target])
        for d in dtypes:
            if not d.is_floating_point:
                raise self.refuse(f"it casts data to {d}, which is not differentiable; cast only to a "
                                  "floating dtype inside the network")


class IdentityRule(Rule):
    """Ops that are the identity when estimating (dropout is off): the data input passes unchanged."""

    family = "identity"
    affine = True

    def _through(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The op's one data input, unchanged (the same in every mode)."""
        data = data_pairs((args, kwargs))
        if len(data) != 1:
            raise self.refuse("expected exactly one data-dependent input")
        return data[0]

    forward = fit = sample = own = moments = _through

    def sample_separable(self, mode: Any) -> bool:
        """True: the value passes unchanged."""
        return True


class ShapeRule(Rule):
    """Queries of a tensor's shape (``size``, ``dim``, ``numel``, ``x.shape``): the same in every stream.

    In the closed form the value is taken from a dummy tensor of one example, as every op there works on one
    example at a time.
    """

    family = "shape"

    def _query(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The shape query answered on theta0's stream (the same in every mode and stream)."""
        a, k = mode.concrete((args, kwargs), 0)
        return self.call(mode.params[0], a, k)

    forward = fit = sample = own = moments = _query

    def sample_separable(self, mode: Any) -> bool:
        """True: a shape is the same in every stream."""
        return True


SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"})
_AFFINE_ATTRS = frozenset({"T", "mT"})


_RESULT_FIELDS = {"values": 0, "indices": 1}


class _ResultField(Rule):
    """``.values`` / ``.indices`` of a ``(values, indices)`` result (``x.max(dim=1).values``): its part."""

    def _field(self, mode: Any, args: Any, kwargs: Any) -> Any:
        result = args[0]
        if not (isinstance(result, tuple) and len(result) == 2):
            raise self.refuse(f"attribute {self.node.args[1]!r} of a value that is not a (values, indices) "
                              "result")
        return result[_RESULT_FIELDS[str(self.node.args[1])]]

    forward = fit = sample = own = moments = _field

    def sample_separable(self, mode: Any) -> bool:
        """True: it passes a part of its input unchanged."""
        return True


@register(getattr)
class GetattrRule(Rule):
    """``getattr(x, name)`` as torch.fx records ``x.shape`` or ``x.T``: a shape query or a transpose."""

    family = "getattr"

    def setup(self) -> None:
        """Pick the shape query or the transpose this attribute stands for; refuse any other attribute."""
        attr = self.node.args[1] if len(self.node.args) > 1 else None
        if attr in SHAPE_ATTRS:
            self._impl: Rule = ShapeRule(self.node, self.gm)
        elif attr in _AFFINE_ATTRS:
            self._impl = AffineRule(self.node, self.gm)
        elif attr in _RESULT_FIELDS:
            self._impl = _ResultField(self.node, self.gm)
        else:
            raise self.refuse(f"attribute {attr!r} of a data tensor")
        self.affine = isinstance(self._impl, (AffineRule, _ResultField))  # type: ignore[misc]  # per instance

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The chosen rule's forward pass (a shape query or a transpose)."""
        return self._impl.forward(mode, args, kwargs)

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The chosen rule's fit pass."""
        return self._impl.fit(mode, args, kwargs)

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The chosen rule's Monte Carlo pass."""
        return self._impl.sample(mode, args, kwargs)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The chosen rule's pass with theta0's own linearization."""
        return self._impl.own(mode, args, kwargs)

    def sample_separable(self, mode: Any) -> bool:
        """As the chosen rule."""
        return self._impl.sample_separable(mode)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The chosen rule's closed form."""
        return self._impl.moments(mode, args, kwargs)


# ---------------------------------------------------------------------------------------------- layers
class TappedLayer(AffineRule):
    """A layer whose input and output the forward mode records when the mode's ``taps`` asks for them.

    K-FAC and diag-Fisher ask for them (:mod:`laftr.estimators.taps`).
    """

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream runs the layer exactly, recording its input and output when the mode's taps ask."""
        out = super().forward(mode, args, kwargs)
        taps = getattr(mode, "taps", None)
        if taps is not None and self.module is not None and taps.wants(self.prefix):
            (x,) = data_pairs((args, kwargs))
            recorded = (taps.record(self.prefix, xi, o, self.node)
                        for xi, o in zip(x.vals, out.vals, strict=True))
            out = Pair(tuple(recorded), True)
        return out


@register(nn.Linear, F.linear)
class LinearRule(TappedLayer):
    """``nn.Linear`` / ``F.linear``."""

    family = "linear"

    def batch_movable(self, layout: tuple[int, int, int], ndim: int) -> bool:
        """When the examples are not along the last axis (the one it maps)."""
        return layout[0] < ndim - 1

    def matrix(self, params: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any],
               ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The layer's weight and bias (the op is ``x -> W x + b``)."""
        weight: Any
        bias: Any
        if self.module is not None:
            weight, bias = params[self.prefix + ".weight"], params.get(self.prefix + ".bias")
        else:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            return None
        if bias is not None and not (isinstance(bias, torch.Tensor) and bias.shape == weight.shape[:1]):
            return None
        return weight, bias


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d)
class ConvRule(TappedLayer):
    """Convolutions (every padding mode: zeros, reflect, replicate and circular padding are linear too)."""

    family = "conv"


@register(nn.modules.batchnorm._BatchNorm, F.batch_norm)
class BatchNormRule(AffineRule):
    """Batch norm on its running statistics (eval mode): a per-channel affine map."""

    family = "batch_norm"

    def setup(self) -> None:
        """Refuse batch norm without running statistics or in training mode (batch statistics)."""
        if self.module is not None:
            if self.module.running_mean is None or self.module.running_var is None:
                raise self.refuse("batch norm without running statistics is not a per-example affine map")
        else:
            training = self.const_arg(5, "training", False)
            if training is not False:
                raise self.refuse("batch norm in training mode (batch statistics)")


# ---------------------------------------------------------------------------------------------- plain ops
_RESHAPE = (
    nn.Flatten, nn.Unflatten, nn.Identity, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "clone", "unflatten",
)
_AFFINE_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Upsample, nn.ConvTranspose1d,
    nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Unfold, nn.Fold, nn.ChannelShuffle, nn.ReflectionPad3d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
# (products, matmul and einsum: laftr.rules.attention's ProductRule, affine with one data factor)
_AFFINE_FUNCTIONS = (
    torch.transpose, torch.permute, torch.mean,
    torch.sum, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, operator.getitem,
    operator.neg, operator.pos, torch.neg, F.pad, torch.narrow, torch.chunk, torch.split, torch.movedim,
    torch.swapaxes, torch.t, torch.unbind, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.unfold, F.fold, torch.channel_shuffle,
    torch.roll, torch.flip, torch.tile, torch.repeat_interleave, torch.cumsum, torch.tril, torch.triu,
    torch.diagonal, torch.index_select,
)
_AFFINE_METHODS = (
    "permute", "transpose", "mean", "sum", "neg", "t", "chunk", "split", "expand", "narrow", "unbind",
    "movedim", "swapaxes", "roll", "flip", "repeat", "tile", "repeat_interleave", "cumsum", "tril", "triu",
    "diagonal", "index_select",
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
register(*_RESHAPE)(ReshapeRule)
register(torch.view_as_complex, torch.view_as_real)(ComplexViewRule)
register(*_SUM_FUNCTIONS, *_SUM_METHODS)(SumRule)
register(*_DIV)(DivideRule)
register("masked_fill", "masked_fill_", torch.masked_fill, torch.where, "where")(SelectRule)
register(torch.gather, "gather", torch.take_along_dim, "take_along_dim")(GatherRule)
register("expand_as", "view_as", "reshape_as")(LikeRule)
register(*_IDENTITY)(IdentityRule)
register("to", "float", "double", "half", "bfloat16", "type_as", "type")(CastRule)
register(*_SHAPE)(ShapeRule)
