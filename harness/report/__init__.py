"""Reporting: run records → leaderboard (Markdown, CSV, HTML, LaTeX), plots and provenance.

The lead's entry point is :func:`publish` (explicit record list, staging directory swapped in at the end).
The pieces, each with one job:

* :mod:`harness.report.records` — read records into a table (:func:`load_record_list`, :func:`missing_runs`)
* :mod:`harness.report.metric_info` — labels, better directions, which objective a metric is
* :mod:`harness.report.stats` — intervals, paired t-tests, Holm, bootstrap P(best), rank correlation
* :mod:`harness.report.aggregate` — DataFrame statistics (per-run values, significance, teachers, tuning)
* :mod:`harness.report.leaderboard` — :func:`build_report`: the numeric leaderboard and side tables
* :mod:`harness.report.render` — Markdown / HTML / LaTeX / CSV with pandas' writers;
  :func:`render_markdown_table` for the README
* :mod:`harness.report.plots` — scores, Pareto, heatmap, tuning and training-curve figures
"""

from __future__ import annotations

from harness.report.aggregate import tuning_table
from harness.report.leaderboard import Report, build_leaderboard, build_report
from harness.report.plots import NothingToPlot
from harness.report.publish import publish, scores_frame
from harness.report.records import LoadedRecords, load_record_list, load_records, missing_runs
from harness.report.render import render_markdown_table
from harness.report.stats import (
    Interval,
    bootstrap_p_best,
    holm,
    mean_ci,
    paired_diff,
    paired_ttest,
    pareto_front,
    rank_correlation,
)

__all__ = [
    "Interval",
    "LoadedRecords",
    "NothingToPlot",
    "Report",
    "bootstrap_p_best",
    "build_leaderboard",
    "build_report",
    "holm",
    "load_record_list",
    "load_records",
    "mean_ci",
    "missing_runs",
    "paired_diff",
    "paired_ttest",
    "pareto_front",
    "publish",
    "rank_correlation",
    "render_markdown_table",
    "scores_frame",
    "tuning_table",
]
