"""Influence estimation with the proximal Bregman response function (PBRF), METHOD.md section 5.

- :class:`PBRF`: the response to removing a training example, with the exact function space distance
  (ground truth) or any fitted :class:`~laftr.estimators.base.FSDEstimator` (``pbrf-<name>``).
- :class:`ClassicalInfluence`: the first-order influence function with the damped Gauss-Newton matrix
  (conjugate gradient on ``torch.func`` Gauss-Newton-vector products, or a dense solve for tiny models);
  a solve that does not converge raises :class:`ConvergenceError`.
- :class:`Measurement`: the loss on fixed test points, whose change the methods predict.
- :func:`make_method`: every method behind one interface, by name.
- :func:`run_influence` and :func:`run_mislabeled`: the experiments of ``laftr influence`` and ``laftr
  mislabeled``, configured by :class:`InfluenceExperimentConfig` and :class:`MislabeledConfig` (complete and
  checked once constructed; their shared fields in :class:`InfluenceBaseConfig`), with their building blocks
  (:func:`load_tables`, :func:`train_model`, :func:`flip_labels`) and defaults
  (:data:`DEFAULT_ESTIMATOR_OPTIONS`, :data:`CLASSIFICATION_LAFTR_OPTIONS`).
"""

from ..stats import curve_area, detection_curve, pearson, spearman
from .classical import CGInfo, ClassicalInfluence, ConvergenceError, InfluenceConfig, conjugate_gradient
from .experiment import (
    CLASSIFICATION_LAFTR_OPTIONS,
    DEFAULT_ESTIMATOR_OPTIONS,
    INFLUENCE_DATASETS,
    MISLABELED_DATASETS,
    InfluenceBaseConfig,
    InfluenceExperimentConfig,
    MislabeledConfig,
    flip_labels,
    load_tables,
    resolve_estimator_options,
    run_influence,
    run_mislabeled,
    train_model,
)
from .losses import BREGMAN_METRIC, per_example_loss
from .measure import Measurement
from .methods import InfluenceMethod, QueryResult, check_method, make_method, method_names
from .params import ParamSpace
from .pbrf import PBRF, PBRFConfig, PBRFSolution

__all__ = [
    "BREGMAN_METRIC",
    "CLASSIFICATION_LAFTR_OPTIONS",
    "DEFAULT_ESTIMATOR_OPTIONS",
    "INFLUENCE_DATASETS",
    "MISLABELED_DATASETS",
    "PBRF",
    "CGInfo",
    "ClassicalInfluence",
    "ConvergenceError",
    "InfluenceBaseConfig",
    "InfluenceConfig",
    "InfluenceExperimentConfig",
    "InfluenceMethod",
    "Measurement",
    "MislabeledConfig",
    "PBRFConfig",
    "PBRFSolution",
    "ParamSpace",
    "QueryResult",
    "check_method",
    "conjugate_gradient",
    "curve_area",
    "detection_curve",
    "flip_labels",
    "load_tables",
    "make_method",
    "method_names",
    "pearson",
    "per_example_loss",
    "resolve_estimator_options",
    "run_influence",
    "run_mislabeled",
    "spearman",
    "train_model",
]
