"""Small statistics for the leaderboard: Student-t intervals over training seeds and Pareto fronts.

The unit of replication is the *training seed*: every interval here treats one value per seed as one
observation. With ``n`` values the interval is ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)`` where ``s`` is
the sample standard deviation (``ddof=1``). With a single value there is no spread to estimate, so the
interval bounds are ``NaN`` (not ``None``, so that tables stay numeric); with no values the mean is
``NaN`` too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _st

__all__ = ["Interval", "mean_ci", "paired_diff", "pareto_front"]


@dataclass(frozen=True)
class Interval:
    """A mean with a two-sided confidence interval.

    ``low``/``high`` are ``NaN`` when ``n < 2``; ``mean`` is ``NaN`` when ``n == 0``.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        """Half the interval's width (``NaN`` when the interval is undefined)."""
        return (self.high - self.low) / 2.0

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        if self.n < 2:
            return f"{self.mean:g} (n=1)"
        return f"{self.mean:g} ± {self.half_width:g} (n={self.n})"


def _finite_floats(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if math.isfinite(f):
            out.append(f)
    return out


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def mean_ci(values: Iterable[Any], confidence: float = 0.95) -> Interval:
    """Mean and Student-t confidence interval of ``values`` (one value per training seed).

    ``None``, NaN and ±inf entries are ignored (``n`` counts the values actually used); callers are
    expected to have removed failed runs already. ``n == 1`` gives ``low = high = NaN``.

    >>> round(mean_ci([1, 2, 3]).half_width, 4)   # t_{0.975,2} * 1 / sqrt(3)
    2.4841
    """
    _check_confidence(confidence)
    xs = _finite_floats(values)
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    mean = float(np.mean(xs))
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, confidence)
    sd = float(np.std(xs, ddof=1))
    half = float(_st.t.ppf((1.0 + confidence) / 2.0, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def _as_mapping(values: Mapping[Any, Any] | Any) -> Mapping[Any, Any]:
    if isinstance(values, Mapping):
        return values
    if hasattr(values, "items"):  # e.g. a pandas Series indexed by seed
        return dict(values.items())
    raise TypeError(f"expected a mapping seed -> value, got {type(values).__name__}")


def paired_diff(
    a_by_seed: Mapping[Any, Any],
    b_by_seed: Mapping[Any, Any],
    confidence: float = 0.95,
) -> Interval:
    """Mean and t-interval of the per-seed differences ``a[s] - b[s]``.

    Only seeds present in both mappings with finite values on both sides are paired; ``n`` is the
    number of pairs. Accepts dicts or pandas Series indexed by seed. No common seed gives an all-NaN
    interval with ``n == 0``.
    """
    a, b = _as_mapping(a_by_seed), _as_mapping(b_by_seed)
    diffs = []
    for seed in sorted(set(a) & set(b), key=repr):
        va, vb = a[seed], b[seed]
        if va is None or vb is None:
            continue
        fa, fb = float(va), float(vb)
        if math.isfinite(fa) and math.isfinite(fb):
            diffs.append(fa - fb)
    return mean_ci(diffs, confidence)


def pareto_front(
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    minimize_x: bool = True,
    maximize_y: bool = True,
) -> list[int]:
    """Indices of the non-dominated points, ordered by increasing ``x``.

    By default a point is better when it is cheaper (smaller ``x``) and scores higher (larger ``y``). A
    point is dominated when another is at least as good on both axes and strictly better on one; equal
    points do not dominate each other. Points with a non-finite coordinate are ignored.
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length ({len(xs)} vs {len(ys)})")
    sx = 1.0 if minimize_x else -1.0
    sy = -1.0 if maximize_y else 1.0
    # Transform so that smaller is better on both axes.
    pts = [
        (i, sx * float(x), sy * float(y))
        for i, (x, y) in enumerate(zip(xs, ys))
        if math.isfinite(float(x)) and math.isfinite(float(y))
    ]
    front = []
    for i, x, y in pts:
        dominated = any(
            (x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, x2, y2 in pts if j != i
        )
        if not dominated:
            front.append((x, y, i))
    front.sort(key=lambda t: (sx * t[0], t[2]))
    return [i for _, _, i in front]
