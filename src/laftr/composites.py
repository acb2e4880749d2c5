"""torch.nn modules and functions traced through their parts: transformer layers, GLU, softmin, bilinear, ...

``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``, ``nn.TransformerDecoderLayer``,
``nn.TransformerDecoder`` and ``nn.Transformer`` are composites of modules that have rules
(``nn.MultiheadAttention``, ``nn.Linear``, ``nn.LayerNorm``, dropout and the activation), but torch.fx keeps
every torch.nn module as one leaf, and their forwards branch on their input (PyTorch's inference fast path,
nested tensors, the detection of a causal mask), which symbolic tracing cannot follow. laftr's tracer
(:func:`laftr.graph.trace`) therefore traces each of them as the function below: the computation of the
module's standard path (the one training runs) written with its public submodules, so the traced graph holds
the same nodes, and the same parameter names, as the same network written by hand.

What the standard path does and the traced one does not: nothing, except that PyTorch's inference fast path
of ``nn.TransformerEncoder`` with ``enable_nested_tensor=True`` returns zeros at the positions a
``src_key_padding_mask`` pads, which its standard path does not; that combination is refused at tracing, with
the fix (build the encoder with ``enable_nested_tensor=False``). Masks go to ``nn.MultiheadAttention`` as they
come (it reads boolean and additive masks alike); an ``is_causal`` left at ``None`` with a mask applies the
mask, which is what PyTorch's detection of a causal mask amounts to.

Only the classes' own forwards are replaced: a subclass that overrides ``forward`` is traced through its own
code, and a module the user registered a rule for stays a leaf.

``nn.GLU`` / ``F.glu`` and ``nn.Softmin`` / ``F.softmin`` are traced as ``a * sigmoid(b)`` (the halves of the
input) and ``softmax(-x)``: a product and a softmax, which have rules. A function the user registered a rule
for is recorded as one node.

Elementwise ops written with ops that have rules, so that each gets the treatment of its parts (function and
tensor-method spellings alike):

- ``torch.maximum(a, b)`` / ``torch.fmax`` as ``b + relu(a - b)``, ``torch.minimum(a, b)`` / ``torch.fmin`` as
  ``a - relu(a - b)``: the relu is a gate decided by theta0 (``torch.maximum(h, torch.zeros_like(h))`` is
  ``torch.relu(h)``, draw for draw); with a constant ``b``, ``a + relu(b - a)`` (:data:`OTHER_BASE`: the same
  gate on the complementary event, exact where it is closed, not rounded against a large constant). The
  elementwise ``torch.max(a, b)`` / ``torch.min(a, b)`` of two tensors are recorded as these by the tracer
  (:mod:`laftr.graph`). Only where the arguments read both the network input and a parameter or
  buffer (see :data:`KEPT_WHOLE`); ``fmax`` / ``fmin`` then lose their treatment of NaN (a NaN propagates).
- ``torch.lerp(a, b, w)`` as ``a + w * (b - a)``, ``torch.addcmul(a, b, c, value=v)`` as ``a + v * b * c`` and
  ``torch.addcdiv(a, b, c, value=v)`` as ``a + v * b / c``: sums, products and a quotient.
- ``nn.Bilinear`` / ``F.bilinear(x1, x2, W, b)`` (``y_o = x1^T W_o x2 + b_o``) as ``u = einsum(x1, W)``
  (affine in ``x1``) and ``(u * x2).sum(-1) + b``: a product of two data tensors, linearized at theta0's
  factors. The module's parameters keep their names (``<name>.weight``, ``<name>.bias``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnsupportedOpError

__all__ = ["KEPT_WHOLE", "traced_forward", "traced_function", "traced_method"]


def _self_attention(m: Any, x: Tensor, mask: Tensor | None, padding: Tensor | None, causal: bool) -> Tensor:
    return m.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False,
                       is_causal=causal)[0]


def _feed_forward(m: Any, x: Tensor, last_dropout: nn.Module) -> Tensor:
    return last_dropout(m.linear2(m.dropout(m.activation(m.linear1(x)))))


def encoder_layer(m: nn.TransformerEncoderLayer, src: Tensor, src_mask: Tensor | None = None,
                  src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """``nn.TransformerEncoderLayer``: self-attention and feed-forward blocks, pre- or post-LayerNorm."""
    def sa(x: Tensor) -> Tensor:
        return m.dropout1(_self_attention(m, x, src_mask, src_key_padding_mask, is_causal))

    x = src
    if m.norm_first:
        x = x + sa(m.norm1(x))
        return x + _feed_forward(m, m.norm2(x), m.dropout2)
    x = m.norm1(x + sa(x))
    return m.norm2(x + _feed_forward(m, x, m.dropout2))


def encoder(m: nn.TransformerEncoder, src: Tensor, mask: Tensor | None = None,
            src_key_padding_mask: Tensor | None = None, is_causal: bool | None = None) -> Tensor:
    """``nn.TransformerEncoder``: its layers in turn, then its final norm if it has one."""
    if src_key_padding_mask is not None and getattr(m, "use_nested_tensor", False):
        raise UnsupportedOpError(
            "nn.TransformerEncoder with enable_nested_tensor=True and a src_key_padding_mask: PyTorch's "
            "inference path returns zeros at the padded positions, its training path does not, so the "
            "network has two functions; build the encoder with enable_nested_tensor=False")
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    return out if m.norm is None else m.norm(out)


def decoder_layer(m: nn.TransformerDecoderLayer, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                  memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                  memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                  memory_is_causal: bool = False) -> Tensor:
    """``nn.TransformerDecoderLayer``: self-attention, attention to ``memory`` and feed-forward blocks."""
    def sa(x: Tensor) -> Tensor:
        return m.dropout1(_self_attention(m, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))

    def ca(x: Tensor) -> Tensor:
        return m.dropout2(m.multihead_attn(x, memory, memory, attn_mask=memory_mask,
                                           key_padding_mask=memory_key_padding_mask, need_weights=False,
                                           is_causal=memory_is_causal)[0])

    x = tgt
    if m.norm_first:
        x = x + sa(m.norm1(x))
        x = x + ca(m.norm2(x))
        return x + _feed_forward(m, m.norm3(x), m.dropout3)
    x = m.norm1(x + sa(x))
    x = m.norm2(x + ca(x))
    return m.norm3(x + _feed_forward(m, x, m.dropout3))


def decoder(m: nn.TransformerDecoder, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
            memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
            memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool | None = None,
            memory_is_causal: bool = False) -> Tensor:
    """``nn.TransformerDecoder``: its layers in turn, then its final norm if it has one."""
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return out if m.norm is None else m.norm(out)


def transformer(m: nn.Transformer, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, src_is_causal: bool | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Tensor:
    """``nn.Transformer``: its encoder on ``src``, then its decoder on ``tgt`` attending to the encoding."""
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask,
                     memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def glu(x: Tensor, dim: int = -1) -> Tensor:
    """``F.glu``: the first half of ``x`` along ``dim`` gated by the sigmoid of the second (a product)."""
    a, b = x.chunk(2, dim=dim)
    return a * torch.sigmoid(b)


def softmin(x: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype: torch.dtype | None = None) -> Tensor:
    """``F.softmin``: the softmax of ``-x`` (an implicit ``dim`` is refused by the softmax's rule)."""
    return F.softmax(-x, dim, dtype=dtype)


# (the arguments are named as torch names them, so that calls with keywords trace too)
def maximum(input: Any, other: Any) -> Tensor:
    """``torch.maximum`` / ``torch.fmax``: ``other + relu(input - other)`` (a gate on the difference)."""
    return other + torch.relu(input - other)


def minimum(input: Any, other: Any) -> Tensor:
    """``torch.minimum`` / ``torch.fmin``: ``input - relu(input - other)`` (a gate on the difference)."""
    return input - torch.relu(input - other)


def maximum_on_input(input: Any, other: Any) -> Tensor:
    """``torch.maximum`` as ``input + relu(other - input)``: the form for a constant ``other``.

    The same function and the same gate (on the event ``other > input``), with ``input`` as the base: exact in
    floating point where the gate is closed, where ``other + relu(input - other)`` loses ``input`` to
    rounding against a large constant (OPT's ``torch.max(scores, torch.tensor(finfo.min))``: every score 0).
    """
    return input + torch.relu(other - input)


def minimum_on_other(input: Any, other: Any) -> Tensor:
    """``torch.minimum`` as ``other - relu(other - input)``: the form for a constant ``input``."""
    return other - torch.relu(other - input)


#: the form of each of the composites above whose base is the other operand (used where the first form's
#: base is a constant: its gate opens where values are typical, and the difference rounds against it)
OTHER_BASE: dict[Callable[..., Tensor], tuple[Callable[..., Tensor], int]] = {
    maximum: (maximum_on_input, 1), minimum: (minimum_on_other, 0)}


def lerp(input: Any, end: Any, weight: Any) -> Tensor:
    """``torch.lerp``: ``input + weight * (end - input)``."""
    return input + weight * (end - input)


def _times(value: Any, t: Any) -> Any:
    """``value * t``, or ``t`` itself for a literal ``value`` of one (no node for it)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1:
        return t
    return value * t


def addcmul(input: Any, tensor1: Any, tensor2: Any, *, value: Any = 1) -> Tensor:
    """``torch.addcmul``: ``input + value * tensor1 * tensor2``."""
    return input + _times(value, tensor1) * tensor2


def addcdiv(input: Any, tensor1: Any, tensor2: Any, *, value: Any = 1) -> Tensor:
    """``torch.addcdiv``: ``input + value * tensor1 / tensor2``."""
    return input + _times(value, tensor1) / tensor2


def bilinear(input1: Any, input2: Any, weight: Any, bias: Any = None) -> Tensor:
    """``F.bilinear``: ``input1 W_o input2 + b_o`` per output ``o``; ``W`` is ``(out, in1, in2)``.

    ``einsum`` of ``input1`` with the weight (affine in ``input1``), then the product with ``input2`` summed
    over ``in2``.
    """
    u = torch.einsum("...i,oij->...oj", input1, weight)
    y = (u * input2.unsqueeze(-2)).sum(-1)
    return y if bias is None else y + bias


_FORWARDS: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.TransformerEncoderLayer: encoder_layer,
    nn.TransformerEncoder: encoder,
    nn.TransformerDecoderLayer: decoder_layer,
    nn.TransformerDecoder: decoder,
    nn.Transformer: transformer,
    nn.GLU: lambda m, x: glu(x, m.dim),
    nn.Softmin: lambda m, x: softmin(x, m.dim),
    nn.Bilinear: lambda m, x1, x2: bilinear(x1, x2, m.weight, m.bias),
}

#: functions traced as the function given (the same computation written with ops that have rules)
_FUNCTIONS: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.glu: glu, F.softmin: softmin, torch.maximum: maximum, torch.fmax: maximum, torch.minimum: minimum,
    torch.fmin: minimum, torch.lerp: lerp, torch.addcmul: addcmul, torch.addcdiv: addcdiv,
    torch.bilinear: bilinear,
}

#: tensor methods traced as the function given (``x.maximum(y)`` is ``maximum(x, y)``; the in-place forms as
#: the out-of-place ones, as for every op: the interpreter never writes into a stream's tensors)
_METHODS: dict[str, Callable[..., Tensor]] = {
    "maximum": maximum, "fmax": maximum, "minimum": minimum, "fmin": minimum, "lerp": lerp, "lerp_": lerp,
    "addcmul": addcmul, "addcmul_": addcmul, "addcdiv": addcdiv, "addcdiv_": addcdiv,
}

#: the composites that are traced as their parts only where their arguments read both the network input and a
#: parameter or buffer. Elsewhere each stays one node: of parameters and constants alone it is parameter
#: arithmetic, run exactly in each stream; of the network input alone (and constants) it is evaluated exactly
#: on the input, the same in every stream, as the other ops of the input alone are (a gate there would be
#: linearized, not exact)
KEPT_WHOLE: frozenset[Any] = frozenset({torch.maximum, torch.minimum, torch.fmax, torch.fmin, "maximum",
                                        "minimum", "fmax", "fmin"})


def traced_function(target: Any) -> Callable[..., Tensor] | None:
    """The function laftr traces in place of a call of ``target``, or None (recorded as one node)."""
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None


def traced_method(name: Any) -> Callable[..., Tensor] | None:
    """The function laftr traces in place of the tensor method ``name`` (self first), or None (one node)."""
    return _METHODS.get(name) if isinstance(name, str) else None


def traced_forward(m: nn.Module) -> Callable[..., Tensor] | None:
    """The function laftr traces in place of ``m.forward``, or None: ``m`` is traced as torch.fx would.

    One of the classes above whose ``forward`` is the class's own (a subclass overriding it is not replaced).
    """
    for cls, fn in _FORWARDS.items():
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return fn
    return None
