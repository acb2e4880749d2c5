"""The errors laftr raises on purpose: one hierarchy under :class:`LaftrError`.

Each class also derives from the built-in exception that older code (and users) caught for the same
mistake (``ValueError`` for bad values, ``TypeError`` for unknown options), so ``except ValueError`` keeps
working while ``except laftr.LaftrError`` catches every deliberate refusal and nothing else.
"""

from __future__ import annotations


class LaftrError(Exception):
    """Base class of every error laftr raises deliberately (bad input, unsupported model, bad file)."""


class UsageError(LaftrError, ValueError):
    """An option, argument or combination of them that is not valid; the message names it."""


class OptionError(UsageError, TypeError):
    """An option name that the estimator (or config) does not have; the message names it."""


class DataError(LaftrError, ValueError):
    """Data that cannot be used: empty, non-finite, wrongly shaped, missing labels."""


class SummaryFileError(LaftrError, ValueError):
    """A summary file that is truncated, corrupted, of another format or version, or otherwise unreadable."""


class UnsupportedOpError(LaftrError, TypeError, ValueError):
    """A network (or one of its ops or layers) that an estimator cannot handle; the message names the node,
    the op and the reason."""


__all__ = ["DataError", "LaftrError", "OptionError", "SummaryFileError", "UnsupportedOpError", "UsageError"]
