"""Aggregation of the records table into statistics: pure functions from DataFrames to DataFrames.

The input is the wide table of :mod:`harness.report.records` (one row per record). Conventions:

* Only ``phase == "final"`` records (test-split runs) enter the leaderboard statistics; ``"tune"`` records
  (validation-split runs of the hyperparameter search) enter :func:`tuning_table` only.
* Failed runs never enter a statistic.
* The unit of replication is the **training run**: one training seed under one teacher, keyed by
  ``(teacher_seed, seed)``. A run's value of a metric on a set is the record's value, which the evaluation
  already averaged over its evaluation seeds (their variance is averaged away, not added). The average
  over sets (``AVG``) is taken per run first (only runs with a successful record on every set count when
  ``strict_average``), then over runs.
* Pooling over teachers: a recipe's interval is taken over all its runs, ``n = teachers × seeds``; see
  :func:`variance_statement` for the words the report prints.
* Paired comparisons pair runs on ``(teacher_seed, seed)``: same teacher, same seed (same data order and
  initial student), different recipe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.report.metric_info import direction
from harness.report.records import (
    COST_PREFIX,
    METRIC_PREFIX,
    cost_names,
    hparams_dict,
    hparams_label,
    load_record_list,
    metric_names,
)
from harness.report.stats import bootstrap_p_best, holm, mean_ci, paired_ttest, rank_correlation

__all__ = [
    "AVG",
    "REFERENCE_KINDS",
    "RUN_KEYS",
    "chosen_hparams",
    "cost_summary",
    "duplicate_metrics",
    "eval_sets_of",
    "final_runs",
    "kind_of",
    "metric_summary",
    "ok_runs",
    "present_metrics",
    "recipe_configs",
    "recipe_roles",
    "run_matrix",
    "run_values",
    "significance",
    "teacher_agreement",
    "teacher_summary",
    "tuning_table",
    "variance_statement",
]

AVG = "avg"
RUN_KEYS = ("teacher_seed", "seed")
REFERENCE_KINDS = ("teacher", "init")


# ------------------------------------------------------------------------------------------- basics
def final_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The test-split records (``phase`` final or absent)."""
    return df.loc[df["phase"] == "final"] if "phase" in df.columns else df


def ok_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Records of successful runs."""
    return df.loc[~df["failed"].astype(bool)]


def eval_sets_of(df: pd.DataFrame) -> list[str]:
    """Evaluation sets present in the records, sorted."""
    return sorted(df["eval_set"].astype(str).unique().tolist())


def recipe_roles(df: pd.DataFrame) -> dict[str, str]:
    """recipe -> role (the most frequent role among its records), recipes sorted by name."""
    return {str(r): str(roles.astype(str).mode().iloc[0]) for r, roles in df.groupby("recipe", sort=True)["role"]}


def kind_of(recipe: str, role: str, baseline: str) -> str:
    """``teacher`` | ``init`` (reference rows), ``baseline`` or ``student``."""
    if role in REFERENCE_KINDS:
        return role
    if recipe in REFERENCE_KINDS:
        return recipe
    return "baseline" if recipe == baseline else "student"


def present_metrics(df: pd.DataFrame) -> list[str]:
    """Metrics with at least one finite value in a successful record."""
    ok = ok_runs(df)
    return [m for m in metric_names(df) if ok[METRIC_PREFIX + m].notna().any()]


def recipe_configs(df: pd.DataFrame) -> dict[str, dict[str, Any] | None]:
    """recipe -> its recipe configuration (the first record's ``config.recipe``), ``None`` when absent."""
    out: dict[str, dict[str, Any] | None] = {}
    for recipe, cfgs in df.groupby("recipe", sort=True)["recipe_config"] if "recipe_config" in df else []:
        found = [c for c in cfgs if isinstance(c, dict)]
        out[str(recipe)] = found[0] if found else None
    return out


def _key_index(names: Sequence[str]) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([[] for _ in names], names=list(names))


# ----------------------------------------------------------------------------------- run values
def run_values(
    df: pd.DataFrame,
    metric: str,
    eval_sets: Sequence[str] | None = None,
    *,
    strict_average: bool = True,
) -> pd.DataFrame:
    """Successful runs' values of ``metric``, index ``(recipe, teacher_seed, seed)``, one column per set
    plus ``AVG``.

    ``AVG`` is the mean of a run's per-set values, defined only for runs with a successful record on every
    set; with ``strict_average`` it is NaN when one of them lacks the metric (use it for the primary
    metric), otherwise the mean over the sets that report it. Pass final-phase records.
    """
    sets = list(eval_sets) if eval_sets is not None else eval_sets_of(df)
    ok = ok_runs(df)
    ok = ok.loc[ok["eval_set"].isin(sets)]
    col = METRIC_PREFIX + metric
    values = ok[col] if col in ok.columns else pd.Series(np.nan, index=ok.index, dtype="float64")
    teacher = ok["teacher_seed"] if "teacher_seed" in ok.columns else pd.Series(0, index=ok.index)
    long = pd.DataFrame({
        "recipe": ok["recipe"].astype(str).to_numpy(),
        "teacher_seed": teacher.astype("int64").to_numpy(),
        "seed": ok["seed"].astype("int64").to_numpy(),
        "eval_set": ok["eval_set"].astype(str).to_numpy(),
        "value": values.astype("float64").to_numpy(),
    })
    keys = ["recipe", *RUN_KEYS]
    if long.empty:
        return pd.DataFrame(columns=[*sets, AVG], index=_key_index(keys), dtype="float64")
    index = pd.MultiIndex.from_frame(long[keys].drop_duplicates().sort_values(keys))
    wide = long.groupby([*keys, "eval_set"])["value"].first().unstack("eval_set")
    wide = wide.reindex(index=index, columns=sets).astype("float64")
    n_sets = long.groupby(keys)["eval_set"].nunique().reindex(index).fillna(0)
    complete = (n_sets == len(sets)).to_numpy()
    wide[AVG] = wide[sets].mean(axis=1, skipna=not strict_average).where(complete, np.nan)
    wide.columns.name = None
    return wide


def run_matrix(values: pd.DataFrame, column: str, recipes: Sequence[str] | None = None) -> pd.DataFrame:
    """Runs × recipes: rows ``(teacher_seed, seed)``, one column per recipe (NaN where a recipe lacks the
    run), from :func:`run_values`' ``column``."""
    if values.empty:
        return pd.DataFrame(index=_key_index(RUN_KEYS), columns=list(recipes or []), dtype="float64")
    m = values[column].unstack("recipe")
    if recipes is not None:
        m = m.reindex(columns=list(recipes))
    m.columns.name = None
    return m.astype("float64")


def metric_summary(
    df: pd.DataFrame,
    metrics: Sequence[str],
    eval_sets: Sequence[str] | None = None,
    *,
    confidence: float = 0.95,
    strict: Sequence[str] = (),
) -> pd.DataFrame:
    """Tidy ``recipe, role, metric, eval_set, mean, ci_low, ci_high, n`` over successful runs (all
    teachers pooled). ``eval_set`` includes ``AVG``; metrics in ``strict`` use a strict average."""
    sets = list(eval_sets) if eval_sets is not None else eval_sets_of(df)
    roles = recipe_roles(df)
    rows = []
    for metric in metrics:
        wide = run_values(df, metric, sets, strict_average=metric in strict)
        have = set(wide.index.get_level_values(0))
        for recipe in roles:
            sub = wide.loc[recipe] if recipe in have else None
            for s in [*sets, AVG]:
                iv = mean_ci([] if sub is None else sub[s].tolist(), confidence)
                rows.append({"recipe": recipe, "role": roles[recipe], "metric": metric, "eval_set": s,
                             "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "n": iv.n})
    return pd.DataFrame(rows, columns=["recipe", "role", "metric", "eval_set", "mean", "ci_low", "ci_high", "n"])


def teacher_summary(values: pd.DataFrame, column: str, *, confidence: float = 0.95) -> pd.DataFrame:
    """Per recipe and teacher: ``recipe, teacher_seed, mean, ci_low, ci_high, n`` over that teacher's
    training seeds (from :func:`run_values`' ``column``)."""
    rows = []
    if not values.empty:
        for (recipe, teacher), sub in values[column].groupby(level=["recipe", "teacher_seed"], sort=True):
            iv = mean_ci(sub.tolist(), confidence)
            rows.append({"recipe": recipe, "teacher_seed": int(teacher), "mean": iv.mean, "ci_low": iv.low,
                         "ci_high": iv.high, "n": iv.n})
    return pd.DataFrame(rows, columns=["recipe", "teacher_seed", "mean", "ci_low", "ci_high", "n"])


def variance_statement(n_teachers: int, seeds_per_teacher: Sequence[int], n_eval_seeds: Sequence[float],
                       confidence: float = 0.95) -> str:
    """One sentence saying which variance an interval over training runs includes."""
    conf = int(round(100 * confidence))
    seeds = sorted(set(int(s) for s in seeds_per_teacher))
    seeds_txt = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    evals = sorted(set(int(e) for e in n_eval_seeds if e == e))
    eval_txt = (f"{evals[0]} evaluation seeds" if len(evals) == 1 else
                ("the evaluation seeds" if not evals else f"{evals[0]}–{evals[-1]} evaluation seeds"))
    text = (f"± is the half-width of the {conf}% Student-t interval over a recipe's training runs. One run = "
            f"one training seed ({seeds_txt} per teacher)")
    if n_teachers > 1:
        text += (f" under one of {n_teachers} teachers; runs of all teachers are pooled (n = teachers × seeds), "
                 "so the interval includes training-seed variance and the spread between these teachers, "
                 "treated as independent runs (a random teacher effect is not modelled)")
    else:
        text += " under the one teacher; it includes training-seed variance only (teacher fixed)"
    text += (f". Each run's score is its mean over {eval_txt}: evaluation-sampling variance is averaged "
             "within the run, not added.")
    return text


# ---------------------------------------------------------------------------------- significance
def significance(
    matrix: pd.DataFrame,
    *,
    baseline: str | None,
    higher_is_better: bool = True,
    alpha: float = 0.05,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired tests against the baseline and against the best, Holm-adjusted, and P(best).

    ``matrix``: runs × candidate recipes (:func:`run_matrix`; rows keyed ``(teacher_seed, seed)``). The
    *best* is the recipe with the best mean over its runs (ties: first by name). For every other recipe a
    paired t-test on the per-run differences (pairs = runs both have) against the baseline and against
    the best; each family (vs baseline, vs best) is Holm-adjusted over the recipes tested in it.
    ``tied_with_best`` is True for the best and for every recipe whose Holm-adjusted p against the best is
    ≥ ``alpha`` (not significantly different — which is not the same as equivalent); NA when untestable
    (fewer than 2 shared runs). ``p_best`` is :func:`~harness.report.stats.bootstrap_p_best` with the
    teacher as stratum.

    Columns: ``vs_base_{mean,ci_low,ci_high,n,p,p_holm}``, ``vs_best_{mean,ci_low,ci_high,n,p,p_holm}``,
    ``is_best``, ``tied_with_best``, ``p_best``; index: recipes. Attribute ``best`` in ``.attrs``.
    """
    recipes = [str(c) for c in matrix.columns]
    out = pd.DataFrame(index=pd.Index(recipes, name="recipe"))
    sign = 1.0 if higher_is_better else -1.0
    means = matrix.mean(axis=0, skipna=True)
    ranked = sorted((r for r in recipes if np.isfinite(means[r])), key=lambda r: (-sign * means[r], r))
    best = ranked[0] if ranked else None
    out.attrs["best"] = best

    def tests(ref: str | None, prefix: str) -> None:
        cols = {f"{prefix}_{k}": [] for k in ("mean", "ci_low", "ci_high", "n", "p")}
        for r in recipes:
            if ref is None or r == ref or ref not in matrix.columns:
                vals = (math.nan, math.nan, math.nan, 0, math.nan)
            else:
                t = paired_ttest(matrix[r].dropna(), matrix[ref].dropna(), confidence)
                vals = (t.diff.mean, t.diff.low, t.diff.high, t.diff.n, t.p)
            for k, v in zip(("mean", "ci_low", "ci_high", "n", "p"), vals):
                cols[f"{prefix}_{k}"].append(v)
        for k, v in cols.items():
            out[k] = v
        out[f"{prefix}_n"] = out[f"{prefix}_n"].astype("int64")
        out[f"{prefix}_p_holm"] = pd.Series(holm(dict(zip(recipes, out[f"{prefix}_p"]))))

    tests(baseline, "vs_base")
    tests(best, "vs_best")
    out["is_best"] = [r == best for r in recipes]
    tied = []
    for r in recipes:
        if r == best:
            tied.append(True)
        elif best is None or not np.isfinite(out.at[r, "vs_best_p_holm"]):
            tied.append(pd.NA)
        else:
            tied.append(bool(out.at[r, "vs_best_p_holm"] >= alpha))
    out["tied_with_best"] = pd.array(tied, dtype="boolean")
    strata = list(matrix.index.get_level_values("teacher_seed")) if "teacher_seed" in (matrix.index.names or []) else None
    out["p_best"] = bootstrap_p_best(matrix, higher_is_better=higher_is_better, n_boot=n_boot, seed=seed,
                                     strata=strata).reindex(recipes)
    return out


def teacher_agreement(per_teacher: pd.DataFrame, recipes: Sequence[str], *, higher_is_better: bool = True) -> pd.DataFrame:
    """For every pair of teachers: rank correlation of the recipes' means and whether the top recipe is
    the same. ``per_teacher`` is :func:`teacher_summary`'s output; only ``recipes`` (the ranked students
    and baseline) count. Columns: ``teacher_a, teacher_b, n, kendall_tau, kendall_p, spearman_rho,
    spearman_p, top_a, top_b, same_top``."""
    sub = per_teacher.loc[per_teacher["recipe"].isin(list(recipes))]
    table = sub.pivot(index="recipe", columns="teacher_seed", values="mean") if not sub.empty else pd.DataFrame()
    teachers = sorted(int(t) for t in table.columns)
    sign = 1.0 if higher_is_better else -1.0
    rows = []

    def top(t: int) -> str | None:
        col = table[t].dropna()
        if col.empty:
            return None
        return sorted(col.index, key=lambda r: (-sign * col[r], r))[0]

    for i, a in enumerate(teachers):
        for b in teachers[i + 1:]:
            rc = rank_correlation(table[a], table[b])
            ta, tb = top(a), top(b)
            rows.append({"teacher_a": a, "teacher_b": b, **rc, "top_a": ta, "top_b": tb,
                         "same_top": ta is not None and ta == tb})
    cols = ["teacher_a", "teacher_b", "n", "kendall_tau", "kendall_p", "spearman_rho", "spearman_p",
            "top_a", "top_b", "same_top"]
    return pd.DataFrame(rows, columns=cols)


# ------------------------------------------------------------------------------------ duplicates
def duplicate_metrics(df: pd.DataFrame, metrics: Sequence[str], *, rtol: float = 1e-12) -> dict[str, str]:
    """Metrics whose value equals an earlier metric's in every successful record (both missing counts as
    equal; at least one finite pair required): ``{dropped: kept}``. ``metrics`` gives the order — the
    first of a group is kept. E.g. ``valid_rate`` duplicates ``exact_match`` when no extra coverage
    samples are drawn."""
    ok = ok_runs(df)
    dropped: dict[str, str] = {}
    kept: list[str] = []
    for m in metrics:
        col = METRIC_PREFIX + m
        if col not in ok.columns:
            continue
        x = ok[col].to_numpy(dtype="float64")
        for k in kept:
            y = ok[METRIC_PREFIX + k].to_numpy(dtype="float64")
            both_nan = np.isnan(x) & np.isnan(y)
            close = np.isclose(x, y, rtol=rtol, atol=rtol)
            if (both_nan | close).all() and close.any():
                dropped[m] = k
                break
        else:
            kept.append(m)
    return dropped


# ------------------------------------------------------------------------------------------ costs
def cost_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean cost per recipe over successful runs (each run's records first averaged over its sets).
    Index: recipe; columns: cost names without prefix."""
    names = cost_names(df)
    ok = ok_runs(df)
    if not names or ok.empty:
        return pd.DataFrame(index=pd.Index([], name="recipe"), columns=names, dtype="float64")
    cols = [COST_PREFIX + c for c in names]
    keys = ["recipe", *[k for k in RUN_KEYS if k in ok.columns]]
    per_run = ok.groupby(keys)[cols].mean()
    out = per_run.groupby(level="recipe").mean()
    out.columns = names
    return out


# ----------------------------------------------------------------------------------------- tuning
def chosen_hparams(df: pd.DataFrame) -> dict[str, str]:
    """recipe -> the hyperparameters its final runs used, as ``"learning_rate=0.003"`` (several
    distinct settings joined by ``" / "``); recipes without hparams are absent."""
    out: dict[str, str] = {}
    final = final_runs(df)
    if "hparams" not in final.columns:
        return out
    for recipe, hps in final.groupby("recipe", sort=True)["hparams"]:
        labels = sorted({hparams_label(h) for h in hps if hparams_dict(h)})
        if labels:
            out[str(recipe)] = " / ".join(labels)
    return out


def _records_frame(records: Any) -> pd.DataFrame:
    if isinstance(records, pd.DataFrame):
        return records
    if isinstance(records, (str, Path)):
        raise TypeError("tuning_table takes the records table or a list of record files/dicts, not one path")
    return load_record_list(list(records)).frame


def tuning_table(
    records: Any,
    primary_metric: str = "rougeL",
    *,
    higher_is_better: Mapping[str, bool] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """The hyperparameter search: per recipe and grid setting, the validation score and the choice.

    ``records``: the records table (:func:`~harness.report.records.load_records`) or a list of record
    files / dicts. Uses ``phase == "tune"`` records; a setting's score is ``primary_metric`` averaged over
    the tune runs' sets per run, then over runs (t-interval when several). ``chosen`` marks the setting the
    recipe's final runs used (their ``hparams``); without final runs, the best validation score.
    ``best_on_validation`` marks the best score (ties: all). Columns: ``recipe, setting, hparams (dict),
    learning_rate (float or NaN), mean, ci_low, ci_high, n, best_on_validation, chosen``.
    """
    df = _records_frame(records)
    cols = ["recipe", "setting", "hparams", "learning_rate", "mean", "ci_low", "ci_high", "n",
            "best_on_validation", "chosen"]
    if df.empty or "phase" not in df.columns:
        return pd.DataFrame(columns=cols)
    tune = df.loc[df["phase"] == "tune"]
    if tune.empty:
        return pd.DataFrame(columns=cols)
    sign = 1.0 if direction(primary_metric, higher_is_better) >= 0 else -1.0
    chosen_by_final = {}
    for recipe, hps in final_runs(df).groupby("recipe")["hparams"]:
        settings = {h for h in hps if hparams_dict(h)}
        if len(settings) == 1:
            chosen_by_final[str(recipe)] = settings.pop()
    rows = []
    for (recipe, setting), sub in tune.groupby(["recipe", "hparams"], sort=True):
        vals = run_values(sub, primary_metric, eval_sets_of(sub), strict_average=True)[AVG]
        iv = mean_ci(vals.tolist(), confidence)
        hp = hparams_dict(setting)
        lr = hp.get("learning_rate", hp.get("lr"))
        rows.append({"recipe": str(recipe), "setting": setting, "hparams": hp,
                     "learning_rate": float(lr) if isinstance(lr, (int, float)) else math.nan,
                     "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "n": iv.n})
    out = pd.DataFrame(rows, columns=cols[:-2])
    best_flags, chosen_flags = [], []
    for recipe, sub in out.groupby("recipe", sort=False):
        finite = sub["mean"].dropna()
        top = (sign * finite).max() if not finite.empty else math.nan
        best = {i for i in finite.index if sign * finite[i] == top}
        pick = chosen_by_final.get(recipe)
        if pick is None and best:
            pick = min((out.at[i, "setting"] for i in best), key=str)
        for i in sub.index:
            best_flags.append((i, i in best))
            chosen_flags.append((i, out.at[i, "setting"] == pick))
    out["best_on_validation"] = pd.Series(dict(best_flags)).reindex(out.index).astype(bool)
    out["chosen"] = pd.Series(dict(chosen_flags)).reindex(out.index).astype(bool)
    out["setting"] = [hparams_label(s) for s in out["setting"]]
    return out.sort_values(["recipe", "learning_rate", "setting"], kind="stable").reset_index(drop=True)
