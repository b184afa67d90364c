"""The leaderboard: assemble the statistics of :mod:`harness.report.aggregate` into one numeric table per
suite (the CSV), plus the side tables a reader needs (per teacher, tuning, metrics legend). No rendering
here — see :mod:`harness.report.render`.

Columns of :attr:`Report.leaderboard` (``<P>`` = the primary metric's label, ``<S>`` = each evaluation set,
plus ``avg`` when there are several; ``<O>`` = ``avg`` with several sets, else the one set):

* ``Rank`` (nullable int; empty for teacher/init and students with no score), ``Recipe``, ``Kind``
  (``teacher`` | ``init`` = reference, ``baseline``, ``student``), ``Teachers`` (teachers with a
  successful run), ``n runs`` (successful training runs = (teacher, seed) pairs), ``Hyperparameters``
  (the tuned values the final runs used, e.g. ``learning_rate=0.003``);
* ``"<P> [<S>] mean|ci_low|ci_high|n"``;
* ``"Δ <P> vs <baseline> [<S>] mean|ci_low|ci_high|n"``, and for ``<O>`` also ``p`` (paired t-test) and
  ``p_holm`` (Holm-adjusted over the recipes compared with the baseline);
* ``"Δ <P> vs best [<O>] mean|ci_low|ci_high|n|p|p_holm"``, ``"≈ best"`` (boolean: the best, or not
  significantly different from it after Holm; empty when untestable), ``"P(best)"`` (bootstrap);
* every other metric on ``<O>``: ``"<label> [<O>] mean|ci_low|ci_high"`` (metrics identical to an earlier
  one in every run are left out and named in the notes);
* costs (mean over runs): ``Train time (s)``, ``CPU time (s)``, ``Eval time (s)``, …;
* ``Status`` (``ok`` | ``partial`` | ``failed``), ``Failed runs`` (count), ``Failures`` (text).

Labels carry ``↓`` for lower-is-better metrics and ``·`` for metrics without a better direction
(:mod:`harness.report.metric_info`). ``leaderboard.attrs`` holds the settings the renderers need.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness.report.aggregate import (
    AVG,
    REFERENCE_KINDS,
    chosen_hparams,
    cost_summary,
    duplicate_metrics,
    eval_sets_of,
    final_runs,
    kind_of,
    metric_summary,
    ok_runs,
    present_metrics,
    recipe_configs,
    recipe_roles,
    run_matrix,
    run_values,
    significance,
    teacher_agreement,
    teacher_summary,
    tuning_table,
    variance_statement,
)
from harness.report.metric_info import (
    direction,
    is_higher_better,
    metric_info,
    metric_label,
    ordered_metrics,
    recipes_training_on,
)
from harness.report.stats import Interval, paired_diff

__all__ = [
    "AVG",
    "COST_LABELS",
    "REFERENCE_KINDS",
    "Report",
    "STATS",
    "best_base",
    "build_leaderboard",
    "build_report",
    "column",
    "delta_base",
    "metric_label",
    "score_base",
]

STATS = ("mean", "ci_low", "ci_high", "n", "p", "p_holm")
TIED = "≈ best"
P_BEST = "P(best)"

#: cost key -> column label, in display order.
COST_LABELS = {
    "train_time_s": "Train time (s)",
    "cpu_time_s": "CPU time (s)",
    "eval_time_s": "Eval time (s)",
    "sec_per_sample": "Sec/sample (s)",
    "tokens_per_s": "Tokens/s",
    "generation_share": "Generating (share)",
    "generated_tokens_per_s": "Generated tok/s",
    "peak_rss_mb": "Peak memory (MB)",
    "steps": "Steps",
    "tokens": "Tokens",
}


def score_base(metric: str, eval_set: str, overrides: Mapping[str, bool] | None = None) -> str:
    """Column stem of a metric on a set (or ``AVG``): ``"ROUGE-L [test]"``."""
    return f"{metric_label(metric, overrides)} [{eval_set}]"


def delta_base(metric: str, baseline: str, eval_set: str, overrides: Mapping[str, bool] | None = None) -> str:
    """Column stem of the paired difference from the baseline: ``"Δ ROUGE-L vs sft [test]"``."""
    return f"Δ {metric_label(metric, overrides)} vs {baseline} [{eval_set}]"


def best_base(metric: str, eval_set: str, overrides: Mapping[str, bool] | None = None) -> str:
    """Column stem of the paired difference from the best recipe: ``"Δ ROUGE-L vs best [avg]"``."""
    return f"Δ {metric_label(metric, overrides)} vs best [{eval_set}]"


def column(base: str, stat: str) -> str:
    """Full column name from a stem and one of :data:`STATS`."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    return f"{base} {stat}"


@dataclass
class Report:
    """Everything the renderers and plots show, as DataFrames (see the module docstring).

    ``per_teacher``: ``recipe, kind, teacher_seed, mean, ci_low, ci_high, n, rank`` (empty with one teacher);
    ``teacher_agreement``: :func:`~harness.report.aggregate.teacher_agreement`; ``tuning``:
    :func:`~harness.report.aggregate.tuning_table`; ``legend``: ``Column, Better, Meaning, Trained on by``
    per metric shown; ``duplicates``: ``{left-out metric: identical metric kept}``.
    """

    leaderboard: pd.DataFrame
    per_teacher: pd.DataFrame
    teacher_agreement: pd.DataFrame
    tuning: pd.DataFrame
    legend: pd.DataFrame
    duplicates: dict[str, str] = field(default_factory=dict)
    methods: pd.DataFrame = field(default_factory=pd.DataFrame)  # each recipe's method card

    @property
    def meta(self) -> dict[str, Any]:
        return self.leaderboard.attrs


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


_TRAINED_FALLBACK = {"fkl": "recipes with an fkl term", "jsd": "recipes with a jsd term (β = 0.5)",
                     "tvd": "recipes with a tvd term", "ce": "recipes with a ce term (sft)"}


def _legend(metrics: Sequence[str], configs: Mapping[str, Any], hib: Mapping[str, bool] | None,
            overall: str) -> pd.DataFrame:
    rows = []
    have_configs = any(isinstance(c, dict) for c in configs.values())
    for m in metrics:
        info = metric_info(m)
        d = direction(m, hib)
        if info is not None and info.objective is not None:
            names = recipes_training_on(m, configs) if have_configs else []
            obj = info.objective[0]
            if names:
                trained = f"{', '.join(names)} (objective {obj})"
            elif have_configs:
                trained = f"none of these recipes (it is objective {obj}'s loss)"
            else:
                trained = _TRAINED_FALLBACK.get(obj, f"recipes with a {obj} term")
        else:
            trained = "none"
        rows.append({
            "Column": score_base(m, overall, hib), "Key": m,
            "Better": "higher" if d > 0 else ("lower" if d < 0 else "no direction"),
            "Meaning": info.meaning if info else "(not in the metric registry: direction unknown)",
            "Trained on by": trained,
        })
    return pd.DataFrame(rows, columns=["Column", "Key", "Better", "Meaning", "Trained on by"])


def build_report(
    df: pd.DataFrame,
    primary_metric: str = "rougeL",
    baseline: str = "sft",
    higher_is_better: Mapping[str, bool] | None = None,
    *,
    confidence: float = 0.95,
    alpha: float = 0.05,
    n_boot: int = 10_000,
    rng_seed: int = 0,
) -> Report:
    """Summarise the records of one suite (see the module docstring).

    Rows: the teacher first, then students by rank (ties share the smaller rank), then students without a
    score, then the untrained ``init``. Rank is by the primary metric on ``<O>``, in its better direction
    (``higher_is_better`` overrides the registry). Raises ``ValueError`` for no records, records of several
    suites, no final-phase record, a primary metric no successful record reports, or a primary metric
    without a better direction.
    """
    if df.empty:
        raise ValueError("no run records to build a leaderboard from")
    suites = sorted(df["suite"].astype(str).unique())
    if len(suites) > 1:
        raise ValueError(f"records from several suites {suites}; build one leaderboard per suite")
    hib = dict(higher_is_better or {})
    tuning = tuning_table(df, primary_metric, higher_is_better=hib, confidence=confidence)
    final = final_runs(df)
    if final.empty:
        raise ValueError("no final-phase run records (only 'tune' records): nothing to rank")
    present = present_metrics(final)
    if not ok_runs(final).empty and primary_metric not in present:
        raise ValueError(f"primary metric {primary_metric!r} is not reported by any successful record; "
                         f"available: {', '.join(present) or 'none'}")
    if direction(primary_metric, hib) == 0:
        raise ValueError(f"primary metric {primary_metric!r} has no better direction; pass "
                         f"higher_is_better={{{primary_metric!r}: True or False}}")
    up = is_higher_better(primary_metric, hib)
    sets = eval_sets_of(final)
    show_sets = [*sets, AVG] if len(sets) > 1 else list(sets)
    overall = AVG if len(sets) > 1 else sets[0]
    roles = recipe_roles(final)
    candidates = ordered_metrics([m for m in present if m != primary_metric])
    duplicates = duplicate_metrics(final, [primary_metric, *candidates])
    others = [m for m in candidates if m not in duplicates]

    summary = metric_summary(final, [primary_metric, *others], sets, confidence=confidence,
                             strict=[primary_metric]).set_index(["recipe", "metric", "eval_set"])
    values = run_values(final, primary_metric, sets, strict_average=True)
    have = set(values.index.get_level_values(0))
    kinds = {r: kind_of(r, role, baseline) for r, role in roles.items()}
    overall_mean = {r: float(summary.loc[(r, primary_metric, overall), "mean"]) for r in roles}
    rankable = [r for r in roles if kinds[r] in ("student", "baseline") and np.isfinite(overall_mean[r])]
    matrix = run_matrix(values, overall, rankable)
    have_baseline = baseline in rankable
    sig = significance(matrix, baseline=baseline if have_baseline else None, higher_is_better=up, alpha=alpha,
                       confidence=confidence, n_boot=n_boot, seed=rng_seed)
    costs = cost_summary(final)
    chosen = chosen_hparams(df)
    ok = ok_runs(final)
    ok_keys = ok.assign(_run=list(zip(ok["teacher_seed"], ok["seed"])))

    rows = []
    for recipe, kind in kinds.items():
        recs = final.loc[final["recipe"].astype(str) == recipe]
        failed = recs.loc[recs["failed"].astype(bool)].sort_values(["teacher_seed", "seed", "eval_set"])
        mine = ok_keys.loc[ok_keys["recipe"].astype(str) == recipe]
        row: dict[str, Any] = {
            "Rank": pd.NA, "Recipe": recipe, "Kind": kind, "Teachers": int(mine["teacher_seed"].nunique()),
            "n runs": int(mine["_run"].nunique()), "Hyperparameters": chosen.get(recipe),
        }

        def iv(metric: str, s: str) -> Interval:
            r = summary.loc[(recipe, metric, s)]
            return Interval(float(r["mean"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n"]), confidence)

        for s in show_sets:
            _put(row, score_base(primary_metric, s, hib), iv(primary_metric, s))
        for s in show_sets:
            base = delta_base(primary_metric, baseline, s, hib)
            if recipe == baseline or not have_baseline or recipe not in have or kind in REFERENCE_KINDS:
                diff = Interval(math.nan, math.nan, math.nan, 0, confidence)
            else:
                diff = paired_diff(values.loc[recipe][s], values.loc[baseline][s], confidence)
            _put(row, base, diff)
            if s == overall:
                in_sig = recipe in sig.index
                row[column(base, "p")] = sig.at[recipe, "vs_base_p"] if in_sig else math.nan
                row[column(base, "p_holm")] = sig.at[recipe, "vs_base_p_holm"] if in_sig else math.nan
        bb = best_base(primary_metric, overall, hib)
        in_sig = recipe in sig.index
        for stat in ("mean", "ci_low", "ci_high", "n", "p", "p_holm"):
            default = 0 if stat == "n" else math.nan
            row[column(bb, stat)] = sig.at[recipe, f"vs_best_{stat}"] if in_sig else default
        row[TIED] = sig.at[recipe, "tied_with_best"] if in_sig else pd.NA
        row[P_BEST] = sig.at[recipe, "p_best"] if in_sig else math.nan
        for m in others:
            _put(row, score_base(m, overall, hib), iv(m, AVG), with_n=False)
        for key, label in COST_LABELS.items():
            if key in costs.columns:
                row[label] = float(costs.at[recipe, key]) if recipe in costs.index else math.nan
        n_failed = len(failed)
        row["Status"] = "failed" if mine.empty else ("partial" if n_failed else "ok")
        row["Failed runs"] = n_failed
        row["Failures"] = "; ".join(
            (f"teacher {r.teacher_seed}, " if r.teacher_seed else "") + f"seed {r.seed}, {r.eval_set}: "
            + _first_line(r.failure) for r in failed.itertuples(index=False)
        ) or None
        rows.append(row)

    lb = pd.DataFrame(rows)
    lb[TIED] = pd.array(lb[TIED].tolist(), dtype="boolean")
    lb[column(best_base(primary_metric, overall, hib), "n")] = lb[column(best_base(primary_metric, overall, hib), "n")].astype("int64")
    avg_mean = column(score_base(primary_metric, overall, hib), "mean")
    is_rankable = lb["Recipe"].isin(rankable)
    ranks = lb.loc[is_rankable, avg_mean].rank(ascending=not up, method="min")
    lb["Rank"] = pd.array([pd.NA] * len(lb), dtype="Int64")
    lb.loc[is_rankable, "Rank"] = ranks.astype("int64").to_numpy()
    group = np.select([lb["Kind"] == "teacher", is_rankable, lb["Kind"] == "init"], [0, 1, 3], default=2)
    lb = (
        lb.assign(_g=group, _r=lb["Rank"].fillna(0).astype("int64"))
        .sort_values(["_g", "_r", "Recipe"], kind="stable")
        .drop(columns=["_g", "_r"])
        .reset_index(drop=True)
    )

    # per teacher
    teachers = sorted(int(t) for t in ok["teacher_seed"].unique())
    per_teacher = pd.DataFrame(columns=["recipe", "kind", "teacher_seed", "mean", "ci_low", "ci_high", "n", "rank"])
    agreement = teacher_agreement(per_teacher, [], higher_is_better=up)
    if len(teachers) > 1:
        pt = teacher_summary(values, overall, confidence=confidence)
        pt["kind"] = [kinds.get(r, "student") for r in pt["recipe"]]
        pt["rank"] = pd.array([pd.NA] * len(pt), dtype="Int64")
        for t, sub in pt.loc[pt["recipe"].isin(rankable)].groupby("teacher_seed"):
            pt.loc[sub.index, "rank"] = sub["mean"].rank(ascending=not up, method="min").astype("int64").to_numpy()
        per_teacher = pt[["recipe", "kind", "teacher_seed", "mean", "ci_low", "ci_high", "n", "rank"]]
        agreement = teacher_agreement(pt, rankable, higher_is_better=up)

    seeds_per_teacher = ok.loc[ok["recipe"].isin(rankable)].groupby("teacher_seed")["seed"].nunique().tolist() or [0]
    n_eval = ok["n_eval_seeds"].dropna().unique().tolist() if "n_eval_seeds" in ok.columns else []
    lb.attrs.update({
        "suite": suites[0],
        "primary_metric": primary_metric,
        "baseline": baseline,
        "baseline_found": bool(have_baseline),
        "best": sig.attrs.get("best"),
        "eval_sets": sets,
        "show_sets": show_sets,
        "overall": overall,
        "others": others,
        "confidence": confidence,
        "alpha": alpha,
        "n_boot": n_boot,
        "rng_seed": rng_seed,
        "teachers": teachers,
        "n_compared": len(rankable),
        "variance": variance_statement(len(teachers), seeds_per_teacher, n_eval, confidence),
        "higher_is_better": {m: direction(m, hib) for m in [primary_metric, *others]},
        "overrides": hib,
        "duplicates": duplicates,
    })
    legend = _legend([primary_metric, *others], recipe_configs(final), hib, overall)
    return Report(lb, per_teacher, agreement, tuning, legend, duplicates, methods_table(recipe_configs(final)))


def methods_table(configs: Mapping[str, Any]) -> pd.DataFrame:
    """One row per recipe: its loss, mode and method card (paper, released code, number of deviations)."""
    rows = []
    for recipe, cfg in sorted(configs.items()):
        if not isinstance(cfg, Mapping):
            continue
        terms = cfg.get("loss") or []
        loss = " + ".join(f"{t.get('weight', 1):g}·{t.get('objective')}" for t in terms if isinstance(t, Mapping))
        ref = cfg.get("reference") or {}
        devs = ref.get("deviations")
        rows.append({"Recipe": recipe, "Loss": loss or cfg.get("objective", ""), "Mode": cfg.get("mode", ""),
                     "Paper": ref.get("paper", "—"), "Code": ref.get("code", "—"),
                     "Deviations": "none" if devs == [] else "not listed" if devs is None else str(len(devs))})
    return pd.DataFrame(rows)


def build_leaderboard(
    df: pd.DataFrame,
    primary_metric: str = "rougeL",
    baseline: str = "sft",
    higher_is_better: Mapping[str, bool] | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """The numeric leaderboard table of :func:`build_report` (keyword arguments passed on)."""
    return build_report(df, primary_metric, baseline, higher_is_better, **kwargs).leaderboard
