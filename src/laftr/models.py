"""Reference networks of the experiments: MLPs, the conv net of METHOD.md section 4, transformers.

The MLPs and the conv net are plain ``nn.Sequential`` networks that LAFTR traces with torch.fx (ReLU by
default; the MLP takes any activation with a rule and an optional normalization layer). Multi-head
continual learning uses one wide output layer and restricts each task to its own slice of outputs.

:func:`transformer` (token sequences, e.g. modular arithmetic) and :func:`vit` (images) are small
pre-LayerNorm transformers with no data-dependent control flow, so torch.fx traces them too; their
attention is computed explicitly, by ``F.scaled_dot_product_attention`` or by ``nn.MultiheadAttention``,
on the same weights (:func:`copy_attention_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "ATTENTIONS", "NORMS", "READOUTS", "VIT_READOUTS", "SelectOutput", "SelfAttention",
           "RecurrentClassifier", "Transformer", "TransformerBlock", "ViT", "WithInputs", "conv_net",
           "copy_attention_weights", "lstm", "mlp", "num_params", "transformer", "vit"]

#: The activations of :func:`mlp`, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
                                           "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}
#: The normalization layers of :func:`mlp`, by name (``rmsnorm`` where torch has ``nn.RMSNorm``).
NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm}
if hasattr(nn, "RMSNorm"):
    NORMS["rmsnorm"] = nn.RMSNorm


class SelectOutput(nn.Module):
    """One output tensor of a network that returns several: ``model(x)[key]``, or ``model(x).key``.

    laftr compares one tensor per example. A network that returns a tuple (``logits, features``), a dict
    (``{"logits": ...}``) or an object with attributes is wrapped so that it returns the one to compare:
    ``SelectOutput(model, 0)``, ``SelectOutput(model, "logits")``. Wrap theta0 and theta alike (the wrapper's
    parameter names are the model's under ``model.``); torch.fx traces through it.
    """

    def __init__(self, model: nn.Module, key: int | str) -> None:
        """``key``: the index (tuple, list) or key (dict) of the output to keep, or an attribute name."""
        super().__init__()
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"key must be an int or a str, got {key!r}")
        self.model = model
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The selected output of ``model(x)``."""
        out = self.model(x)
        if isinstance(self.key, str) and not isinstance(out, dict):
            return getattr(out, self.key)
        return out[self.key]


class WithInputs(nn.Module):
    """A network of several inputs, called with one tensor from which the others are computed.

    laftr models one input tensor per example (its input models draw it; ``exact_fsd`` reads it). A network
    that takes more is wrapped so that every input is a function of that one:

    - inputs that follow from the first, e.g. a padding mask from the token ids::

          laftr.WithInputs(model, attention_mask=lambda ids: ids != pad_id)   # model(ids, attention_mask=...)

    - separate inputs packed side by side into one tensor, split again inside::

          laftr.WithInputs(model, lambda x: x[:, :784].view(-1, 1, 28, 28), lambda x: x[:, 784:])

      (``model(image, features)``; the data is ``torch.cat([images.flatten(1), features], 1)``, and an input
      model then draws both jointly).

    Without positional functions the tensor itself is the first positional argument. The functions must
    work per example (no mixing of the batch) and be traceable by torch.fx (indexing, comparisons, views,
    arithmetic; no Python branching on values). Wrap theta0 and theta alike: the parameter names are the
    model's under ``model.``. Like any module holding lambdas, it cannot be pickled whole (laftr saves
    tensors only).
    """

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        """``model`` called with inputs computed from one tensor.

        ``args``: one function of the tensor per positional input (none: the tensor itself); ``kwargs``:
        keyword inputs, each a function of the tensor.
        """
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, fn in [*((f"positional input {i}", f) for i, f in enumerate(args)), *kwargs.items()]:
            if not callable(fn):
                raise TypeError(f"{name} must be a function of the input tensor, got {type(fn).__name__}")
        self.model = model
        self.arg_fns = tuple(args)
        self.kwarg_fns = dict(kwargs)

    def forward(self, x: torch.Tensor) -> Any:
        """``model(*(f(x) for f in args), **{k: f(x) for k, f in kwargs.items()})``."""
        args = tuple(f(x) for f in self.arg_fns) if self.arg_fns else (x,)
        return self.model(*args, **{k: f(x) for k, f in self.kwarg_fns.items()})


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
        raise ValueError(f"layer sizes must be positive: in {in_features}, hidden "
                         f"{list(hidden)}, out {out_features}")
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
    if min(h, w) < 10:  # 3x3 conv (padded), 3x3 conv, pool 2, the same again: 10 -> 10, 8, 4, 4, 2, 1
        raise ValueError(f"conv_net needs images of at least 10 x 10 pixels (two unpadded 3x3 convolutions "
                         f"and two 2x2 max pools), got {h} x {w}")
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


# ----------------------------------------------------------------------------------------------------
# transformers

ATTENTIONS: tuple[str, ...] = ("manual", "sdpa", "mha")
"""The ways self-attention is computed (explicit matmuls and softmax, ``F.scaled_dot_product_attention``,
``nn.MultiheadAttention``); all three compute the same function of the same weights."""

READOUTS: tuple[str, ...] = ("last", "first", "mean")
"""Which hidden states feed the head of :func:`transformer`."""

VIT_READOUTS: tuple[str, ...] = ("cls", "mean")
"""Which hidden states feed the head of :func:`vit`."""


def _check_sizes(**sizes: int) -> None:
    """Raise a ValueError naming the first size that is not a positive integer."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_attention(d_model: int, heads: int, attention: str, dropout: float) -> None:
    if d_model % heads != 0:
        raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v``, ``o`` projections.

    Or one ``nn.MultiheadAttention`` holding the same weights.

    Args:
        d_model: width of the residual stream.
        heads: number of heads (``d_model`` must be divisible by it).
        seq_len: length of the input sequences (size of the causal mask).
        attention: ``"manual"``, ``"sdpa"`` or ``"mha"`` (see :data:`ATTENTIONS`).
        causal: each position attends only to itself and earlier positions.
        dropout: dropout on the attention probabilities (training mode only).
    """

    mask: torch.Tensor  # the causal mask, a buffer (registered when ``causal``)

    def __init__(
        self, d_model: int, heads: int, seq_len: int, attention: str = "manual", causal: bool = True,
        dropout: float = 0.0,
    ) -> None:
        """The projections (or one ``nn.MultiheadAttention``) and the causal mask; see the class."""
        super().__init__()
        _check_sizes(d_model=d_model, heads=heads, seq_len=seq_len)
        _check_attention(d_model, heads, attention, dropout)
        self.d_model, self.heads, self.head_dim = d_model, heads, d_model // heads
        self.attention, self.causal, self.dropout = attention, bool(causal), float(dropout)
        above = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
        if attention == "mha":
            self.mha = nn.MultiheadAttention(d_model, heads, dropout=self.dropout, batch_first=True)
            if self.causal:
                self.register_buffer("mask", above, persistent=False)
        else:
            self.q = nn.Linear(d_model, d_model)
            self.k = nn.Linear(d_model, d_model)
            self.v = nn.Linear(d_model, d_model)
            self.o = nn.Linear(d_model, d_model)
            if attention == "manual":
                if self.causal:
                    mask = torch.zeros(seq_len, seq_len).masked_fill(above, float("-inf"))
                    self.register_buffer("mask", mask, persistent=False)
                self.drop = nn.Dropout(self.dropout) if self.dropout > 0 else None

    def _split(self, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """``(B, T, d_model) -> (B, heads, T, head_dim)``."""
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` of shape ``(B, seq_len, d_model)``; returns the same shape."""
        if self.attention == "mha":
            mask = self.mask if self.causal else None
            return self.mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        b, t = x.shape[0], x.shape[1]
        q, k, v = self._split(self.q(x), b, t), self._split(self.k(x), b, t), self._split(self.v(x), b, t)
        if self.attention == "sdpa":
            p = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if self.causal:
                scores = scores + self.mask
            attn = torch.softmax(scores, dim=-1)
            if self.drop is not None:
                attn = self.drop(attn)
            out = attn @ v
        return self.o(out.transpose(1, 2).reshape(b, t, self.d_model))

    def projections(self) -> dict[str, torch.Tensor]:
        """The weights as ``{q,k,v,o}_{weight,bias}`` tensors (views), whatever the attention variant."""
        if self.attention == "mha":
            w, b = self.mha.in_proj_weight, self.mha.in_proj_bias
            d = self.d_model
            out = {}
            for i, n in enumerate("qkv"):
                out[f"{n}_weight"], out[f"{n}_bias"] = w[i * d : (i + 1) * d], b[i * d : (i + 1) * d]
            out["o_weight"], out["o_bias"] = self.mha.out_proj.weight, self.mha.out_proj.bias
            return out
        return {f"{n}_{kind}": getattr(getattr(self, n), kind) for n in "qkvo" for kind in ("weight", "bias")}

    @torch.no_grad()
    def load_projections(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``{q,k,v,o}_{weight,bias}`` tensors (as from :meth:`projections`) into this module."""
        for key, dst in self.projections().items():
            src = weights[key]
            if src.shape != dst.shape:
                raise ValueError(f"attention weight {key}: shape {tuple(src.shape)} vs {tuple(dst.shape)}")
            dst.copy_(src)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``h + attn(ln1(h))``, then ``h + mlp(ln2(h))`` with a GELU MLP.

    Args:
        d_model, heads, seq_len, attention, causal: as in :class:`SelfAttention`.
        d_mlp: hidden width of the MLP.
        dropout: dropout on attention probabilities and on both branches' outputs (training only).
    """

    def __init__(
        self, d_model: int, heads: int, d_mlp: int, seq_len: int, attention: str = "manual",
        causal: bool = True, dropout: float = 0.0,
    ) -> None:
        """Two LayerNorms, the attention and the MLP; see the class."""
        super().__init__()
        _check_sizes(d_mlp=d_mlp)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, seq_len, attention, causal, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_model) -> (B, T, d_model)``."""
        a = self.attn(self.ln1(h))
        if self.drop is not None:
            a = self.drop(a)
        h = h + a
        m = self.mlp(self.ln2(h))
        if self.drop is not None:
            m = self.drop(m)
        return h + m


class Transformer(nn.Module):
    """Decoder-style transformer over token ids; see :func:`transformer`."""

    def __init__(
        self, vocab_size: int, seq_len: int, out_features: int, d_model: int, heads: int, blocks: int,
        d_mlp: int, attention: str, causal: bool, readout: str, dropout: float,
    ) -> None:
        """Embeddings, blocks, final LayerNorm and readout head; see :func:`transformer`."""
        super().__init__()
        _check_sizes(vocab_size=vocab_size, seq_len=seq_len, out_features=out_features, d_model=d_model,
                     heads=heads, blocks=blocks, d_mlp=d_mlp)
        _check_attention(d_model, heads, attention, dropout)
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")
        self.readout = readout
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.empty(seq_len, d_model))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, heads, d_mlp, seq_len, attention, causal, dropout)
            for _ in range(blocks)
        )
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, seq_len)`` (int64) -> outputs ``(B, out_features)``."""
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        h = self.ln(h)
        if self.readout == "last":
            h = h[:, -1]
        elif self.readout == "first":
            h = h[:, 0]
        else:
            h = h.mean(1)
        return self.head(h)


def transformer(
    vocab_size: int,
    seq_len: int,
    out_features: int,
    d_model: int = 128,
    heads: int = 4,
    blocks: int = 2,
    d_mlp: int = 512,
    attention: str = "manual",
    causal: bool = True,
    readout: str = "last",
    dropout: float = 0.0,
) -> nn.Module:
    """A small pre-LayerNorm decoder transformer (e.g. for modular arithmetic, LIFTR's benchmark).

    Token embedding plus a learned positional embedding, ``blocks`` pre-LN blocks (multi-head
    self-attention and a GELU MLP, each on a residual branch), a final LayerNorm, a readout of the hidden
    states and a linear head. The network takes one int64 tensor of token ids ``(B, seq_len)`` (the
    length is fixed: the positional embedding and the causal mask are added whole, so the graph has no
    shape-dependent slicing) and is traceable by ``torch.fx.symbolic_trace``.

    Args:
        vocab_size: number of token ids (``p + 5`` for :func:`laftr.data.load_arithmetic`).
        seq_len: length of the input sequences (4 for modular arithmetic).
        out_features: outputs of the head.
        d_model: width of the residual stream.
        heads: attention heads (must divide ``d_model``).
        blocks: number of transformer blocks.
        d_mlp: hidden width of each block's MLP.
        attention: ``"manual"`` (explicit ``q @ k^T / sqrt(d_head)``, additive causal mask, softmax),
            ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"mha"`` (``nn.MultiheadAttention``).
            They compute the same function; :func:`copy_attention_weights` moves weights between them.
        causal: position ``i`` attends only to positions ``<= i``.
        readout: ``"last"`` (hidden state of the last position), ``"first"`` or ``"mean"`` (over positions).
        dropout: dropout on attention probabilities and residual branches, active in training mode only.

    Returns:
        The :class:`Transformer` module.

    Raises:
        ValueError: a size is not a positive integer, ``d_model`` is not divisible by ``heads``, or an
            unknown ``attention``/``readout``, or ``dropout`` outside [0, 1).
    """
    return Transformer(vocab_size, seq_len, out_features, d_model, heads, blocks, d_mlp, attention, causal,
                       readout, dropout)


class RecurrentClassifier(nn.Module):
    """Token embedding, a stacked LSTM (or GRU), the last position's hidden state, a linear head."""

    def __init__(self, vocab_size: int, out_features: int, d_model: int, layers: int, cell: str) -> None:
        """See :func:`lstm`."""
        super().__init__()
        _check_sizes(vocab_size=vocab_size, out_features=out_features, d_model=d_model, layers=layers)
        cells = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in cells:
            raise ValueError(f"unknown cell {cell!r}; choose one of {sorted(cells)}")
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rnn = cells[cell](d_model, d_model, num_layers=layers, batch_first=True)
        self.head = nn.Linear(d_model, out_features)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` int64 token ids -> ``(B, out_features)``."""
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


def lstm(vocab_size: int, out_features: int, d_model: int = 128, layers: int = 2,
         cell: str = "lstm") -> nn.Module:
    """A recurrent classifier over token ids: embedding, ``layers`` LSTM (or GRU) layers, last-step readout.

    Args:
        vocab_size: number of token ids.
        out_features: outputs of the head.
        d_model: embedding and hidden width.
        layers: stacked recurrent layers.
        cell: ``"lstm"`` or ``"gru"``.
    """
    return RecurrentClassifier(vocab_size, out_features, d_model, layers, cell)


class ViT(nn.Module):
    """Vision transformer over image patches; see :func:`vit`."""

    def __init__(
        self, image_size: int, patch: int, channels: int, out_features: int, d_model: int, heads: int,
        blocks: int, d_mlp: int, attention: str, readout: str, dropout: float,
    ) -> None:
        """Patch embedding, positions (and class token), blocks, LayerNorm and head; see :func:`vit`."""
        super().__init__()
        _check_sizes(image_size=image_size, patch=patch, channels=channels, out_features=out_features,
                     d_model=d_model, heads=heads, blocks=blocks, d_mlp=d_mlp)
        _check_attention(d_model, heads, attention, dropout)
        if image_size % patch != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch ({patch})")
        if readout not in VIT_READOUTS:
            raise ValueError(f"unknown readout {readout!r}; choose one of {', '.join(VIT_READOUTS)}")
        self.readout = readout
        n_tokens = (image_size // patch) ** 2 + (readout == "cls")
        self.patch = nn.Conv2d(channels, d_model, patch, stride=patch)
        if readout == "cls":
            self.cls = nn.Parameter(torch.empty(1, 1, d_model))
            nn.init.normal_(self.cls, std=0.02)
        self.pos = nn.Parameter(torch.empty(n_tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, heads, d_mlp, n_tokens, attention, False, dropout)
            for _ in range(blocks)
        )
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, channels, image_size, image_size)`` -> outputs ``(B, out_features)``."""
        h = self.patch(x).flatten(2).transpose(1, 2)
        if self.readout == "cls":
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1)
        h = h + self.pos
        for block in self.blocks:
            h = block(h)
        h = self.ln(h)
        h = h[:, 0] if self.readout == "cls" else h.mean(1)
        return self.head(h)


def vit(
    image_size: int = 28,
    patch: int = 7,
    channels: int = 1,
    out_features: int = 10,
    d_model: int = 64,
    heads: int = 4,
    blocks: int = 2,
    d_mlp: int = 128,
    attention: str = "manual",
    readout: str = "cls",
    dropout: float = 0.0,
) -> nn.Module:
    """A small vision transformer: non-overlapping patches, pre-LN blocks, a linear head.

    The patches are embedded by ``nn.Conv2d(channels, d_model, patch, stride=patch)``; a learned class
    token is put in front (``readout="cls"``, the head reads its final hidden state) or the head reads
    the mean over patches (``readout="mean"``); a learned positional embedding is added. The blocks are
    those of :func:`transformer`, without a causal mask. Traceable by ``torch.fx.symbolic_trace``.

    Args:
        image_size: height and width of the (square) input images.
        patch: side of a patch (must divide ``image_size``).
        channels: input channels.
        out_features: outputs of the head.
        d_model: width of the residual stream, as in :func:`transformer`.
        heads: attention heads, as in :func:`transformer`.
        blocks: number of transformer blocks.
        d_mlp: hidden width of each block's MLP.
        attention: ``"manual"``, ``"sdpa"`` or ``"mha"``, as in :func:`transformer`.
        readout: ``"cls"`` or ``"mean"``.
        dropout: as in :func:`transformer`.

    Returns:
        The :class:`ViT` module; it takes float images ``(B, channels, image_size, image_size)``.

    Raises:
        ValueError: a size is not a positive integer, ``patch`` does not divide ``image_size``,
            ``heads`` does not divide ``d_model``, an unknown ``attention``/``readout``, or a bad ``dropout``.
    """
    return ViT(image_size, patch, channels, out_features, d_model, heads, blocks, d_mlp, attention, readout,
               dropout)


def copy_attention_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy all weights of ``src`` into ``dst``, two networks that differ at most in their attention variant.

    Attention layers are matched by name and their ``q``, ``k``, ``v``, ``o`` weights converted between
    the separate projections (``"manual"``, ``"sdpa"``) and ``nn.MultiheadAttention``'s packed
    ``in_proj_weight = cat(Wq, Wk, Wv)`` / ``out_proj`` (``"mha"``), in either direction; every other
    parameter and buffer is copied as is (converted to ``dst``'s dtype and device). Afterwards both
    networks compute the same function.

    Args:
        src: a :func:`transformer` or :func:`vit` (or any module made of :class:`SelfAttention` layers).
        dst: a network of the same architecture, any attention variant.

    Raises:
        ValueError: the networks differ in their attention layers, other parameters or shapes.
    """
    src_attn = {n: m for n, m in src.named_modules() if isinstance(m, SelfAttention)}
    dst_attn = {n: m for n, m in dst.named_modules() if isinstance(m, SelfAttention)}
    if list(src_attn) != list(dst_attn):
        raise ValueError(f"attention layers differ: src has {list(src_attn)}, dst has {list(dst_attn)}")

    def rest(model: nn.Module, attn: dict[str, SelfAttention]) -> dict[str, torch.Tensor]:
        prefixes = tuple(f"{n}." for n in attn)
        return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(prefixes)}

    src_rest, dst_rest = rest(src, src_attn), rest(dst, dst_attn)
    if list(src_rest) != list(dst_rest):
        missing = sorted(set(src_rest) ^ set(dst_rest))
        raise ValueError(f"src and dst differ in parameters or buffers outside attention: {missing}")
    for key, v in src_rest.items():
        if v.shape != dst_rest[key].shape:
            raise ValueError(f"{key}: shape {tuple(v.shape)} in src vs {tuple(dst_rest[key].shape)} in dst")
    with torch.no_grad():
        for key, v in src_rest.items():
            dst_rest[key].copy_(v)
        for name, m in src_attn.items():
            dst_attn[name].load_projections(m.projections())
