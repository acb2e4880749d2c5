"""Max pooling: a selection decided by theta0 (METHOD.md section 2).

Both streams take the position where theta0's stream is largest (``argmax0``, the default), or each stream
pools itself (``separate``, the original code), or, for LAFTR's Monte Carlo, every window's position is drawn
from the stored frequency with which it was theta0's argmax on the data (``sample``: one stored float per
pool-input position, recorded only when that rule is used). The closed form has no max pooling.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError
from .base import Pair, Rule, register


def _pool_geometry(pool: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    def pair(v: Any) -> tuple[int, int]:
        if pool["dims"] == 1:
            v = v[0] if isinstance(v, (tuple, list)) else v
            return (1, int(v))
        return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))

    return pair(pool["kernel_size"]), pair(pool["stride"]), pair(pool["padding"]), pair(pool["dilation"])


def pool_windows(v: torch.Tensor, pool: dict[str, Any],
                 pad_value: float) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Windows of a max pool as ``(B, C, K, L)`` (K positions per window, L windows) and the output shape."""
    if pool.get("ceil_mode"):
        raise UnsupportedOpError("max pooling with ceil_mode=True is not supported by window statistics")
    k, s, p, d = _pool_geometry(pool)
    x = v.unsqueeze(2) if pool["dims"] == 1 else v
    if x.ndim != 4:
        raise UnsupportedOpError(f"max pooling input of shape {tuple(v.shape)} is not supported")
    B, C, H, W = x.shape
    if p != (0, 0):
        x = F.pad(x, (p[1], p[1], p[0], p[0]), value=pad_value)
    cols = F.unfold(x, k, dilation=d, stride=s)  # (B, C*K, L)
    K = k[0] * k[1]
    cols = cols.view(B, C, K, -1)
    Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    out_shape = (B, C, Wo) if pool["dims"] == 1 else (B, C, Ho, Wo)
    return cols, out_shape


def max_pool(v: torch.Tensor, pool: dict[str, Any], return_indices: bool = False) -> Any:
    """Max pooling of ``v`` with the pool's constants (``(out, indices)`` when ``return_indices``)."""
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

    def setup(self) -> None:
        """Read the pool's constants (stride defaults to the kernel size); refuse ``return_indices``."""
        names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        if self.module is not None:
            dims = 1 if isinstance(self.module, nn.MaxPool1d) else 2
            kw = {n: getattr(self.module, n) for n in names}
        else:
            dims = _MAXPOOL_FUNCS[self.node.target]
            kw = {n: self.const_arg(i + 1, n, None) for i, n in enumerate(names)}
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

    def params(self) -> dict[str, Any]:
        """The pool's constants as JSON values, which a stored summary must match."""
        def js(v: Any) -> Any:
            return list(v) if isinstance(v, (tuple, list)) else v

        return {k: js(v) for k, v in self.pool.items()}

    def signature(self) -> list[Any]:
        """``[node name, family, params]``, always with the pool's constants."""
        return [self.name, self.family, self.params()]

    def pre(self, args: Any, kwargs: Any) -> Pair:
        """The pooled input pair; refuses other data-dependent arguments."""
        return self.data_input(args, kwargs)

    def forward(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """Every stream pools itself exactly."""
        pre = self.pre(args, kwargs)
        return Pair(tuple(max_pool(v, self.pool) for v in pre.vals), True)

    def fit(self, mode: Any, args: Any, kwargs: Any) -> Any:
        """theta0's exact pooling; records how often each window position is the argmax when asked."""
        s0 = self.pre(args, kwargs).vals[0]
        if mode.record_pools:
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
