"""Small statistics for the leaderboard, pure functions on numbers, mappings and DataFrames.

* :func:`mean_ci` — Student-t interval; :func:`paired_diff` / :func:`paired_ttest` — per-run differences;
* :func:`holm` — Holm's step-down adjustment of a family of p-values;
* :func:`bootstrap_p_best` — probability of each recipe being the best, resampling runs;
* :func:`rank_correlation` — Kendall τ-b and Spearman ρ between two rankings (scipy);
* :func:`pareto_front`.

The unit of replication is the *training run* (one training seed, under one teacher): every interval here
treats one value per run as one observation. With ``n`` values the interval is ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)`` where ``s`` is
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

__all__ = [
    "Interval",
    "PairedTest",
    "bootstrap_p_best",
    "holm",
    "mean_ci",
    "paired_diff",
    "paired_ttest",
    "pareto_front",
    "rank_correlation",
]


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


def _paired(a_by_seed: Mapping[Any, Any] | Any, b_by_seed: Mapping[Any, Any] | Any) -> list[float]:
    a, b = _as_mapping(a_by_seed), _as_mapping(b_by_seed)
    diffs = []
    for seed in sorted(set(a) & set(b), key=repr):
        va, vb = a[seed], b[seed]
        if va is None or vb is None:
            continue
        fa, fb = float(va), float(vb)
        if math.isfinite(fa) and math.isfinite(fb):
            diffs.append(fa - fb)
    return diffs


def paired_diff(
    a_by_seed: Mapping[Any, Any],
    b_by_seed: Mapping[Any, Any],
    confidence: float = 0.95,
) -> Interval:
    """Mean and t-interval of the per-run differences ``a[k] - b[k]``.

    Only keys (seeds, or ``(teacher_seed, seed)`` pairs) present in both mappings with finite values on
    both sides are paired; ``n`` is the number of pairs. Accepts dicts or pandas Series. No common key
    gives an all-NaN interval with ``n == 0``.
    """
    return mean_ci(_paired(a_by_seed, b_by_seed), confidence)


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of ``a − b``: the difference's interval and the two-sided p-value of ``mean = 0``.

    ``p`` is NaN with fewer than 2 pairs. With zero spread the test is degenerate: ``p = 1`` when every
    difference is 0, ``p = 0`` when they are all equal and non-zero (no variation can explain them).
    """

    diff: Interval
    t: float
    p: float


def paired_ttest(
    a_by_seed: Mapping[Any, Any],
    b_by_seed: Mapping[Any, Any],
    confidence: float = 0.95,
) -> PairedTest:
    """Paired t-test on the per-run differences ``a[k] − b[k]`` (``scipy.stats.ttest_1samp`` against 0),
    with ``df = n − 1``; pairing as in :func:`paired_diff`."""
    diffs = _paired(a_by_seed, b_by_seed)
    iv = mean_ci(diffs, confidence)
    if iv.n < 2:
        return PairedTest(iv, math.nan, math.nan)
    if float(np.std(diffs, ddof=1)) == 0.0:
        if iv.mean == 0.0:
            return PairedTest(iv, 0.0, 1.0)
        return PairedTest(iv, math.copysign(math.inf, iv.mean), 0.0)
    res = _st.ttest_1samp(np.asarray(diffs, dtype=np.float64), 0.0)
    return PairedTest(iv, float(res.statistic), float(res.pvalue))


def holm(pvalues: Mapping[Any, float] | Sequence[float]) -> Any:
    """Holm's step-down adjustment (family-wise error control) of a family of p-values.

    With the ``m`` finite p-values sorted ascending, ``p_(1) ≤ … ≤ p_(m)``, the adjusted value is
    ``p̃_(i) = min(1, max_{j ≤ i} (m − j + 1) · p_(j))``. NaN entries are not tests: they stay NaN and do
    not count in ``m``. Returns the same shape: a dict for a mapping, a list for a sequence.
    """
    keys = list(pvalues.keys()) if isinstance(pvalues, Mapping) else None
    values = [float(v) for v in (pvalues.values() if keys is not None else pvalues)]
    for v in values:
        if math.isfinite(v) and not 0.0 <= v <= 1.0:
            raise ValueError(f"p-values must lie in [0, 1], got {v}")
    finite = sorted((v, i) for i, v in enumerate(values) if math.isfinite(v))
    m = len(finite)
    adjusted = [math.nan] * len(values)
    running = 0.0
    for j, (v, i) in enumerate(finite):
        running = max(running, min(1.0, (m - j) * v))
        adjusted[i] = running
    return dict(zip(keys, adjusted)) if keys is not None else adjusted


def bootstrap_p_best(
    values: Any,
    *,
    higher_is_better: bool = True,
    n_boot: int = 10_000,
    seed: int = 0,
    strata: Sequence[Any] | None = None,
) -> Any:
    """Probability of each column (recipe) having the best mean, by the bootstrap over rows (runs).

    ``values``: a ``pandas.DataFrame``, rows = training runs (one per seed, or per (teacher, seed)), columns
    = recipes; NaN = no value for that run. Each replicate draws rows with replacement — the *same* rows
    for every recipe, so the pairing by seed (same data order, same initialisation) is kept — within each
    stratum (``strata``: one label per row, e.g. the teacher seed, so each replicate keeps every teacher's
    share of runs); each recipe's mean ignores its NaN rows. The replicate's best mean wins; ``k`` tied
    winners get ``1/k`` each; a recipe with no value in a replicate cannot win it. The RNG is
    ``numpy.random.default_rng(seed)``: the result is deterministic. Returns a Series (index = columns)
    summing to 1 (all-NaN input: all NaN).
    """
    import pandas as pd

    frame = pd.DataFrame(values).astype("float64")
    cols = list(frame.columns)
    x = frame.to_numpy()
    n_rows = x.shape[0]
    if n_rows == 0 or not np.isfinite(x).any() or not cols:
        return pd.Series(np.nan, index=cols, dtype="float64")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    labels = list(strata) if strata is not None else [0] * n_rows
    if len(labels) != n_rows:
        raise ValueError(f"strata has {len(labels)} labels for {n_rows} rows")
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    parts = []
    for lab in sorted(groups, key=repr):
        rows = np.asarray(groups[lab])
        parts.append(rows[rng.integers(0, len(rows), size=(n_boot, len(rows)))])
    idx = np.concatenate(parts, axis=1)  # [B, N]
    sample = x[idx]  # [B, N, R]
    finite = np.isfinite(sample)
    counts = finite.sum(axis=1)
    sums = np.where(finite, sample, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts  # [B, R]; NaN where a recipe has no value in the replicate
    score = means if higher_is_better else -means
    score = np.where(np.isfinite(score), score, -np.inf)
    best = score.max(axis=1, keepdims=True)
    win = (score == best) & np.isfinite(best)
    credit = win / np.maximum(win.sum(axis=1, keepdims=True), 1)
    return pd.Series(credit.mean(axis=0), index=cols, dtype="float64")


def rank_correlation(a: Mapping[Any, Any] | Any, b: Mapping[Any, Any] | Any) -> dict[str, float]:
    """Kendall τ-b and Spearman ρ between two scorings of the same items (e.g. recipe means under two
    teachers), over the items both score finitely: ``{"kendall_tau", "kendall_p", "spearman_rho",
    "spearman_p", "n"}`` (scipy's two-sided p-values; NaN with fewer than 2 items or a constant side)."""
    ma, mb = _as_mapping(a), _as_mapping(b)
    keys = [k for k in sorted(set(ma) & set(mb), key=repr)
            if ma[k] is not None and mb[k] is not None
            and math.isfinite(float(ma[k])) and math.isfinite(float(mb[k]))]
    xa = np.asarray([float(ma[k]) for k in keys])
    xb = np.asarray([float(mb[k]) for k in keys])
    out = {"kendall_tau": math.nan, "kendall_p": math.nan, "spearman_rho": math.nan,
           "spearman_p": math.nan, "n": len(keys)}
    if len(keys) < 2 or np.ptp(xa) == 0 or np.ptp(xb) == 0:
        return out
    kt = _st.kendalltau(xa, xb)
    sr = _st.spearmanr(xa, xb)
    out.update(kendall_tau=float(kt.statistic), kendall_p=float(kt.pvalue),
               spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue))
    return out


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
