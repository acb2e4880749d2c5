"""Elementwise activations: the general gate of METHOD.md section 6.

An activation ``a = phi(s)`` is linearized at theta0's pre-activation s0 as the tangent ``a = c * s + r`` with
slope ``c = phi'(s0)`` and intercept ``r = phi(s0) - c * s0``; both streams use the same ``(c, r)``, so
``a - a0 = c * (s - s0)``. LAFTR draws ``(c, r)`` per unit from a law fitted at theta0 on the data,
independently across units and of the input; ``gates="relu"`` uses theta0's own tangent on each input.

- :class:`PiecewiseLinearGate` (ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh, clamp, Threshold, Hardsigmoid,
  Hardshrink, Softshrink, RReLU in eval mode): the tangent is one of K pieces, so the law is exact and
  discrete: the frequency of each piece per unit, K - 1 stored floats per unit (ReLU: the activation
  probability mu).
- :class:`SmoothGate` (GELU, SiLU, Tanh, Sigmoid, Softplus, ELU, CELU, SELU, Mish, Hardswish, LogSigmoid,
  Softsign, Tanhshrink): the law of ``(c, r)`` is continuous; we store its exact first and second moments
  (5 floats per unit: the means of c and r and their 2x2 covariance) and sample the four-point law
  ``mean +- sqrt(2 lambda_j) v_j`` (eigenpairs of the covariance, probability 1/4 each), whose mean and
  covariance are exactly the stored ones and whose points stay within a few standard deviations of the mean.
  The closed form needs only these moments, so it is exact for any law with them.
"""

from __future__ import annotations

import math
import operator
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._util import eigh_on_host
from ..moments import GateMoments
from .base import ELEMENTWISE_FUNCTIONS, Pair, Rule, register, registered_targets, stream_of
from .norm import ScaleLaw


def gate_families() -> set[str]:
    """The families of every registered activation (gate rules that ``linearize="activations"`` linearizes).

    The built-in activations and the user's; not the elementwise math of the data (``exp``, ``sqrt``, ...).
    """
    return {cls.family for table in registered_targets().values() for cls in table.values()
            if issubclass(cls, GateRule) and cls.activation}


def _check_units(kind: str, site: str, stored: Any, s0: torch.Tensor) -> None:
    """Refuse a value whose units (its shape after the batch axis) are not those the law was fitted on."""
    if tuple(stored) != tuple(s0.shape[1:]):
        raise ValueError(f"{kind} site {site!r}: summary has units of shape {tuple(stored)}, the network "
                         f"produces {tuple(s0.shape[1:])} (input of another size?)")


# ---------------------------------------------------------------------------------------------- laws
class DiscreteLaw:
    """Per group and unit, the probability of pieces ``1..K-1``: ``(G, K-1, *units)``.

    Piece 0 has the rest.
    """

    def __init__(self, probs: torch.Tensor) -> None:
        """Wrap the piece probabilities ``(G, K-1, *units)``."""
        self.probs = probs
        self.num_pieces = probs.shape[1] + 1

    def draw(self, groups: torch.Tensor, gen: torch.Generator, shared: bool,
             like: torch.Tensor) -> torch.Tensor:
        """Piece index per (sample, unit): ``(n, *units)`` long.

        ``(1, *units)`` when shared (and ungrouped).
        """
        G, units = self.probs.shape[0], tuple(self.probs.shape[2:])
        n = 1 if shared else int(groups.shape[0])
        if G == 1:
            p = self.probs[0]  # (K-1, *units)
            u = torch.rand((n, *units), generator=gen, device=like.device, dtype=like.dtype)
        else:
            p = self.probs.index_select(0, groups.to(self.probs.device)).movedim(1, 0)  # (K-1, n, *units)
            u = torch.rand((n, *units), generator=gen, device=gen.device, dtype=like.dtype).to(like.device)
        if self.num_pieces == 2:
            return (u < p[0]).long()
        k = torch.zeros(u.shape if G == 1 else torch.broadcast_shapes(u.shape, p.shape[1:]), dtype=torch.long,
                        device=u.device)
        cum = torch.zeros_like(p[0])
        for j in range(1, self.num_pieces):
            cum = cum + p[j - 1]
            k = torch.where((k == 0) & (u < cum), j, k)
        return k

    def piece_probs(self, g: int) -> list[torch.Tensor]:
        """``[pi_0, ..., pi_{K-1}]`` of group ``g``, each ``(*units)``."""
        rest = [self.probs[g, j] for j in range(self.num_pieces - 1)]
        total = rest[0]
        for t in rest[1:]:
            total = total + t
        return [1 - total, *rest]


class MomentLaw:
    """Exact first and second moments of ``(c, r)`` per group and unit; samples the four sigma points."""

    KEYS: ClassVar[tuple[str, ...]] = ("c", "r", "cc", "cr", "rr")

    def __init__(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> None:
        """Turn the stored sums into the means and the four-point law of ``(c, r)`` per group and unit."""
        n = counts.clamp_min(1).view(-1, *([1] * (sums["c"].ndim - 1)))
        m = {k: sums[k] / n for k in self.KEYS}  # float64 means
        self.mean = {k: v.to(device, dtype) for k, v in m.items()}
        vcc = m["cc"] - m["c"] ** 2
        vcr = m["cr"] - m["c"] * m["r"]
        vrr = m["rr"] - m["r"] ** 2
        cov = torch.stack([torch.stack([vcc, vcr], -1), torch.stack([vcr, vrr], -1)], -2)  # (G, *units, 2, 2)
        evals, evecs = eigh_on_host(cov)
        off = evecs * (2 * evals.clamp_min(0)).sqrt().unsqueeze(-2)  # columns: sqrt(2 lambda_j) v_j
        center = torch.stack([m["c"], m["r"]], -1)  # (G, *units, 2)
        pts = torch.stack([center + off[..., 0], center - off[..., 0], center + off[..., 1],
                           center - off[..., 1]],
                          1)  # (G, 4, *units, 2)
        self.points_c = pts[..., 0].to(device, dtype)
        self.points_r = pts[..., 1].to(device, dtype)

    def draw(self, groups: torch.Tensor, gen: torch.Generator, shared: bool, like: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tangents ``(c, r)`` drawn from the four-point law, each ``(n, *units)`` (``n = 1`` if shared)."""
        G, units = self.points_c.shape[0], tuple(self.points_c.shape[2:])
        n = 1 if shared else int(groups.shape[0])
        idx = torch.randint(0, 4, (n, *units), generator=gen, device=gen.device).to(like.device)
        if G == 1:
            pc, pr = self.points_c[0].unsqueeze(0), self.points_r[0].unsqueeze(0)
            rows = n
        else:
            g = groups.to(self.points_c.device)
            pc, pr = self.points_c.index_select(0, g), self.points_r.index_select(0, g)
            rows = pc.shape[0]
            idx = idx.expand(rows, *units)
        pc = pc.expand(rows, 4, *units)
        pr = pr.expand(rows, 4, *units)
        return pc.gather(1, idx.unsqueeze(1)).squeeze(1), pr.gather(1, idx.unsqueeze(1)).squeeze(1)

    def moments(self, g: int) -> dict[str, torch.Tensor]:
        """The means of ``c``, ``r``, ``c^2``, ``c r`` and ``r^2`` per unit in group ``g``."""
        return {k: v[g] for k, v in self.mean.items()}


# ---------------------------------------------------------------------------------------------- base
class GateRule(Rule):
    """An elementwise activation (the data input is the op's first argument)."""

    family: ClassVar[str] = "gate"
    site: ClassVar[bool] = True
    #: whether ``linearize="activations"`` linearizes it: the activation functions do; elementwise math of
    #: the data (``exp``, ``sqrt``, ``pow``, ...: a normalization or a softmax written by hand) runs exactly
    activation: ClassVar[bool] = True

    def pre(self, args: Any, kwargs: Any) -> Pair:
        """The pre-activation pair; refuses other data-dependent arguments (a bound computed from data)."""
        return self.data_input(args, kwargs)

    def batch_movable(self, layout: tuple[int, int, int], ndim: int) -> bool:
        """True: elementwise."""
        return True

    def real(self, mode: Any, args: Any, kwargs: Any, s: int = 0) -> torch.Tensor:
        """The exact op in stream ``s``."""
        return self.call(mode.params[s], stream_of(args, s), stream_of(kwargs, s))

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream runs the activation exactly (after checking its one data input)."""
        self.pre(args, kwargs)
        return Pair(self.call_streams(mode, args, kwargs), True)


def _flat(t: Any, n_units: int, unit_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A piece value (a float or a tensor broadcastable to the unit shape) as ``(n,)``."""
    if isinstance(t, torch.Tensor):
        return t.to(like).expand(unit_shape).reshape(n_units)
    return like.new_full((n_units,), float(t))


class PiecewiseLinearGate(GateRule):
    """An activation that is linear on each of ``K`` pieces: ``phi(s) = c_k s + r_k`` for s in piece k.

    Subclasses give :meth:`pieces` (the ``(c_k, r_k)``, floats or tensors broadcastable to one example's
    units, possibly depending on the stream's parameters) and :meth:`piece_index` (which piece theta0's
    pre-activation is in). Piece 0 should be the one most units are not in (it stores nothing).
    """

    family = "piecewise"
    stream_specific: ClassVar[bool] = False
    #: Whether the op is continuous. It is not when the op has jumps, as Hardshrink and Threshold with
    #: ``value != threshold`` have: there the FSD has a term of first order in ``|theta - theta0|`` from
    #: examples that cross a jump, which no linearization captures.
    continuous: ClassVar[bool] = True

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """``[(c_0, r_0), ..., (c_{K-1}, r_{K-1})]`` for one stream (its parameters and arguments).

        Tensor values broadcast against one example's units (``unit_ndim`` dimensions).
        """
        raise NotImplementedError

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """The piece each element of theta0's pre-activation ``s0`` lies in (long, same shape)."""
        raise NotImplementedError

    def num_pieces(self) -> int:
        """K (the default asks :meth:`pieces` of a rule whose pieces do not depend on parameters)."""
        return len(self.pieces({}, (), 1))

    # ------------------------------------------------------------------ helpers
    def _stream_pieces(self, mode: Any, args: Any, s: int, unit_ndim: int) -> list[tuple[Any, Any]]:
        return self.pieces(mode.params[s], stream_of(args, s), unit_ndim)

    @staticmethod
    def _select(values: list[Any], k: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """The value of each element's piece; None when every piece's value is zero."""
        if all(not isinstance(v, torch.Tensor) and float(v) == 0.0 for v in values):
            return None
        if all(not isinstance(v, torch.Tensor) for v in values):
            table = torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)
            return table[k]
        out = values[0] if isinstance(values[0], torch.Tensor) else like.new_tensor(float(values[0]))
        out = out.to(like)
        for j in range(1, len(values)):
            v = values[j]
            v = v.to(like) if isinstance(v, torch.Tensor) else like.new_tensor(float(v))
            out = torch.where(k == j, v, out)
        return out

    def _apply(self, mode: Any, args: Any, pre: Pair, k: torch.Tensor) -> Pair:
        outs = []
        cached: tuple[Any, Any] | None = None
        for s, v in enumerate(pre.vals):
            if cached is None or self.stream_specific:
                pieces = self._stream_pieces(mode, args, s, v.ndim - 1)
                c = self._select([p[0] for p in pieces], k, v)
                r = self._select([p[1] for p in pieces], k, v)
                cached = (c, r)
            c, r = cached
            out = v * c if c is not None else torch.zeros_like(v)
            outs.append(out if r is None else out + r)
        return Pair(tuple(outs), True)

    # ------------------------------------------------------------------ modes
    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact activation, recording which piece each unit is in."""
        pre = self.pre(args, kwargs)
        s0 = pre.vals[0]
        k = self.piece_index(s0)
        for j in range(1, self.num_pieces()):
            mode.add(self.name, f"p{j}", k == j)
        return Pair((self.real(mode, args, kwargs),), True)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's own linearization: each unit takes the piece theta0's pre-activation is in."""
        pre = self.pre(args, kwargs)
        return self._apply(mode, args, pre, self.piece_index(pre.vals[0]))

    def sample_separable(self, mode: Any) -> bool:
        """True: the drawn pieces are shared; each stream takes its own pieces' slopes and intercepts."""
        return True

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Monte Carlo: each unit's piece drawn from the stored piece frequencies."""
        pre = self.pre(args, kwargs)
        law: DiscreteLaw = mode.law(self)
        s0 = pre.vals[0]
        _check_units("gate", self.name, law.probs.shape[2:], s0)
        k = mode.draw(self, law, s0)
        return self._apply(mode, args, pre, k)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The closed form: the gate moments of ``(c, r)`` under the stored piece frequencies."""
        pre = self.pre(args, kwargs)
        law: DiscreteLaw = mode.law(self)
        probs = [p.reshape(-1) for p in law.piece_probs(mode.group)]
        n = probs[0].numel()
        unit_shape = tuple(law.probs.shape[2:])
        like = mode.state.like
        probs = [p.to(like) for p in probs]
        streams = [0, 1] if self.stream_specific else [0]
        nd = len(unit_shape)
        cs = {s: [_flat(c, n, unit_shape, like) if isinstance(c, torch.Tensor) else float(c)
                  for c, _ in self._stream_pieces(mode, args, s, nd)] for s in streams}
        rs = {s: [_flat(r, n, unit_shape, like) if isinstance(r, torch.Tensor) else float(r)
                  for _, r in self._stream_pieces(mode, args, s, nd)] for s in streams}

        def expect(f: Any) -> torch.Tensor:
            total: torch.Tensor | None = None
            for j, p in enumerate(probs):
                t = p * f(j)
                total = t if total is None else total + t
            assert total is not None
            return total

        def prod(x: Any, y: Any) -> Any:
            return x * y

        c1 = [expect(lambda j, s=s: cs[s][j]) for s in streams]
        keys = [(a, b) for a in range(len(streams)) for b in range(len(streams))]
        c2 = {(a, b): expect(lambda j, a=a, b=b: prod(cs[streams[a]][j], cs[streams[b]][j])) for a, b in keys}
        has_r = any(isinstance(r, torch.Tensor) or r != 0.0 for s in streams for r in rs[s])
        gm = GateMoments(c1=c1, c2=c2)
        if has_r:
            gm.r1 = [expect(lambda j, s=s: rs[s][j]) for s in streams]
            gm.cr = {(a, b): expect(lambda j, a=a, b=b: prod(cs[streams[a]][j], rs[streams[b]][j]))
                     for a, b in keys}
            gm.r2 = {(a, b): expect(lambda j, a=a, b=b: prod(rs[streams[a]][j], rs[streams[b]][j]))
                     for a, b in keys}
        return mode.gate(pre, gm)

    def law(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> Any:
        """The stored piece counts turned into a (private) ``DiscreteLaw`` on ``device`` in ``dtype``."""
        K = self.num_pieces()
        first = sums["p1"]
        n = counts.clamp_min(1).view(-1, *([1] * (first.ndim - 1)))
        probs = torch.stack([sums[f"p{j}"] / n for j in range(1, K)], 1)
        return DiscreteLaw(probs.to(device, dtype))


class SmoothGate(GateRule):
    """A smooth activation.

    Subclasses may give :meth:`slope` (``phi'``) in closed form; the default takes it from autograd, which is
    exact for any elementwise op, so a user's activation needs no formula.
    """

    family = "smooth"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``phi'(s)`` elementwise (default: autograd of the op itself)."""
        with torch.enable_grad():
            t = s.detach().requires_grad_(True)
            a = stream_of(args, 0)
            y = self.call(mode.params[0], (t, *a[1:]), stream_of(kwargs, 0))
            (g,) = torch.autograd.grad(y.sum(), t)
        return g

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact activation, recording the moments of its tangent ``(c, r)`` per unit."""
        pre = self.pre(args, kwargs)
        s0 = pre.vals[0]
        a0 = self.real(mode, args, kwargs)
        c = self.slope(s0, mode, args, kwargs).to(torch.float64)
        r = a0.to(torch.float64) - c * s0.to(torch.float64)
        if not (torch.isfinite(c).all() and torch.isfinite(r).all()):
            raise self.refuse("its value or slope at theta0 is not finite on some of the data (an input "
                              "outside or at the edge of the op's domain, e.g. log(0), sqrt(0), 1/0); keep "
                              "its input inside the domain, e.g. with an epsilon")
        for key, val in (("c", c), ("r", r), ("cc", c * c), ("cr", c * r), ("rr", r * r)):
            mode.add(self.name, key, val)
        return Pair((a0,), True)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's own linearization: the tangent at theta0's pre-activation on each input."""
        pre = self.pre(args, kwargs)
        s0 = pre.vals[0]
        a0 = self.real(mode, args, kwargs)
        c = self.slope(s0, mode, args, kwargs).detach()
        return Pair((a0, *(a0 + c * (v - s0) for v in pre.vals[1:])), True)

    def sample_separable(self, mode: Any) -> bool:
        """True: the drawn tangent is shared by the streams."""
        return True

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Monte Carlo: a tangent ``(c, r)`` per unit drawn from the stored four-point law."""
        pre = self.pre(args, kwargs)
        law: MomentLaw = mode.law(self)
        s0 = pre.vals[0]
        _check_units("gate", self.name, law.points_c.shape[2:], s0)
        c, r = mode.draw(self, law, s0)
        return Pair(tuple(v * c + r for v in pre.vals), True)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The closed form from the stored moments of ``(c, r)``."""
        pre = self.pre(args, kwargs)
        law: MomentLaw = mode.law(self)
        like = mode.state.like
        m = {k: v.reshape(-1).to(like) for k, v in law.moments(mode.group).items()}
        gm = GateMoments(c1=[m["c"]], c2={(0, 0): m["cc"]}, r1=[m["r"]], cr={(0, 0): m["cr"]},
                         r2={(0, 0): m["rr"]})
        return mode.gate(pre, gm)

    def law(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> Any:
        """The stored sums turned into a (private) ``MomentLaw`` on ``device`` in ``dtype``."""
        return MomentLaw(sums, counts, device, dtype)


# ---------------------------------------------------------------------------------------------- piecewise ops
def _fns(*names: str, module: Any = F) -> list[Any]:
    """The functions of these names that exist (torch.fx records some under a private alias)."""
    return [getattr(module, n) for n in names if hasattr(module, n)]


@register(nn.ReLU, F.relu, torch.relu, *_fns("relu_"), *_fns("relu_", module=torch), "relu", "relu_")
class ReluGate(PiecewiseLinearGate):
    """``relu(s)``: pieces ``(0, 0)`` and ``(1, 0)``; the law is the activation probability mu per unit."""

    family = "relu"

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """Off ``(0, 0)`` and on ``(1, 0)``."""
        return [(0.0, 0.0), (1.0, 0.0)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """1 where theta0's pre-activation is positive, else 0."""
        return (s0 > 0).long()


@register(nn.LeakyReLU, F.leaky_relu, *_fns("leaky_relu_"))
class LeakyReluGate(PiecewiseLinearGate):
    """``leaky_relu(s, alpha)``: pieces ``(alpha, 0)`` and ``(1, 0)``."""

    family = "leaky_relu"

    def setup(self) -> None:
        """Read the negative slope."""
        if self.module is not None:
            self.alpha = float(cast(nn.LeakyReLU, self.module).negative_slope)
        else:
            self.alpha = float(self.const_arg(1, "negative_slope", 0.01))

    def params(self) -> dict[str, Any]:
        """The negative slope, which a stored summary must match."""
        return {"negative_slope": self.alpha}

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """Negative ``(alpha, 0)`` and positive ``(1, 0)``."""
        return [(self.alpha, 0.0), (1.0, 0.0)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """1 where theta0's pre-activation is positive, else 0."""
        return (s0 > 0).long()


@register(nn.RReLU, F.rrelu, *_fns("rrelu_"))
class RReluGate(LeakyReluGate):
    """Randomized leaky ReLU in eval mode: the fixed slope ``(lower + upper) / 2``."""

    family = "rrelu"

    def setup(self) -> None:
        """Read the bounds of the random slope and use their mean; refuse training mode."""
        if self.module is not None:
            mod = cast(nn.RReLU, self.module)
            lower, upper = float(mod.lower), float(mod.upper)
        else:
            lower = float(self.const_arg(1, "lower", 1.0 / 8))
            upper = float(self.const_arg(2, "upper", 1.0 / 3))
            if self.const_arg(3, "training", False):
                raise self.refuse("randomized leaky ReLU in training mode")
        self.alpha = (lower + upper) / 2

    def call(self, params: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Leaky ReLU with the fixed eval-mode slope."""
        return F.leaky_relu(args[0], self.alpha)


@register(nn.PReLU, F.prelu, *_fns("prelu", module=torch))
class PReluGate(PiecewiseLinearGate):
    """``prelu(s, w)``: pieces ``(w, 0)`` and ``(1, 0)`` with each stream's learned slope w.

    The slope is per channel or shared; the piece is decided by theta0, the slope is the stream's own
    parameter.
    """

    family = "prelu"
    stream_specific = True

    def batch_movable(self, layout: tuple[int, int, int], ndim: int) -> bool:
        """Only with one shared slope (a slope per channel reads the channel axis, 1)."""
        return self.module is not None and cast(nn.PReLU, self.module).num_parameters == 1

    def num_pieces(self) -> int:
        """Two: negative and positive."""
        return 2

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """Negative ``(w, 0)`` with the stream's own learned slope ``w``, and positive ``(1, 0)``."""
        name = f"{self.prefix}.weight" if self.prefix else "weight"
        w = params[name] if self.module is not None else args[1]
        w = w.reshape(()) if w.numel() == 1 else w.reshape(-1, *([1] * (unit_ndim - 1)))
        return [(w, 0.0), (1.0, 0.0)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """1 where theta0's pre-activation is positive, else 0."""
        return (s0 > 0).long()


class _Clip(PiecewiseLinearGate):
    """``clip(s, lo, hi)`` with constant bounds (either may be None): pieces below, inside and above."""

    family = "clip"
    lo: float | None = None
    hi: float | None = None

    def _set_bounds(self, lo: Any, hi: Any) -> None:
        self.lo = None if lo is None else float(lo)
        self.hi = None if hi is None else float(hi)
        if self.lo is None and self.hi is None:
            raise self.refuse("clamp without bounds")
        if self.lo is not None and self.hi is not None and not self.lo < self.hi:
            raise self.refuse(f"clamp bounds min={self.lo} >= max={self.hi}")

    def params(self) -> dict[str, Any]:
        return {"min": self.lo, "max": self.hi}

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = [(1.0, 0.0)]  # piece 0: inside
        if self.lo is not None:
            out.append((0.0, self.lo))
        if self.hi is not None:
            out.append((0.0, self.hi))
        return out

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        k = torch.zeros_like(s0, dtype=torch.long)
        j = 1
        if self.lo is not None:
            k = torch.where(s0 < self.lo, j, k)
            j += 1
        if self.hi is not None:
            k = torch.where(s0 > self.hi, j, k)
        return k


@register(nn.ReLU6, F.relu6)
class Relu6Gate(_Clip):
    """``relu6(s) = clip(s, 0, 6)``."""

    family = "relu6"

    def setup(self) -> None:
        """The bounds 0 and 6."""
        self._set_bounds(0.0, 6.0)

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """Below ``(0, 0)``, inside ``(1, 0)`` and above ``(0, 6)``."""
        # piece 0 is "below": ReLU-like units are off more often than saturated
        return [(0.0, 0.0), (1.0, 0.0), (0.0, 6.0)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """0 below 0, 1 inside, 2 at 6 or above."""
        return (s0 > 0).long() + (s0 >= 6).long()


@register(nn.Hardtanh, F.hardtanh, *_fns("hardtanh_"))
class HardtanhGate(_Clip):
    """``hardtanh(s, min_val, max_val)``."""

    family = "hardtanh"

    def setup(self) -> None:
        """Read ``min_val`` and ``max_val``."""
        if isinstance(self.module, nn.ReLU6):  # nn.ReLU6 derives from nn.Hardtanh but has its own rule
            self._set_bounds(0.0, 6.0)
        elif self.module is not None:
            self._set_bounds(self.module.min_val, self.module.max_val)
        else:
            self._set_bounds(self.const_arg(1, "min_val", -1.0), self.const_arg(2, "max_val", 1.0))


@register(torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clip_", *_fns("clamp_", "clip_", module=torch))
class ClampGate(_Clip):
    """``clamp(s, min, max)`` / ``clip`` with constant bounds."""

    family = "clamp"

    def setup(self) -> None:
        """Read the bounds ``min`` and ``max`` (either may be None)."""
        self._set_bounds(self.const_arg(1, "min", None), self.const_arg(2, "max", None))


@register(torch.clamp_min, "clamp_min", *_fns("clamp_min_", module=torch), "clamp_min_")
class ClampMinGate(_Clip):
    """``clamp_min(s, min)``."""

    family = "clamp"

    def setup(self) -> None:
        """Read the lower bound ``min``."""
        self._set_bounds(self.const_arg(1, "min", None), None)


@register(torch.clamp_max, "clamp_max", *_fns("clamp_max_", module=torch), "clamp_max_")
class ClampMaxGate(_Clip):
    """``clamp_max(s, max)``."""

    family = "clamp"

    def setup(self) -> None:
        """Read the upper bound ``max``."""
        self._set_bounds(None, self.const_arg(1, "max", None))


@register(nn.Threshold, *_fns("threshold", "_threshold", "threshold_"))
class ThresholdGate(PiecewiseLinearGate):
    """``threshold(s, t, v)``: ``s`` where ``s > t``, else ``v``: pieces ``(0, v)`` and ``(1, 0)``."""

    family = "threshold"

    def setup(self) -> None:
        """Read the threshold and the replacement value."""
        if self.module is not None:
            mod = cast(nn.Threshold, self.module)
            self.t, self.v = float(mod.threshold), float(mod.value)
        else:
            self.t, self.v = float(self.const_arg(1, "threshold")), float(self.const_arg(2, "value"))

    def params(self) -> dict[str, Any]:
        """The threshold and the value, which a stored summary must match."""
        return {"threshold": self.t, "value": self.v}

    @property
    def continuous(self) -> bool:  # type: ignore[override]  # a per-instance value of the class constant
        """Whether the op has no jump: the value equals the threshold."""
        return self.t == self.v

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """Replaced ``(0, v)`` and passed ``(1, 0)``."""
        return [(0.0, self.v), (1.0, 0.0)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """1 where theta0's pre-activation exceeds the threshold, else 0."""
        return (s0 > self.t).long()


def _target_name(node: Any) -> str:
    """The name of an fx node's op, without an in-place ``_`` (``"add"`` for ``x.add_``, ``torch.add``)."""
    t = node.target
    return (t if isinstance(t, str) else getattr(t, "__name__", "")).rstrip("_")


_COMPARISONS: dict[str, Any] = {"gt": operator.gt, "lt": operator.lt, "ge": operator.ge, "le": operator.le}
_MIRRORED = {"gt": "lt", "lt": "gt", "ge": "le", "le": "ge"}


@register(*_COMPARISONS.values(),
          *_fns("gt", "lt", "ge", "le", "greater", "less", "greater_equal", "less_equal", module=torch),
          "gt", "lt", "ge", "le")
class CompareGate(PiecewiseLinearGate):
    """``s > c`` (``<``, ``>=``, ``<=``) of data and a constant: a gate written by hand.

    ``torch.where(h > 0, h, 0.1 * h)`` is a LeakyReLU, ``h * (h > 0)`` a ReLU. The boolean mask is decided by
    theta0, like a ReLU's gate: the pieces ``0`` and ``1`` (slope 0), the law the frequency of ``True`` per
    unit, one mask per sample shared by both streams (so the ops that read it -- ``where``, a product -- see a
    constant of the streams, as they see a padding mask), and theta0's own mask on each input for
    ``gates="relu"``. The mask itself jumps; what it selects between need not (the two examples above are
    continuous). A comparison of values computed from the network input alone (``ids != pad``) is not a gate:
    it is evaluated exactly on each stream's input, as before. The closed form refuses it.
    """

    family = "compare"
    continuous = False  # the mask jumps where s crosses c
    #: not an activation function: ``linearize="activations"`` evaluates each stream's comparison exactly, as
    #: it did before comparisons had a rule (a mask for attention keys is no activation)
    activation = False
    #: evaluated exactly (not a site) where it reads values computed from the network input alone
    exact_on_input: ClassVar[bool] = True

    def setup(self) -> None:
        """Read which operand is data and the constant it is compared with."""
        name = _target_name(self.node)
        name = {"greater": "gt", "less": "lt", "greater_equal": "ge", "less_equal": "le"}.get(name, name)
        a = self.node.args[0] if self.node.args else None
        b = self.node.args[1] if len(self.node.args) > 1 else self.node.kwargs.get("other")
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            raise self.refuse("a comparison of two computed tensors has no rule; compare a value with a "
                              "constant (h > 0), or use linearize='activations' or gates='none'")
        const = b if isinstance(a, fx.Node) else a
        if isinstance(const, bool) or not isinstance(const, (int, float)):
            raise self.refuse(f"a comparison with {const!r}; laftr's rule compares a value with a constant "
                              "number")
        self.op = name if isinstance(a, fx.Node) else _MIRRORED[name]  # c < h is h > c
        self.threshold = float(const)

    def params(self) -> dict[str, Any]:
        """The comparison and its constant, which a stored summary must match."""
        return {"op": self.op, "threshold": self.threshold}

    def pre(self, args: Any, kwargs: Any) -> Pair:
        """The compared data value (either operand)."""
        return self.data_input(args, kwargs, first=False)

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """False and True."""
        return [(0.0, 0.0), (0.0, 1.0)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """1 where theta0's comparison holds."""
        return _COMPARISONS[self.op](s0, self.threshold).long()

    def _apply(self, mode: Any, args: Any, pre: Pair, k: torch.Tensor) -> Pair:
        mask = k == 1
        return Pair(tuple(mask for _ in pre.vals), True, fixed=True)

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's mask, recording how often it holds; a constant for the ops that read it."""
        out = super().fit(mode, args, kwargs)
        return Pair(out.vals, True, fixed=True)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Refused: a mask read by ``where`` or a product has no closed form here."""
        raise self.refuse("laftr-exact has no closed form for a comparison of data (a gate written by hand); "
                          "use the Monte Carlo 'laftr', or nn.ReLU / nn.LeakyReLU, which have one")


@register(torch.abs, torch.absolute, operator.abs, *_fns("abs_", "absolute_", module=torch), "abs", "abs_",
          "absolute", "absolute_")
class AbsGate(PiecewiseLinearGate):
    """``|s|``: pieces ``(-1, 0)`` (negative) and ``(1, 0)`` (positive); the law is P(s > 0) per unit."""

    family = "abs"

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """Negative ``(-1, 0)`` and positive ``(1, 0)``."""
        return [(-1.0, 0.0), (1.0, 0.0)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """1 where theta0's pre-activation is positive, else 0."""
        return (s0 > 0).long()


@register(nn.Hardsigmoid, F.hardsigmoid)
class HardsigmoidGate(PiecewiseLinearGate):
    """``hardsigmoid(s) = clip(s / 6 + 1/2, 0, 1)``: pieces ``(0, 0)``, ``(1/6, 1/2)``, ``(0, 1)``."""

    family = "hardsigmoid"

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """Low ``(0, 0)``, middle ``(1/6, 1/2)`` and high ``(0, 1)``."""
        return [(0.0, 0.0), (1.0 / 6.0, 0.5), (0.0, 1.0)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """0 at -3 or below, 1 in between, 2 at 3 or above."""
        return (s0 > -3).long() + (s0 >= 3).long()


@register(nn.Hardshrink, F.hardshrink, *_fns("hardshrink", module=torch), "hardshrink")
class HardshrinkGate(PiecewiseLinearGate):
    """``hardshrink(s, l)``: ``s`` where ``|s| > l``, else 0."""

    family = "hardshrink"
    continuous = False

    def setup(self) -> None:
        """Read ``lambd``."""
        mod = cast("nn.Hardshrink | nn.Softshrink | None", self.module)
        self.lam = float(mod.lambd) if mod is not None else float(self.const_arg(1, "lambd", 0.5))

    def params(self) -> dict[str, Any]:
        """``lambd``, which a stored summary must match."""
        return {"lambd": self.lam}

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """Zeroed ``(0, 0)`` and passed ``(1, 0)``."""
        return [(0.0, 0.0), (1.0, 0.0)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """1 where ``|s0| > lambd``, else 0."""
        return (s0.abs() > self.lam).long()


@register(nn.Softshrink, F.softshrink)
class SoftshrinkGate(PiecewiseLinearGate):
    """``softshrink(s, l)``: ``s - l`` above ``l``, ``s + l`` below ``-l``, else 0."""

    family = "softshrink"

    def setup(self) -> None:
        """Read ``lambd``."""
        mod = cast("nn.Hardshrink | nn.Softshrink | None", self.module)
        self.lam = float(mod.lambd) if mod is not None else float(self.const_arg(1, "lambd", 0.5))

    def params(self) -> dict[str, Any]:
        """``lambd``, which a stored summary must match."""
        return {"lambd": self.lam}

    def pieces(self, params: dict[str, torch.Tensor], args: Any, unit_ndim: int) -> list[tuple[Any, Any]]:
        """Zeroed ``(0, 0)``, above ``(1, -lambd)`` and below ``(1, lambd)``."""
        return [(0.0, 0.0), (1.0, -self.lam), (1.0, self.lam)]

    def piece_index(self, s0: torch.Tensor) -> torch.Tensor:
        """0 inside ``[-lambd, lambd]``, 1 above, 2 below."""
        return (s0 > self.lam).long() + 2 * (s0 < -self.lam).long()


# ---------------------------------------------------------------------------------------------- smooth ops
_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


@register(nn.GELU, F.gelu)
class GeluGate(SmoothGate):
    """``gelu(s)`` (``approximate="none"``: ``s Phi(s)``; ``"tanh"``: the tanh approximation)."""

    family = "gelu"

    def setup(self) -> None:
        """Read ``approximate`` (``"none"`` or ``"tanh"``)."""
        if self.module is not None:
            self.approximate = str(self.module.approximate)
        else:
            self.approximate = str(self.const_arg(1, "approximate", "none"))
        if self.approximate not in ("none", "tanh"):
            raise self.refuse(f"approximate={self.approximate!r}")

    def params(self) -> dict[str, Any]:
        """``approximate``, which a stored summary must match."""
        return {"approximate": self.approximate}

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """GELU's derivative, exact or of the tanh approximation."""
        if self.approximate == "tanh":
            k = math.sqrt(2.0 / math.pi)
            t = torch.tanh(k * (s + 0.044715 * s**3))
            return 0.5 * (1 + t) + 0.5 * s * (1 - t * t) * k * (1 + 3 * 0.044715 * s * s)
        cdf = 0.5 * (1 + torch.erf(s / _SQRT_2))
        return cdf + s * torch.exp(-0.5 * s * s) * _INV_SQRT_2PI


@register(nn.SiLU, F.silu)
class SiluGate(SmoothGate):
    """``silu(s) = s sigmoid(s)``."""

    family = "silu"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``sigmoid(s) (1 + s (1 - sigmoid(s)))``."""
        sg = torch.sigmoid(s)
        return sg * (1 + s * (1 - sg))


def tanh_slope(s: torch.Tensor) -> torch.Tensor:
    """``tanh'(s) = 1 - tanh(s)^2`` (also the recurrent layers' gates)."""
    t = torch.tanh(s)
    return 1 - t * t


def sigmoid_slope(s: torch.Tensor) -> torch.Tensor:
    """``sigmoid'(s) = sigmoid(s) (1 - sigmoid(s))`` (also the recurrent layers' gates)."""
    sg = torch.sigmoid(s)
    return sg * (1 - sg)


@register(nn.Tanh, torch.tanh, "tanh", "tanh_", *_fns("tanh_", module=torch))  # F.tanh calls Tensor.tanh
class TanhGate(SmoothGate):
    """``tanh(s)``."""

    family = "tanh"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``1 - tanh(s)^2``."""
        return tanh_slope(s)


# F.sigmoid calls Tensor.sigmoid
@register(nn.Sigmoid, torch.sigmoid, "sigmoid", "sigmoid_", *_fns("sigmoid_", module=torch))
class SigmoidGate(SmoothGate):
    """``sigmoid(s)``."""

    family = "sigmoid"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``sigmoid(s) (1 - sigmoid(s))``."""
        return sigmoid_slope(s)


@register(nn.Softplus, F.softplus)
class SoftplusGate(SmoothGate):
    """``softplus(s, beta, threshold)`` (linear where ``beta s > threshold``)."""

    family = "softplus"

    def setup(self) -> None:
        """Read ``beta`` and ``threshold``."""
        if self.module is not None:
            mod = cast(nn.Softplus, self.module)
            self.beta, self.threshold = float(mod.beta), float(mod.threshold)
        else:
            self.beta = float(self.const_arg(1, "beta", 1.0))
            self.threshold = float(self.const_arg(2, "threshold", 20.0))

    def params(self) -> dict[str, Any]:
        """``beta`` and ``threshold``, which a stored summary must match."""
        return {"beta": self.beta, "threshold": self.threshold}

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``sigmoid(beta s)``, and 1 where the op is linear (``beta s > threshold``)."""
        bs = self.beta * s
        return torch.where(bs > self.threshold, torch.ones_like(s), torch.sigmoid(bs))


@register(nn.ELU, F.elu, *_fns("elu_"))
class EluGate(SmoothGate):
    """``elu(s, alpha)``."""

    family = "elu"

    def setup(self) -> None:
        """Read ``alpha``."""
        mod = cast("nn.ELU | nn.CELU | None", self.module)
        self.alpha = float(mod.alpha) if mod is not None else float(self.const_arg(1, "alpha", 1.0))

    def params(self) -> dict[str, Any]:
        """``alpha``, which a stored summary must match."""
        return {"alpha": self.alpha}

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """1 for positive ``s``, else ``alpha exp(s)``."""
        return torch.where(s > 0, torch.ones_like(s), self.alpha * torch.exp(torch.clamp_max(s, 0)))


@register(nn.CELU, F.celu, *_fns("celu_"))
class CeluGate(EluGate):
    """``celu(s, alpha)`` (``alpha`` read as ELU's)."""

    family = "celu"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """1 for positive ``s``, else ``exp(s / alpha)``."""
        return torch.where(s > 0, torch.ones_like(s), torch.exp(torch.clamp_max(s, 0) / self.alpha))


@register(nn.SELU, F.selu, *_fns("selu_"), *_fns("selu", module=torch))
class SeluGate(SmoothGate):
    """``selu(s)``."""

    family = "selu"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``scale`` for positive ``s``, else ``scale alpha exp(s)``."""
        return _SELU_SCALE * torch.where(s > 0, torch.ones_like(s),
                                         _SELU_ALPHA * torch.exp(torch.clamp_max(s, 0)))


@register(nn.Mish, F.mish)
class MishGate(SmoothGate):
    """``mish(s) = s tanh(softplus(s))``."""

    family = "mish"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``tanh(softplus(s)) + s (1 - tanh(softplus(s))^2) sigmoid(s)``."""
        t = torch.tanh(F.softplus(s))
        return t + s * (1 - t * t) * torch.sigmoid(s)


@register(nn.Hardswish, F.hardswish)
class HardswishGate(SmoothGate):
    """``hardswish(s) = s relu6(s + 3) / 6`` (piecewise quadratic: a smooth law)."""

    family = "hardswish"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """0 at -3 or below, 1 at 3 or above, ``(2 s + 3) / 6`` in between."""
        mid = (2 * s + 3) / 6
        return torch.where(s <= -3, torch.zeros_like(s), torch.where(s >= 3, torch.ones_like(s), mid))


@register(nn.LogSigmoid, F.logsigmoid)
class LogSigmoidGate(SmoothGate):
    """``logsigmoid(s)``."""

    family = "logsigmoid"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``sigmoid(-s)``."""
        return torch.sigmoid(-s)


@register(nn.Softsign, F.softsign)
class SoftsignGate(SmoothGate):
    """``softsign(s) = s / (1 + |s|)``."""

    family = "softsign"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``1 / (1 + |s|)^2``."""
        return 1 / (1 + s.abs()) ** 2


@register(nn.Tanhshrink, F.tanhshrink)
class TanhshrinkGate(SmoothGate):
    """``tanhshrink(s) = s - tanh(s)``."""

    family = "tanhshrink"

    def slope(self, s: torch.Tensor, mode: Any, args: Any, kwargs: Any) -> torch.Tensor:
        """``tanh(s)^2``."""
        t = torch.tanh(s)
        return t * t


# ---------------------------------------------------------------------------------------------- elementwise
def _method_and_inplace(*names: str) -> list[Any]:
    """The tensor-method spellings (``x.exp()``, ``x.exp_()``) and the torch functions of these names."""
    out: list[Any] = []
    for n in names:
        out += [n, n + "_", *_fns(n, n + "_", module=torch)]
    return out


#: reductions over an axis that a normalizer's statistic comes from, and the ops it may be read through
_REDUCTIONS = ("mean", "sum", "var", "std", "norm", "vector_norm", "nansum", "nanmean")
_THROUGH = ("add", "radd", "sub", "mul", "rmul", "truediv", "div", "clamp", "clamp_min", "clip", "iadd",
            "imul")


def reads_reduction(node: Any) -> bool:
    """Whether ``node`` is a reduction of data over an axis (``std``, ``norm``, ``mean``, ...).

    Read through additions and multiplications by constants (``h.std(-1, keepdim=True) + eps``): the
    statistic a normalization written by hand divides or scales by.
    """
    for _ in range(8):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
            return False
        name = _target_name(node)
        if name in _REDUCTIONS:
            return True
        data = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        if name not in _THROUGH or len(data) != 1:
            return False
        node = data[0]
    return False


@register(*_method_and_inplace(*ELEMENTWISE_FUNCTIONS),
          *_fns("erf", "erfc", "expm1", "log1p", module=torch.special))
class ElementwiseGate(SmoothGate):
    """A smooth elementwise function of the data (``exp``, ``log``, ``sqrt``, ``rsqrt``, ``sin``, ...).

    Like every smooth gate: its tangent at theta0's value (slope from autograd, exact for each op). These ops
    have a domain (``log``, ``sqrt``, ``rsqrt``, ``reciprocal``): theta0's inputs on the data must stay inside
    it, or the fit refuses the non-finite tangent; the Monte Carlo then never evaluates the op outside
    theta0's data (it applies the drawn tangents), while ``gates="relu"`` and ``"none"`` evaluate it on
    samples of the input model. Not an activation: ``linearize="activations"`` runs it exactly.

    A *normalizer* -- ``sqrt``, ``rsqrt``, ``reciprocal`` or a power ``-1 <= p <= 1/2`` (p != 0) of a mean or
    sum over an axis, used only to multiply or divide other data (``x * torch.rsqrt(x.pow(2).mean(-1,
    keepdim=True) + eps)``, ``x / (x - mu).pow(2).mean(-1, keepdim=True).sqrt()``: a normalization written by
    hand) -- is treated as the normalization layers treat theirs (METHOD.md section 6): its value is decided
    by theta0, a positive scale per unit drawn from the log-normal law with its exact first and second moments
    on the data, shared by both streams and independent of the input. (Its tangent drawn at random could cross
    zero and, in the division that follows, blow the estimate up by many orders of magnitude.) So the
    hand-written RMSNorm gives what ``nn.RMSNorm`` gives. θ0's own linearization (``gates="relu"``) keeps the
    exact tangent on each input.
    """

    family = "elementwise"
    activation = False
    #: elementwise ops that turn a positive statistic into a scale, and reductions they may read through
    #: additions and multiplications by constants
    _SCALE_OPS: ClassVar[tuple[str, ...]] = ("sqrt", "rsqrt", "reciprocal")

    def setup(self) -> None:
        """Whether the op is a normalizer (see the class)."""
        self.normalizer = (_target_name(self.node) in self._SCALE_OPS and self._reads_reduction()
                           and self._scales_data())
        self.divisor = self.normalizer and self._divides_only()

    def _reads_reduction(self) -> bool:
        """Whether the data input comes from a reduction over an axis, through constant shifts and scales."""
        return reads_reduction(self.node.args[0] if self.node.args else self.node.kwargs.get("input"))

    _SCALING: ClassVar[tuple[str, ...]] = ("mul", "rmul", "truediv", "div", "imul", "itruediv")

    def _scales_data(self) -> bool:
        """Whether every use of the value multiplies or divides another data-dependent value by it.

        Through multiplications by parameters or constants (``rsqrt(...) * self.weight * x``). A norm used as
        a feature (``head(x.pow(2).sum(-1).sqrt())``) is not a normalizer: its change must reach the output,
        and it keeps the tangent law.
        """
        def scales(node: fx.Node, depth: int) -> bool:
            users = list(node.users)
            if not users or depth > 4:
                return False
            for u in users:
                if _target_name(u) not in self._SCALING:
                    return False
                # the other factor: a computed value (not a parameter or buffer read by get_attr)
                others = [a for a in (*u.args, *u.kwargs.values())
                          if isinstance(a, fx.Node) and a is not node and a.op != "get_attr"]
                if not others and not scales(u, depth + 1):
                    return False
            return True

        return scales(self.node, 0)

    def _divides_only(self) -> bool:
        """Whether every use of the value divides data by it (``x / sqrt(var + eps)``)."""
        users = list(self.node.users)
        return bool(users) and all(
            _target_name(u) in ("truediv", "div", "itruediv") and len(u.args) > 1 and u.args[1] is self.node
            for u in users)

    def params(self) -> dict[str, Any]:
        """The op (and whether it is a normalizer), which a stored summary must match."""
        t = self.node.target
        out: dict[str, Any] = {"op": t if isinstance(t, str) else getattr(t, "__name__", str(t))}
        if self.normalizer:
            out["normalizer"] = "divisor" if self.divisor else True
        return out

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact value; a normalizer records the moments of its value, other ops their tangent's."""
        if not self.normalizer:
            return super().fit(mode, args, kwargs)
        self.pre(args, kwargs)
        a0 = self.real(mode, args, kwargs)
        nu = a0.to(torch.float64)
        if not (torch.isfinite(nu).all() and (nu > 0).all()):
            raise ValueError(f"{self.describe()}: a normalizer (a scale computed from a statistic of the "
                             "data) that is not finite and positive on some of the data; keep its input "
                             "positive, e.g. with an epsilon")
        if self.divisor:  # the law of the scale it applies, 1 / value, as a normalization layer keeps it
            nu = nu.reciprocal()
        mode.add(self.name, "nu", nu)
        mode.add(self.name, "nu2", nu * nu)
        return Pair((a0,), True)

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Monte Carlo: a normalizer's scale drawn from its stored law; other ops a drawn tangent."""
        if not self.normalizer:
            return super().sample(mode, args, kwargs)
        pre = self.pre(args, kwargs)
        law: ScaleLaw = mode.law(self)
        s0 = pre.vals[0]
        _check_units("normalizer", self.name, law.first.shape[1:], s0)
        nu = mode.draw(self, law, s0)
        if self.divisor:
            nu = nu.reciprocal()
        return Pair(tuple(nu.expand_as(v) for v in pre.vals), True)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The closed form: a normalizer is a random constant with the stored moments (no slope)."""
        if not self.normalizer:
            return super().moments(mode, args, kwargs)
        pre = self.pre(args, kwargs)
        law: ScaleLaw = mode.law(self)
        like = mode.state.like
        first, second = (t.reshape(-1).to(like) for t in law.moments(mode.group))
        if self.divisor:  # moments of 1 / nu under the log-normal law of nu
            mu = law.log_mean.index_select(0, torch.tensor([mode.group])).reshape(-1).to(like)
            sd = law.log_sd.index_select(0, torch.tensor([mode.group])).reshape(-1).to(like)
            first, second = torch.exp(-mu + sd * sd / 2), torch.exp(-2 * mu + 2 * sd * sd)
        zero = torch.zeros_like(first)
        gm = GateMoments(c1=[zero], c2={(0, 0): zero}, r1=[first], cr={(0, 0): zero}, r2={(0, 0): second})
        return mode.gate(pre, gm)

    def law(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> Any:
        """A normalizer's log-normal ``ScaleLaw``; other ops' tangent law."""
        if self.normalizer:
            return ScaleLaw(sums, counts, device, dtype)
        return super().law(sums, counts, device, dtype)


@register(torch.pow, operator.pow, "pow", "pow_")  # (``x **= 2`` reaches torch.fx as operator.pow)
class PowGate(ElementwiseGate):
    """``s ** p`` for a constant exponent ``p`` (``x ** 2``, ``x.pow(0.5)``, ``torch.pow(x, 3)``)."""

    family = "pow"

    def setup(self) -> None:
        """Read the exponent; refuse a data-dependent or learned one and a constant base."""
        base = self.node.args[0] if self.node.args else self.node.kwargs.get("input")
        if not isinstance(base, fx.Node):
            raise self.refuse("a constant raised to a data-dependent power has no rule; write b ** x as "
                              "torch.exp(x * math.log(b))")
        e = self.const_arg(1, "exponent")
        if isinstance(e, bool) or not isinstance(e, (int, float)):
            raise self.refuse(f"the exponent must be a constant number, got {e!r}")
        self.exponent = float(e)
        self.normalizer = (-1.0 <= self.exponent <= 0.5 and self.exponent != 0 and self._reads_reduction()
                           and self._scales_data())
        self.divisor = self.normalizer and self._divides_only()

    def params(self) -> dict[str, Any]:
        """The exponent (and whether it is a normalizer), which a stored summary must match."""
        normalizer = {"normalizer": "divisor" if self.divisor else True} if self.normalizer else {}
        return {"exponent": self.exponent, **normalizer}
