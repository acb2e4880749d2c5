"""The linearized-network baseline: the discrepancy of a first-order Taylor expansion in the parameters.

``D(theta) ~= mean_{x in C} rho(f(x; theta0), f(x; theta0) + J(x) (theta - theta0))`` over a coreset C of
k stored inputs, J the Jacobian w.r.t. the parameters at theta0. ``J(x) dtheta`` is one forward-mode
product, differentiable w.r.t. theta through the tangent: ``torch.func.linearize`` traces it once per model
(theta0's forward pass is not repeated), or, where the model cannot be traced, a ``torch.func.jvp`` per call.
Buffers (batch-norm statistics) stay at theta0's values; the network runs in eval mode. Every parameter is
linearized (a frozen parameter contributes only if it differs from theta0). Stores ``k * d`` floats. A network
with an op that has no forward-mode AD (nn.MultiheadAttention's fused kernel) goes through laftr's
traced interpreter instead, which computes the same function from plain ops; where that cannot run it either
(a weight_norm parametrization), ``J v`` is taken by reverse mode twice.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import nn
from torch.func import jvp

from .._util import (
    autocast_dtype,
    functional_call,
    in_func_transform,
    is_batched,
    probe_direction,
    shorten,
    tangent_map,
)
from ..errors import UnsupportedOpError, UsageError
from ..metrics import discrepancy
from .base import register
from .coreset import CoresetConfig, CoresetEstimator
from .curvature import eval_mode

log = logging.getLogger(__name__)


def _reraise_out_of_memory(e: BaseException) -> None:
    """Out of memory is no missing derivative: raise it as it is."""
    if isinstance(e, torch.OutOfMemoryError):
        raise e


def _twice_reversed(model: nn.Module, rest: dict[str, torch.Tensor], X: torch.Tensor,
                    primals: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor],
                    *failed: BaseException) -> tuple[torch.Tensor, torch.Tensor]:
    """The last way to ntk's products (:func:`_jvp_by_double_vjp`), or a refusal naming each way's failure."""
    try:
        with eval_mode(model):
            return _jvp_by_double_vjp(lambda p: functional_call(model, (p, rest), (X,)), primals, tangents)
    except (NotImplementedError, RuntimeError) as last:
        _reraise_out_of_memory(last)
        forward, interpreter, final = (shorten((str(f).splitlines() or [type(f).__name__])[0], 200)
                                       for f in (*failed, last))
        raise UnsupportedOpError(
            f"ntk cannot take Jacobian-vector products of this network: forward mode failed ({forward}), "
            f"laftr's interpreter too ({interpreter}), and reverse mode twice ({final}); "
            "subset, or laftr with gates='none', compare the real networks") from last


def _jvp_by_double_vjp(f: Any, primals: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor],
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(primals), J v)`` for ops without forward-mode AD: ``J v = d/du [(J^T u) . v]`` (any ``u``).

    Two reverse passes (``J^T u`` with its graph, then its derivative in ``u``); differentiable in ``v``.
    """
    with torch.enable_grad():
        p = {n: t.detach().requires_grad_(True) for n, t in primals.items()}
        z = f(p)
        u = torch.zeros_like(z, requires_grad=True)
        names = [n for n in p if n in tangents]
        jtu = torch.autograd.grad(z, [p[n] for n in names], u, create_graph=True, allow_unused=True)
        dot = sum(((g * tangents[n]).sum() for n, g in zip(names, jtu, strict=True) if g is not None),
                  torch.zeros((), dtype=z.dtype, device=z.device))
        (jv,) = torch.autograd.grad(dot, u, create_graph=True)
    return z.detach(), jv


def _reverse_checked(lin: Any, primals: dict[str, torch.Tensor]) -> Any:
    """``lin``, refusing by name a product that would be differentiated where it cannot be.

    The forward-mode products through some ops cannot be differentiated again, by any of ntk's paths
    (``nn.Hardsigmoid``: 'derivative for aten::hardsigmoid_backward is not implemented' in torch 2.13), which
    the user's ``backward()`` met after the estimate had been returned. Checked once on a fixed direction;
    such a map still gives values where no gradient is asked (under ``torch.no_grad()``, or a theta that
    requires none).
    """
    probe = {n: v.requires_grad_(v.is_floating_point()) for n, v in probe_direction(primals).items()}
    leaves = [v for v in probe.values() if v.requires_grad]
    try:
        with torch.enable_grad():
            out = lin(probe)
            if out.requires_grad and leaves:
                torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    except (NotImplementedError, RuntimeError) as e:
        _reraise_out_of_memory(e)
        if "derivative for" not in str(e):
            raise
        why = str(e).splitlines()[0]

        def values_only(v: dict[str, torch.Tensor]) -> torch.Tensor:
            if torch.is_grad_enabled() and any(t.requires_grad for t in v.values()):
                raise UnsupportedOpError(
                    f"ntk: the network's Jacobian products cannot be differentiated ({why}, an op of torch "
                    "without a second derivative), so this estimate has no gradient; evaluate it under "
                    "torch.no_grad(), or use laftr or subset, which differentiate it")
            return lin(v)
        return values_only
    return lin


@register("ntk")
class NtkEstimator(CoresetEstimator):
    """``rho(f0, f0 + J dtheta)`` averaged over ``coreset_size`` stored inputs (linearized network)."""

    Config = CoresetConfig
    traces = False  # differentiates the module itself (its forward hooks included), but for _traced
    renormalized_tables = "binding"

    def _traced(self, model: nn.Module) -> Any:
        """The traced network (cached per model), used only when the model's own ops lack forward-mode AD.

        Refused where the model has forward hooks, which the traced graph does not call (the products then go
        by reverse mode twice through the module itself, or the final error names the hooks).
        """
        from ..graph import TracedNet, forward_hooks

        hooked = forward_hooks(model)
        if hooked:
            raise UnsupportedOpError(
                f"ntk: {type(model).__name__} has ops without forward-mode AD, for which ntk runs its traced "
                f"graph, and forward hooks (on {', '.join(hooked)}), which that graph does not call; remove "
                "the hooks or compute what they do inside forward")

        # keyed by a weak reference, not id(): a model freed and another allocated at its address is not it
        cache = self.__dict__.get("_net_cache")
        if cache is None or cache[0]() is not model:
            cache = self.__dict__["_net_cache"] = (weakref.ref(model), TracedNet(model))
        return cache[1]

    def _tangent_map(self, model: nn.Module, p0: dict[str, torch.Tensor], primals: dict[str, torch.Tensor],
                     rest: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """``(f(x; theta0), v -> J v)`` on the stored inputs, traced once per model, device and dtype.

        ``torch.func.linearize`` (:func:`laftr._util.tangent_map`) skips theta0's forward pass, which every
        evaluation would otherwise repeat; where the model cannot be traced, a ``jvp`` per evaluation.
        """
        # p0 is theta0 cached for this device and dtype (a new object after a refit or a load); what is traced
        # inside a torch.func transform belongs to it, and what runs under autocast holds its precision
        keep = not in_func_transform()
        state = autocast_dtype(next(iter(p0.values())).device) if p0 else None
        cache = self.__dict__.get("_tangent_cache") if keep else None
        if (cache is not None and cache[0]() is model and cache[1] is p0 and cache[2] is self.X
                and cache[5] == state):
            return cache[3], cache[4]
        X = self.inputs_on(model)

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(model, (p, rest), (X,))

        with eval_mode(model), torch.no_grad():
            z0 = f(primals)
        with eval_mode(model):
            lin = tangent_map(f, primals, "ntk products")
            if keep:  # (checked once per traced map; inside a torch.func transform, which keeps none, not)
                lin = _reverse_checked(lin, primals)
        if keep:
            self.__dict__["_tangent_cache"] = (weakref.ref(model), p0, self.X, z0, lin, state)
        return z0, lin

    def _distance(self, model: nn.Module) -> torch.Tensor:
        p0 = self.theta0_on(model)
        # (an integer parameter -- a frozen permutation -- is no direction: it stays with the constants, and
        # one that theta changed is refused, as the linearization cannot see it)
        params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        moved = [n for n, p in model.named_parameters() if not p.is_floating_point() and not torch.equal(
            p.detach(), p0[n])]
        if moved:
            raise UsageError(f"ntk: integer parameters {moved} differ from theta0's: the network linearized "
                             "in its floating parameters cannot see that change; use subset or exact_fsd")
        primals = {n: p0[n] for n in params}
        tangents = {n: p - p0[n] if p.requires_grad else (p - p0[n]).detach() for n, p in params.items()}
        rest = {n: t for n, t in p0.items() if n not in params}
        try:
            z0, lin = self._tangent_map(model, p0, primals, rest)
            with eval_mode(model):
                dz = lin(tangents)
        except (NotImplementedError, RuntimeError) as e:
            # an op without forward-mode AD (e.g. MultiheadAttention's fused kernel): the same function
            # through laftr's interpreter, made of plain ops; where that is refused or reaches such an op too
            # (a weight_norm parametrization), J v by reverse mode twice
            _reraise_out_of_memory(e)
            X = self.inputs_on(model)
            try:
                net = self._traced(model)
                with eval_mode(model):
                    z0, dz = jvp(lambda p: net.forward(X, {**p, **rest}), (primals,),  # type: ignore[misc]
                                 (tangents,))
            except (UnsupportedOpError, NotImplementedError, RuntimeError) as refused:
                _reraise_out_of_memory(refused)
                log.info("ntk: products by reverse mode twice (%s; %s)", e, refused)
                z0, dz = _twice_reversed(model, rest, X, primals, tangents, e, refused)
        # under torch.func.vmap the check cannot branch per parameter set: a non-finite Jacobian then shows as
        # a non-finite distance of every set
        finite = not is_batched(tangents.values()) and all(bool(torch.isfinite(t).all())
                                                          for t in tangents.values())
        if finite and not bool(torch.isfinite(dz).all()):
            raise UnsupportedOpError(
                "ntk: the network's Jacobian at theta0 is not finite on the stored inputs (an op whose "
                "derivative is infinite there, e.g. a square root at 0 in LPPool after a ReLU); the "
                "linearization does not exist: use subset or laftr")
        z0 = z0.detach()
        return discrepancy(z0, z0 + dz, self.metric, self.outputs).mean()
