"""Checks of the influence configs' and solvers' arguments: each raises :class:`~laftr.errors.UsageError`.

A message names the argument, what it must be and the value given (a bool is not a number here: ``True``
would otherwise pass as ``1``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .._util import check_integer as check_int
from ..errors import UsageError

__all__ = ["check_bool", "check_int", "check_positive", "is_number"]


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False``, else raise ``UsageError``."""
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, got {value!r}")
    return value


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(value: Any, name: str, finite: bool = True) -> float:
    """Return ``value`` if it is a number > 0 (finite unless ``finite=False``), else raise ``UsageError``."""
    if not (is_number(value) and value > 0 and (math.isfinite(value) or not finite)):
        need = "a finite number > 0" if finite else "a number > 0"
        raise UsageError(f"{name} must be {need}, got {value!r}")
    return float(value)
