"""FSD estimators: LAFTR and the baselines, all behind :class:`FSDEstimator`. Importing registers them."""

from . import fisher, kfac, laftr, liftr, ntk, subset, weight  # noqa: F401  (registration side effects)
from .base import REGISTRY, EstimatorConfig, FSDEstimator, available_estimators, make_estimator, register

__all__ = ["REGISTRY", "EstimatorConfig", "FSDEstimator", "available_estimators", "make_estimator",
           "register"]
