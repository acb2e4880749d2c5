"""The linearized-network baseline: the discrepancy of a first-order Taylor expansion in the parameters.

``D(theta) ~= mean_{x in C} rho(f(x; theta0), f(x; theta0) + J(x) (theta - theta0))`` over a coreset C of
k stored inputs, J the Jacobian w.r.t. the parameters at theta0. ``J(x) dtheta`` is one forward-mode
product (``torch.func.jvp``), differentiable w.r.t. theta through the tangent. Buffers (batch-norm
statistics) stay at theta0's values; the network runs in eval mode. Every parameter is linearized
(a frozen parameter contributes only if it differs from theta0). Stores ``k * d`` floats.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp

from ..metrics import discrepancy
from .base import register
from .coreset import CoresetConfig, CoresetEstimator
from .curvature import eval_mode


@register("ntk")
class NtkEstimator(CoresetEstimator):
    """``rho(f0, f0 + J dtheta)`` averaged over ``coreset_size`` stored inputs (linearized network)."""

    Config = CoresetConfig

    def _distance(self, model: nn.Module) -> torch.Tensor:
        X = self.inputs_on(model)
        p0 = self.theta0_on(model)
        params = dict(model.named_parameters())
        primals = {n: p0[n] for n in params}
        tangents = {n: p - p0[n] if p.requires_grad else (p - p0[n]).detach() for n, p in params.items()}
        rest = {n: t for n, t in p0.items() if n not in params}

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(model, (p, rest), (X,))

        with eval_mode(model):
            z0, dz = jvp(f, (primals,), (tangents,))
        z0 = z0.detach()
        return discrepancy(z0, z0 + dz, self.metric, self.outputs).mean()
