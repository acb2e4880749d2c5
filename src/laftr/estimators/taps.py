"""The layers K-FAC and diag-Fisher tap, found on the same torch.fx trace that LAFTR interprets.

A *tap* is a layer that is linear in (a function of) its data input, whose inputs and the gradients of the
outputs w.r.t. its output are recorded in one forward pass of the traced network (the interpreter's forward
mode, :class:`laftr.graph.ForwardMode`) and one backward pass per output vector:

- ``nn.Linear`` and ``nn.Conv2d`` (groups 1) called as modules on data (kinds ``linear`` and ``conv``);
- ``nn.Embedding`` called as a module on token ids (kind ``embedding``): a linear map of the one-hot token.
  Its recorded inputs are the integer ids, never one-hot matrices; its weight is ``(V, d)``, the transpose of
  a Linear weight's ``(d_out, d_in)`` orientation (here ``d_in = V``, ``d_out = d``). The gradient of the row
  ``padding_idx`` is zero in PyTorch (that row is a constant of the network), so its statistics are zero here
  too;
- ``nn.MultiheadAttention`` used for self-attention (``query is key is value``) with one joint input
  projection (``kdim == vdim == embed_dim``): two linear taps, ``<prefix>.in_proj`` (parameters
  ``<prefix>.in_proj_weight`` ``(3E, E)`` and ``<prefix>.in_proj_bias``; its output is ``q | k | v``
  concatenated) and ``<prefix>.out_proj`` (the module ``<prefix>.out_proj``, applied to the merged heads). The
  attention rule (:class:`laftr.rules.attention.MultiheadAttentionRule`) records both. An attention layer with
  separate ``q/k/v`` projection weights, or used for cross-attention, keeps only its ``out_proj`` tap: its
  input-projection parameters are not tappable.

Tracing first means every estimator refuses the same networks with the same
:class:`~laftr.errors.UnsupportedOpError` (an op without a rule, data-dependent control flow), and that no
hook is ever put on the user's modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .._util import param_dict, wide_dtype
from ..errors import UnsupportedOpError, UsageError
from ..graph import ForwardMode, Layout, TracedNet, pruned_tensors, to_batch_first
from ..metrics import select_outputs
from ..rules.base import make_rule
from .curvature import per_example_square_grads

#: The kinds of tapped layers.
TAP_KINDS = ("linear", "conv", "embedding")


@dataclasses.dataclass
class Tap:
    """A layer whose inputs and output gradients are recorded during a pass.

    ``d_in`` is ``in_features`` (Linear, an attention input projection: ``E``), ``C_in * kh * kw`` (Conv2d) or
    the vocabulary size ``V`` (Embedding); ``d_out`` is the output width (``out_features``, ``C_out``, ``3E``,
    the embedding dimension). ``bias`` says whether its bias is trainable (then a ones column is appended to
    the inputs, the bias being the last column of the ``d_out x (d_in + 1)`` weight matrix; embeddings have
    none). ``weight_name`` / ``bias_name`` are the qualified parameter names (by default ``<name>.weight`` and
    ``<name>.bias``; an attention input projection has ``<prefix>.in_proj_weight`` /
    ``<prefix>.in_proj_bias``). ``padding_idx`` is an embedding's padding row (its gradient, hence its
    statistics, are zero).
    """

    name: str
    kind: str  # one of TAP_KINDS
    bias: bool
    d_in: int
    d_out: int
    weight_name: str = ""
    bias_name: str = ""
    padding_idx: int | None = None
    # filled during a forward pass, one entry per call of the module
    inp: list[torch.Tensor] = dataclasses.field(default_factory=list)
    out: list[torch.Tensor] = dataclasses.field(default_factory=list)
    #: per call, where the examples sit in its input and output (None: one per entry of the first axis)
    layouts: list[Layout | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        """Check the kind and fill in the parameter names from the layer name."""
        if self.kind not in TAP_KINDS:
            raise ValueError(f"unknown tap kind {self.kind!r}; expected one of {list(TAP_KINDS)}")
        pre = f"{self.name}." if self.name else ""
        self.weight_name = self.weight_name or pre + "weight"
        self.bias_name = self.bias_name or pre + "bias"


@dataclasses.dataclass
class TapSet:
    """What :func:`find_taps` found: the traced network, its taps, their modules, and the other parameters."""

    net: TracedNet
    taps: list[Tap]
    modules: dict[str, nn.Module]
    fallback: list[str]


def _query_key_value(node: fx.Node) -> list[Any]:
    """The ``query``, ``key`` and ``value`` arguments of a ``MultiheadAttention`` call node."""
    return [node.kwargs.get(n, node.args[i] if i < len(node.args) else None)
            for i, n in enumerate(("query", "key", "value"))]


#: why a layer called on a value that does not depend on the data is not tapped
_CONSTANT_INPUT = ("its input does not depend on the data (a positional embedding of torch.arange, a layer "
                   "of a constant or buffer): K-FAC's input factor is a statistic of per-example inputs")


def _attention_in_proj(mod: nn.MultiheadAttention, calls: list[fx.Node], net: TracedNet) -> str | None:
    """Why the joint input projection of an attention layer cannot be tapped (None when it can)."""
    if not calls:
        return "it is not called in the forward pass"
    for node in calls:
        if node.name in net.exact_nodes:  # run exactly: its attention rule refused the call (the reason)
            try:
                make_rule(node, net.gm)
            except UnsupportedOpError as e:
                return f"its call is not one the attention rule taps ({e})"
            return "its call is not one the attention rule taps"
    if not mod._qkv_same_embed_dim:
        return (f"it has separate q/k/v projection weights (kdim={mod.kdim}, vdim={mod.vdim}, "
                f"embed_dim={mod.embed_dim})")
    for node in calls:
        q, k, v = _query_key_value(node)
        if not (q is k and k is v):
            return (f"it is used for cross-attention at node {node.name!r} (query, key and value differ); "
                    "only self-attention's input projection is tapped")
    if not mod.in_proj_weight.requires_grad:
        return "its in_proj_weight is frozen but its in_proj_bias is trainable"
    return None


def find_taps(model: nn.Module, unsupported: str, who: str) -> TapSet:
    """Trace ``model`` and split its trainable parameters into tappable layers and the rest.

    Args:
        model: the network.
        unsupported: ``error`` to raise on a module with trainable parameters that cannot be tapped, or
            ``fallback`` to return its parameter names instead.
        who: the estimator's name, for error messages.

    Raises:
        UnsupportedOpError: the network cannot be traced or has an op without a rule; or, with
            ``unsupported="error"``, a layer that cannot be tapped (named with its type and the reason).
    """
    # the taps run the real network: ops without a rule (or refused by theirs) run exactly
    net = TracedNet(model, exact_unknown=True)
    called = {r.prefix for r in net.nodes_with(lambda r: r.module is not None)}
    # modules the graph calls on values that do not depend on the data (a positional embedding of arange)
    constant_calls = {str(n.target) for n in net.gm.graph.nodes if n.op == "call_module"} - called
    attention_calls: dict[str, list[fx.Node]] = {}
    for r in net.nodes_with(lambda r: isinstance(r.module, nn.MultiheadAttention)):
        attention_calls.setdefault(r.prefix, []).append(r.node)
    # parameters read directly by the graph (tied weights): a tap would miss those uses
    direct = {str(n.target) for n in net.gm.graph.nodes if n.op == "get_attr"}
    taps: list[Tap] = []
    modules: dict[str, nn.Module] = {}
    fallback: list[str] = []
    canonical = {id(p): n for n, p in model.named_parameters()}  # each tensor once, under its first name

    def refuse(mname: str, mod: nn.Module, why: str, names: list[str]) -> None:
        if unsupported == "fallback":
            fallback.extend(names)
            return
        raise UnsupportedOpError(f"{who} cannot handle layer {mname or '(root)'!r} "
                                 f"({type(mod).__name__}, trainable parameters {names}): {why}; pass "
                                 "unsupported='diag' to give its parameters a diagonal Gauss-Newton term")

    for mname, mod in model.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        prefix = f"{mname}." if mname else ""
        owner, _, leaf = mname.rpartition(".")
        parent = model.get_submodule(owner) if mname else None
        why = None
        pruned = pruned_tensors(mod)
        if pruned:
            why = (f"its {', '.join(pruned)} is pruned (torch.nn.utils.prune: computed from "
                   f"{pruned[0]}_orig and a mask); {who} taps a layer's own weight (prune.remove(module, "
                   f"{pruned[0]!r}) makes the pruned tensor a parameter again)")
        elif parametrize.is_parametrized(mod) or isinstance(mod, parametrize.ParametrizationList):
            why = ("a parametrization (weight_norm, spectral_norm, ...) computes its "
                   + ("weight" if parametrize.is_parametrized(mod) else "module's tensor")
                   + f"; {who} taps a layer's own weight")
        elif isinstance(parent, nn.MultiheadAttention) and leaf == "out_proj" and isinstance(mod, nn.Linear):
            # applied with F.linear by the attention rule, which records it under this name
            if not mod.weight.requires_grad:
                why = "its weight is frozen but its bias is trainable"
            elif owner not in attention_calls:
                why = "its attention layer is not called in the forward pass"
            elif any(n.name in net.exact_nodes for n in attention_calls[owner]):
                why = "its attention layer's call is not one the attention rule taps (see that layer)"
            elif any(prefix + n in direct for n, _ in own):
                why = "its weight is also used directly (tied weights)"
        elif type(mod) in (nn.Linear, nn.Conv2d):
            extra = [n for n, _ in own if n not in ("weight", "bias")]
            if not mod.weight.requires_grad:
                why = "its weight is frozen but its bias is trainable"
            elif extra:
                why = f"it has extra parameters {extra}"
            elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
                why = f"grouped convolution (groups={mod.groups})"
            elif mname in constant_calls:
                why = _CONSTANT_INPUT
            elif mname not in called:
                why = "it is not called in the forward pass (is its weight used directly?)"
        elif type(mod) is nn.Embedding:
            if not mod.weight.requires_grad:  # pragma: no cover - its only parameter
                why = "its weight is frozen"
            elif mname in constant_calls:
                why = _CONSTANT_INPUT
            elif mname not in called:
                why = "it is not called in the forward pass (is its weight used directly?)"
            elif prefix + "weight" in direct:
                why = "its weight is also used directly (tied weights)"
        elif isinstance(mod, nn.MultiheadAttention):
            names = [prefix + n for n, _ in own]
            why = _attention_in_proj(mod, attention_calls.get(mname, []), net)
            if why is None and any(n in direct for n in names):
                why = "its input projection is also used directly (tied weights)"
            if why is not None:
                refuse(mname, mod, why, names)
                continue
            bias = mod.in_proj_bias is not None and mod.in_proj_bias.requires_grad
            E = mod.embed_dim
            taps.append(Tap(prefix + "in_proj", "linear", bias, E, 3 * E, prefix + "in_proj_weight",
                            prefix + "in_proj_bias"))
            modules[prefix + "in_proj"] = mod
            appended = [prefix + n for n, p in own if n in ("bias_k", "bias_v") and p.requires_grad]
            if appended:  # (add_bias_kv: keys and values of their own, no layer's weights)
                refuse(mname, mod, "its add_bias_kv keys and values are no layer's weights", appended)
            continue
        else:
            why = (f"{who} supports nn.Linear, nn.Conv2d, nn.Embedding and nn.MultiheadAttention, "
                   f"not {type(mod).__name__}")
        if why is None:
            bias = getattr(mod, "bias", None) is not None and mod.bias.requires_grad
            if isinstance(mod, nn.Conv2d):
                d_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
                kind, d_out = "conv", mod.out_channels
            elif isinstance(mod, nn.Embedding):
                kind, d_in, d_out = "embedding", mod.num_embeddings, mod.embedding_dim
            else:
                kind, d_in, d_out = "linear", mod.in_features, mod.out_features
            pad = mod.padding_idx if isinstance(mod, nn.Embedding) else None
            # a weight tied to another module's (lm_head.weight = wte.weight) goes by its first name, the one
            # under which the model's parameters list it: both layers' terms then act on the same tensor
            taps.append(Tap(mname, kind, bias, d_in, d_out, weight_name=canonical[id(mod.weight)],
                            bias_name=canonical[id(mod.bias)] if bias else "", padding_idx=pad))
            modules[mname] = mod
        else:
            refuse(mname, mod, why, list(dict.fromkeys(canonical[id(p)] for _, p in own)))
    if not taps and not fallback:
        raise UsageError("the model has no trainable parameters")
    return TapSet(net, taps, modules, list(dict.fromkeys(fallback)))


def _patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches ``(B, T, C_in*kh*kw)`` in the weight's ``(C_in, kh, kw)`` order."""
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
    return cols.transpose(1, 2)


def _rows(t: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """``(R, ..., d)`` rows of a conv's patches as ``(B, -1, d)``: the rows of each example together."""
    if layout is None:
        return t
    t = to_batch_first(t, layout)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def tap_positions(tap: Tap, t: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
    """A layer output (or its gradient) as ``(B, T, d_out)``; ``layout``: where its examples are."""
    if tap.kind == "conv":
        return _rows(t.flatten(2).transpose(1, 2), layout)
    if layout is not None:
        t = to_batch_first(t, layout)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def tap_inputs(tap: Tap, module: nn.Module, x: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
    """The layer's input as ``(B, T, d_in [+ 1])`` (patches for convs; a ones column with a bias).

    An embedding's input is returned as its integer token ids ``(B, T)`` (the one-hot vectors are never
    formed). ``layout``: where the examples are in ``x`` (None: one per entry of its first axis; a conv's
    examples may only be merged with other rows of its first axis).
    """
    if layout is not None and tap.kind != "conv":
        x = to_batch_first(x, layout)
    if tap.kind == "embedding":
        return x.reshape(x.shape[0], -1)
    if tap.kind == "conv":
        a = _rows(_patches(cast(nn.Conv2d, module), x), layout)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.cat([a, a.new_ones((*a.shape[:-1], 1))], dim=-1) if tap.bias else a


def token_counts(tap: Tap, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_{b, t} onehot(ids[b, t])``: the diagonal of an embedding's summed one-hot outer products.

    The outer products are diagonal (one token per position); the count of ``padding_idx`` is set to 0.

    Args:
        tap: an embedding tap (its vocabulary size ``d_in`` and ``padding_idx``).
        ids: token ids ``(B, T)``.
        dtype: the floating dtype of the counts.

    Returns:
        ``(V,)``.
    """
    flat = ids.reshape(-1)
    out = torch.zeros(tap.d_in, dtype=dtype, device=ids.device)
    out.index_add_(0, flat, torch.ones(flat.shape, dtype=dtype, device=ids.device))
    if tap.padding_idx is not None:
        out[tap.padding_idx] = 0
    return out


class LayerTaps:
    """Records every tapped layer's input and output while the traced network runs (see :meth:`grads`).

    Use as a context manager (the recordings are cleared on exit). The model is never changed.
    """

    def __init__(self, model: nn.Module, found: TapSet) -> None:
        """Taps on ``model``'s layers found by :func:`find_taps` (``found``)."""
        self.model = model
        self.net = found.net
        self.taps = found.taps
        self.modules = found.modules
        self._by_name = {t.name: t for t in self.taps}

    def __enter__(self) -> LayerTaps:  # noqa: PYI034 (Self needs Python 3.11)
        """Start recording."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Clear the recordings."""
        for tap in self.taps:
            tap.inp, tap.out, tap.layouts = [], [], []

    def wants(self, name: str) -> bool:
        """Whether the layer called ``name`` is tapped (asked by the layer rules in forward mode)."""
        return name in self._by_name

    def record(self, name: str, inp: torch.Tensor, out: torch.Tensor, node: fx.Node | None = None,
               ) -> torch.Tensor:
        """Keep one call's input and output; returns the output to use downstream.

        That is a leaf that requires grad when nothing upstream does, so its gradient can be taken. ``node``:
        the graph node of the call, whose input's batch layout is kept with it (None: the rule gives its
        input and output with the examples first, one per entry).
        """
        tap = self._by_name[name]
        layouts = self.net.layouts or {}
        source = None if node is None else next(
            (a for a in node.all_input_nodes if a.name in self.net.data_nodes), None)
        tap.layouts.append(None if source is None else layouts.get(source.name))
        tap.inp.append(inp.detach())
        if not out.requires_grad:
            out = out.detach().requires_grad_(True)
        tap.out.append(out)
        return out

    def grads(self, x: torch.Tensor, W: torch.Tensor, outputs: Sequence[int] | None,
              ) -> tuple[dict[str, list[torch.Tensor]], Iterator[dict[str, list[torch.Tensor]]]]:
        """One forward pass on ``x``; returns the layers' inputs and an iterator over the output vectors.

        Returns:
            ``(inputs, per_vector)``: ``inputs[name]`` lists, per call of the layer, its input as
            ``(B, T, d_in [+1])`` (an embedding's: its token ids ``(B, T)``); each item of ``per_vector`` (one
            per column s of ``W``) maps a layer name to the per-example gradients ``(B, T, d_out)`` of
            ``sum_b W[b, :, s] . z_sel(x_b)`` w.r.t. each call's output. Examples do not interact (eval mode),
            so these are per-example gradients.
        """
        for tap in self.taps:
            tap.inp, tap.out, tap.layouts = [], [], []
        params = param_dict(self.model)
        if self.net.layouts is None:  # where each value keeps its examples (sequence-first blocks, ...)
            self.net.layouts = self.net.find_layouts(x, params)
        with torch.enable_grad():
            (z,) = self.net.run((x,), ForwardMode([params], taps=self))
            zs = select_outputs(z, outputs)
        inputs = {tap.name: [tap_inputs(tap, self.modules[tap.name], t, lay)
                             for t, lay in zip(tap.inp, tap.layouts, strict=True)]
                  for tap in self.taps}
        owner = [(tap, lay) for tap in self.taps for lay in tap.layouts]
        outs = [o for tap in self.taps for o in tap.out]

        def per_vector() -> Iterator[dict[str, list[torch.Tensor]]]:
            S = W.shape[2]
            for s in range(S):
                gs = torch.autograd.grad((zs * W[:, :, s]).sum(), outs, retain_graph=s < S - 1,
                                         allow_unused=True) if outs else ()  # (no layer tapped)
                res: dict[str, list[torch.Tensor]] = {tap.name: [] for tap in self.taps}
                for (tap, lay), g, o in zip(owner, gs, outs, strict=True):
                    g = torch.zeros_like(o) if g is None else g.detach()
                    res[tap.name].append(tap_positions(tap, g, lay))
                yield res
            for tap in self.taps:
                tap.inp, tap.out, tap.layouts = [], [], []

        return inputs, per_vector()


def tapped_square_grads(inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """``sum_b (per-example gradient of the layer's [weight | bias] matrix)^2`` from one layer's taps.

    ``inputs``/``grads`` list the calls of the layer: ``(B, T, d_in [+1])`` and ``(B, T, d_out)``. With one
    call and one position per example the per-example gradient ``g_b a_b^T`` is never formed:
    ``sum_b (g_b a_b^T)^2 = (g^2)^T (a^2)``. Otherwise each example's gradient (summed over positions and
    calls) is formed and squared.

    Returns:
        ``(d_out, d_in [+1])``.
    """
    wide = wide_dtype(grads[0].dtype)  # (squares of float16 gradients underflow, their sums overflow)
    if len(inputs) == 1 and inputs[0].shape[1] == 1:
        a, g = inputs[0][:, 0].to(wide), grads[0][:, 0].to(wide)
        return (g * g).T @ (a * a)
    per = None
    for a, g in zip(inputs, grads, strict=True):
        t = torch.einsum("bto,bti->boi", g.to(wide), a.to(wide))
        per = t if per is None else per + t
    assert per is not None
    return (per * per).sum(0)


def embedding_square_grads(tap: Tap, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """``sum_b (per-example gradient of an embedding's weight)^2`` from its taps, shaped ``(V, d)``.

    Example b's gradient is ``sum_t onehot(ids[b, t]) g[b, t]^T`` (over all positions of all calls): row v
    holds the sum of the output gradients at the positions of token v. It is formed only for the (example,
    token) pairs that occur (``index_add``), never as a ``(B, V, d)`` tensor or one-hot matrices. The row
    ``padding_idx`` is zero (PyTorch gives it no gradient).

    Args:
        tap: the embedding's tap.
        inputs: token ids ``(B, T)`` per call.
        grads: output gradients ``(B, T, d)`` per call.

    Returns:
        ``(V, d)``.
    """
    ids = torch.cat(inputs, dim=1)
    g = torch.cat(grads, dim=1)
    g = g.to(wide_dtype(g.dtype))
    B, T = ids.shape
    d = g.shape[-1]
    example = torch.arange(B, device=ids.device)[:, None].expand(B, T)
    pairs, which = torch.unique(example * tap.d_in + ids, return_inverse=True)  # (example, token) pairs
    per = g.new_zeros(pairs.shape[0], d).index_add_(0, which.reshape(-1), g.reshape(B * T, d))
    out = g.new_zeros(tap.d_in, d).index_add_(0, pairs % tap.d_in, per * per)
    if tap.padding_idx is not None:
        out[tap.padding_idx] = 0
    return out


def square_grads(
    model: nn.Module,
    x: torch.Tensor,
    W: torch.Tensor,
    names: Sequence[str],
    outputs: Sequence[int] | None,
    chunk_size: int = 32,
    taps: LayerTaps | None = None,
) -> dict[str, torch.Tensor]:
    """Like :func:`laftr.estimators.curvature.per_example_square_grads`, with the taps batched.

    The layers in ``taps`` get theirs from one batched backward pass per output vector
    (:func:`tapped_square_grads`, :func:`embedding_square_grads`); only the other parameters in ``names`` go
    through the per-example ``vmap``.
    """
    out: dict[str, torch.Tensor] = {}
    tapped: set[str] = set()
    if taps is not None and taps.taps:
        inputs, per_vector = taps.grads(x, W, outputs)
        acc: dict[str, torch.Tensor] = {}
        for grads in per_vector:
            for tap in taps.taps:
                if tap.kind == "embedding":
                    sq = embedding_square_grads(tap, inputs[tap.name], grads[tap.name])
                else:
                    sq = tapped_square_grads(inputs[tap.name], grads[tap.name])
                acc[tap.name] = sq if tap.name not in acc else acc[tap.name] + sq
        params = dict(model.named_parameters())
        for tap in taps.taps:
            if tap.kind == "embedding":
                out[tap.weight_name] = acc[tap.name]
                tapped.add(tap.weight_name)
                continue
            out[tap.weight_name] = acc[tap.name][:, : tap.d_in].reshape(params[tap.weight_name].shape)
            tapped.add(tap.weight_name)
            if tap.bias:
                out[tap.bias_name] = acc[tap.name][:, tap.d_in]
                tapped.add(tap.bias_name)
    rest = [n for n in names if n not in tapped]
    if rest:
        out.update(per_example_square_grads(model, x, W, rest, outputs, chunk_size))
    return {n: out[n] for n in names}
