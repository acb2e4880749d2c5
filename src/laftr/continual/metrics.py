"""Continual-learning metrics on the accuracy matrix ``A[i][j]``: accuracy on task j after training task i."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["average_accuracy", "backward_transfer", "mean_std"]


def _check(A: Sequence[Sequence[float]]) -> int:
    T = len(A)
    if T == 0 or any(len(row) != T for row in A):
        raise ValueError("the accuracy matrix must be square and non-empty "
                         "(rows: after task i, cols: task j)")
    return T


def average_accuracy(A: Sequence[Sequence[float]], after: int | None = None) -> float:
    """Mean accuracy over tasks ``0..after`` after training task ``after`` (default: the last task)."""
    T = _check(A)
    i = T - 1 if after is None else after
    if not 0 <= i < T:
        raise ValueError(f"after must be in 0..{T - 1}")
    return sum(A[i][: i + 1]) / (i + 1)


def backward_transfer(A: Sequence[Sequence[float]]) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): mean over tasks j < T-1 of ``A[T-1][j] - A[j][j]``.

    The last task is left out (its term is zero by definition); 0.0 for a single task. Negative values are
    forgetting.
    """
    T = _check(A)
    if T == 1:
        return 0.0
    return sum(A[T - 1][j] - A[j][j] for j in range(T - 1)) / (T - 1)


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "std": sd, "n": n}
