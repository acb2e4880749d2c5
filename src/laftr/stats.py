"""The project's statistics, in plain numpy.

Agreement scores (Pearson, Spearman with average ranks), the agreement of estimates with exact values
(fsd-bench), mislabeled-detection curves (influence).

Inputs must be finite and equally long (an error names the problem); a constant vector has no correlation
(NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_vector(a: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(a, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return v


def pearson(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of two equally long vectors (NaN if either is constant)."""
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two vectors of the same length >= 2, got {x.size} and {y.size}")
    x = x - x.mean()
    y = y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def rankdata(a: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    x = _as_vector(a, "a")
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    xs = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rankdata(a), rankdata(b))


def agreement(estimates: Sequence[float], exact: Sequence[float]) -> dict[str, float]:
    """Pearson of logs, Spearman and median |log(estimate / exact)| of estimates against exact values.

    Non-positive estimates are counted (``nonpositive``) and floored at 1e-30 before taking logs; non-finite
    estimates (an estimator that failed) are counted (``nonfinite``, present only then) and make every score
    NaN. With one value the correlations are NaN (undefined), the median |log ratio| that value's.
    """
    est = np.asarray(estimates, dtype=np.float64).reshape(-1)
    ex = _as_vector(exact, "exact")
    if est.shape != ex.shape:
        raise ValueError(f"{est.size} estimates for {ex.size} exact values")
    nonfinite = int((~np.isfinite(est)).sum())
    nonpos = int((est <= 0).sum())
    if nonfinite:
        nan = float("nan")
        return {"pearson_log": nan, "spearman": nan, "median_abs_log_ratio": nan, "nonpositive": nonpos,
                "nonfinite": nonfinite}  # (the key is present only when an estimate was not finite)
    le, lx = np.log(np.maximum(est, 1e-30)), np.log(np.maximum(ex, 1e-30))
    if est.size < 2:  # (one theta, or a tracked run of one epoch: a configuration the bench accepts)
        return {"pearson_log": float("nan"), "spearman": float("nan"),
                "median_abs_log_ratio": float(np.median(np.abs(le - lx))), "nonpositive": nonpos}
    return {"pearson_log": pearson(le, lx), "spearman": spearman(est, ex),
            "median_abs_log_ratio": float(np.median(np.abs(le - lx))), "nonpositive": nonpos}


def detection_curve(scores: Sequence[float] | np.ndarray, flipped: Sequence[bool] | np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of flipped examples found vs fraction inspected, inspecting by decreasing score.

    Ties are broken by example index (stable), so the curve is deterministic.

    Returns:
        ``(fraction_inspected, fraction_found)``, both of length ``n + 1`` starting at ``(0, 0)``.
    """
    s = _as_vector(scores, "scores")
    f = np.asarray(flipped, dtype=bool).reshape(-1)
    if s.shape != f.shape:
        raise ValueError(f"scores ({s.size}) and flipped ({f.size}) differ in length")
    if not f.any():
        raise ValueError("no flipped examples: the detection curve is undefined")
    order = np.argsort(-s, kind="mergesort")
    found = np.concatenate([[0.0], np.cumsum(f[order]) / f.sum()])
    inspected = np.arange(s.size + 1, dtype=np.float64) / s.size
    return inspected, found


def curve_area(x: np.ndarray, y: np.ndarray) -> float:
    """Area under a curve by the trapezoid rule."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
