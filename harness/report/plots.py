"""Figures for the report (seaborn on matplotlib's Agg canvas; every figure saved as PNG and SVG).

The ``*_figure`` functions are pure: they take a :class:`~harness.report.leaderboard.Report` (or the records
table, from which one is built with :func:`~harness.report.leaderboard.build_report`) and return a
:class:`matplotlib.figure.Figure`; the ``plot_*`` functions write ``<out>.png`` (``PNG_DPI`` dpi) and
``<out>.svg`` atomically and return both paths. Nothing touches pyplot's global state.

Every interval drawn is the same Student-t interval the tables show (never seaborn's bootstrap, never ±1
s.d.); colours never invert a metric: wherever colour encodes quality, "better" is the metric's own better
direction (higher, or lower for ↓), and metrics without a better direction (·) are not coloured.
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
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from harness.io import write_bytes_atomic
from harness.report.aggregate import AVG, REFERENCE_KINDS
from harness.report.leaderboard import COST_LABELS, Report, build_report, column, score_base
from harness.report.metric_info import metric_label
from harness.report.render import decimals_for
from harness.report.stats import mean_ci, pareto_front

__all__ = [
    "NothingToPlot",
    "PNG_DPI",
    "curves_frame",
    "heatmap_figure",
    "heatmap_frames",
    "pareto_cost",
    "pareto_figure",
    "plot_heatmap",
    "plot_pareto",
    "plot_scores",
    "plot_training_curves",
    "plot_tuning",
    "save_figure",
    "scores_figure",
    "training_curves_figure",
    "tuning_figure",
]

PNG_DPI = 150
_STYLE = "whitegrid"
_CONTEXT = "notebook"
_FIG_SUFFIXES = {".png", ".svg", ".pdf"}
_REF_GREY = "#e6e6e6"


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


def _as_report(data: Report | pd.DataFrame, primary_metric: str = "rougeL", **kwargs: Any) -> Report:
    if isinstance(data, Report):
        return data
    allowed = {k: v for k, v in kwargs.items() if k in ("baseline", "higher_is_better", "confidence")}
    try:
        return build_report(data, primary_metric, n_boot=200, **allowed)
    except ValueError as exc:
        raise NothingToPlot(str(exc)) from exc


def _conf_pct(confidence: float) -> int:
    return int(round(100 * confidence))


def _primary(report: Report) -> tuple[pd.DataFrame, dict[str, Any], str]:
    lb = report.leaderboard
    a = lb.attrs
    return lb, a, score_base(a["primary_metric"], a["overall"], a.get("overrides"))


def _students(lb: pd.DataFrame, base: str) -> pd.DataFrame:
    """Ranked rows (students and baseline with a score), best first."""
    mask = lb["Rank"].notna() & np.isfinite(lb[column(base, "mean")].astype("float64"))
    return lb.loc[mask]


def _half(lb: pd.DataFrame, base: str) -> np.ndarray:
    return ((lb[column(base, "ci_high")] - lb[column(base, "ci_low")]) / 2).astype("float64").fillna(0.0).to_numpy()


def _reference_lines(ax: Any, lb: pd.DataFrame, base: str) -> None:
    """Horizontal lines at the teacher's and init's score."""
    styles = {"teacher": ("--", "#444444"), "init": (":", "#888888")}
    for _, r in lb.loc[lb["Kind"].isin(REFERENCE_KINDS)].iterrows():
        m = float(r[column(base, "mean")])
        if np.isfinite(m):
            ls, color = styles[r["Kind"]]
            ax.axhline(m, ls=ls, color=color, lw=1.3, label=f"{r['Recipe']} (reference, {m:.3g})")


def _suite(lb: pd.DataFrame) -> str:
    return str(lb.attrs.get("suite", "?"))


# ------------------------------------------------------------------------------------------- scores
def scores_figure(data: Report | pd.DataFrame, primary_metric: str = "rougeL", **kwargs: Any) -> Figure:
    """Primary metric per ranked recipe (per set, and averaged when several) with t-interval bars; with
    several teachers also each teacher's mean (hollow markers). Teacher and init are reference lines."""
    report = _as_report(data, primary_metric, **kwargs)
    lb, a, base = _primary(report)
    ranked = _students(lb, base)
    if ranked.empty:
        raise NothingToPlot(f"no successful student run reports {a['primary_metric']!r}")
    order = ranked["Recipe"].tolist()
    over = a.get("overrides")
    groups = list(a["show_sets"])
    palette = sns.color_palette("colorblind", max(len(groups), 1) + len(a.get("teachers", [])) + 1)
    colors = {g: (0.1, 0.1, 0.1) if g == AVG else palette[i] for i, g in enumerate(groups)}
    teachers = a.get("teachers", []) if not report.per_teacher.empty else []
    n_marks = len(groups) + len(teachers)
    width = min(0.7, 0.18 * n_marks)
    offsets = np.linspace(-width / 2, width / 2, n_marks) if n_marks > 1 else np.zeros(1)
    label = metric_label(a["primary_metric"], over)
    conf = _conf_pct(a["confidence"])
    with _style():
        fig = _new_figure(max(6.0, 0.9 * len(order) + 4.5), 4.8)
        ax = fig.add_subplot()
        x0 = np.arange(len(order))
        for g, off in zip(groups, offsets):
            b = score_base(a["primary_metric"], g, over)
            is_avg = g == a["overall"] and len(groups) > 1
            ax.errorbar(x0 + off, ranked[column(b, "mean")].to_numpy(), yerr=_half(ranked, b),
                        fmt="D" if is_avg else "o", ms=8 if is_avg else 6, color=colors[g], ecolor=colors[g],
                        elinewidth=1.5, capsize=4, lw=0,
                        label=("average over sets" if g == AVG else f"set: {g}")
                        + (" (all teachers pooled)" if teachers else ""))
        pt = report.per_teacher
        for t, off, col in zip(teachers, offsets[len(groups):], palette[len(groups):]):
            sub = pt.loc[pt["teacher_seed"] == t].set_index("recipe").reindex(order)
            half = ((sub["ci_high"] - sub["ci_low"]) / 2).fillna(0.0).to_numpy()
            ax.errorbar(x0 + off, sub["mean"].to_numpy(), yerr=half, fmt="o", mfc="white", mec=col, ms=6,
                        ecolor=col, elinewidth=1.0, capsize=3, lw=0, label=f"teacher {t} ({conf}% t-interval)")
        _reference_lines(ax, lb, base)
        ax.set_xticks(x0)
        ax.set_xticklabels(order, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_xlabel("Recipe (best first)")
        ax.set_ylabel(f"{label} (mean over runs)")
        ax.set_title(f"{label} per recipe — suite {_suite(lb)}\nbars: {conf}% t-interval over training runs")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    return fig


def plot_scores(data: Report | pd.DataFrame, out: str | os.PathLike, primary_metric: str = "rougeL",
                **kwargs: Any) -> list[Path]:
    """Write :func:`scores_figure` to ``<out>.png`` and ``<out>.svg``; return the paths."""
    return save_figure(scores_figure(data, primary_metric, **kwargs), out)


# ------------------------------------------------------------------------------------------- pareto
#: Costs the Pareto plot may use, in order of preference: none depends on the machine's load.
PARETO_COSTS = (("cpu_time_s", "CPU time of training (s, process time, mean over runs)"),
                ("tokens", "Training tokens processed (mean over runs)"))


def pareto_cost(lb: pd.DataFrame) -> tuple[str, str]:
    """``(column label, axis label)`` of the first :data:`PARETO_COSTS` entry with a value for every
    ranked recipe. Wall time is load-dependent and never used here (it stays in the costs table)."""
    base = score_base(lb.attrs["primary_metric"], lb.attrs["overall"], lb.attrs.get("overrides"))
    ranked = _students(lb, base)
    for key, axis in PARETO_COSTS:
        col = COST_LABELS[key]
        if col in ranked.columns and len(ranked) and np.isfinite(ranked[col].astype("float64")).all():
            return col, axis
    raise NothingToPlot("no machine-independent cost (cost cpu_time_s or tokens) recorded for every recipe")


def _spread(ys: Sequence[float], gap: float, lo: float, hi: float) -> list[float]:
    """Label positions as close to ``ys`` as possible, at least ``gap`` apart, inside ``[lo, hi]``
    (``ys`` sorted ascending)."""
    pos: list[float] = []
    for y in ys:
        pos.append(max(y, lo) if not pos else max(y, pos[-1] + gap))
    over = pos[-1] - hi if pos else 0.0
    if over > 0:
        pos = [p - over for p in pos]
        for i in range(len(pos) - 2, -1, -1):  # keep the gaps after shifting down
            pos[i] = min(pos[i], pos[i + 1] - gap)
    return pos


def pareto_figure(data: Report | pd.DataFrame, primary_metric: str = "rougeL", **kwargs: Any) -> Figure:
    """Primary score against a machine-independent cost (:func:`pareto_cost`) per ranked recipe, the Pareto
    front drawn. Labels sit in a column beside the axes, in the order of the scores, each joined to its
    point by a thin line, so they never overlap however close the points are."""
    report = _as_report(data, primary_metric, **kwargs)
    lb, a, base = _primary(report)
    ranked = _students(lb, base)
    if ranked.empty:
        raise NothingToPlot(f"no student recipe has a {a['primary_metric']!r} score")
    cost_col, cost_axis = pareto_cost(lb)
    recipes = ranked["Recipe"].tolist()
    xs = ranked[cost_col].astype("float64").to_numpy()
    ys = ranked[column(base, "mean")].astype("float64").to_numpy()
    half = _half(ranked, base)
    higher = a["higher_is_better"][a["primary_metric"]] >= 0
    front = pareto_front(list(xs), list(ys), minimize_x=True, maximize_y=higher)
    on = set(front)
    label = metric_label(a["primary_metric"], a.get("overrides"))
    conf = _conf_pct(a["confidence"])
    with _style():
        fig = _new_figure(9.0, 5.6)
        ax = fig.add_subplot()
        for i in range(len(recipes)):
            ax.errorbar(xs[i], ys[i], yerr=half[i], fmt="o", ms=8 if i in on else 6, capsize=4,
                        color="#d55e00" if i in on else "#0072b2", mec="black" if i in on else None, zorder=3)
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.step(fx, fy, where="post", color="#d55e00", lw=1.8, alpha=0.8, label="Pareto front")
        ax.plot([], [], "o", color="#0072b2", label="recipe (dominated)")
        ax.plot([], [], "o", color="#d55e00", mec="black", label="recipe on the front")
        _reference_lines(ax, lb, base)
        if xs.min() > 0 and xs.max() / xs.min() > 30:
            ax.set_xscale("log")
        ax.margins(x=0.08, y=0.06)
        ax.autoscale_view()
        lo, hi = ax.get_ylim()
        gap = (hi - lo) / max(len(recipes) + 1, 18)
        order = np.argsort(ys, kind="stable")
        pos = _spread([ys[i] for i in order], gap, lo + gap / 2, hi - gap / 2)
        for i, y in zip(order, pos):
            ax.annotate(f"{recipes[i]}  {ys[i]:.{decimals_for(pd.Series(ys))}f}", xy=(xs[i], ys[i]),
                        xycoords="data", xytext=(1.02, y), textcoords=("axes fraction", "data"),
                        va="center", ha="left", fontsize="small", annotation_clip=False,
                        color="#d55e00" if i in on else "#222222",
                        arrowprops={"arrowstyle": "-", "color": "#aaaaaa", "lw": 0.6, "ls": ":", "shrinkA": 0, "shrinkB": 4})
        ax.set_ylim(lo, hi)
        ax.set_xlabel(cost_axis)
        ax.set_ylabel(f"{label} [{a['overall']}]")
        better = "higher" if higher else "lower"
        ax.set_title(f"Score vs. cost — suite {_suite(lb)}\n({better} score is better; bars: {conf}% t-interval; "
                     "wall time is in the costs table)", fontsize="medium")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False, fontsize="small")
    return fig


def plot_pareto(data: Report | pd.DataFrame, out: str | os.PathLike, primary_metric: str = "rougeL",
                **kwargs: Any) -> list[Path]:
    """Write :func:`pareto_figure` to ``<out>.png`` and ``<out>.svg``; return the paths."""
    return save_figure(pareto_figure(data, primary_metric, **kwargs), out)


# ------------------------------------------------------------------------------------------ heatmap
def heatmap_frames(report: Report) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """``(raw, colour, directions)`` of the heatmap: ``raw`` = means (rows: teacher, ranked recipes, other
    students, init; columns: the primary metric per shown set, then the other metrics — duplicates already
    left out by the report); ``colour`` = per column, ``(x − min) / (max − min)`` over the *recipes only*
    (reference rows never set the scale), flipped for lower-is-better so 1 is always best; NaN for
    reference rows, for columns without a better direction and for missing values (drawn uncoloured);
    a constant column is 0.5. ``directions``: column -> +1 / -1 / 0."""
    lb, a, _ = _primary(report)
    over = a.get("overrides")
    specs = [(a["primary_metric"], s) for s in a["show_sets"]] + [(m, a["overall"]) for m in a.get("others", [])]
    raw = pd.DataFrame(index=lb["Recipe"].tolist(), dtype="float64")
    dirs: dict[str, int] = {}
    for metric, s in specs:
        b = score_base(metric, s, over)
        if column(b, "mean") not in lb.columns:
            continue
        name = b if metric == a["primary_metric"] and len(a["show_sets"]) > 1 else metric_label(metric, over)
        raw[name] = lb[column(b, "mean")].astype("float64").to_numpy()
        dirs[name] = int(a["higher_is_better"].get(metric, 0))
    raw = raw.loc[:, raw.notna().any(axis=0)]
    is_ref = lb["Kind"].isin(REFERENCE_KINDS).to_numpy()
    colour = pd.DataFrame(np.nan, index=raw.index, columns=raw.columns)
    for c in raw.columns:
        d = dirs[c]
        if d == 0:
            continue
        vals = raw[c].to_numpy()
        rec = vals[~is_ref]
        rec = rec[np.isfinite(rec)]
        if rec.size == 0:
            continue
        lo, hi = rec.min(), rec.max()
        scaled = (vals - lo) / (hi - lo) if hi > lo else np.where(np.isfinite(vals), 0.5, np.nan)
        scaled = scaled if d > 0 else 1.0 - scaled
        scaled[is_ref] = np.nan
        colour[c] = scaled
    return raw, colour, dirs


def heatmap_figure(data: Report | pd.DataFrame, primary_metric: str = "rougeL", **kwargs: Any) -> Figure:
    """Recipes × metrics: raw means in every cell; colour = rank within the column among the recipes (see
    :func:`heatmap_frames`). Reference rows are grey, columns without a better direction white."""
    report = _as_report(data, primary_metric, **kwargs)
    lb = report.leaderboard
    raw, colour, dirs = heatmap_frames(report)
    if raw.empty:
        raise NothingToPlot("no metric to show")
    is_ref = lb["Kind"].isin(REFERENCE_KINDS).to_numpy()
    cmap = sns.color_palette("viridis", as_cmap=True)
    norm = Normalize(0.0, 1.0)
    ylabels = [f"{r} (ref.)" if ref else r for r, ref in zip(raw.index, is_ref)]
    xlabels = [c if dirs[c] != 0 or c.endswith(" ·") else f"{c} ·" for c in raw.columns]
    with _style():
        fig = _new_figure(max(6.0, 1.05 * len(raw.columns) + 3.5), max(3.5, 0.5 * len(raw.index) + 2.4))
        ax = fig.add_subplot()
        sns.heatmap(colour.astype("float64"), ax=ax, cmap=cmap, vmin=0, vmax=1, mask=colour.isna(),
                    linewidths=0.5, linecolor="white", annot=False,
                    cbar_kws={"label": "within column, over the recipes only\n(1 = best: highest, or lowest for ↓)"})
        for i in range(len(raw.index)):
            for j, c in enumerate(raw.columns):
                v, k = raw.iat[i, j], colour.iat[i, j]
                if is_ref[i]:
                    ax.add_patch(Rectangle((j, i), 1, 1, facecolor=_REF_GREY, edgecolor="white", lw=0.5))
                text = "" if not np.isfinite(v) else f"{v:.{decimals_for(raw[c])}f}"
                dark = np.isfinite(k) and k < 0.6
                ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize="small",
                        color="white" if dark else "#222222", fontstyle="italic" if is_ref[i] else "normal")
        ax.set_facecolor("white")
        ax.grid(False)
        ax.set_yticks(np.arange(len(raw.index)) + 0.5)
        ax.set_yticklabels(ylabels, rotation=0)
        ax.set_xticks(np.arange(len(raw.columns)) + 0.5)
        ax.set_xticklabels(xlabels, rotation=35, ha="right", rotation_mode="anchor")
        ax.set_xlabel("Metric (cells: mean over runs; ↓ lower is better; · no better direction, not coloured;\n"
                      "grey rows: references, shown but not setting the colour scale)")
        ax.set_ylabel("Recipe")
        ax.set_title(f"Recipes × metrics — suite {_suite(lb)}")
    return fig


def plot_heatmap(data: Report | pd.DataFrame, out: str | os.PathLike, primary_metric: str = "rougeL",
                 **kwargs: Any) -> list[Path]:
    """Write :func:`heatmap_figure` to ``<out>.png`` and ``<out>.svg``; return the paths."""
    return save_figure(heatmap_figure(data, primary_metric, **kwargs), out)


# ------------------------------------------------------------------------------------------- tuning
def tuning_figure(report: Report) -> Figure:
    """Validation score against learning rate (log x), one panel per recipe, shared y; the chosen value
    is a star. Bars: t-interval over tuning runs when there are several."""
    tt = report.tuning
    if tt.empty or not np.isfinite(tt["learning_rate"].astype("float64")).any():
        raise NothingToPlot("no tuning record with a learning_rate")
    a = report.meta
    label = metric_label(a["primary_metric"], a.get("overrides"))
    recipes = sorted(tt["recipe"].unique())
    ncols = min(4, len(recipes))
    nrows = math.ceil(len(recipes) / ncols)
    conf = _conf_pct(a.get("confidence", 0.95))
    with _style():
        fig = _new_figure(3.4 * ncols + 0.6, 2.8 * nrows + 1.0)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        for i, recipe in enumerate(recipes):
            ax = axes[i // ncols][i % ncols]
            sub = tt.loc[(tt["recipe"] == recipe) & np.isfinite(tt["learning_rate"].astype("float64"))]
            sub = sub.sort_values("learning_rate")
            half = ((sub["ci_high"] - sub["ci_low"]) / 2).astype("float64").fillna(0.0).to_numpy()
            ax.errorbar(sub["learning_rate"], sub["mean"], yerr=half, fmt="o-", color="#0072b2", capsize=3, ms=5)
            pick = sub.loc[sub["chosen"].astype(bool)]
            ax.plot(pick["learning_rate"], pick["mean"], "*", ms=16, color="#d55e00", mec="black", zorder=4)
            ax.set_xscale("log")
            grid = sorted(set(tt["learning_rate"].dropna().astype(float)))
            ax.set_xticks(grid, [f"{g:g}" for g in grid])
            ax.minorticks_off()
            ax.set_title(recipe)
            ax.set_xlabel("learning rate")
            if i % ncols == 0:
                ax.set_ylabel(f"validation {label}")
        for j in range(len(recipes), nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        fig.suptitle(f"Hyperparameter search — suite {a.get('suite', '?')} (★ chosen; bars: {conf}% "
                     "t-interval over tuning runs where several)")
    return fig


def plot_tuning(report: Report, out: str | os.PathLike) -> list[Path]:
    """Write :func:`tuning_figure` to ``<out>.png`` and ``<out>.svg``; return the paths."""
    return save_figure(tuning_figure(report), out)


# ---------------------------------------------------------------------------------- training curves
def curves_frame(curves: Mapping[str, Any] | pd.DataFrame) -> pd.DataFrame:
    """Normalise training curves to a DataFrame with columns ``recipe, step, loss`` (and ``seed``).

    Accepts a DataFrame with those columns, or a mapping ``recipe -> curve`` where a curve is a list of
    ``(step, loss)`` pairs, a list of ``{"step": .., "loss": ..}`` dicts, a DataFrame with ``step`` and
    ``loss`` (optionally ``seed``) columns, or a mapping ``run -> list of (step, loss)`` (``run`` a seed or
    a ``(teacher_seed, seed)`` pair).
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
                    [_pairs_frame(v).assign(seed=[seed] * len(v)) for seed, v in curve.items()], ignore_index=True
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


def _t_band(confidence: float):
    def band(values: pd.Series) -> tuple[float, float]:
        iv = mean_ci(values.tolist(), confidence)
        return iv.low, iv.high
    return band


def training_curves_figure(curves: Mapping[str, Any] | pd.DataFrame, *, title: str | None = None,
                           confidence: float = 0.95) -> Figure:
    """One panel per recipe (own y scale: each recipe minimises its own objective, so scales differ).

    With several runs the line is the mean over runs and the band the same Student-t interval over runs
    as in the tables (per logged step). The y axis is logarithmic when a panel's positive losses span more
    than a factor of 30.
    """
    frame = curves_frame(curves)
    if frame.empty:
        raise NothingToPlot("no training-curve points")
    recipes = list(dict.fromkeys(frame["recipe"]))
    ncols = min(3, len(recipes))
    nrows = math.ceil(len(recipes) / ncols)
    palette = sns.color_palette("colorblind", len(recipes))
    has_runs = "seed" in frame.columns and frame["seed"].astype(str).nunique() > 1
    conf = _conf_pct(confidence)
    with _style():
        fig = _new_figure(4.2 * ncols + 0.5, 3.2 * nrows + 0.8)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
        for i, recipe in enumerate(recipes):
            ax = axes[i // ncols][i % ncols]
            sub = frame.loc[frame["recipe"] == recipe]
            sns.lineplot(data=sub, x="step", y="loss", ax=ax, color=palette[i],
                         errorbar=_t_band(confidence) if has_runs else None, estimator="mean")
            pos = sub.loc[sub["loss"] > 0, "loss"]
            if len(pos) == len(sub) and len(pos) and pos.max() / pos.min() > 30:
                ax.set_yscale("log")
            ax.set_title(recipe)
            ax.set_xlabel("Optimizer step")
            ax.set_ylabel("Training loss (objective's own units)")
            ax.tick_params(axis="x", labelrotation=30)
        for j in range(len(recipes), nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        band = f"; band: {conf}% t-interval over training runs (as in the tables)" if has_runs else ""
        fig.suptitle(title or f"Training curves (mean over runs){band}")
    return fig


def plot_training_curves(
    curves: Mapping[str, Any] | pd.DataFrame, out: str | os.PathLike, **kwargs: Any
) -> list[Path]:
    """Write :func:`training_curves_figure` to ``<out>.png`` and ``<out>.svg``; return the paths."""
    return save_figure(training_curves_figure(curves, **kwargs), out)
