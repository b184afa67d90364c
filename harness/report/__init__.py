"""Reporting: run records → leaderboard (Markdown, CSV, HTML, LaTeX) and plots.

The CLI calls :func:`publish`; the pieces are importable on their own:

* :mod:`harness.report.records` — :func:`load_records`, :func:`missing_runs`
* :mod:`harness.report.stats` — :func:`mean_ci`, :func:`paired_diff`, :func:`pareto_front`
* :mod:`harness.report.leaderboard` — :func:`build_leaderboard`, :func:`write_leaderboard`
* :mod:`harness.report.plots` — :func:`plot_scores`, :func:`plot_pareto`, :func:`plot_heatmap`,
  :func:`plot_training_curves`
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from harness.io import write_json_atomic
from harness.report.leaderboard import build_leaderboard, write_leaderboard
from harness.report.plots import (
    NothingToPlot,
    plot_heatmap,
    plot_pareto,
    plot_scores,
    plot_training_curves,
)
from harness.report.records import LoadedRecords, load_records, missing_runs
from harness.report.stats import Interval, mean_ci, paired_diff, pareto_front

__all__ = [
    "Interval",
    "LoadedRecords",
    "NothingToPlot",
    "build_leaderboard",
    "load_records",
    "mean_ci",
    "missing_runs",
    "paired_diff",
    "pareto_front",
    "plot_heatmap",
    "plot_pareto",
    "plot_scores",
    "plot_training_curves",
    "publish",
    "write_leaderboard",
]


def publish(
    records: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    primary_metric: str = "rougeL",
    baseline: str = "sft",
    expected: Iterable[tuple[str, int, str]] | None = None,
    curves: Mapping[str, Any] | pd.DataFrame | None = None,
    *,
    higher_is_better: Mapping[str, bool] | None = None,
    confidence: float = 0.95,
    stem: str = "leaderboard",
) -> dict[str, Path]:
    """Load the run records, write the leaderboard files and plots into ``out_dir``; return their paths.

    ``records`` is a directory of ``*.json`` records, a glob pattern, a file, or a list of these.
    ``expected`` — the ``(recipe, seed, eval_set)`` runs the suite should have produced — adds a list of
    missing runs; ``curves`` (see :func:`harness.report.plots.curves_frame`) adds training curves.

    Written (keys of the returned dict): ``leaderboard_md|csv|html|tex`` (``<stem>.*``),
    ``scores_png|svg``, ``pareto_png|svg``, ``heatmap_png|svg``, ``training_curves_png|svg`` (the last
    only with ``curves``), under ``out_dir/plots/``, and ``problems`` (``report_problems.json``: files
    that could not be read, missing runs, failed runs, plots skipped for lack of data). Unreadable or
    failed records never stop the report; they are listed in the leaderboard and the problems file. A
    figure with nothing to show (e.g. no cost recorded for the Pareto plot) is skipped and noted.

    Raises ``ValueError`` when no record could be read at all, or from :func:`build_leaderboard`.
    """
    out = Path(out_dir)
    loaded = load_records(records)
    df, load_problems = loaded.frame, list(loaded.problems)
    if df.empty:
        raise ValueError("no readable run records: " + ("; ".join(load_problems) or str(records)))
    missing = missing_runs(expected, df) if expected is not None else []
    lb = build_leaderboard(df, primary_metric, baseline, higher_is_better, confidence=confidence)

    plot_dir = out / "plots"
    common = {"higher_is_better": higher_is_better, "confidence": confidence}
    jobs = [
        ("scores", lambda p: plot_scores(df, p, primary_metric, **common)),
        ("pareto", lambda p: plot_pareto(df, p, primary_metric, **common)),
        ("heatmap", lambda p: plot_heatmap(df, p, primary_metric, **common)),
    ]
    if curves is not None:
        jobs.append(("training_curves", lambda p: plot_training_curves(curves, p)))
    written: dict[str, Path] = {}
    skipped: list[str] = []
    for name, job in jobs:
        try:
            png, svg = job(plot_dir / name)
        except NothingToPlot as exc:
            skipped.append(f"plot {name!r} skipped: {exc}")
            continue
        written[f"{name}_png"], written[f"{name}_svg"] = png, svg

    failed = df.loc[df["failed"]]
    failed_runs = [
        {"recipe": r.recipe, "seed": int(r.seed), "eval_set": r.eval_set, "path": r.path, "failure": r.failure}
        for r in failed.sort_values(["recipe", "seed", "eval_set"]).itertuples(index=False)
    ]
    missing_text = [f"missing run: recipe {r!r}, seed {s}, set {e!r}" for r, s, e in missing]
    problems = load_problems + missing_text + skipped
    for key, path in write_leaderboard(lb, out, stem, problems).items():
        written[f"leaderboard_{key}"] = path
    written["problems"] = write_json_atomic(out / "report_problems.json", {
        "unreadable_records": load_problems,
        "missing_runs": [{"recipe": r, "seed": s, "eval_set": e} for r, s, e in missing],
        "failed_runs": failed_runs,
        "skipped_plots": skipped,
    })
    return written
