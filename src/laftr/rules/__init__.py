"""Op rules: one class per op family, registered for module types, functions and tensor methods.

Public API: :func:`register` (add or replace the rule of an op, e.g. a custom activation), the base
classes a new rule derives from (:class:`Rule`, :class:`AffineRule`, :class:`PiecewiseLinearGate`,
:class:`SmoothGate`, :class:`NormRule`), :class:`RuleMode` (what a rule's mode methods receive),
:func:`registered_targets` (the support matrix) and :class:`~laftr.errors.UnsupportedOpError`.

Families, one private submodule each: ``affine`` (layers, reshapes, sums, dropout, shape queries),
``gates`` (elementwise activations), ``norm`` (per-example normalization), ``pooling`` (max pooling),
``attention`` (token embeddings, products of two data tensors, softmax over data, attention) and
``recurrent`` (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``).
"""

from ..errors import UnsupportedOpError
from . import affine, attention, gates, norm, pooling, recurrent  # noqa: F401  (registration side effects)
from .affine import AffineRule, IdentityRule, ShapeRule, SumRule
from .base import (
    Pair,
    Rule,
    RuleMode,
    describe,
    lookup,
    make_rule,
    module_rule,
    register,
    registered_targets,
    unregister,
)
from .gates import GateRule, PiecewiseLinearGate, SmoothGate
from .norm import NormRule
from .pooling import MaxPoolRule

__all__ = [
    "AffineRule",
    "GateRule",
    "IdentityRule",
    "MaxPoolRule",
    "NormRule",
    "Pair",
    "PiecewiseLinearGate",
    "Rule",
    "RuleMode",
    "ShapeRule",
    "SmoothGate",
    "SumRule",
    "UnsupportedOpError",
    "describe",
    "lookup",
    "make_rule",
    "module_rule",
    "register",
    "registered_targets",
    "unregister",
]
