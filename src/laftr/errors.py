"""The errors laftr raises on purpose: one hierarchy under :class:`LaftrError`.

Each class also derives from the built-in exception that older code (and users) caught for the same
mistake (``ValueError`` for bad values, ``TypeError`` for unknown options, ``RuntimeError`` for an output
folder in the way), so ``except ValueError`` keeps working while ``except laftr.LaftrError`` catches every
deliberate refusal and nothing else. The command line reports these as messages without a traceback.

One class here is not a refusal and stands outside that hierarchy: :class:`NoLocalMinimumError`, a
numerical outcome of the PBRF solver (a ``FloatingPointError``), which the influence benchmarks record as a
failed query.
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


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A data set's files are missing; the message names them and says how to get them."""


class FileError(LaftrError):
    """A file or folder named by the user that cannot be used (read, trusted or written).

    The message names it.
    """


class InputFileError(FileError, ValueError):
    """A file given as input that is missing, unreadable or of the wrong kind.

    The file is a model, weights, tensors or summary file; the message names it and says what was expected.
    """


class UntrustedPickleError(InputFileError):
    """A file that only a full unpickler can read, refused because unpickling can run arbitrary code.

    The command line loads such a file only with ``--trust-pickle``.
    """


class SummaryFileError(InputFileError):
    """A summary file that is truncated, corrupted, of another format or version, or otherwise unreadable."""


class OutputPathError(FileError, RuntimeError):
    """An output path that would overwrite something.

    An existing file where a folder is wanted (or the reverse), or an existing file or non-empty folder
    without ``force``.
    """


class OutputExistsError(OutputPathError, FileExistsError):
    """A file that writing would replace without being asked to (``laftr.save`` without ``overwrite``)."""


class OutputIsDirectoryError(OutputPathError, IsADirectoryError):
    """A folder where a file is to be written."""


class OutDirError(OutputPathError):
    """The output folder exists and is not empty (and overwriting was not asked for), or is a file."""


class UnsupportedOpError(LaftrError, TypeError, ValueError):
    """A network (or one of its ops or layers) that an estimator cannot handle.

    The message names the node, the op and the reason.
    """

    #: the op has no one function (``is_causal=True`` without a mask): refused also where other refused ops
    #: run through torch itself (``gates="none"``, ``linearize="activations"``)
    final: bool = False


class NoLocalMinimumError(FloatingPointError):
    """The PBRF iterates left the trust region around ``theta_s``: no local minimum was found near it.

    Raised by :meth:`laftr.influence.PBRF.solve`; not a :class:`LaftrError` (see the module's description).
    """


class ConvergenceError(FloatingPointError):
    """A linear solve of the classical influence did not reach its tolerance: a numerical outcome.

    Raised by :meth:`laftr.influence.ClassicalInfluence.solve` when conjugate gradient stops above its
    tolerance (or diverges), typically because ``G + damping I`` is (nearly) singular. Like
    :class:`NoLocalMinimumError` a ``FloatingPointError`` (the influence benchmarks record it as a failed
    query), not a :class:`LaftrError`.
    """


__all__ = [
    "ConvergenceError",
    "DataError",
    "DatasetNotFoundError",
    "FileError",
    "InputFileError",
    "LaftrError",
    "NoLocalMinimumError",
    "OptionError",
    "OutDirError",
    "OutputExistsError",
    "OutputIsDirectoryError",
    "OutputPathError",
    "SummaryFileError",
    "UnsupportedOpError",
    "UntrustedPickleError",
    "UsageError",
]
