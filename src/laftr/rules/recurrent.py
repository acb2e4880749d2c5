"""Recurrent layers: ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``, linearized step by step at theta0.

A recurrent layer is the same cell applied at every position: affine maps of the position's input and of the
previous hidden state, elementwise gates (sigmoid, tanh, ReLU) and products of two data tensors (LSTM's
``f * c + i * g`` and ``o * tanh(c)``, GRU's ``r * (W h + b)``, ``(1 - z) * n`` and ``z * h``). The rule runs
the recurrence itself and treats each part as laftr treats it anywhere else:

- the affine maps run exactly in each stream with that stream's weights;
- every gate nonlinearity at every position is a smooth gate (:class:`laftr.rules.SmoothGate`): its tangent
  ``a = c s + r`` at theta0's pre-activation (``gates="relu"``), or ``(c, r)`` drawn per unit, position,
  layer and direction from the four-point law of their moments recorded at theta0 (``gates="bernoulli"``);
- every product of two data tensors is bilinear, linearized at stream 0's factors.

So the layer gives exactly what the same recurrence written by hand with ``nn.Linear``, ``torch.sigmoid``,
``torch.tanh`` and ``*`` gives (tested in float64 with ``gates="relu"``, and with the sampled laws on one
input, where every law is a point), with one site per layer instead of one per gate and position. Its
stored statistic: ``(c, r)`` moments for ``(layers x directions, T, K x hidden)`` units, ``K`` = 1 (RNN),
3 (GRU: r, z, n) or 5 (LSTM: i, f, g, o and tanh of the cell). A ReLU RNN's gate has the same moment law
(its exact law is two-point; the four-point law matches its first two moments), so it is refused in the
sampling mode. There is no closed form (products of data), a given initial state and ``proj_size`` are
refused, and ``linearize="activations"`` runs the layer exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from .attention import bilinear_streams
from .base import Pair, Rule, data_pairs, register
from .gates import MomentLaw, sigmoid_slope, tanh_slope


def _mul(x: Tensor, y: Tensor) -> Tensor:
    return x * y


def _relu_slope(s: Tensor) -> Tensor:
    return (s > 0).to(s.dtype)


#: each gate nonlinearity: (function, slope)
_GATES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "sigmoid": (torch.sigmoid, sigmoid_slope), "tanh": (torch.tanh, tanh_slope),
    "relu": (torch.relu, _relu_slope)}


class _Pass:
    """One pass of the rule: the gates' linearizations, in the mode's way, for every unit block in turn.

    ``exact``: every stream's own gates and products; ``fit``: theta0's exact gates (one stream), their
    tangents ``(c, r)`` kept to be recorded; ``own``: the tangent at stream 0's pre-activation; ``sample``:
    ``(c, r)`` from the draw of the whole site, one block (layer and direction, position, gate) at a time.
    """

    def __init__(self, rule: RecurrentRule, mode: Any, method: str, like: Tensor, T: int) -> None:
        self.rule, self.method = rule, method
        self.c: Tensor | None = None
        self.r: Tensor | None = None
        if self.method == "fit":
            units = (rule.blocks, T, rule.K * rule.hidden)
            self.c = like.new_zeros((like.shape[0], *units), dtype=torch.float64)
            self.r = torch.zeros_like(self.c)
        elif self.method == "sample":
            law: MomentLaw = mode.law(rule)
            want = (rule.blocks, T, rule.K * rule.hidden)
            if tuple(law.points_c.shape[2:]) != want:
                raise ValueError(f"recurrent site {rule.name!r}: summary has units of shape "
                                 f"{tuple(law.points_c.shape[2:])}, the network produces {want} (another "
                                 "sequence length?)")
            self.c, self.r = mode.draw(rule, law, like)

    def gate(self, kind: str, pre: tuple[Tensor, ...], block: int, t: int, k: int) -> tuple[Tensor, ...]:
        """The ``k``-th gate of ``block`` at position ``t`` on the streams' pre-activations ``pre``."""
        fn, slope = _GATES[kind]
        H = self.rule.hidden
        cols = slice(k * H, (k + 1) * H)
        if self.method == "exact":
            return tuple(fn(p) for p in pre)
        s0 = pre[0]
        if self.method == "fit":
            a0 = fn(s0)
            assert self.c is not None and self.r is not None
            c = slope(s0).to(torch.float64)
            self.c[:, block, t, cols] = c
            self.r[:, block, t, cols] = a0.to(torch.float64) - c * s0.to(torch.float64)
            return (a0,)
        if self.method == "own":
            a0 = fn(s0)
            c = slope(s0).detach()
            return (a0, *(a0 + c * (p - s0) for p in pre[1:]))
        assert self.c is not None and self.r is not None
        c, r = self.c[:, block, t, cols], self.r[:, block, t, cols]
        return tuple(p * c + r for p in pre)

    def product(self, x: tuple[Tensor, ...], y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``x * y`` of two data tensors: exact (also while fitting), else bilinear at stream 0's factors."""
        if self.method in ("exact", "fit"):
            return tuple(a * b for a, b in zip(x, y, strict=True))
        return bilinear_streams(_mul, x, y)

    def record(self, mode: Any) -> None:
        """Fit: add this batch's tangents to the site's sums."""
        if self.method == "fit":
            assert self.c is not None and self.r is not None
            c, r = self.c, self.r
            for key, val in (("c", c), ("r", r), ("cc", c * c), ("cr", c * r), ("rr", r * r)):
                mode.add(self.rule.name, key, val)


@register(nn.RNN, nn.GRU, nn.LSTM)
class RecurrentRule(Rule):
    """``nn.RNN`` (tanh or ReLU), ``nn.GRU`` and ``nn.LSTM``, any number of layers, one or two directions.

    ``batch_first`` either way, with or without biases; dropout between layers is off (as every dropout while
    estimating, also when the network is in training mode). Refused:
    ``proj_size``, a given initial state ``hx``, a packed sequence, and the closed form.
    """

    family = "recurrent"
    site = True

    def native_batch_axis(self) -> int:
        """0 with ``batch_first``, else 1."""
        return 0 if cast(nn.RNNBase, self.module).batch_first else 1

    def setup(self) -> None:
        """Read the layer's shape; refuse what the rule does not cover."""
        mod = self.module
        assert isinstance(mod, nn.RNNBase)
        if getattr(mod, "proj_size", 0):
            raise self.refuse("proj_size > 0 (an LSTM with projections) is not supported")
        hx = self.node.args[1] if len(self.node.args) > 1 else self.node.kwargs.get("hx")
        if hx is not None:
            raise self.refuse("a given initial state (hx) is not supported: the state starts at zero")
        self.kind = {nn.LSTM: "lstm", nn.GRU: "gru"}.get(type(mod), "rnn")
        if self.kind == "rnn" and mod.mode not in ("RNN_TANH", "RNN_RELU"):  # pragma: no cover - torch's own
            raise self.refuse(f"unknown RNN mode {mod.mode!r}")
        self.nonlinearity = "relu" if mod.mode == "RNN_RELU" else "tanh"
        self.K = {"lstm": 5, "gru": 3, "rnn": 1}[self.kind]
        self.hidden = int(mod.hidden_size)
        self.layers = int(mod.num_layers)
        self.directions = 2 if mod.bidirectional else 1
        self.blocks = self.layers * self.directions

    def params(self) -> dict[str, Any]:
        """The cell, its size, layers, directions and nonlinearity, which a stored summary must match."""
        return {"cell": self.kind, "hidden": self.hidden, "layers": self.layers,
                "directions": self.directions, "nonlinearity": self.nonlinearity}

    def _weights(self, params: dict[str, Tensor], layer: int, direction: int,
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(W_ih, W_hh, b_ih, b_hh)`` of one layer and direction in one stream (biases None without)."""
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        p = self.prefix + "."
        return (params[p + "weight_ih" + suffix], params[p + "weight_hh" + suffix],
                params.get(p + "bias_ih" + suffix), params.get(p + "bias_hh" + suffix))

    def _input(self, args: Any, kwargs: Any) -> Pair:
        x = data_pairs((args, kwargs))
        if len(x) != 1 or not isinstance(args[0], Pair) or args[0] is not x[0]:
            raise self.refuse("only the input sequence may depend on the data")
        if not all(isinstance(v, Tensor) for v in x[0].vals):
            raise self.refuse("the input must be a tensor (a packed sequence is not supported)")
        return x[0]

    def run(self, mode: Any, args: Any, kwargs: Any, method: str) -> Any:
        """The recurrence over every layer, direction and position, linearized as ``method`` says.

        ``exact`` (every stream's own layer, written with ops that have forward-mode derivatives, which
        PyTorch's fused LSTM kernel lacks: the NTK baseline's ``jvp`` runs through it), ``fit`` (theta0 alone,
        recording), ``own`` or ``sample``.
        """
        mod = self.module
        assert isinstance(mod, nn.RNNBase)
        x = self._input(args, kwargs)
        n = len(x.vals)
        seqs = tuple(v if mod.batch_first else v.transpose(0, 1) for v in x.vals)  # (B, T, F)
        if seqs[0].ndim != 3:
            raise self.refuse(f"expected a batched (3-d) input sequence, got {seqs[0].ndim} dimensions")
        T = int(seqs[0].shape[1])
        run = _Pass(self, mode, method, seqs[0], T)
        finals_h: list[tuple[Tensor, ...]] = []
        finals_c: list[tuple[Tensor, ...]] = []
        for layer in range(self.layers):
            outs = []
            for d in range(self.directions):
                block = layer * self.directions + d
                ws = [self._weights(mode.params[s], layer, d) for s in range(n)]
                inp = Pair(seqs, True)
                inp = mode.inner(self, f"ih{block}", inp)
                # the input's affine map at every position at once, in each stream
                xw = tuple(torch.nn.functional.linear(v, w[0], w[2])
                           for v, w in zip(inp.vals, ws, strict=True))
                steps = range(T - 1, -1, -1) if d else range(T)
                h: tuple[Tensor, ...] = tuple(v.new_zeros(v.shape[0], self.hidden) for v in xw)
                c: tuple[Tensor, ...] = h
                hs: list[tuple[Tensor, ...]] = [()] * T
                first = True
                for t in steps:
                    if first:  # the zero state: W h + b is the bias alone, and it is no data
                        hh = tuple(w[3].expand(v.shape[0], -1) if w[3] is not None else v.new_zeros(
                            v.shape[0], w[1].shape[0]) for v, w in zip(xw, ws, strict=True))
                    else:
                        hp = mode.inner(self, f"hh{block}.{t}", Pair(h, True))
                        hh = tuple(torch.nn.functional.linear(v, w[1], w[3])
                                   for v, w in zip(hp.vals, ws, strict=True))
                    xt = tuple(v[:, t] for v in xw)
                    h, c = self._cell(run, xt, hh, None if first else h, None if first else c, block, t)
                    hs[t] = h
                    first = False
                finals_h.append(h)
                finals_c.append(c)
                outs.append(tuple(torch.stack([hs[t][s] for t in range(T)], 1) for s in range(n)))
            seqs = outs[0] if self.directions == 1 else tuple(
                torch.cat([outs[0][s], outs[1][s]], -1) for s in range(n))
        run.record(mode)
        out = []
        for s in range(n):
            y = seqs[s] if mod.batch_first else seqs[s].transpose(0, 1)
            h_n = torch.stack([f[s] for f in finals_h])
            out.append((y, (h_n, torch.stack([f[s] for f in finals_c]))) if self.kind == "lstm" else (y, h_n))
        return Pair(tuple(out), True)

    def _cell(self, run: _Pass, xt: tuple[Tensor, ...], hh: tuple[Tensor, ...], h: tuple[Tensor, ...] | None,
              c: tuple[Tensor, ...] | None, block: int, t: int, state_data: bool = True,
              ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """One step of the cell in every stream: the new hidden state (and the LSTM's cell state).

        ``h`` / ``c`` None: the zero state (``hh`` is then ``W_hh 0 + b_hh``). ``state_data`` False: a state
        that does not depend on the data, whose products with the gates are exact in each stream.
        """
        H = self.hidden

        def part(v: tuple[Tensor, ...], k: int) -> tuple[Tensor, ...]:
            return tuple(a[:, k * H:(k + 1) * H] for a in v)

        def add(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return tuple(u + w for u, w in zip(a, b, strict=True))

        def times(a: tuple[Tensor, ...], b: tuple[Tensor, ...], data: bool) -> tuple[Tensor, ...]:
            # a product with the state (or with W_hh h + b_hh): bilinear when the state is data
            return run.product(a, b) if data else tuple(u * w for u, w in zip(a, b, strict=True))

        state = state_data and h is not None
        if self.kind == "rnn":
            new = run.gate(self.nonlinearity, add(xt, hh), block, t, 0)
            return new, new
        if self.kind == "gru":
            r = run.gate("sigmoid", add(part(xt, 0), part(hh, 0)), block, t, 0)
            z = run.gate("sigmoid", add(part(xt, 1), part(hh, 1)), block, t, 1)
            # r * (W_hn h + b_hn): at the zero state the second factor is the bias, a parameter (no data)
            rn = times(r, part(hh, 2), state)
            nn_ = run.gate("tanh", add(part(xt, 2), rn), block, t, 2)
            keep = run.product(tuple(1 - v for v in z), nn_)
            if h is None:
                return keep, keep
            new = add(keep, times(z, h, state))
            return new, new
        gates = add(xt, hh)
        i = run.gate("sigmoid", part(gates, 0), block, t, 0)
        f = run.gate("sigmoid", part(gates, 1), block, t, 1)
        g = run.gate("tanh", part(gates, 2), block, t, 2)
        o = run.gate("sigmoid", part(gates, 3), block, t, 3)
        ig = run.product(i, g)
        c_new = ig if c is None else add(times(f, c, state_data), ig)
        tc = run.gate("tanh", c_new, block, t, 4)
        return run.product(o, tc), c_new

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The layer run exactly in every stream (dropout between layers off, as every dropout here)."""
        return self.run(mode, args, kwargs, "exact")

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's recurrence on real data, recording every gate's tangent."""
        return self.run(mode, args, kwargs, "fit")

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's own linearization: each gate's tangent at theta0's pre-activation on each input."""
        return self.run(mode, args, kwargs, "own")

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Each gate's tangent drawn from its stored law (refused for a ReLU RNN: see the module)."""
        if self.kind == "rnn" and self.nonlinearity == "relu":
            raise self.refuse("a ReLU RNN's gates have a two-point law that the stored moment law does not "
                              "reproduce; use gates='relu' (theta0's own linearization) or write the "
                              "recurrence with nn.Linear and torch.relu")
        return self.run(mode, args, kwargs, "sample")

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Refused: the recurrence multiplies data tensors."""
        raise self.refuse("laftr-exact has no closed form for a recurrent layer (products of data tensors "
                          "and a recurrence); use the Monte Carlo 'laftr' estimator")

    def law(self, sums: dict[str, Tensor], counts: Tensor, device: torch.device, dtype: torch.dtype) -> Any:
        """The four-point law of every gate's tangent, per group and unit."""
        return MomentLaw(sums, counts, device, dtype)


@register(nn.RNNCell, nn.GRUCell, nn.LSTMCell)
class CellRule(RecurrentRule):
    """``nn.RNNCell``, ``nn.GRUCell`` and ``nn.LSTMCell``: one step of the recurrence.

    A loop over positions calls the cell once per position, each call a site of its own. The step is the
    layer's (:class:`RecurrentRule`): affine maps exact in each stream, gates smooth gates,
    products of data bilinear at theta0's factors. The state ``hx`` (``(h, c)`` for the LSTM cell) is the
    previous step's output (data), a constant (e.g. zeros), or None (zeros). An unbatched (1-d) input is
    refused.
    """

    family = "recurrent_cell"

    def native_batch_axis(self) -> int:
        """0."""
        return 0

    def setup(self) -> None:
        """Read the cell's kind and size."""
        mod = self.module
        assert isinstance(mod, nn.RNNCellBase)
        self.kind = {nn.LSTMCell: "lstm", nn.GRUCell: "gru"}.get(type(mod), "rnn")
        self.nonlinearity = getattr(mod, "nonlinearity", "tanh")
        self.K = {"lstm": 5, "gru": 3, "rnn": 1}[self.kind]
        self.hidden = int(mod.hidden_size)
        self.layers, self.directions, self.blocks = 1, 1, 1

    def _weights(self, params: dict[str, Tensor], layer: int, direction: int,
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        p = self.prefix + "."
        return (params[p + "weight_ih"], params[p + "weight_hh"], params.get(p + "bias_ih"),
                params.get(p + "bias_hh"))

    def run(self, mode: Any, args: Any, kwargs: Any, method: str) -> Any:
        """One step in every stream, linearized as ``method`` says (see :meth:`RecurrentRule.run`)."""
        x = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if not (isinstance(x, Pair) and x.data):
            raise self.refuse("its input must depend on the data")
        n = len(x.vals)
        if x.vals[0].ndim != 2:
            raise self.refuse(f"expected a batched (2-d) input, got {x.vals[0].ndim} dimensions")

        def streams(v: Any) -> tuple[tuple[Tensor, ...] | None, bool]:
            if v is None:
                return None, False
            if isinstance(v, Pair):
                return tuple(v.vals[s] if len(v.vals) > 1 else v.vals[0] for s in range(n)), v.data
            return tuple(v for _ in range(n)), False

        if isinstance(hx, Pair) and hx.vals and isinstance(hx.vals[0], (tuple, list)):
            # the (h, c) an LSTM cell returned, passed on whole: one pair per stream
            if any(len(v) != 2 for v in hx.vals):
                raise self.refuse("an LSTM cell's state must be a pair (h, c)")
            hx = (Pair(tuple(v[0] for v in hx.vals), hx.data), Pair(tuple(v[1] for v in hx.vals), hx.data))
        if self.kind == "lstm" and hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise self.refuse("an LSTM cell's state must be a pair (h, c)")
            (h, h_data), (c, c_data) = streams(hx[0]), streams(hx[1])
        else:
            (h, h_data), (c, c_data) = streams(hx), (None, False)
        state_data = h_data or c_data
        ws = [self._weights(mode.params[s], 0, 0) for s in range(n)]
        inp = mode.inner(self, "ih0", x)
        xw = tuple(torch.nn.functional.linear(v, w[0], w[2]) for v, w in zip(inp.vals, ws, strict=True))
        if h is None:
            hh = tuple(w[3].expand(v.shape[0], -1) if w[3] is not None
                       else v.new_zeros(v.shape[0], w[1].shape[0]) for v, w in zip(xw, ws, strict=True))
        else:
            hp = mode.inner(self, "hh0.0", Pair(h, True)) if h_data else Pair(h, False)
            hh = tuple(torch.nn.functional.linear(v, w[1], w[3]) for v, w in zip(hp.vals, ws, strict=True))
        if self.kind == "lstm" and h is not None and c is None:
            c = tuple(torch.zeros_like(v) for v in h)
        run = _Pass(self, mode, method, xw[0], 1)
        new_h, new_c = self._cell(run, xw, hh, h, c, 0, 0, state_data)
        run.record(mode)
        if self.kind == "lstm":
            return Pair(tuple((new_h[s], new_c[s]) for s in range(n)), True)
        return Pair(new_h, True)


__all__ = ["CellRule", "RecurrentRule"]
