"""Tracing with torch.fx and a paired interpreter that runs several parameter sets ("streams") node by node.

The network is never mutated: each stream's parameters come from a dict (theta0's stored copy, or the
live model's parameters), and every node is interpreted by the rule of :mod:`laftr.rules`. Gates and
max pools are delegated to a *policy* object, which is where LAFTR's linearization lives:

- :class:`FitRecorder` runs theta0 alone on real data and counts how often each unit is active;
- :class:`BernoulliGates` / :class:`ReluGates` run theta0 and theta with gates decided by theta0.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from .rules import Kind, Rule, UnsupportedOpError, classify, describe, nondata_only_position

log = logging.getLogger(__name__)


class Pair:
    """A value in each stream. ``data`` marks values that depend on the network input."""

    __slots__ = ("data", "vals")

    def __init__(self, vals: tuple[Any, ...], data: bool) -> None:
        self.vals = vals
        self.data = data


@dataclasses.dataclass
class Site:
    """A gate site (ReLU-family node) or a max-pool site, with its per-example unit shape."""

    name: str
    kind: str  # "gate" or "maxpool"
    slope: float = 0.0
    pool: dict[str, Any] | None = None
    shape: tuple[int, ...] | None = None  # pre-activation shape (gate) / pool statistic shape (maxpool)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`UnsupportedOpError` with the reason if it cannot be."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:
        raise UnsupportedOpError(
            f"could not trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); LAFTR needs a "
            "network whose forward has no data-dependent control flow"
        ) from e


def _stream(v: Any, s: int) -> Any:
    return tree_map(lambda a: a.vals[s] if isinstance(a, Pair) else a, v)


def _pairs(v: Any) -> list[Pair]:
    leaves, _ = tree_flatten(v)
    return [a for a in leaves if isinstance(a, Pair)]


class TracedNet:
    """A traced ReLU network: its graph, the rule of every node and its gate / max-pool sites."""

    def __init__(self, model: nn.Module) -> None:
        self.gm = trace(model)
        self.rules: dict[str, Rule] = {}
        self.sites: dict[str, Site] = {}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if not placeholders:
            raise UnsupportedOpError(f"{type(model).__name__}.forward takes no input")
        for extra in placeholders[1:]:
            if not extra.args:  # no default value
                raise UnsupportedOpError(
                    f"{type(model).__name__}.forward takes more than one required input ({extra.name!r}); "
                    "LAFTR supports networks of one input tensor"
                )
        self.input_node = placeholders[0]
        self._param_names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        for node in self.gm.graph.nodes:
            if node.op in ("call_module", "call_function", "call_method"):
                rule = classify(node, self.gm)
                self.rules[node.name] = rule
                if rule.kind is Kind.GATE:
                    self.sites[node.name] = Site(node.name, "gate", slope=rule.slope)
                elif rule.kind is Kind.MAXPOOL:
                    self.sites[node.name] = Site(node.name, "maxpool", pool=rule.pool)
        self.users_left = {n.name: len(n.users) for n in self.gm.graph.nodes}

    def signature(self) -> list[list[Any]]:
        """``[[site name, kind, slope], ...]``: what a stored summary must match."""
        return [[s.name, s.kind, s.slope] for s in self.sites.values()]

    # ------------------------------------------------------------------ per-stream evaluation
    def _call(self, node: fx.Node, s: int, params: dict[str, torch.Tensor], args: Any, kwargs: Any) -> Any:
        a = _stream(args, s)
        k = _stream(kwargs, s)
        if node.op == "call_module":
            name = str(node.target)
            mod = self.gm.get_submodule(name)
            return module_call(mod, name, params, a, k)
        if node.op == "call_function":
            return node.target(*a, **k)
        return getattr(a[0], str(node.target))(*a[1:], **k)

    def run(self, x: tuple[torch.Tensor, ...], params: Sequence[dict[str, torch.Tensor]], policy: Any) -> tuple:
        """Run the graph with one input and one parameter dict per stream; gates/pools go to ``policy``.

        Returns a tuple with the output of each stream.
        """
        n = len(params)
        env: dict[str, Any] = {}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if node is self.input_node:
                    env[node.name] = Pair(tuple(x), True)
                else:
                    env[node.name] = node.args[0]
                continue
            if node.op == "get_attr":
                t = str(node.target)
                if t in self._param_names:
                    env[node.name] = Pair(tuple(p[t] for p in params), False)
                else:
                    env[node.name] = _get_attr(self.gm, t)
                continue
            if node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda m: env[m.name])
                if not isinstance(out, Pair):
                    raise UnsupportedOpError("the network must return a single tensor that depends on its input")
                return out.vals
            args = fx.node.map_arg(node.args, lambda m: env[m.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda m: env[m.name])
            env[node.name] = self._eval(node, n, params, args, kwargs, policy)
        raise AssertionError("graph has no output node")

    def _eval(self, node: fx.Node, n: int, params: Sequence[dict], args: Any, kwargs: Any, policy: Any) -> Any:
        pairs = _pairs((args, kwargs))
        data = [p for p in pairs if p.data]
        rule = self.rules[node.name]
        if not data:  # parameter / constant arithmetic: per stream, no linearization involved
            if not pairs:
                return self._call(node, 0, params[0], args, kwargs)
            return Pair(tuple(self._call(node, s, params[s], args, kwargs) for s in range(n)), False)
        if rule.kind is Kind.SHAPE:
            return self._call(node, 0, params[0], args, kwargs)
        if rule.kind is Kind.IDENTITY:
            return args[0]
        if rule.kind is Kind.GATE:
            return policy.gate(self.sites[node.name], args[0])
        if rule.kind is Kind.MAXPOOL:
            return policy.maxpool(self.sites[node.name], args[0])
        if rule.kind is Kind.AFFINE:
            self.check_affine(node, args, kwargs)
        outs = tuple(self._call(node, s, params[s], args, kwargs) for s in range(n))
        return Pair(outs, True)

    def check_affine(self, node: fx.Node, args: Any, kwargs: Any) -> None:
        """Raise unless at most one data-dependent input enters this (single-input) affine op."""
        data_args = [p for p in _pairs((args, kwargs)) if p.data]
        if len(data_args) > 1:
            raise UnsupportedOpError(
                f"node {node.name!r} ({describe(node, self.gm)}) combines two data-dependent tensors "
                "multiplicatively; the network is not piecewise linear in its input"
            )
        for pos in nondata_only_position(node):
            if pos < len(args) and any(p.data for p in _pairs(args[pos])):
                raise UnsupportedOpError(
                    f"node {node.name!r} ({describe(node, self.gm)}) divides by a data-dependent tensor"
                )


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def module_call(mod: nn.Module, name: str, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """Call a leaf module with parameters (and buffers) taken from ``params`` by their qualified names."""
    p = name + "."
    if isinstance(mod, nn.Linear):
        return F.linear(args[0], params[p + "weight"], params.get(p + "bias"))
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return mod._conv_forward(args[0], params[p + "weight"], params.get(p + "bias"))
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(
            args[0], params[p + "running_mean"], params[p + "running_var"], params.get(p + "weight"),
            params.get(p + "bias"), False, 0.0, mod.eps,
        )
    if any(True for _ in mod.parameters()):
        local = {k: params[p + k] for k, _ in list(mod.named_parameters()) + list(mod.named_buffers())}
        return torch.func.functional_call(mod, local, args, kwargs)
    return mod(*args, **kwargs)


# ---------------------------------------------------------------------- max-pool helpers
def _pool_geometry(pool: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    def pair(v: Any) -> tuple[int, int]:
        if pool["dims"] == 1:
            v = v[0] if isinstance(v, (tuple, list)) else v
            return (1, int(v))
        return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))

    return pair(pool["kernel_size"]), pair(pool["stride"]), pair(pool["padding"]), pair(pool["dilation"])


def pool_windows(v: torch.Tensor, pool: dict[str, Any], pad_value: float) -> tuple[torch.Tensor, tuple]:
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
    fn = F.max_pool1d if pool["dims"] == 1 else F.max_pool2d
    return fn(v, pool["kernel_size"], pool["stride"], pool["padding"], pool["dilation"], pool["ceil_mode"],
              return_indices)


def gather_pool(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select the positions ``idx`` (as returned by ``max_pool(..., return_indices=True)``) from ``v``."""
    B, C = v.shape[:2]
    return v.reshape(B, C, -1).gather(2, idx.reshape(B, C, -1)).view(idx.shape)


# ---------------------------------------------------------------------- policies
class FitRecorder:
    """Single stream at theta0 on real data: the real network, while counting gate activity per group.

    ``group`` is a ``(B,)`` long tensor (the class for classwise summaries, else zeros). Statistics are
    float64 sums, so summaries of data shards add up exactly.
    """

    def __init__(self, sites: dict[str, Site]) -> None:
        self.sites = sites
        self.sums: dict[str, torch.Tensor] = {}
        self.group: torch.Tensor | None = None
        self.num_groups = 1

    def _add(self, name: str, values: torch.Tensor) -> None:
        assert self.group is not None
        vals = values.to(torch.float64)
        acc = torch.zeros((self.num_groups, *vals.shape[1:]), dtype=torch.float64, device=vals.device)
        acc.index_add_(0, self.group, vals)
        if name in self.sums:
            old = self.sums[name]
            if old.shape[1:] != acc.shape[1:]:
                raise ValueError(f"site {name!r}: unit shape changed between batches ({old.shape[1:]} vs "
                                 f"{acc.shape[1:]}); inputs must all have the same shape")
            if old.shape[0] < acc.shape[0]:
                old = torch.cat([old, old.new_zeros((acc.shape[0] - old.shape[0], *old.shape[1:]))])
            old[: acc.shape[0]] += acc
            self.sums[name] = old
        else:
            self.sums[name] = acc

    def gate(self, site: Site, pre: Pair) -> Pair:
        s0 = pre.vals[0]
        on = s0 > 0
        site.shape = tuple(s0.shape[1:])
        self._add(site.name, on)
        out = torch.where(on, s0, s0 * site.slope)
        return Pair((out,), True)

    def maxpool(self, site: Site, pre: Pair) -> Pair:
        s0 = pre.vals[0]
        cols, _ = pool_windows(s0, site.pool or {}, float("-inf"))
        win = cols.argmax(2)  # (B, C, L)
        onehot = F.one_hot(win, cols.shape[2]).permute(0, 1, 3, 2)  # (B, C, K, L)
        site.shape = tuple(onehot.shape[1:])
        self._add(site.name, onehot)
        return Pair((max_pool(s0, site.pool or {}),), True)


class _PairPolicy:
    """Shared max-pool handling for the two-stream policies."""

    pool_mode = "argmax0"

    def __init__(self, pool_mode: str) -> None:
        if pool_mode not in ("argmax0", "separate", "sample"):
            raise ValueError(f"unknown maxpool mode {pool_mode!r}; choose argmax0, separate or sample")
        self.pool_mode = pool_mode

    def maxpool(self, site: Site, pre: Pair) -> Pair:
        pool = site.pool or {}
        if self.pool_mode == "separate":
            return Pair(tuple(max_pool(v, pool) for v in pre.vals), True)
        if self.pool_mode == "argmax0":
            out0, idx = max_pool(pre.vals[0], pool, return_indices=True)
            return Pair((out0,) + tuple(gather_pool(v, idx) for v in pre.vals[1:]), True)
        return self._sample_pool(site, pre)

    def _sample_pool(self, site: Site, pre: Pair) -> Pair:
        raise UnsupportedOpError("sampled max-pool selection needs stored window statistics")


class BernoulliGates(_PairPolicy):
    """Stochastic gating: unit i is on with probability mu_i, independently; one mask per sample
    (or one per call shared across the batch), the same mask for both streams."""

    def __init__(self, mu: dict[str, torch.Tensor], generator: torch.Generator, shared: bool = False,
                 pool_mode: str = "sample") -> None:
        super().__init__(pool_mode)
        self.mu = mu
        self.generator = generator
        self.shared = shared

    def gate(self, site: Site, pre: Pair) -> Pair:
        s0 = pre.vals[0]
        mu = self.mu[site.name].to(s0.dtype)
        if tuple(mu.shape) != tuple(s0.shape[1:]):
            raise ValueError(f"gate site {site.name!r}: summary has units of shape {tuple(mu.shape)}, the "
                             f"network produces {tuple(s0.shape[1:])} (input of another size?)")
        n = 1 if self.shared else s0.shape[0]
        u = torch.rand((n, *mu.shape), generator=self.generator, device=s0.device, dtype=s0.dtype)
        m = (u < mu).to(s0.dtype)
        if site.slope != 0.0:
            m = m + site.slope * (1 - m)
        return Pair(tuple(v * m for v in pre.vals), True)

    def _sample_pool(self, site: Site, pre: Pair) -> Pair:
        pi = self.mu[site.name]  # (C, K, L) selection probabilities
        v0 = pre.vals[0]
        cols0, out_shape = pool_windows(v0, site.pool or {}, 0.0)
        B, C, K, L = cols0.shape
        if tuple(pi.shape) != (C, K, L):
            raise ValueError(f"max-pool site {site.name!r}: summary has shape {tuple(pi.shape)}, network {(C, K, L)}")
        n = 1 if self.shared else B
        probs = pi.permute(0, 2, 1).reshape(C * L, K).to(torch.float64)
        idx = torch.multinomial(probs, n, replacement=True, generator=_cpu_gen(self.generator, probs))
        idx = idx.to(v0.device).view(C, L, n).permute(2, 0, 1).unsqueeze(2)  # (n, C, 1, L)
        outs = []
        for v in pre.vals:
            cols, _ = pool_windows(v, site.pool or {}, 0.0)
            outs.append(cols.gather(2, idx.expand(B, C, 1, L)).view(out_shape))
        return Pair(tuple(outs), True)


def _cpu_gen(gen: torch.Generator, like: torch.Tensor) -> torch.Generator:
    return gen if gen.device == like.device else torch.Generator(like.device).manual_seed(
        int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item()))


class ReluGates(_PairPolicy):
    """Deterministic gating by theta0's own activation pattern on each input: ``m = 1[s0(x) > 0]``."""

    def __init__(self, pool_mode: str = "argmax0") -> None:
        super().__init__(pool_mode)

    def gate(self, site: Site, pre: Pair) -> Pair:
        s0 = pre.vals[0]
        on = s0 > 0
        m = on.to(s0.dtype) if site.slope == 0.0 else torch.where(on, 1.0, site.slope).to(s0.dtype)
        return Pair(tuple(v * m for v in pre.vals), True)
