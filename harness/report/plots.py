"""Figures for the report (seaborn on matplotlib's Agg canvas; every figure saved as PNG and SVG).

The ``*_figure`` functions are pure: they take the records table (see :mod:`harness.report.records`)
and return a :class:`matplotlib.figure.Figure`. The ``plot_*`` functions build the figure and write
``<out>.png`` (``PNG_DPI`` dpi) and ``<out>.svg`` atomically, returning both paths. Nothing touches
pyplot's global state, so the plots are safe to make from any process (no display needed).

Intervals are the same Student-t intervals over training seeds the leaderboard shows (not seaborn's
bootstrap). Failed runs are excluded, as everywhere in the report.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.io import write_bytes_atomic
from harness.report.leaderboard import (
    AVG,
    REFERENCE_KINDS,
    decimals_for,
    ordered_metrics,
    cost_summary,
    eval_sets_of,
    is_higher_better,
    metric_label,
    metric_summary,
    recipe_roles,
)
from harness.report.records import METRIC_PREFIX, metric_names
from harness.report.stats import pareto_front

__all__ = [
    "NothingToPlot",
    "PNG_DPI",
    "curves_frame",
    "heatmap_figure",
    "pareto_figure",
    "plot_heatmap",
    "plot_pareto",
    "plot_scores",
    "plot_training_curves",
    "save_figure",
    "scores_figure",
    "training_curves_figure",
]

PNG_DPI = 150
_STYLE = "whitegrid"
_CONTEXT = "notebook"
_FIG_SUFFIXES = {".png", ".svg", ".pdf"}


class NothingToPlot(ValueError):
    """The input holds no data the requested figure could show (e.g. no successful run)."""


# ------------------------------------------------------------------------------------------ helpers
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out: str | os.PathLike) -> list[Path]:
    """Write ``fig`` as ``<out>.png`` and ``<out>.svg`` (a ``.png``/``.svg``/``.pdf`` suffix on ``out``
    is replaced); atomic, parent directories created. Returns ``[png_path, svg_path]``."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in _FIG_SUFFIXES else out
    written = []
    for fmt, kwargs in (("png", {"dpi": PNG_DPI}), ("svg", {"metadata": {"Date": None}})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, facecolor="white", **kwargs)
        written.append(write_bytes_atomic(stem.parent / f"{stem.name}.{fmt}", buf.getvalue()))
    return written


def _style() -> contextlib.ExitStack:
    """seaborn style and context, applied only while a figure is made (no global side effects)."""
    stack = contextlib.ExitStack()
    stack.enter_context(sns.axes_style(_STYLE))
    stack.enter_context(sns.plotting_context(_CONTEXT))
    return stack


def _avg_scores(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    s = summary.loc[(summary["metric"] == metric) & (summary["eval_set"] == AVG)]
    return s.set_index("recipe")


def _student_order(summary: pd.DataFrame, metric: str, higher: bool, roles: Mapping[str, str]) -> list[str]:
    """Students with a finite average, best first."""
    avg = _avg_scores(summary, metric)
    avg = avg.loc[[r for r in avg.index if roles.get(r) not in REFERENCE_KINDS and np.isfinite(avg.at[r, "mean"])]]
    return avg.sort_values("mean", ascending=not higher, kind="stable").index.tolist()


def _suite(df: pd.DataFrame) -> str:
    suites = sorted(df["suite"].astype(str).unique())
    return suites[0] if len(suites) == 1 else ", ".join(suites)


def _reference_lines(ax: Any, avg: pd.DataFrame, roles: Mapping[str, str]) -> None:
    """Horizontal lines at the teacher's and init's average score."""
    styles = {"teacher": ("--", "#444444"), "init": (":", "#888888")}
    for recipe, role in roles.items():
        if role in REFERENCE_KINDS and recipe in avg.index and np.isfinite(avg.at[recipe, "mean"]):
            ls, color = styles[role]
            ax.axhline(avg.at[recipe, "mean"], ls=ls, color=color, lw=1.3,
                       label=f"{recipe} (reference, avg {avg.at[recipe, 'mean']:.3g})")


def _conf_pct(confidence: float) -> int:
    return int(round(100 * confidence))


# ------------------------------------------------------------------------------------------- scores
def scores_figure(
    df: pd.DataFrame,
    primary_metric: str = "rougeL",
    *,
    higher_is_better: Mapping[str, bool] | None = None,
    confidence: float = 0.95,
) -> Figure:
    """Point plot of the primary metric per student recipe (per set and averaged) with t-interval bars.

    Students are ordered best first; the teacher and untrained init appear as horizontal reference
    lines at their average score. Single-seed points have no bar.
    """
    sets = eval_sets_of(df)
    roles = recipe_roles(df)
    summary = metric_summary(df, [primary_metric], sets, confidence=confidence, strict=[primary_metric])
    higher = is_higher_better(primary_metric, higher_is_better)
    order = _student_order(summary, primary_metric, higher, roles)
    per_set_any = summary.loc[summary["recipe"].isin([r for r, k in roles.items() if k not in REFERENCE_KINDS])]
    if not order and not np.isfinite(per_set_any["mean"]).any():
        raise NothingToPlot(f"no successful student run reports {primary_metric!r}")
    if not order:  # no complete seed anywhere: still show per-set points
        order = sorted(set(per_set_any.loc[np.isfinite(per_set_any["mean"]), "recipe"]))
    groups = [*sets, AVG] if len(sets) > 1 else list(sets)  # one set: its average is the same point
    palette = sns.color_palette("colorblind", len(sets))
    colors = {s: palette[i] for i, s in enumerate(sets)} | {AVG: (0.1, 0.1, 0.1)}
    width = min(0.6, 0.2 * len(groups))
    offsets = np.linspace(-width / 2, width / 2, len(groups)) if len(groups) > 1 else np.zeros(1)
    label = metric_label(primary_metric, higher_is_better)
    with _style():
        fig = _new_figure(max(6.0, 1.0 * len(order) + 4.0), 4.8)
        ax = fig.add_subplot()
        for g, off in zip(groups, offsets):
            sub = summary.loc[summary["eval_set"] == g].set_index("recipe").reindex(order)
            x = np.arange(len(order)) + off
            half = ((sub["ci_high"] - sub["ci_low"]) / 2).fillna(0.0).to_numpy()
            is_avg = g == AVG
            ax.errorbar(
                x, sub["mean"].to_numpy(), yerr=half, fmt="D" if is_avg else "o", ms=8 if is_avg else 6,
                color=colors[g], ecolor=colors[g], elinewidth=1.5, capsize=4, lw=0,
                label="average over sets" if is_avg else f"set: {g}",
            )
        _reference_lines(ax, _avg_scores(summary, primary_metric), roles)
        ax.set_xticks(np.arange(len(order)))
        ax.set_xticklabels(order, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_xlabel("Recipe (best first)")
        ax.set_ylabel(f"{label} (mean over seeds)")
        ax.set_title(
            f"{label} per recipe — suite {_suite(df)}\n"
            f"error bars: {_conf_pct(confidence)}% t-interval over training seeds"
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    return fig


def plot_scores(df: pd.DataFrame, out: str | os.PathLike, primary_metric: str = "rougeL", **kwargs: Any) -> list[Path]:
    """Write :func:`scores_figure` to ``<out>.png`` and ``<out>.svg``; return the paths."""
    return save_figure(scores_figure(df, primary_metric, **kwargs), out)


# ------------------------------------------------------------------------------------------- pareto
def pareto_figure(
    df: pd.DataFrame,
    primary_metric: str = "rougeL",
    *,
    cost: str = "train_time_s",
    higher_is_better: Mapping[str, bool] | None = None,
    confidence: float = 0.95,
) -> Figure:
    """Average primary score against mean training time per student recipe, Pareto front drawn.

    A recipe is on the front when no other is both cheaper (or as cheap) and better (or as good). The
    front is drawn as the staircase "best score reachable within this time". Teacher and init are
    horizontal reference lines (their cost is not comparable).
    """
    sets = eval_sets_of(df)
    roles = recipe_roles(df)
    summary = metric_summary(df, [primary_metric], sets, confidence=confidence, strict=[primary_metric])
    higher = is_higher_better(primary_metric, higher_is_better)
    avg = _avg_scores(summary, primary_metric)
    costs = cost_summary(df)
    if cost not in costs.columns:
        raise NothingToPlot(f"no record reports the cost {cost!r}")
    students = [
        r for r in avg.index
        if roles.get(r) not in REFERENCE_KINDS and r in costs.index
        and np.isfinite(avg.at[r, "mean"]) and np.isfinite(costs.at[r, cost])
    ]
    if not students:
        raise NothingToPlot(f"no student recipe has both an average {primary_metric!r} and {cost!r}")
    xs = [float(costs.at[r, cost]) for r in students]
    ys = [float(avg.at[r, "mean"]) for r in students]
    half = [(avg.at[r, "ci_high"] - avg.at[r, "ci_low"]) / 2 for r in students]
    half = [h if np.isfinite(h) else 0.0 for h in half]
    front = pareto_front(xs, ys, minimize_x=True, maximize_y=higher)
    label = metric_label(primary_metric, higher_is_better)
    cost_label = "Training time (s, mean over seeds)" if cost == "train_time_s" else f"{cost} (mean over seeds)"
    with _style():
        fig = _new_figure(7.5, 5.0)
        ax = fig.add_subplot()
        on = set(front)
        for i, r in enumerate(students):
            ax.errorbar(
                xs[i], ys[i], yerr=half[i], fmt="o", ms=8 if i in on else 6, capsize=4,
                color="#d55e00" if i in on else "#0072b2", mec="black" if i in on else None,
            )
            ax.annotate(r, (xs[i], ys[i]), xytext=(6, 6), textcoords="offset points", fontsize="small")
        fx = [xs[i] for i in front]
        fy = [ys[i] for i in front]
        ax.step(fx, fy, where="post", color="#d55e00", lw=1.8, alpha=0.8, label="Pareto front")
        ax.plot([], [], "o", color="#0072b2", label="recipe (dominated)")
        ax.plot([], [], "o", color="#d55e00", mec="black", label="recipe on the front")
        _reference_lines(ax, avg, roles)
        if min(xs) > 0 and max(xs) / min(xs) > 30:
            ax.set_xscale("log")
        ax.margins(x=0.12, y=0.08)
        ax.set_xlabel(cost_label)
        ax.set_ylabel(f"{label}, average over sets")
        better = "higher" if higher else "lower"
        ax.set_title(
            f"Score vs. cost — suite {_suite(df)}\n"
            f"({better} score is better; bars: {_conf_pct(confidence)}% t-interval)"
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    return fig


def plot_pareto(df: pd.DataFrame, out: str | os.PathLike, primary_metric: str = "rougeL", **kwargs: Any) -> list[Path]:
    """Write :func:`pareto_figure` to ``<out>.png`` and ``<out>.svg``; return the paths."""
    return save_figure(pareto_figure(df, primary_metric, **kwargs), out)


# ------------------------------------------------------------------------------------------ heatmap
def heatmap_figure(
    df: pd.DataFrame,
    primary_metric: str = "rougeL",
    *,
    higher_is_better: Mapping[str, bool] | None = None,
    confidence: float = 0.95,
) -> Figure:
    """Recipes × metrics: the primary metric per set and averaged, then every other metric averaged.

    Colour is each column normalised to [0, 1] with 1 = best in that column (direction-aware, so ↓
    metrics are flipped); a constant column is mid-colour. Cells are annotated with the raw means.
    """
    sets = eval_sets_of(df)
    roles = recipe_roles(df)
    ok = df.loc[~df["failed"].astype(bool)]
    present = [m for m in metric_names(df) if ok[METRIC_PREFIX + m].notna().any()]
    if primary_metric not in present:
        raise NothingToPlot(f"no successful run reports {primary_metric!r}")
    others = [m for m in ordered_metrics(present) if m != primary_metric]
    summary = metric_summary(df, [primary_metric, *others], sets, confidence=confidence, strict=[primary_metric])
    higher = is_higher_better(primary_metric, higher_is_better)
    students = _student_order(summary, primary_metric, higher, roles)
    rest = sorted(r for r, k in roles.items() if k not in REFERENCE_KINDS and r not in students)
    order = (
        [r for r, k in roles.items() if k == "teacher"] + students + rest
        + [r for r, k in roles.items() if k == "init"]
    )
    col_specs = [(primary_metric, s) for s in [*sets, AVG]] + [(m, AVG) for m in others]
    raw = pd.DataFrame(index=order, dtype="float64")
    direction: dict[str, bool] = {}
    for metric, s in col_specs:
        sub = summary.loc[(summary["metric"] == metric) & (summary["eval_set"] == s)].set_index("recipe")
        label = metric_label(metric, higher_is_better)
        name = f"{label} [{s}]" if metric == primary_metric else label
        raw[name] = sub["mean"].reindex(order).astype("float64")
        direction[name] = is_higher_better(metric, higher_is_better)
    raw = raw.loc[:, raw.notna().any(axis=0)]
    norm = raw.copy()
    for c in raw.columns:
        col, up = raw[c], direction[c]
        lo, hi = col.min(), col.max()
        scaled = (col - lo) / (hi - lo) if hi > lo else col * 0 + 0.5
        norm[c] = scaled if up else 1.0 - scaled
    annot = pd.DataFrame(index=raw.index, columns=raw.columns, dtype=object)
    for c in raw.columns:
        d = decimals_for(raw[c])
        annot[c] = ["" if not np.isfinite(v) else f"{v:.{d}f}" for v in raw[c]]
    ylabels = [f"{r} (ref.)" if roles.get(r) in REFERENCE_KINDS else r for r in raw.index]
    with _style():
        fig = _new_figure(max(6.0, 1.05 * len(raw.columns) + 3.0), max(3.5, 0.55 * len(raw.index) + 2.2))
        ax = fig.add_subplot()
        sns.heatmap(
            norm.astype("float64"), ax=ax, annot=annot.to_numpy(), fmt="", cmap="viridis", vmin=0, vmax=1,
            mask=raw.isna(), linewidths=0.5, linecolor="white",
            cbar_kws={"label": "relative within column (1 = best)"}, annot_kws={"fontsize": "small"},
        )
        ax.set_yticklabels(ylabels, rotation=0)
        ax.set_xticklabels(raw.columns, rotation=35, ha="right")
        ax.set_xlabel("Metric [evaluation set] (cells: raw mean over seeds; ↓ = lower is better)")
        ax.set_ylabel("Recipe")
        ax.set_title(f"Recipes × metrics — suite {_suite(df)}")
    return fig


def plot_heatmap(df: pd.DataFrame, out: str | os.PathLike, primary_metric: str = "rougeL", **kwargs: Any) -> list[Path]:
    """Write :func:`heatmap_figure` to ``<out>.png`` and ``<out>.svg``; return the paths."""
    return save_figure(heatmap_figure(df, primary_metric, **kwargs), out)


# ---------------------------------------------------------------------------------- training curves
def curves_frame(curves: Mapping[str, Any] | pd.DataFrame) -> pd.DataFrame:
    """Normalise training curves to a DataFrame with columns ``recipe, step, loss`` (and ``seed``).

    Accepts a DataFrame with those columns, or a mapping ``recipe -> curve`` where a curve is a list of
    ``(step, loss)`` pairs, a list of ``{"step": .., "loss": ..}`` dicts, a DataFrame with ``step`` and
    ``loss`` (optionally ``seed``) columns, or a mapping ``seed -> list of (step, loss)``.
    """
    if isinstance(curves, pd.DataFrame):
        missing = {"recipe", "step", "loss"} - set(curves.columns)
        if missing:
            raise ValueError(f"training-curve table lacks column(s) {sorted(missing)}")
        frame = curves.copy()
    else:
        parts = []
        for recipe, curve in curves.items():
            if isinstance(curve, pd.DataFrame):
                part = curve.copy()
            elif isinstance(curve, Mapping):
                part = pd.concat(
                    [_pairs_frame(v).assign(seed=seed) for seed, v in curve.items()], ignore_index=True
                ) if curve else _pairs_frame([])
            else:
                part = _pairs_frame(curve)
            parts.append(part.assign(recipe=str(recipe)))
        frame = pd.concat(parts, ignore_index=True) if parts else _pairs_frame([]).assign(recipe=[])
    frame["step"] = pd.to_numeric(frame["step"], errors="coerce")
    frame["loss"] = pd.to_numeric(frame["loss"], errors="coerce")
    frame["recipe"] = frame["recipe"].astype(str)
    frame = frame.loc[np.isfinite(frame["step"]) & np.isfinite(frame["loss"])]
    cols = ["recipe", "step", "loss"] + (["seed"] if "seed" in frame.columns else [])
    return frame[cols].reset_index(drop=True)


def _pairs_frame(curve: Sequence[Any]) -> pd.DataFrame:
    rows = []
    for item in curve:
        if isinstance(item, Mapping):
            rows.append((item["step"], item["loss"]))
        else:
            step, loss = item
            rows.append((step, loss))
    return pd.DataFrame(rows, columns=["step", "loss"])


def training_curves_figure(curves: Mapping[str, Any] | pd.DataFrame, *, title: str | None = None) -> Figure:
    """One panel per recipe (own y scale: each recipe minimises its own objective, so scales differ).

    With several seeds the line is the mean over seeds and the band ±1 standard deviation. The y axis
    is logarithmic when a panel's positive losses span more than a factor of 30.
    """
    frame = curves_frame(curves)
    if frame.empty:
        raise NothingToPlot("no training-curve points")
    recipes = list(dict.fromkeys(frame["recipe"]))
    ncols = min(3, len(recipes))
    nrows = math.ceil(len(recipes) / ncols)
    palette = sns.color_palette("colorblind", len(recipes))
    has_seed = "seed" in frame.columns and frame["seed"].nunique() > 1
    with _style():
        fig = _new_figure(4.2 * ncols + 0.5, 3.2 * nrows + 0.8)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
        for i, recipe in enumerate(recipes):
            ax = axes[i // ncols][i % ncols]
            sub = frame.loc[frame["recipe"] == recipe]
            sns.lineplot(
                data=sub, x="step", y="loss", ax=ax, color=palette[i],
                errorbar="sd" if has_seed else None, estimator="mean",
            )
            pos = sub.loc[sub["loss"] > 0, "loss"]
            if len(pos) == len(sub) and len(pos) and pos.max() / pos.min() > 30:
                ax.set_yscale("log")
            ax.set_title(recipe)
            ax.set_xlabel("Optimizer step")
            ax.set_ylabel("Training loss (objective's own units)")
            ax.tick_params(axis="x", labelrotation=30)
        for j in range(len(recipes), nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        band = "; band: ±1 s.d. over seeds" if has_seed else ""
        fig.suptitle(title or f"Training curves{band}")
    return fig


def plot_training_curves(
    curves: Mapping[str, Any] | pd.DataFrame, out: str | os.PathLike, **kwargs: Any
) -> list[Path]:
    """Write :func:`training_curves_figure` to ``<out>.png`` and ``<out>.svg``; return the paths."""
    return save_figure(training_curves_figure(curves, **kwargs), out)
