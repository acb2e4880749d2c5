"""The functional baseline: the exact discrepancy on a few stored training inputs.

``D(theta) ~= mean_{x in C} rho(f(x; theta0), f(x; theta))`` over a coreset C of k inputs (a FROMP-like
functional regularizer with identity kernel). f(x; theta0) is recomputed from the stored theta0 at every
evaluation, so only the inputs are stored (``k * d`` floats). Both networks run in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from .._util import functional_call
from ..metrics import discrepancy
from .base import register
from .coreset import CoresetConfig, CoresetEstimator
from .curvature import eval_mode


@register("subset")
class SubsetEstimator(CoresetEstimator):
    """Exact ``rho(f(x; theta0), f(x; theta))`` averaged over ``coreset_size`` stored inputs."""

    Config = CoresetConfig
    traces = False  # runs the module itself (its forward hooks included)
    reverse_mode_module = True  # and differentiates it by reverse mode (its no_grad blocks followed)

    def _distance(self, model: nn.Module) -> torch.Tensor:
        X = self.inputs_on(model)
        p0 = self.theta0_on(model)
        with eval_mode(model):
            with torch.no_grad():
                z0 = functional_call(model, p0, (X,))
            z = model(X)
        return discrepancy(z0, z, self.metric, self.outputs).mean()
