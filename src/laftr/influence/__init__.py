"""Influence estimation with the proximal Bregman response function (PBRF), METHOD.md section 5.

- :class:`PBRF`: the response to removing a training example, with the exact function space distance
  (ground truth) or any fitted :class:`~laftr.estimators.base.FSDEstimator` (``pbrf-<name>``).
- :class:`ClassicalInfluence`: the first-order influence function with the damped Gauss-Newton matrix
  (conjugate gradient on ``torch.func`` Gauss-Newton-vector products, or a dense solve for tiny models).
- :class:`Measurement`: the loss on fixed test points, whose change the methods predict.
- :func:`make_method`: every method behind one interface, by name; ``laftr.influence.experiment`` (private)
  runs the benchmarks of ``laftr influence`` and ``laftr mislabeled``.
"""

from ..stats import curve_area, detection_curve, pearson, spearman
from .classical import CGInfo, ClassicalInfluence, InfluenceConfig, conjugate_gradient
from .losses import BREGMAN_METRIC, per_example_loss
from .measure import Measurement
from .methods import InfluenceMethod, QueryResult, check_method, make_method, method_names
from .params import ParamSpace
from .pbrf import PBRF, PBRFConfig, PBRFSolution

__all__ = [
    "BREGMAN_METRIC",
    "PBRF",
    "CGInfo",
    "ClassicalInfluence",
    "InfluenceConfig",
    "InfluenceMethod",
    "Measurement",
    "PBRFConfig",
    "PBRFSolution",
    "ParamSpace",
    "QueryResult",
    "check_method",
    "conjugate_gradient",
    "curve_area",
    "detection_curve",
    "make_method",
    "method_names",
    "pearson",
    "per_example_loss",
    "spearman",
]
