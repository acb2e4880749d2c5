"""The one way an experiment's settings become a complete, checked config: :class:`ExperimentConfig`.

Every experiment config (``laftr fsd-bench``, ``laftr continual``, ``laftr influence``, ``laftr mislabeled``)
is a dataclass deriving from :class:`ExperimentConfig`. Its ``__post_init__`` runs two steps, so a config is
complete and valid as soon as it is constructed (and again after :func:`dataclasses.replace`):

1. ``_resolve()`` fills the fields whose defaults depend on other fields (the data set, the network,
   ``quick``): typically fields left at ``None``, filled from a dict of defaults by :meth:`_fill`;
2. ``_validate()`` raises :class:`laftr.errors.UsageError` naming the first bad field.

A config changed in place afterwards (``cfg.trajectories = ...``) is checked again by :meth:`validate`;
:func:`dataclasses.replace` resolves and checks the new config as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ExperimentConfig"]


class ExperimentConfig:
    """Mixin of the experiment configs (dataclasses): resolved, then validated, in ``__post_init__``.

    A subclass overrides ``_resolve()`` (fill the defaults that depend on other fields, e.g. with
    ``self._fill(defaults)``, which sets the fields that are ``None``) and ``_validate()`` (raise
    :class:`~laftr.errors.UsageError` naming the bad field), calling the parent's where it has one.
    """

    def __post_init__(self) -> None:
        """Fill the dependent defaults, then check every field (see the module docstring)."""
        self._resolve()
        self._validate()

    def _resolve(self) -> None:
        """Fill the fields whose defaults depend on other fields (nothing here)."""

    def _validate(self) -> None:
        """Raise :class:`~laftr.errors.UsageError` naming the first bad field (nothing to check here)."""

    def validate(self) -> None:
        """Check the config again, e.g. after a field was changed in place.

        Raises:
            laftr.errors.UsageError: a bad field (the message names it).
        """
        self._validate()

    def _fill(self, defaults: Mapping[str, Any]) -> None:
        """Set every field of ``defaults`` that is ``None`` to its default (fields given are kept)."""
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
