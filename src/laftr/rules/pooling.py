"""Max pooling: a selection decided by theta0 (METHOD.md section 2).

Both streams take the position where theta0's stream is largest (``argmax0``, the default), or each stream
pools itself (``separate``, the original code), or, for LAFTR's Monte Carlo, every window's position is drawn
from the stored frequency with which it was theta0's argmax on the data (``sample``: one stored float per
pool-input position, recorded only when that rule is used). The closed form has no max pooling.

``torch.sort`` / ``torch.topk`` are selections of the same kind (:class:`SortRule`): theta0's order, or each
stream's own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import UnsupportedOpError
from .base import Pair, Rule, describe, register


def _pool_geometry(pool: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    """Kernel, stride, padding and dilation as (height, width) pairs.

    A 1-d pool is a 2-d one of height 1 (kernel, stride and dilation 1 along it, no padding).
    """
    def pair(v: Any, along_height: int) -> tuple[int, int]:
        if pool["dims"] == 1:
            v = v[0] if isinstance(v, (tuple, list)) else v
            return (along_height, int(v))
        return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))

    return (pair(pool["kernel_size"], 1), pair(pool["stride"], 1), pair(pool["padding"], 0),
            pair(pool["dilation"], 1))


def pool_windows(v: torch.Tensor, pool: dict[str, Any],
                 pad_value: float) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Windows of a max pool as ``(B, C, K, L)`` (K positions per window, L windows) and the output shape.

    Positions outside the input (``padding``, and with ``ceil_mode`` the part of a last window that runs past
    the padded input) hold ``pad_value``. Windows of unequal sizes (an adaptive pool whose output size does
    not divide its input's: ``pool["unequal"]`` says so) have no such layout and are refused.
    """
    if "output_size" in pool:
        raise UnsupportedOpError(pool["unequal"])
    k, s, p, d = _pool_geometry(pool)
    x = v.unsqueeze(2) if pool["dims"] == 1 else v
    if x.ndim != 4:
        raise UnsupportedOpError(f"max pooling input of shape {tuple(v.shape)} is not supported")
    B, C, H, W = x.shape

    def windows(size: int, i: int) -> int:  # torch's output size along axis i
        span = size + 2 * p[i] - d[i] * (k[i] - 1) - 1
        if not pool.get("ceil_mode"):
            return span // s[i] + 1
        n = -(-span // s[i]) + 1
        return n - 1 if (n - 1) * s[i] >= size + p[i] else n  # the last window must start inside

    Ho, Wo = windows(H, 0), windows(W, 1)
    # padding, and on the bottom / right what a ceil_mode window reads past it
    extra = [max(0, (n - 1) * s[i] + d[i] * (k[i] - 1) + 1 - (size + 2 * p[i]))
             for i, (n, size) in enumerate(((Ho, H), (Wo, W)))]
    if p != (0, 0) or any(extra):
        x = F.pad(x, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]), value=pad_value)
    cols = F.unfold(x, k, dilation=d, stride=s)  # (B, C*K, L)
    K = k[0] * k[1]
    cols = cols.view(B, C, K, -1)
    out_shape = (B, C, Wo) if pool["dims"] == 1 else (B, C, Ho, Wo)
    return cols, out_shape


def max_pool(v: torch.Tensor, pool: dict[str, Any], return_indices: bool = False) -> Any:
    """Max pooling of ``v`` with the pool's constants (``(out, indices)`` when ``return_indices``).

    A pool given by ``output_size`` is torch's adaptive max pooling (windows of unequal sizes).
    """
    if "output_size" in pool:
        afn = F.adaptive_max_pool1d if pool["dims"] == 1 else F.adaptive_max_pool2d
        out, idx = afn(v, pool["output_size"], return_indices=True)
        return (out, idx) if return_indices else out
    fn = F.max_pool1d if pool["dims"] == 1 else F.max_pool2d
    k, s, p, d = pool["kernel_size"], pool["stride"], pool["padding"], pool["dilation"]
    if return_indices:
        return fn(v, k, s, p, d, pool["ceil_mode"], return_indices=True)
    return fn(v, k, s, p, d, pool["ceil_mode"])


def gather_pool(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select the positions ``idx`` (as returned by ``max_pool(..., return_indices=True)``) from ``v``."""
    B, C = v.shape[:2]
    return v.reshape(B, C, -1).gather(2, idx.reshape(B, C, -1)).view(idx.shape)


class PoolLaw:
    """How often each window position was theta0's argmax, pooled over groups: ``(C, K, L)``."""

    def __init__(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> None:
        """Turn the stored argmax counts into frequencies, pooled over the groups."""
        self.pi = (sums["argmax"].sum(0) / counts.sum()).to(device, dtype)

    def draw(self, groups: torch.Tensor, gen: torch.Generator, shared: bool,
             like: torch.Tensor) -> torch.Tensor:
        """Each window's argmax position, ``(n, C, 1, L)`` on ``like``'s device (``n = 1`` when shared)."""
        C, K, L = self.pi.shape
        n = 1 if shared else int(groups.shape[0])
        probs = self.pi.permute(0, 2, 1).reshape(C * L, K).to(torch.float64)
        cpu_gen = gen if gen.device == probs.device else torch.Generator(probs.device).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item()))
        idx = torch.multinomial(probs, n, replacement=True, generator=cpu_gen)
        return idx.to(like.device).view(C, L, n).permute(2, 0, 1).unsqueeze(2)


_MAXPOOL_FUNCS: dict[Any, int] = {F.max_pool1d: 1, F.max_pool2d: 2, torch.max_pool1d: 1, torch.max_pool2d: 2}
for _name, _dims in (("_max_pool1d", 1), ("_max_pool2d", 2), ("max_pool1d_with_indices", 1),
                     ("max_pool2d_with_indices", 2)):
    if hasattr(F, _name):
        _MAXPOOL_FUNCS[getattr(F, _name)] = _dims


@register(nn.MaxPool1d, nn.MaxPool2d, *_MAXPOOL_FUNCS)
class MaxPoolRule(Rule):
    """``max_pool1d`` / ``max_pool2d``."""

    family: ClassVar[str] = "maxpool"
    site: ClassVar[bool] = True
    #: why the windows have no common layout (an adaptive pool of unequal windows), as seen on the last input
    unequal: str | None = None

    def setup(self) -> None:
        """Read the pool's constants (stride defaults to the kernel size); refuse ``return_indices``."""
        names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        self._sized: dict[str, int] = {}
        if self.module is not None:
            dims = 1 if isinstance(self.module, nn.MaxPool1d) else 2
            kw = {n: getattr(self.module, n) for n in names}
        else:
            dims = _MAXPOOL_FUNCS[self.node.target]
            # a kernel or stride read from the input's shape (``F.max_pool1d(x, x.size(2))``, the max over
            # time of a text CNN) is known at run time only: taken from the call's arguments then (``_sized``)
            self._sized = self.runtime_args((1, "kernel_size"), (2, "stride"))
            kw = {n: "runtime" if n in self._sized else self.const_arg(i + 1, n, None)
                  for i, n in enumerate(names)}
        if kw.get("return_indices"):
            raise self.refuse("max pooling with return_indices=True")
        k = kw["kernel_size"]
        s = kw.get("stride")
        self.pool = {
            "kernel_size": k,
            "stride": s if s not in (None, [], ()) else k,
            "padding": kw.get("padding") or 0,
            "dilation": kw.get("dilation") or 1,
            "ceil_mode": bool(kw.get("ceil_mode") or False),
            "dims": dims,
        }
        self._declared = dict(self.pool)  # what the summary records (a size read at run time as "runtime")

    def params(self) -> dict[str, Any]:
        """The pool's constants as JSON values, which a stored summary must match."""
        def js(v: Any) -> Any:
            return list(v) if isinstance(v, (tuple, list)) else v

        return {k: js(v) for k, v in self._declared.items()}

    def signature(self) -> list[Any]:
        """``[node name, family, params]``, always with the pool's constants."""
        return [self.name, self.family, self.params()]

    def pre(self, args: Any, kwargs: Any) -> Pair:
        """The pooled input pair; refuses other data-dependent arguments. Sets a size read at run time."""
        pair = self.data_input(args, kwargs)
        if self._sized:
            pool = dict(self._declared)
            for name, i in self._sized.items():
                v = self.runtime_value(args, kwargs, i, name)
                if not (isinstance(v, int) or (isinstance(v, (tuple, list)) and v
                                               and all(isinstance(u, int) for u in v))):
                    raise self.refuse(f"its {name}={v!r} is not a size (an int or a tuple of ints)")
                pool[name] = v
            if pool["stride"] == "runtime" and "stride" not in self._sized:
                pool["stride"] = pool["kernel_size"]
            self.pool = pool
        return pair

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream pools itself exactly."""
        pre = self.pre(args, kwargs)
        return Pair(tuple(max_pool(v, self.pool) for v in pre.vals), True)

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact pooling; records how often each window position is the argmax when asked."""
        s0 = self.pre(args, kwargs).vals[0]
        if mode.record_pools and "unequal" not in self.pool:  # (unequal windows: no frequencies to record)
            cols, _ = pool_windows(s0, self.pool, float("-inf"))
            win = cols.argmax(2)  # (B, C, L)
            onehot = F.one_hot(win, cols.shape[2]).permute(0, 1, 3, 2)  # (B, C, K, L)
            mode.add(self.name, "argmax", onehot)
        return Pair((max_pool(s0, self.pool),), True)

    def _selected(self, mode: Any, pre: Pair) -> Pair:
        if mode.pool_mode == "separate":
            return Pair(tuple(max_pool(v, self.pool) for v in pre.vals), True)
        if mode.pool_mode == "argmax0":
            out0, idx = max_pool(pre.vals[0], self.pool, return_indices=True)
            return Pair((out0, *(gather_pool(v, idx) for v in pre.vals[1:])), True)
        raise ValueError(f"unknown max-pool rule {mode.pool_mode!r}")

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Both streams take theta0's argmax (or each its own with ``maxpool="separate"``)."""
        pre = self.pre(args, kwargs)
        if mode.pool_mode == "sample":
            raise ValueError("theta0's own linearization uses theta0's max-pool selection: maxpool='argmax0' "
                             "or 'separate'")
        return self._selected(mode, pre)

    def sample_separable(self, mode: Any) -> bool:
        """With drawn positions (``sample``) or each stream's own max (``separate``); not theta0's argmax."""
        return mode.pool_mode in ("sample", "separate")

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Each window's position drawn from the stored argmax frequencies (``maxpool="sample"``).

        With the other ``maxpool`` choices, as :meth:`own`.
        """
        pre = self.pre(args, kwargs)
        if mode.pool_mode != "sample":
            return self._selected(mode, pre)
        law: PoolLaw = mode.law(self)
        v0 = pre.vals[0]
        cols0, out_shape = pool_windows(v0, self.pool, 0.0)
        B, C, K, L = cols0.shape
        if tuple(law.pi.shape) != (C, K, L):
            raise ValueError(f"max-pool site {self.name!r}: summary has shape "
                             f"{tuple(law.pi.shape)}, network {(C, K, L)}")
        idx = mode.draw(self, law, v0)  # (n, C, 1, L)
        outs = []
        for v in pre.vals:
            cols, _ = pool_windows(v, self.pool, 0.0)
            outs.append(cols.gather(2, idx.expand(B, C, 1, L)).view(out_shape))
        return Pair(tuple(outs), True)

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Refuse: laftr-exact does not handle max pooling."""
        raise UnsupportedOpError(
            f"node {self.name!r}: laftr-exact does not handle max pooling; "
            "use the Monte Carlo 'laftr' estimator"
        )

    def law(self, sums: dict[str, torch.Tensor], counts: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> Any:
        """The stored argmax counts turned into a (private) ``PoolLaw`` on ``device`` in ``dtype``."""
        return PoolLaw(sums, counts, device, dtype)


class _ViewedMaxPool(MaxPoolRule):
    """A max over windows that becomes a ``max_pool1d``/``max_pool2d`` once its input is viewed another way.

    Subclasses give :meth:`view` (the pooled input of one stream, and the pool's constants for it) and
    :meth:`unview` (the pooled output back in the op's own shape). Every mode of :class:`MaxPoolRule` then
    applies unchanged: theta0's argmax, each stream its own, or positions drawn from the stored argmax
    frequencies (one per input position of the viewed layout).
    """

    constants: dict[str, Any]  # the op's own constants (set by the subclass's setup)

    def view(self, v: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def unview(self, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def setup(self) -> None:
        """Nothing to read here (subclasses read their constants); the pool is set from the input's shape."""
        self.pool = {}

    def params(self) -> dict[str, Any]:
        """The op's constants, which a stored summary must match (the pool depends on the input's shape)."""
        return dict(self.constants)

    def pre(self, args: Any, kwargs: Any) -> Pair:
        """The data input viewed for pooling; sets the pool's constants from its shape."""
        pair = self.data_input(args, kwargs)
        self._inputs = tuple(pair.vals)
        viewed = []
        for v in pair.vals:
            w, self.pool = self.view(v)
            viewed.append(w)
        return Pair(tuple(viewed), pair.data, pair.fixed)

    def _back(self, out: Any) -> Any:
        return Pair(tuple(self.unview(o, self._inputs[0]) for o in out.vals), True)

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream pools itself exactly."""
        return self._back(super().forward(mode, args, kwargs))

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """As :meth:`MaxPoolRule.fit` on the viewed input."""
        return self._back(super().fit(mode, args, kwargs))

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """As :meth:`MaxPoolRule.own` on the viewed input."""
        return self._back(super().own(mode, args, kwargs))

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """As :meth:`MaxPoolRule.sample` on the viewed input."""
        return self._back(super().sample(mode, args, kwargs))


def _windows(kernel: Any, dims: int) -> dict[str, Any]:
    """The constants of a max pool whose windows tile its input: kernel = stride, no padding."""
    return {"kernel_size": kernel, "stride": kernel, "padding": 0, "dilation": 1, "ceil_mode": False,
            "dims": dims}


def _window(n: int, out: int | None, what: str, rule: Rule) -> int | None:
    """The window of an adaptive pool along one axis: input size / output size; None if sizes are unequal."""
    if out is None:
        return 1
    if out < 1:
        raise rule.refuse(f"{what}: output size {out}")
    return None if n % out else n // out


_ADAPTIVE_FUNCS: dict[Any, int] = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
                                   torch.adaptive_max_pool1d: 1}
for _name, _dims in (("adaptive_max_pool1d_with_indices", 1), ("_adaptive_max_pool1d", 1),
                     ("adaptive_max_pool2d_with_indices", 2), ("_adaptive_max_pool2d", 2)):
    if hasattr(F, _name):
        _ADAPTIVE_FUNCS[getattr(F, _name)] = _dims


@register(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, *_ADAPTIVE_FUNCS)
class AdaptiveMaxPoolRule(_ViewedMaxPool):
    """``AdaptiveMaxPool1d/2d``.

    Where the output size divides the input size, max pooling with kernel = stride = input size / output size
    (``output_size=1``: the global max pool of CNN heads), in every mode. Otherwise torch's windows are of
    unequal sizes: theta0's argmax and each stream's own max are taken by torch's adaptive pooling itself;
    positions drawn from stored argmax frequencies (``maxpool="sample"``), which need windows of one size,
    are refused at fit.
    """

    def setup(self) -> None:
        """Read the output size; refuse ``return_indices``."""
        super().setup()
        if self.module is not None:
            dims = 1 if isinstance(self.module, nn.AdaptiveMaxPool1d) else 2
            size, ret = self.module.output_size, self.module.return_indices
        else:
            dims = _ADAPTIVE_FUNCS[self.node.target]
            size, ret = self.const_arg(1, "output_size"), self.const_arg(2, "return_indices", False)
        if ret:
            raise self.refuse("adaptive max pooling with return_indices=True")
        sizes = list(size) if isinstance(size, (tuple, list)) else [size] * dims
        self.dims = dims
        self.constants = {"output_size": sizes, "dims": dims}

    def view(self, v: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``v`` itself, with kernel and stride the input size over the output size in each pooled dim."""
        if v.ndim != self.dims + 2:
            raise self.refuse(f"input of shape {tuple(v.shape)} (laftr pools batches of (C, ...) examples)")
        sizes: list[int | None] = self.constants["output_size"]
        k = [_window(int(n), o, "adaptive max pooling", self)
             for n, o in zip(v.shape[2:], sizes, strict=True)]
        if None in k:
            n, o = next((int(n), o) for n, o, w in zip(v.shape[2:], sizes, k, strict=True) if w is None)
            why = (f"node {self.name!r}: adaptive max pooling of output size {o} over an input of size {n} "
                   "has windows of unequal sizes, whose argmax frequencies maxpool='sample' cannot store; "
                   "use maxpool='argmax0' (the default) or 'separate', or an output size that divides the "
                   "input size")
            out = [int(n) if o is None else o for n, o in zip(v.shape[2:], sizes, strict=True)]
            self.unequal = why
            return v, {"output_size": out[0] if self.dims == 1 else tuple(out), "dims": self.dims,
                       "unequal": why}
        self.unequal = None
        return v, _windows(k[0] if self.dims == 1 else tuple(k), self.dims)

    def unview(self, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Already the op's shape."""
        return out


@register(torch.amax, "amax", torch.amin, "amin")
class AmaxRule(_ViewedMaxPool):
    """``amax`` / ``amin`` over one dimension (``x.amax(-1)``: the max over time of a text CNN).

    A max pool whose one window is that whole dimension (a minimum: of the negated input).
    """

    def setup(self) -> None:
        """Read ``dim`` (one, not the batch's) and ``keepdim``."""
        super().setup()
        dim = self.const_arg(1, "dim", None)
        if isinstance(dim, (tuple, list)):
            if len(dim) != 1:
                raise self.refuse(f"a max over several dimensions {list(dim)}; reduce one at a time")
            dim = dim[0]
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise self.refuse(f"a max over dim={dim!r}; give one dimension of each example")
        if dim == 0:
            raise self.refuse("a max over the batch dimension mixes the examples")
        self.dim, self.keepdim = dim, bool(self.const_arg(2, "keepdim", False))
        name = self.node.target if isinstance(self.node.target, str) else self.node.target.__name__
        self.sign = -1.0 if name in ("amin", "min") else 1.0
        self.constants = {"dim": dim, "keepdim": self.keepdim, "min": self.sign < 0}

    def view(self, v: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(B, rest, K)``: the reduced dimension last, the others flattened (negated for ``amin``)."""
        w = (self.sign * v).movedim(self.dim, -1)
        K = w.shape[-1]
        return w.reshape(w.shape[0], -1, K), _windows(K, 1)

    def unview(self, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The pooled ``(B, rest, 1)`` in the op's shape (``keepdim`` or not), the sign undone."""
        shape = list(v.shape)
        d = self.dim % v.ndim
        shape[d] = 1
        out = self.sign * out.reshape([s for i, s in enumerate(shape) if i != d])
        return out.unsqueeze(d) if self.keepdim else out


@register(torch.max, "max", torch.min, "min")
class MaxDimRule(AmaxRule):
    """``torch.max(x, dim)`` / ``x.max(dim)`` (and ``min``): ``(values, indices)`` over one dimension.

    The values are :class:`AmaxRule`'s (PointNet's global feature ``torch.max(x, 2)[0]``); the indices are
    each stream's own argmax, not linearized (a value per stream that no parameter's change moves smoothly),
    for code that reads them. ``torch.max(x)`` over every entry and a dim computed while tracing are refused;
    the elementwise ``torch.max(a, b)`` of two tensors is traced as ``torch.maximum`` (``laftr.graph``).
    """

    #: the op returns ``(values, indices)``, the indices each stream's own
    with_indices: ClassVar[bool] = True

    def setup(self) -> None:
        """Read ``dim`` and ``keepdim``; refuse the other forms of ``max``."""
        given = self.node.kwargs.get("dim", self.node.args[1] if len(self.node.args) > 1 else None)
        if given is None:
            raise self.refuse("a max over every entry mixes the examples of a batch; give dim")
        if isinstance(given, fx.Node):  # (of two tensors the tracer records torch.maximum / minimum)
            raise self.refuse(f"its dim is computed while tracing (node {given.name!r}, {describe(given)}); "
                              "laftr reads a reduction's dim when it builds the network: give it as a number "
                              "(x.max(-1))")
        super().setup()

    def _back(self, out: Any) -> Any:
        values = super()._back(out)
        indices = tuple(torch.max(self.sign * v, self.dim, keepdim=self.keepdim).indices
                        for v in self._inputs)
        return (values, Pair(indices, False))


@register(torch.sort, "sort", torch.topk, "topk")
class SortRule(Rule):
    """``torch.sort`` / ``torch.topk`` along one dimension of each example: ``(values, indices)``.

    The values are the input gathered in an order the data decides, a selection like max pooling's (a max is
    the last entry of a sort). Both streams take theta0's order (``maxpool="argmax0"``, the default; with
    ``gates="relu"`` theta0's order on each input) or each stream its own (``maxpool="separate"``). The sorted
    values are a continuous, piecewise-linear function of the input (entries that trade places are equal
    there), so theta0's order is theta0's tangent: away from ties the estimate is exact to first order. No law
    of orders is stored (``maxpool="sample"`` and the closed form refuse the op). The indices are each
    stream's own (not linearized), as ``torch.max(x, dim)``'s.
    """

    family: ClassVar[str] = "sort"
    #: the op returns ``(values, indices)``, the indices each stream's own
    with_indices: ClassVar[bool] = True

    def setup(self) -> None:
        """Read ``dim`` (not the batch's); refuse ``out=``."""
        target = self.node.target
        self.kind = "topk" if target in (torch.topk, "topk") else "sort"
        dim = self.const_arg(1 if self.kind == "sort" else 2, "dim", -1)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise self.refuse(f"{self.kind} over dim={dim!r}; give one dimension of each example")
        if dim == 0:
            raise self.refuse(f"{self.kind} over the batch dimension mixes the examples")
        if self.const_arg(None, "out", None) is not None:
            raise self.refuse(f"{self.kind} with out=")
        self.dim = dim

    def _check(self, v: torch.Tensor) -> None:
        if v.ndim < 2 or self.dim % v.ndim == 0:
            raise self.refuse(f"{self.kind} over dim={self.dim} of an input of shape {tuple(v.shape)} "
                              "reaches the batch dimension, which mixes the examples; give a dimension of "
                              "each example")

    def _own_orders(self, mode: Any, args: Any, kwargs: Any) -> tuple[Pair, Pair]:
        """Every stream sorts itself exactly."""
        x = self.data_input(args, kwargs)
        self._check(x.vals[0])
        outs = self.call_streams(mode, args, kwargs, range(len(x.vals)))
        return Pair(tuple(o[0] for o in outs), True), Pair(tuple(o[1] for o in outs), False)

    def _theta0_order(self, mode: Any, args: Any, kwargs: Any) -> tuple[Pair, Pair]:
        """Every stream's values gathered in theta0's order; each stream's own indices."""
        if getattr(mode, "pool_mode", "argmax0") == "separate":
            return self._own_orders(mode, args, kwargs)
        if mode.pool_mode == "sample":
            raise self.refuse(f"maxpool='sample' draws max-pool positions from their stored frequencies, and "
                              f"laftr stores no law of the orders a {self.kind} takes; use maxpool='argmax0' "
                              "(theta0's order, the default) or 'separate'")
        values, indices = self._own_orders(mode, args, kwargs)
        x = self.data_input(args, kwargs)
        order = indices.vals[0]
        gathered = (values.vals[0], *(v.gather(self.dim, order) for v in x.vals[1:]))
        return Pair(gathered, True), indices

    forward = _own_orders

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact op (nothing is recorded)."""
        return self._own_orders(mode, args, kwargs)

    def own(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's order (or each stream's own with ``maxpool="separate"``)."""
        return self._theta0_order(mode, args, kwargs)

    def sample(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """As :meth:`own`, on the sampled streams."""
        return self._theta0_order(mode, args, kwargs)

    def sample_separable(self, mode: Any) -> bool:
        """Only when each stream sorts itself (``separate``); theta0's order reads theta0's stream."""
        return getattr(mode, "pool_mode", "argmax0") == "separate"

    def moments(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Refuse: the closed form has no selections decided by the data."""
        raise self.refuse(f"laftr-exact has no closed form for a {self.kind} (an order decided by theta0, as "
                          "max pooling's selection); use the Monte Carlo 'laftr' estimator")
