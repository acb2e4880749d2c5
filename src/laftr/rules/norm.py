"""Per-example normalization (LayerNorm, RMSNorm, GroupNorm, InstanceNorm without running statistics).

Each normalizes groups of D entries of one example ("positions": the leading entries of a LayerNorm input,
the groups of a GroupNorm): ``y = gamma * (x - mean(x)) * nu + beta`` with ``nu = 1 / sqrt(var(x) + eps)``
(RMSNorm: no centring, ``nu = 1 / sqrt(mean(x^2) + eps)``). Linearized at theta0 (METHOD.md section 6):

- LAFTR (``sample``) and the closed form: the normalizer ``nu`` is decided by theta0, like a gate: a random
  scale per position, independent of the input and across positions, shared by the position's entries and
  by both streams. It is drawn from a law fitted at theta0 on the data: we store the exact first and second
  moments of ``nu`` per position (2 floats) and sample the log-normal law with those moments (a normalizer
  is positive). Given ``nu`` the op is linear in x: ``y_s = gamma_s * P(nu x_s) + beta_s``.
- theta0's own linearization (``gates="relu"``): the exact Jacobian of the normalization at theta0's input,
  ``dn = nu0 (P dx - n0 (n0 . P dx) / D)`` with ``n0 = nu0 P x0``, which includes the
  ``-(x - mean)(x - mean)^T / (D sigma^3)`` term; so the estimate is first-order exact as theta -> theta0.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..moments import GateMoments
from .base import Pair, Rule, register, stream_of


class ScaleLaw:
    """Exact mean and second moment of a positive scale per group and position; samples a log-normal law."""

    def __init__(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> None:
        """Turn the stored sums of ``nu`` and ``nu^2`` into moments and log-normal parameters per position."""
        n = counts.clamp_min(1).view(-1, *([1] * (sums["nu"].ndim - 1))).to(sums["nu"])
        if "nu_zero" in sums:  # positions whose input was exactly zero (or constant) are not in nu's sums
            n = n - sums["nu_zero"]
        m1, m2 = sums["nu"] / n.clamp_min(1), sums["nu2"] / n.clamp_min(1)
        # a position that was never anything but zero: its scale never matters (its output is the bias)
        m1, m2 = torch.where(n > 0, m1, 1.0), torch.where(n > 0, m2, 1.0)
        var_log = torch.log(m2 / (m1 * m1)).clamp_min(0)  # sigma^2 of log nu
        self.first = m1.to(device, dtype)
        self.second = m2.to(device, dtype)
        self.log_mean = (torch.log(m1) - var_log / 2).to(device, dtype)
        self.log_sd = var_log.sqrt().to(device, dtype)

    def draw(self, groups: torch.Tensor, gen: torch.Generator, shared: bool,
             like: torch.Tensor) -> torch.Tensor:
        """Scales ``(n, *positions)`` drawn from the log-normal law (``n = 1`` when shared)."""
        G, pos = self.first.shape[0], tuple(self.first.shape[1:])
        n = 1 if shared else int(groups.shape[0])
        z = torch.randn((n, *pos), generator=gen, device=gen.device, dtype=like.dtype).to(like.device)
        if G == 1:
            mu, sd = self.log_mean[0], self.log_sd[0]
        else:
            g = groups.to(self.first.device)
            mu, sd = self.log_mean.index_select(0, g), self.log_sd.index_select(0, g)
        return torch.exp(mu + sd * z)

    def moments(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and second moment of the scale per position in group ``g``."""
        return self.first[g], self.second[g]


class NormRule(Rule):
    """Base of the per-example normalizations; subclasses give the geometry and the affine parameters."""

    family: ClassVar[str] = "norm"
    site: ClassVar[bool] = True
    centered: ClassVar[bool] = True
    #: whether the statistic is a mean over the D entries of a position (variance, mean square) rather than a
    #: sum (the squared norm of F.normalize); it sets the Jacobian's 1/D
    per_entry: ClassVar[bool] = True

    # ------------------------------------------------------------------ geometry (override)
    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(B, *positions, D)``: the statistics are over the last axis."""
        raise NotImplementedError

    def ungrouped(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A tensor laid out as :meth:`grouped` gives it, back in ``x``'s layout."""
        return g.reshape(x.shape)

    def weight_bias(self, params: dict[str, torch.Tensor], args: Any, kwargs: Any,
                    like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The stream's ``(gamma, beta)``, broadcastable against the input (None where absent)."""
        raise NotImplementedError

    #: added to the statistic; None (RMSNorm only, which overrides :meth:`eps_for`): the dtype's epsilon
    eps: float | None

    def eps_for(self, x: torch.Tensor) -> float:
        """The ``eps`` added to the statistic for an input of ``x``'s dtype."""
        assert self.eps is not None
        return self.eps

    # ------------------------------------------------------------------ pieces of the op
    def statistic(self, x: torch.Tensor) -> torch.Tensor:
        """The variance (mean square when not centred) of every position: ``(B, *positions)``."""
        g = self.grouped(x)
        return g.var(-1, unbiased=False) if self.centered else (g * g).mean(-1)

    def inv_sigma(self, x: torch.Tensor) -> torch.Tensor:
        """``nu`` of every position: ``(B, *positions)``."""
        return torch.rsqrt(self.statistic(x) + self.eps_for(x))

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` minus the mean of each position (unchanged for RMSNorm, which does not centre)."""
        if not self.centered:
            return x
        g = self.grouped(x)
        return self.ungrouped(g - g.mean(-1, keepdim=True), x)

    def scale(self, x: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        """``x`` with each position's entries multiplied by its scale ``nu`` (``(B, *positions)``)."""
        g = self.grouped(x)
        return self.ungrouped(g * nu.unsqueeze(-1), x)

    def finish(self, v: torch.Tensor, params: dict[str, torch.Tensor], args: Any,
               kwargs: Any) -> torch.Tensor:
        """``gamma * v + beta``."""
        w, b = self.weight_bias(params, args, kwargs, v)
        if w is not None:
            v = v * w
        if b is not None:
            v = v + b
        return v

    def pre(self, args: Any, kwargs: Any) -> Pair:
        """The normalized input pair; refuses other data-dependent arguments."""
        return self.data_input(args, kwargs)

    def has_params(self, args: Any, kwargs: Any) -> bool:
        """Whether the op has an affine weight or bias (which may differ between the streams)."""
        if self.module is not None:
            return any(True for _ in self.module.parameters())
        return any(isinstance(a, Pair) and not a.data for a in (*args[1:], *kwargs.values()))

    # ------------------------------------------------------------------ modes
    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream runs the normalization exactly."""
        self.pre(args, kwargs)
        return Pair(self.call_streams(mode, args, kwargs), True)

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact normalization, recording ``nu`` and ``nu^2`` per position.

        A position whose input is exactly zero (a padding token's zero embedding) -- or constant, when the
        norm centres -- normalizes to zero (then the bias) whatever its scale, so its scale,
        ``1 / sqrt(eps)``, says nothing about the scale of other inputs there; it is left out of the law
        (counted in ``nu_zero``, a key recorded only once such an input is seen). Kept in, it made the drawn
        scales hundreds to millions of times those of real tokens.
        """
        x0 = self.pre(args, kwargs).vals[0]
        nu = self.inv_sigma(x0.to(torch.float64))
        zero = self.statistic(x0.to(torch.float64)) == 0
        if bool(zero.any()) or "nu_zero" in mode.sums.get(self.name, {}):
            nu = nu.masked_fill(zero, 0.0)
            mode.add(self.name, "nu_zero", zero.to(torch.float64))
        mode.add(self.name, "nu", nu)
        mode.add(self.name, "nu2", nu * nu)
        return Pair(self.call_streams(mode, args, kwargs, [0]), True)

    def sample_separable(self, mode: Any) -> bool:
        """True: the drawn scale is shared; each stream centers and applies its own affine parameters."""
        return True

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Monte Carlo: a scale per position drawn from the stored law, shared by both streams."""
        pre = self.pre(args, kwargs)
        law: ScaleLaw = mode.law(self)
        x0 = pre.vals[0]
        pos = tuple(self.grouped(x0).shape[1:-1])
        if tuple(law.first.shape[1:]) != pos:
            raise ValueError(f"normalization site {self.name!r}: summary has positions of shape "
                             f"{tuple(law.first.shape[1:])}, the network produces {pos} "
                             "(input of another size?)")
        nu = mode.draw(self, law, x0)
        outs = []
        for s, v in enumerate(pre.vals):
            a, k = stream_of(args, s), stream_of(kwargs, s)
            outs.append(self.finish(self.center(self.scale(v, nu)), mode.params[s], a, k))
        return Pair(tuple(outs), True)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's own linearization: the exact Jacobian of the normalization at theta0's input."""
        pre = self.pre(args, kwargs)
        x0 = pre.vals[0]
        nu0 = self.inv_sigma(x0).unsqueeze(-1)
        n0 = self.grouped(self.center(x0)) * nu0
        D = n0.shape[-1]
        outs = []
        for s, v in enumerate(pre.vals):
            dx = self.grouped(self.center(v - x0))
            dn = nu0 * (dx - n0 * (n0 * dx).sum(-1, keepdim=True) / (D if self.per_entry else 1))
            a, k = stream_of(args, s), stream_of(kwargs, s)
            outs.append(self.finish(self.ungrouped(n0 + dn, x0), mode.params[s], a, k))
        return Pair(tuple(outs), True)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The closed form: a random per-position scale with the stored moments, then the affine rest."""
        pre = self.pre(args, kwargs)
        law: ScaleLaw = mode.law(self)
        ref = pre.vals[0]
        like = mode.state.like
        first, second = (t.reshape(-1).to(like) for t in law.moments(mode.group))
        n = math.prod(ref.shape)
        D = n // first.numel()
        if D * first.numel() != n:
            raise ValueError(f"normalization site {self.name!r}: {first.numel()} stored positions do not "
                             f"divide {n} units")
        # the position of every unit, in the units' own order (the normalized axis need not be the last)
        pos = torch.arange(first.numel(), device=like.device).view(1, *law.first.shape[1:], 1)
        one = like.new_empty((1, *ref.shape))  # (ref: one example's shape)
        unit_pos = self.ungrouped(pos.expand(*pos.shape[:-1], D), one).reshape(-1)
        gm = GateMoments(c1=[first[unit_pos]], c2={(0, 0): second[unit_pos]}, unit_groups=unit_pos)
        scaled = mode.gate(pre, gm)
        specific = self.has_params(args, kwargs) or scaled.vals[0].block != scaled.vals[1].block
        streams = [0, 1] if specific else [0]

        def make(s: int) -> Any:
            a, k = stream_of(args, s), stream_of(kwargs, s)
            return lambda v: self.finish(self.center(v), mode.params[s], a, k)

        return mode.affine_fns([make(s) for s in streams], [[scaled.vals[s]] for s in streams], self.name)

    def law(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> Any:
        """The stored sums turned into a (private) ``ScaleLaw`` on ``device`` in ``dtype``."""
        return ScaleLaw(sums, counts, device, dtype)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _RuntimeSizes(NormRule):
    """A normalization whose sizes may be read from its input's shape at run time.

    ``F.layer_norm(h, h.shape[1:])``, ``F.layer_norm(h, (h.shape[-1],))``,
    ``F.group_norm(h, h.shape[1] // 4)``: read when the op runs (in :meth:`pre`, :meth:`Rule.runtime_value`),
    and recorded as ``"runtime"`` by a stored summary (the law's shape is checked against the network's when
    it is used).

    Attributes:
        size_arg: ``(position, keyword)`` of the size argument.
    """

    size_arg: ClassVar[tuple[int, str]]
    #: how to give the sizes (for messages)
    hint: ClassVar[str]
    _runtime: bool = False  # whether the sizes are read at run time

    def read_size(self, value: Any) -> None:
        """Set the sizes from the argument's value (override); refuse one that is not a size."""
        raise NotImplementedError

    def setup_sizes(self) -> bool:
        """Read the size argument when it is a constant; False when it is read at run time."""
        self._runtime = bool(self.runtime_args(self.size_arg))
        if not self._runtime:
            self.read_size(self.arg_node(*self.size_arg))
        return not self._runtime

    def pre(self, args: Any, kwargs: Any) -> Pair:
        """The normalized input pair; reads sizes given at run time (refusing sizes that are data)."""
        pair = super().pre(args, kwargs)
        if self._runtime:
            self.read_size(self.runtime_value(args, kwargs, *self.size_arg, hint=self.hint))
        return pair


def _trailing(rule: Rule, shape: Any) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple of ints; refuses anything else."""
    if _is_int(shape):
        return (shape,)
    if isinstance(shape, (tuple, list, torch.Size)) and shape and all(_is_int(v) for v in shape):
        return tuple(shape)
    raise rule.refuse(f"normalized_shape={shape!r} is not a size (an int or a non-empty tuple of ints); "
                      + LayerNormRule.hint)


@register(nn.LayerNorm, F.layer_norm)
class LayerNormRule(_RuntimeSizes):
    """``layer_norm`` over the trailing ``normalized_shape`` dimensions; positions are the leading ones.

    ``normalized_shape`` may be read from the input's shape (``h.shape[1:]``, ``(h.shape[-1],)``).
    """

    family = "layer_norm"

    eps_position: ClassVar[int] = 4
    size_arg = (1, "normalized_shape")
    hint = ("give it as a literal, normalized_shape=(D,), or read it from the input's shape (h.shape[-1:] "
            "or (h.shape[-1],))")
    shape: tuple[int, ...]

    def setup(self) -> None:
        """Read ``normalized_shape`` (now, or at run time when read from a shape) and ``eps``."""
        if self.module is not None:
            mod = cast("nn.LayerNorm | nn.RMSNorm", self.module)
            self.shape = _trailing(self, mod.normalized_shape)
            eps = mod.eps
        else:
            self.setup_sizes()
            eps = self.const_arg(self.eps_position, "eps", 1e-5 if self.centered else None)
        if eps is not None and not isinstance(eps, (int, float)):
            raise self.refuse(f"eps={eps!r} is not a number")
        self.eps = None if eps is None else float(eps)

    def read_size(self, value: Any) -> None:
        """``normalized_shape`` from its value."""
        self.shape = _trailing(self, value)

    def params(self) -> dict[str, Any]:
        """``normalized_shape`` (``"runtime"`` if read from a shape) and ``eps``; a summary matches them."""
        return {"normalized_shape": "runtime" if self._runtime else list(self.shape), "eps": self.eps}

    def batch_movable(self, layout: tuple[int, int, int], ndim: int) -> bool:
        """True: it normalizes trailing axes (the batch axis comes before them, or the op mixes examples)."""
        return True

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(B, *positions, D)`` with the trailing ``normalized_shape`` axes flattened."""
        k = len(self.shape)
        return x.reshape(*x.shape[: x.ndim - k], -1)

    def weight_bias(self, params: dict[str, torch.Tensor], args: Any, kwargs: Any,
                    like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The stream's ``(gamma, beta)`` from the module or the function's ``weight`` and ``bias``."""
        if self.module is not None:
            p = self.prefix + "."
            return params.get(p + "weight"), params.get(p + "bias")
        w = kwargs.get("weight", args[2] if len(args) > 2 else None)
        b = kwargs.get("bias", args[3] if len(args) > 3 else None)
        return w, b


@register(*(t for t in (getattr(nn, "RMSNorm", None), getattr(F, "rms_norm", None)) if t is not None))
class RmsNormRule(LayerNormRule):
    """``rms_norm``: no centring, ``nu = 1 / sqrt(mean(x^2) + eps)``.

    ``eps=None`` means the dtype's epsilon.
    """

    family = "rms_norm"
    centered = False
    eps_position = 3

    def eps_for(self, x: torch.Tensor) -> float:
        """The given ``eps``, or the machine epsilon of ``x``'s dtype when it is None."""
        return float(torch.finfo(x.dtype).eps) if self.eps is None else self.eps

    def weight_bias(self, params: dict[str, torch.Tensor], args: Any, kwargs: Any,
                    like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The stream's ``gamma``; RMSNorm has no bias."""
        return super().weight_bias(params, args, kwargs, like)[0], None


@register(F.normalize)
class NormalizeRule(NormRule):
    """``F.normalize(x, p=2, dim)``: ``x / max(||x||, eps)`` over ``dim``, a scale per position.

    Like RMSNorm without its weight, with the norm instead of the root mean square (so no ``1/D`` in its
    Jacobian); ``dim`` may be any axis but the batch's (the channels of a feature map: ``dim=1``). Other ``p``
    are refused.
    """

    family = "normalize"
    centered = False
    per_entry = False

    def setup(self) -> None:
        """Read ``p``, ``dim`` and ``eps``."""
        p = self.const_arg(1, "p", 2.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or float(p) != 2.0:
            raise self.refuse(f"F.normalize with p={p!r}; only the Euclidean norm (p=2) has a rule")
        dim = self.const_arg(2, "dim", 1)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise self.refuse(f"F.normalize over dim={dim!r}; give one dimension")
        if dim == 0:
            raise self.refuse("F.normalize over dim=0, the axis laftr takes the examples along: it would mix "
                              "them (a sequence-first value normalized over time: put its batch axis first)")
        if self.const_arg(4, "out", None) is not None:
            raise self.refuse("F.normalize with out=")
        self.dim, self.eps = dim, float(self.const_arg(3, "eps", 1e-12))

    def params(self) -> dict[str, Any]:
        """``dim`` and ``eps``, which a stored summary must match."""
        return {"dim": self.dim, "eps": self.eps}

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the normalized dimension moved last."""
        if x.ndim < 2 or self.dim % x.ndim == 0:
            raise self.refuse(f"F.normalize over dim={self.dim} of a {x.ndim}-d input: the axis laftr takes "
                              "the examples along (it would mix them; a sequence-first value normalized over "
                              "time: put its batch axis first)")
        return x.movedim(self.dim, -1)

    def ungrouped(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The normalized dimension moved back."""
        return g.movedim(-1, self.dim % x.ndim)

    def inv_sigma(self, x: torch.Tensor) -> torch.Tensor:
        """``1 / max(||x||, eps)`` of every position."""
        return self.grouped(x).norm(dim=-1).clamp_min(self.eps).reciprocal()

    def weight_bias(self, params: dict[str, torch.Tensor], args: Any, kwargs: Any,
                    like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """None: F.normalize has no affine parameters."""
        return None, None


@register(nn.GroupNorm, F.group_norm)
class GroupNormRule(_RuntimeSizes):
    """``group_norm``: input ``(B, C, *spatial)``, statistics over each group of ``C / G`` channels.

    ``num_groups`` may be read from the input's shape (``h.shape[1] // 4``).
    """

    family = "group_norm"
    eps: float
    size_arg = (1, "num_groups")
    hint = ("give it as a literal, e.g. F.group_norm(h, 4), or read it from the input's shape "
            "(h.shape[1] // 4)")
    groups: int

    def setup(self) -> None:
        """Read ``num_groups`` (now, or at run time when read from a shape) and ``eps``."""
        if self.module is not None:
            mod = cast(nn.GroupNorm, self.module)
            self.groups = int(mod.num_groups)
            self.eps = float(mod.eps)
        else:
            self.setup_sizes()
            eps = self.const_arg(4, "eps", 1e-5)
            if not isinstance(eps, (int, float)):
                raise self.refuse(f"eps={eps!r} is not a number")
            self.eps = float(eps)

    def read_size(self, value: Any) -> None:
        """``num_groups`` from its value (a positive int)."""
        if not _is_int(value) or value < 1:
            raise self.refuse(f"num_groups={value!r} is not a positive int; " + self.hint)
        self.groups = value

    def params(self) -> dict[str, Any]:
        """``num_groups`` (``"runtime"`` when read from a shape) and ``eps``, which a summary must match."""
        return {"num_groups": "runtime" if self._runtime else self.groups, "eps": self.eps}

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(B, groups, D)``: each group's channels and spatial entries flattened."""
        return x.reshape(x.shape[0], self.groups, -1)

    def _channel(self, t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t.reshape(-1, *([1] * (like.ndim - 2)))

    def weight_bias(self, params: dict[str, torch.Tensor], args: Any, kwargs: Any,
                    like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The stream's per-channel ``(gamma, beta)`` shaped to broadcast against the input."""
        if self.module is not None:
            p = self.prefix + "."
            return self._channel(params.get(p + "weight"), like), self._channel(params.get(p + "bias"), like)
        w = kwargs.get("weight", args[2] if len(args) > 2 else None)
        b = kwargs.get("bias", args[3] if len(args) > 3 else None)
        return self._channel(w, like), self._channel(b, like)


@register(nn.modules.instancenorm._InstanceNorm)
class InstanceNormRule(GroupNormRule):
    """Instance norm: per example and channel (GroupNorm with one channel per group).

    With running statistics in eval mode it is instead a per-channel affine map, like eval batch norm.
    """

    family = "instance_norm"

    def setup(self) -> None:
        """Read ``eps`` and the channels; with running statistics the op is a fixed affine map."""
        mod = cast("nn.modules.instancenorm._InstanceNorm | None", self.module)
        assert mod is not None
        self.eps = float(mod.eps)
        self.groups = int(mod.num_features)
        self.fixed = bool(mod.track_running_stats and mod.running_mean is not None)
        if self.fixed:  # per-instance values of the class constants (an affine map, no statistic)
            self.site = False  # type: ignore[misc]
            self.affine = True  # type: ignore[misc]

    def call(self, params: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Instance norm of one stream, on the running statistics when the op uses them."""
        p = self.prefix + "."
        x = args[0]
        if self.fixed:
            return F.instance_norm(x, params[p + "running_mean"], params[p + "running_var"],
                                   params.get(p + "weight"), params.get(p + "bias"), use_input_stats=False,
                                   eps=self.eps)
        return F.instance_norm(x, None, None, params.get(p + "weight"), params.get(p + "bias"),
                               use_input_stats=True, eps=self.eps)

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The exact op when it is affine (running statistics), else the normalization's fit."""
        return self._fixed(mode, args, kwargs) if self.fixed else super().fit(mode, args, kwargs)

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The exact op when it is affine (running statistics), else the normalization's Monte Carlo."""
        return self._fixed(mode, args, kwargs) if self.fixed else super().sample(mode, args, kwargs)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The exact op when it is affine (running statistics), else theta0's own linearization."""
        return self._fixed(mode, args, kwargs) if self.fixed else super().own(mode, args, kwargs)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """The generic affine closed form with running statistics, else the normalization's."""
        return mode.affine(self, args, kwargs) if self.fixed else super().moments(mode, args, kwargs)

    def check(self, args: Any, kwargs: Any) -> None:
        """Refuse other data-dependent arguments (used in the fixed case)."""
        self.pre(args, kwargs)

    def _fixed(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream runs the op exactly: with running statistics it is a fixed affine map."""
        self.check(args, kwargs)
        return Pair(self.call_streams(mode, args, kwargs), True)
