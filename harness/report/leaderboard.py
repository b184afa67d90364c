"""The leaderboard: per recipe, mean and 95% interval over training seeds, rank, paired gap to the baseline,
and cost — built as a numeric table, then rendered as Markdown, CSV, HTML and LaTeX.

Statistics (see :mod:`harness.report.stats`): the training seed is the unit. For each recipe, metric and
evaluation set the values of the seeds whose run succeeded give a mean and a Student-t interval. The
*average over sets* is computed per seed first (the mean of that seed's per-set values, only for seeds
whose runs succeeded on every set) and then over seeds, so its interval reflects seed-to-seed spread of
the average. Failed runs (see :mod:`harness.report.records`) never enter a statistic; they are counted
and described in the ``Failures`` column.

Column layout of the table :func:`build_leaderboard` returns (and of the CSV, which is that table):

* ``Rank`` (nullable int; empty for the teacher/init reference rows and for students with no average),
  ``Recipe``, ``Kind`` (``teacher`` | ``init`` = reference, ``baseline``, ``student``), ``n seeds``
  (seeds with at least one successful run);
* for the primary metric, per evaluation set and for ``avg``: ``"<Metric> [<set>] mean"``, ``... ci_low``,
  ``... ci_high``, ``... n``;
* the paired difference from the baseline, per set and ``avg``: ``"Δ <Metric> vs <baseline> [<set>]"``
  with the same four suffixes (empty for the baseline itself and where no seed pairs up);
* every other metric, averaged over sets: ``"<Metric> [avg] mean|ci_low|ci_high"``;
* costs (mean over seeds): ``Train time (s)``, ``Eval time (s)``, ``Sec/sample (s)``, ``Tokens/s``,
  ``Peak memory (MB)``, ``Steps``, ``Tokens`` (those present in the records);
* ``Status`` (``ok`` | ``partial`` | ``failed``), ``Failed runs`` (count), ``Failures`` (text).

Metric labels are readable names (``ROUGE-L``, ``Exact match``, …); metrics where lower is better carry
``↓`` (``ECE ↓``, ``KL to teacher ↓``). ``DataFrame.attrs`` keeps the primary metric, baseline, sets,
suite and confidence for the renderers.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.io import write_text_atomic
from harness.report.records import COST_PREFIX, METRIC_PREFIX, cost_names, metric_names
from harness.report.stats import Interval, mean_ci, paired_diff

__all__ = [
    "AVG",
    "build_leaderboard",
    "column",
    "cost_summary",
    "delta_base",
    "decimals_for",
    "display_table",
    "eval_sets_of",
    "is_higher_better",
    "metric_label",
    "metric_summary",
    "ordered_metrics",
    "per_seed_values",
    "recipe_roles",
    "render_csv",
    "render_html",
    "render_latex",
    "render_markdown",
    "score_base",
    "write_leaderboard",
]

AVG = "avg"
STATS = ("mean", "ci_low", "ci_high", "n")
REFERENCE_KINDS = ("teacher", "init")

#: Metric leaf names (after the last ``/``) where a smaller value is better.
LOWER_IS_BETTER = frozenset({"ece", "kl_to_teacher", "kl", "loss", "nll", "perplexity", "ppl", "brier"})

METRIC_LABELS = {
    "rougeL": "ROUGE-L",
    "exact_match": "Exact match",
    "valid_rate": "Valid rate",
    "coverage": "Coverage",
    "distinct_1": "Distinct-1",
    "distinct_2": "Distinct-2",
    "distinct_3": "Distinct-3",
    "ece": "ECE",
    "top1_agreement": "Top-1 agreement",
    "kl_to_teacher": "KL to teacher",
}
#: Preferred order of the well-known metrics; others follow alphabetically.
METRIC_ORDER = list(METRIC_LABELS)

#: cost key -> column label, in display order.
COST_LABELS = {
    "train_time_s": "Train time (s)",
    "eval_time_s": "Eval time (s)",
    "sec_per_sample": "Sec/sample (s)",
    "tokens_per_s": "Tokens/s",
    "peak_rss_mb": "Peak memory (MB)",
    "steps": "Steps",
    "tokens": "Tokens",
}


# --------------------------------------------------------------------------------------------- naming
def is_higher_better(metric: str, overrides: Mapping[str, bool] | None = None) -> bool:
    """Whether a larger value of ``metric`` is better: ``overrides`` first, else ``LOWER_IS_BETTER``."""
    if overrides and metric in overrides:
        return bool(overrides[metric])
    leaf = metric.rsplit("/", 1)[-1]
    return metric not in LOWER_IS_BETTER and leaf not in LOWER_IS_BETTER


def metric_label(metric: str, overrides: Mapping[str, bool] | None = None) -> str:
    """Readable name of ``metric``, with ``↓`` when lower is better (``"ece"`` → ``"ECE ↓"``).

    Unknown names are kept; ``lm_eval/<task>/<metric>`` becomes ``"lm-eval <task> <metric>"``.
    """
    if metric in METRIC_LABELS:
        label = METRIC_LABELS[metric]
    elif metric.startswith("lm_eval/"):
        label = "lm-eval " + " ".join(metric.split("/")[1:])
    else:
        label = metric
    return label if is_higher_better(metric, overrides) else f"{label} ↓"


def score_base(metric: str, eval_set: str, overrides: Mapping[str, bool] | None = None) -> str:
    """Column stem of a metric on a set (or ``AVG``): ``"ROUGE-L [test]"``."""
    return f"{metric_label(metric, overrides)} [{eval_set}]"


def delta_base(metric: str, baseline: str, eval_set: str, overrides: Mapping[str, bool] | None = None) -> str:
    """Column stem of the paired difference from the baseline: ``"Δ ROUGE-L vs sft [test]"``."""
    return f"Δ {metric_label(metric, overrides)} vs {baseline} [{eval_set}]"


def column(base: str, stat: str) -> str:
    """Full column name from a stem and one of ``mean``, ``ci_low``, ``ci_high``, ``n``."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    return f"{base} {stat}"


def ordered_metrics(names: Sequence[str]) -> list[str]:
    """Well-known metrics in ``METRIC_ORDER`` first, then the rest alphabetically."""
    known = [m for m in METRIC_ORDER if m in names]
    return known + sorted(m for m in names if m not in METRIC_ORDER)


# --------------------------------------------------------------------------------------- statistics
def eval_sets_of(df: pd.DataFrame) -> list[str]:
    """Evaluation sets present in the records, sorted."""
    return sorted(df["eval_set"].astype(str).unique().tolist())


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df.loc[~df["failed"].astype(bool)]


def recipe_roles(df: pd.DataFrame) -> dict[str, str]:
    """recipe -> role (the most frequent role among its records)."""
    out = {}
    for recipe, roles in df.groupby("recipe", sort=True)["role"]:
        out[str(recipe)] = str(roles.astype(str).mode().iloc[0])
    return out


def per_seed_values(
    df: pd.DataFrame,
    metric: str,
    eval_sets: Sequence[str] | None = None,
    *,
    strict_average: bool = True,
) -> pd.DataFrame:
    """Successful runs' values of ``metric`` indexed by ``(recipe, seed)``, one column per set plus ``AVG``.

    ``AVG`` is defined only for seeds with a successful run on every set in ``eval_sets``; it is the
    mean of the per-set values, NaN if one is missing when ``strict_average`` (use for the primary
    metric), otherwise the mean over the sets that report the metric.
    """
    sets = list(eval_sets) if eval_sets is not None else eval_sets_of(df)
    ok = _ok(df)
    ok = ok.loc[ok["eval_set"].isin(sets)]
    col = METRIC_PREFIX + metric
    values = ok[col] if col in ok.columns else pd.Series(np.nan, index=ok.index, dtype="float64")
    long = pd.DataFrame({
        "recipe": ok["recipe"].astype(str).to_numpy(),
        "seed": ok["seed"].astype("int64").to_numpy(),
        "eval_set": ok["eval_set"].astype(str).to_numpy(),
        "value": values.astype("float64").to_numpy(),
    })
    index = pd.MultiIndex.from_frame(long[["recipe", "seed"]].drop_duplicates().sort_values(["recipe", "seed"]))
    if long.empty:
        index = pd.MultiIndex.from_arrays([[], []], names=["recipe", "seed"])
    wide = (
        long.groupby(["recipe", "seed", "eval_set"])["value"].first().unstack("eval_set")
        if not long.empty
        else pd.DataFrame(index=index)
    )
    wide = wide.reindex(index=index, columns=sets).astype("float64")
    n_sets = long.groupby(["recipe", "seed"])["eval_set"].nunique().reindex(index).fillna(0)
    complete = (n_sets == len(sets)).to_numpy()
    avg = wide.mean(axis=1, skipna=not strict_average)
    wide[AVG] = avg.where(complete, np.nan)
    wide.columns.name = None
    return wide


def metric_summary(
    df: pd.DataFrame,
    metrics: Sequence[str],
    eval_sets: Sequence[str] | None = None,
    *,
    confidence: float = 0.95,
    strict: Sequence[str] = (),
) -> pd.DataFrame:
    """Tidy table ``recipe, role, metric, eval_set, mean, ci_low, ci_high, n`` over successful seeds.

    ``eval_set`` includes ``AVG``; metrics in ``strict`` use a strict average (see :func:`per_seed_values`).
    """
    sets = list(eval_sets) if eval_sets is not None else eval_sets_of(df)
    roles = recipe_roles(df)
    rows = []
    for metric in metrics:
        wide = per_seed_values(df, metric, sets, strict_average=metric in strict)
        for recipe in sorted(roles):
            sub = wide.loc[recipe] if recipe in wide.index.get_level_values(0) else None
            for s in [*sets, AVG]:
                iv = mean_ci([] if sub is None else sub[s].tolist(), confidence)
                rows.append({
                    "recipe": recipe, "role": roles[recipe], "metric": metric, "eval_set": s,
                    "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "n": iv.n,
                })
    return pd.DataFrame(rows, columns=["recipe", "role", "metric", "eval_set", "mean", "ci_low", "ci_high", "n"])


def cost_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean cost per recipe over successful seeds (each seed first averaged over its sets' records).

    Index: recipe; columns: cost names without prefix.
    """
    names = cost_names(df)
    ok = _ok(df)
    if not names or ok.empty:
        return pd.DataFrame(index=pd.Index([], name="recipe"), columns=names, dtype="float64")
    cols = [COST_PREFIX + c for c in names]
    per_seed = ok.groupby(["recipe", "seed"])[cols].mean()
    out = per_seed.groupby(level="recipe").mean()
    out.columns = names
    return out


def _kind(recipe: str, role: str, baseline: str) -> str:
    if role in REFERENCE_KINDS:
        return role
    if recipe in REFERENCE_KINDS:
        return recipe
    return "baseline" if recipe == baseline else "student"


def _first_line(text: Any) -> str:
    """First non-empty line of an error message (tracebacks stay in the record file)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else str(text)


def _put(row: dict[str, Any], base: str, iv: Interval, with_n: bool = True) -> None:
    row[column(base, "mean")] = iv.mean
    row[column(base, "ci_low")] = iv.low
    row[column(base, "ci_high")] = iv.high
    if with_n:
        row[column(base, "n")] = iv.n


def build_leaderboard(
    df: pd.DataFrame,
    primary_metric: str = "rougeL",
    baseline: str = "sft",
    higher_is_better: Mapping[str, bool] | None = None,
    *,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Summarise the records of one suite (see the module docstring for the columns).

    Rows: reference teacher first, then students by rank (ties share the smaller rank), then students
    without an average (all runs failed, or no seed complete on every set), then the untrained ``init``.
    Rank is by the primary metric averaged over sets, in its better direction (``higher_is_better``
    overrides the built-in ``LOWER_IS_BETTER`` list). Raises ``ValueError`` for no records, records of
    several suites, or a primary metric that no successful record reports.
    """
    if df.empty:
        raise ValueError("no run records to build a leaderboard from")
    suites = sorted(df["suite"].astype(str).unique())
    if len(suites) > 1:
        raise ValueError(f"records from several suites {suites}; build one leaderboard per suite")
    ok = _ok(df)
    metrics_present = [m for m in metric_names(df) if ok[METRIC_PREFIX + m].notna().any()]
    if not ok.empty and primary_metric not in metrics_present:
        raise ValueError(
            f"primary metric {primary_metric!r} is not reported by any successful record; "
            f"available: {', '.join(metrics_present) or 'none'}"
        )
    hib = dict(higher_is_better or {})
    sets = eval_sets_of(df)
    roles = recipe_roles(df)
    others = [m for m in ordered_metrics(metrics_present) if m != primary_metric]

    summary = metric_summary(df, [primary_metric, *others], sets, confidence=confidence, strict=[primary_metric])
    summary = summary.set_index(["recipe", "metric", "eval_set"])
    primary_wide = per_seed_values(df, primary_metric, sets, strict_average=True)
    costs = cost_summary(df)
    have_baseline = baseline in primary_wide.index.get_level_values(0)

    rows = []
    for recipe, role in roles.items():
        kind = _kind(recipe, role, baseline)
        recs = df.loc[df["recipe"].astype(str) == recipe]
        failed = recs.loc[recs["failed"].astype(bool)].sort_values(["seed", "eval_set"])
        ok_recs = recs.loc[~recs["failed"].astype(bool)]
        row: dict[str, Any] = {
            "Rank": pd.NA, "Recipe": recipe, "Kind": kind, "n seeds": int(ok_recs["seed"].nunique()),
        }

        def iv(metric: str, s: str) -> Interval:
            r = summary.loc[(recipe, metric, s)]
            return Interval(float(r["mean"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n"]), confidence)

        for s in [*sets, AVG]:
            _put(row, score_base(primary_metric, s, hib), iv(primary_metric, s))
        for s in [*sets, AVG]:
            if recipe == baseline or not have_baseline or recipe not in primary_wide.index.get_level_values(0):
                diff = Interval(math.nan, math.nan, math.nan, 0, confidence)
            else:
                diff = paired_diff(primary_wide.loc[recipe][s], primary_wide.loc[baseline][s], confidence)
            _put(row, delta_base(primary_metric, baseline, s, hib), diff)
        for m in others:
            _put(row, score_base(m, AVG, hib), iv(m, AVG), with_n=False)
        for key, label in COST_LABELS.items():
            if key in costs.columns:
                row[label] = float(costs.at[recipe, key]) if recipe in costs.index else math.nan
        n_failed = len(failed)
        row["Status"] = "failed" if ok_recs.empty else ("partial" if n_failed else "ok")
        row["Failed runs"] = n_failed
        row["Failures"] = "; ".join(
            f"seed {r.seed}, {r.eval_set}: {_first_line(r.failure)}" for r in failed.itertuples(index=False)
        ) or None
        rows.append(row)

    lb = pd.DataFrame(rows)
    avg_mean = column(score_base(primary_metric, AVG, hib), "mean")
    rankable = lb["Kind"].isin(["student", "baseline"]) & lb[avg_mean].notna()
    up = is_higher_better(primary_metric, hib)
    ranks = lb.loc[rankable, avg_mean].rank(ascending=not up, method="min")
    lb["Rank"] = pd.array([pd.NA] * len(lb), dtype="Int64")
    lb.loc[rankable, "Rank"] = ranks.astype("int64").to_numpy()

    group = np.select(
        [lb["Kind"] == "teacher", rankable, lb["Kind"] == "init"], [0, 1, 3], default=2
    )
    lb = (
        lb.assign(_g=group, _r=lb["Rank"].fillna(0).astype("int64"))
        .sort_values(["_g", "_r", "Recipe"], kind="stable")
        .drop(columns=["_g", "_r"])
        .reset_index(drop=True)
    )
    lb.attrs.update({
        "suite": suites[0],
        "primary_metric": primary_metric,
        "baseline": baseline,
        "baseline_found": bool(have_baseline),
        "eval_sets": sets,
        "confidence": confidence,
        "higher_is_better": {m: is_higher_better(m, hib) for m in [primary_metric, *others]},
    })
    return lb


# ----------------------------------------------------------------------------------------- rendering
def _triplet_bases(columns: Sequence[str]) -> list[str]:
    """Stems that have ``mean``, ``ci_low`` and ``ci_high`` columns, in column order."""
    cols = set(columns)
    return [
        c[: -len(" mean")]
        for c in columns
        if c.endswith(" mean") and f"{c[:-5]} ci_low" in cols and f"{c[:-5]} ci_high" in cols
    ]


def decimals_for(values: pd.Series) -> int:
    """Decimals to show for a column: 1 when values reach 10, 2 when they reach 1, else 3."""
    finite = values.astype("float64").abs()
    finite = finite[np.isfinite(finite)]
    if finite.empty:
        return 1
    top = finite.max()
    return 1 if top >= 10 else (2 if top >= 1 else 3)


def _fmt_interval(mean: float, low: float, high: float, decimals: int, signed: bool) -> str:
    if not np.isfinite(mean):
        return "—"
    sign = "+" if signed else ""
    text = f"{mean:{sign}.{decimals}f}"
    if np.isfinite(low) and np.isfinite(high):
        text += f" ± {(high - low) / 2:.{decimals}f}"
    return text


def _fmt_cost(value: Any) -> str:
    if value is None or pd.isna(value):
        return "—"
    v = float(value)
    if abs(v) >= 1000 or (abs(v) >= 1 and v.is_integer()):
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}"
    return f"{v:.3g}"


def display_table(lb: pd.DataFrame) -> pd.DataFrame:
    """String table for people: intervals as ``"45.2 ± 1.3"``, differences signed, costs rounded.

    Reference rows read ``ref.`` in the rank column and ``(reference)`` after the recipe; the baseline
    reads ``(baseline)``. The ``n`` columns, ``Kind`` and the long ``Failures`` text are left out (the
    renderers list failures below the table).
    """
    bases = _triplet_bases(list(lb.columns))
    primary = lb.attrs.get("primary_metric")
    primary_label = metric_label(primary, lb.attrs.get("higher_is_better")) if primary else None
    decimals = {b: decimals_for(lb[column(b, "mean")]) for b in bases}
    if primary_label:
        primary_bases = [b for b in bases if b.startswith(f"{primary_label} [")]
        if primary_bases:
            d = max(decimals[b] for b in primary_bases)
            for b in bases:
                if b in primary_bases or b.startswith(f"Δ {primary_label} "):
                    decimals[b] = d
    out = pd.DataFrame(index=lb.index)
    kinds = lb["Kind"] if "Kind" in lb.columns else pd.Series("student", index=lb.index)
    out["Rank"] = [
        "ref." if k in REFERENCE_KINDS else ("—" if pd.isna(r) else str(int(r)))
        for r, k in zip(lb["Rank"], kinds)
    ]
    out["Recipe"] = [
        f"{r} (reference)" if k in REFERENCE_KINDS else (f"{r} (baseline)" if k == "baseline" else str(r))
        for r, k in zip(lb["Recipe"], kinds)
    ]
    skip = {"Rank", "Recipe", "Kind", "Failures"}
    seen_bases: set[str] = set()
    for c in lb.columns:
        if c in skip or c.endswith(" n") or c.endswith(" ci_low") or c.endswith(" ci_high"):
            continue
        base = c[: -len(" mean")] if c.endswith(" mean") else None
        if base in bases and base not in seen_bases:
            seen_bases.add(base)
            signed = base.startswith("Δ ")
            out[base] = [
                _fmt_interval(m, lo, hi, decimals[base], signed)
                for m, lo, hi in zip(lb[column(base, "mean")], lb[column(base, "ci_low")], lb[column(base, "ci_high")])
            ]
        elif c in COST_LABELS.values():
            out[c] = [_fmt_cost(v) for v in lb[c]]
        else:
            out[c] = ["—" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v) for v in lb[c]]
    return out


def _notes(lb: pd.DataFrame) -> list[str]:
    a = lb.attrs
    conf = int(round(100 * a.get("confidence", 0.95)))
    primary = a.get("primary_metric", "the primary metric")
    label = metric_label(primary, a.get("higher_is_better")) if "primary_metric" in a else primary
    sets = ", ".join(a.get("eval_sets", []))
    notes = [
        f"Cells read mean ± half-width of the {conf}% Student-t interval over training seeds; a cell with a "
        "single seed shows no interval; — means no value (no successful run, or for Δ no seed shared with "
        "the baseline).",
        f"Rank: {label} averaged over the evaluation sets ({sets}) per seed, then over seeds "
        "(seeds that succeeded on every set); reference rows (teacher, untrained init) are not ranked.",
        f"Δ … vs {a.get('baseline', 'baseline')}: mean and interval of the per-seed difference from the "
        "baseline over the seeds both have.",
        "Other metrics are averaged over the sets that report them. ↓ marks metrics where lower is better.",
        "Costs: mean over successful seeds; times in seconds, memory is peak RSS (CPU) or peak allocated (GPU).",
    ]
    if a.get("baseline_found") is False:
        notes.append(f"Baseline recipe {a.get('baseline')!r} has no successful run: Δ columns are empty.")
    return notes


def _failure_lines(lb: pd.DataFrame, max_len: int = 300) -> list[tuple[str, str]]:
    out = []
    if "Failures" not in lb.columns:
        return out
    for recipe, text in zip(lb["Recipe"], lb["Failures"]):
        if isinstance(text, str) and text:
            out.append((str(recipe), text if len(text) <= max_len else text[: max_len - 1] + "…"))
    return out


def _md_cell(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(lb: pd.DataFrame, problems: Sequence[str] = ()) -> str:
    """GitHub-flavoured Markdown: a title, the table, notes, failed runs and ``problems``."""
    table = display_table(lb)
    headers = list(table.columns)
    text_cols = {"Rank", "Recipe", "Status"}
    align = [":---" if h in text_cols else "---:" for h in headers]
    lines = [f"# Leaderboard — suite `{lb.attrs.get('suite', '?')}`", ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
    lines.append("| " + " | ".join(align) + " |")
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_md_cell(v) for v in r.tolist()) + " |")
    lines += ["", *[f"- {n}" for n in _notes(lb)]]
    failures = _failure_lines(lb)
    if failures:
        lines += ["", "## Failed runs (excluded from all statistics)", ""]
        lines += [f"- **{r}**: {_md_cell(t)}" for r, t in failures]
    if problems:
        lines += ["", "## Problems", ""]
        lines += [f"- {_md_cell(p)}" for p in problems]
    return "\n".join(lines) + "\n"


def render_csv(lb: pd.DataFrame) -> str:
    """The numeric table as CSV (mean, ci_low, ci_high and n in separate columns; NaN left empty)."""
    return lb.to_csv(index=False, lineterminator="\n")


_HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.reference td { color: #666; font-style: italic; background: #fafafa; }
tr.baseline td { font-weight: 600; }
tr.failed td { color: #a00; }
caption { caption-side: top; text-align: left; font-weight: 600; margin-bottom: .5em; }
.notes { color: #555; font-size: 13px; max-width: 70em; }
"""


def render_html(lb: pd.DataFrame, problems: Sequence[str] = ()) -> str:
    """A standalone HTML page with the table, notes, failed runs and ``problems``."""
    table = display_table(lb)
    esc = html.escape
    suite = esc(str(lb.attrs.get("suite", "?")))
    text_cols = {"Rank", "Recipe", "Status"}
    kinds = lb["Kind"].tolist() if "Kind" in lb.columns else ["student"] * len(lb)
    statuses = lb["Status"].tolist() if "Status" in lb.columns else ["ok"] * len(lb)
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>DistillBench leaderboard — {suite}</title>", f"<style>{_HTML_STYLE}</style>", "</head>",
        "<body>", f"<h1>Leaderboard — suite <code>{suite}</code></h1>", "<table>",
        f"<caption>Primary metric: {esc(str(lb.attrs.get('primary_metric', '?')))}; "
        f"baseline: {esc(str(lb.attrs.get('baseline', '?')))}</caption>",
        "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.columns) + "</tr></thead>", "<tbody>",
    ]
    for (_, r), kind, status in zip(table.iterrows(), kinds, statuses):
        cls = "reference" if kind in REFERENCE_KINDS else ("baseline" if kind == "baseline" else "")
        if status == "failed":
            cls = (cls + " failed").strip()
        cells = "".join(
            (f"<td>{esc(str(v))}</td>" if h in text_cols else f'<td class="num">{esc(str(v))}</td>')
            for h, v in r.items()
        )
        parts.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    parts += ["</tbody>", "</table>", '<div class="notes"><ul>']
    parts += [f"<li>{esc(n)}</li>" for n in _notes(lb)]
    parts.append("</ul></div>")
    failures = _failure_lines(lb)
    if failures:
        parts += ["<h2>Failed runs (excluded from all statistics)</h2>", "<ul>"]
        parts += [f"<li><b>{esc(r)}</b>: {esc(t)}</li>" for r, t in failures]
        parts.append("</ul>")
    if problems:
        parts += ["<h2>Problems</h2>", "<ul>", *[f"<li>{esc(p)}</li>" for p in problems], "</ul>"]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "↓": r"$\downarrow$", "Δ": r"$\Delta$", "—": "--", "…": r"\ldots{}",
}


def _tex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def render_latex(lb: pd.DataFrame) -> str:
    """A booktabs ``table`` (needs ``\\usepackage{booktabs}``); rules separate reference and student rows."""
    table = display_table(lb)
    text_cols = {"Rank", "Recipe", "Status"}
    spec = "".join("l" if h in text_cols else "r" for h in table.columns)
    kinds = lb["Kind"].tolist() if "Kind" in lb.columns else ["student"] * len(lb)
    suite = _tex(lb.attrs.get("suite", "?"))
    conf = int(round(100 * lb.attrs.get("confidence", 0.95)))
    lines = [
        "% Generated by DistillBench (harness.report). Requires \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{DistillBench leaderboard, suite \\texttt{{{suite}}}: mean $\\pm$ {conf}\\% Student-t "
        "interval over training seeds.}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(_tex(h) for h in table.columns) + " \\\\",
        "\\midrule",
    ]
    prev_group = None
    for (_, r), kind in zip(table.iterrows(), kinds):
        group = "teacher" if kind == "teacher" else ("init" if kind == "init" else "student")
        if prev_group is not None and group != prev_group:
            lines.append("\\midrule")
        prev_group = group
        lines.append(" & ".join(_tex(v) for v in r.tolist()) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_leaderboard(
    lb: pd.DataFrame,
    out_dir: str | os.PathLike,
    stem: str = "leaderboard",
    problems: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``.csv``, ``.html`` and ``.tex`` atomically into ``out_dir``.

    ``problems`` (unreadable records, missing runs, …) are listed under the Markdown and HTML tables.
    Returns ``{"md": path, "csv": path, "html": path, "tex": path}``.
    """
    out = Path(out_dir)
    return {
        "md": write_text_atomic(out / f"{stem}.md", render_markdown(lb, problems)),
        "csv": write_text_atomic(out / f"{stem}.csv", render_csv(lb)),
        "html": write_text_atomic(out / f"{stem}.html", render_html(lb, problems)),
        "tex": write_text_atomic(out / f"{stem}.tex", render_latex(lb)),
    }
