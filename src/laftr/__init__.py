"""laftr: function space distance between networks from a compact summary of the training data."""

from importlib import metadata as _metadata

from . import errors, rules
from .config import ExperimentConfig
from .errors import *  # noqa: F403  (every public error; the list is errors.__all__)
from .estimators import EstimatorConfig, FSDEstimator, available_estimators, make_estimator, register
from .exact import exact_fsd, exact_fsd_and_grad
from .io import load, save
from .metrics import METRICS, discrepancy
from .models import SelectOutput, WithInputs

try:
    __version__ = _metadata.version("laftr")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "METRICS",
    "EstimatorConfig",
    "ExperimentConfig",
    "FSDEstimator",
    "SelectOutput",
    "WithInputs",
    "__version__",
    "available_estimators",
    "discrepancy",
    "exact_fsd",
    "exact_fsd_and_grad",
    "load",
    "make_estimator",
    "register",
    "rules",
    "save",
]
__all__ += errors.__all__  # every public error, listed once in laftr.errors
