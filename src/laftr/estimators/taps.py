"""The layers K-FAC and diag-Fisher tap, found on the same torch.fx trace that LAFTR interprets.

A *tap* is an ``nn.Linear`` or ``nn.Conv2d`` (groups 1) called as a module on data: its inputs and the gradients
of the outputs w.r.t. its output are recorded in one forward pass of the traced network (the interpreter's
forward mode, :class:`laftr.graph.ForwardMode`) and one backward pass per output vector. Tracing first means
every estimator refuses the same networks with the same :class:`~laftr.errors.UnsupportedOpError` (an op without
a rule, data-dependent control flow), and that no hook is ever put on the user's modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._util import param_dict
from ..errors import UnsupportedOpError
from ..graph import ForwardMode, TracedNet
from ..metrics import select_outputs
from .curvature import per_example_square_grads


@dataclasses.dataclass
class Tap:
    """A ``Linear`` or ``Conv2d`` layer whose inputs and output gradients are recorded during a pass.

    ``d_in`` is ``in_features`` (Linear) or ``C_in * kh * kw`` (Conv2d); ``bias`` says whether its bias is
    trainable (then a ones column is appended to the inputs, the bias being the last column of the
    ``d_out x (d_in + 1)`` weight matrix).
    """

    name: str
    kind: str  # "linear" | "conv"
    bias: bool
    d_in: int
    d_out: int
    # filled during a forward pass, one entry per call of the module
    inp: list[torch.Tensor] = dataclasses.field(default_factory=list)
    out: list[torch.Tensor] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TapSet:
    """What :func:`find_taps` found: the traced network, its taps, their modules, and the other parameters."""

    net: TracedNet
    taps: list[Tap]
    modules: dict[str, nn.Module]
    fallback: list[str]


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
    net = TracedNet(model)
    called = {r.prefix for r in net.nodes_with(lambda r: r.module is not None)}
    taps: list[Tap] = []
    modules: dict[str, nn.Module] = {}
    fallback: list[str] = []
    for mname, mod in model.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        prefix = f"{mname}." if mname else ""
        why = None
        if type(mod) in (nn.Linear, nn.Conv2d):
            extra = [n for n, _ in own if n not in ("weight", "bias")]
            if not mod.weight.requires_grad:
                why = "its weight is frozen but its bias is trainable"
            elif extra:
                why = f"it has extra parameters {extra}"
            elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
                why = f"grouped convolution (groups={mod.groups})"
            elif mname not in called:
                why = "it is not called in the forward pass (is its weight used directly?)"
        else:
            why = f"{who} supports nn.Linear and nn.Conv2d, not {type(mod).__name__}"
        if why is None:
            bias = mod.bias is not None and mod.bias.requires_grad
            if isinstance(mod, nn.Conv2d):
                d_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
                kind, d_out = "conv", mod.out_channels
            else:
                kind, d_in, d_out = "linear", mod.in_features, mod.out_features
            taps.append(Tap(mname, kind, bias, d_in, d_out))
            modules[mname] = mod
        elif unsupported == "fallback":
            fallback += [prefix + n for n, _ in own]
        else:
            raise UnsupportedOpError(f"{who} cannot handle layer {mname or '(root)'!r} ({type(mod).__name__}): {why}; "
                                     "pass unsupported='diag' to give its parameters a diagonal Gauss-Newton term")
    if not taps and not fallback:
        raise ValueError("the model has no trainable parameters")
    return TapSet(net, taps, modules, fallback)


def _patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches ``(B, T, C_in*kh*kw)`` in the weight's ``(C_in, kh, kw)`` order."""
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
    return cols.transpose(1, 2)


def tap_positions(tap: Tap, t: torch.Tensor) -> torch.Tensor:
    """A layer output (or its gradient) as ``(B, T, d_out)``."""
    if tap.kind == "conv":
        return t.flatten(2).transpose(1, 2)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def tap_inputs(tap: Tap, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(B, T, d_in [+ 1])`` (patches for convs; a ones column with a bias)."""
    a = _patches(module, x) if tap.kind == "conv" else x.reshape(x.shape[0], -1, x.shape[-1])  # type: ignore[arg-type]
    return torch.cat([a, a.new_ones((*a.shape[:-1], 1))], dim=-1) if tap.bias else a


class LayerTaps:
    """Records every tapped layer's input and output while the traced network runs (see :meth:`grads`).

    Use as a context manager (the recordings are cleared on exit). The model is never changed.
    """

    def __init__(self, model: nn.Module, found: TapSet) -> None:
        self.model = model
        self.net = found.net
        self.taps = found.taps
        self.modules = found.modules
        self._by_name = {t.name: t for t in self.taps}

    def __enter__(self) -> LayerTaps:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        for tap in self.taps:
            tap.inp, tap.out = [], []

    def wants(self, name: str) -> bool:
        """Whether the module called ``name`` is tapped (asked by the layer rules in forward mode)."""
        return name in self._by_name

    def record(self, name: str, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Keep one call's input and output; returns the output to use downstream (a leaf that requires grad
        when nothing upstream does, so its gradient can be taken)."""
        tap = self._by_name[name]
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
            ``(B, T, d_in [+1])``; each item of ``per_vector`` (one per column s of ``W``) maps a layer name to
            the per-example gradients ``(B, T, d_out)`` of ``sum_b W[b, :, s] . z_sel(x_b)`` w.r.t. each
            call's output. Examples do not interact (eval mode), so these are per-example gradients.
        """
        for tap in self.taps:
            tap.inp, tap.out = [], []
        with torch.enable_grad():
            (z,) = self.net.run((x,), ForwardMode([param_dict(self.model)], taps=self))
            zs = select_outputs(z, outputs)
        inputs = {tap.name: [tap_inputs(tap, self.modules[tap.name], t) for t in tap.inp] for tap in self.taps}
        owner = [tap for tap in self.taps for _ in tap.out]
        outs = [o for tap in self.taps for o in tap.out]

        def per_vector() -> Iterator[dict[str, list[torch.Tensor]]]:
            S = W.shape[2]
            for s in range(S):
                gs = torch.autograd.grad((zs * W[:, :, s]).sum(), outs, retain_graph=s < S - 1, allow_unused=True)
                res: dict[str, list[torch.Tensor]] = {tap.name: [] for tap in self.taps}
                for tap, g, o in zip(owner, gs, outs):
                    g = torch.zeros_like(o) if g is None else g.detach()
                    res[tap.name].append(tap_positions(tap, g))
                yield res
            for tap in self.taps:
                tap.inp, tap.out = [], []

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
    if len(inputs) == 1 and inputs[0].shape[1] == 1:
        a, g = inputs[0][:, 0], grads[0][:, 0]
        return (g * g).T @ (a * a)
    per = None
    for a, g in zip(inputs, grads):
        t = torch.einsum("bto,bti->boi", g, a)
        per = t if per is None else per + t
    assert per is not None
    return (per * per).sum(0)


def square_grads(
    model: nn.Module,
    x: torch.Tensor,
    W: torch.Tensor,
    names: Sequence[str],
    outputs: Sequence[int] | None,
    chunk_size: int = 32,
    taps: LayerTaps | None = None,
) -> dict[str, torch.Tensor]:
    """Like :func:`laftr.estimators.curvature.per_example_square_grads`, but ``Linear``/``Conv2d`` layers in
    ``taps`` get theirs from one batched backward pass per output vector (:func:`tapped_square_grads`); only the
    other parameters in ``names`` go through the per-example ``vmap``.
    """
    out: dict[str, torch.Tensor] = {}
    tapped: set[str] = set()
    if taps is not None and taps.taps:
        inputs, per_vector = taps.grads(x, W, outputs)
        acc: dict[str, torch.Tensor] = {}
        for grads in per_vector:
            for tap in taps.taps:
                sq = tapped_square_grads(inputs[tap.name], grads[tap.name])
                acc[tap.name] = sq if tap.name not in acc else acc[tap.name] + sq
        for tap in taps.taps:
            pre = f"{tap.name}." if tap.name else ""
            w: Any = taps.modules[tap.name].weight
            out[pre + "weight"] = acc[tap.name][:, : tap.d_in].reshape(w.shape)
            tapped.add(pre + "weight")
            if tap.bias:
                out[pre + "bias"] = acc[tap.name][:, tap.d_in]
                tapped.add(pre + "bias")
    rest = [n for n in names if n not in tapped]
    if rest:
        out.update(per_example_square_grads(model, x, W, rest, outputs, chunk_size))
    return {n: out[n] for n in names}
