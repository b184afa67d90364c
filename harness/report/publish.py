"""Publishing: records → every report file, written into a staging directory and swapped in at the end.

Safety (what a reader of ``out_dir`` can rely on):

* Before any work, ``out_dir``'s parent must accept a new directory (the staging directory
  ``.<name>.staging-*`` is created there first); otherwise a one-line :class:`PermissionError` names it.
  ``out_dir`` itself, when it exists, may only hold files publish writes (it is replaced as a whole);
  anything else stops publish before any work, naming the files.
* Every file goes into the staging directory; only when all are written is it swapped in: the old
  ``out_dir`` is renamed to ``.<name>.old-*``, the staging directory renamed to ``out_dir``, and the old
  one deleted. A failure or a kill before the swap leaves the previous ``out_dir`` untouched (the staging
  directory is removed on a failure); a kill between the two renames leaves the previous results complete
  under ``.<name>.old-*``, and the next publish puts them back before doing anything else. Staging
  directories of killed publishes (their process id, part of the name, is gone) are deleted.
* Records are an explicit list (files chosen by the caller, e.g. those whose fingerprint matches the
  plan) or already decoded dicts; publish never lists a directory or expands a pattern.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.io import write_json_atomic, write_text_atomic
from harness.report.aggregate import final_runs, ok_runs
from harness.report.leaderboard import build_report
from harness.report.plots import (
    plot_heatmap,
    plot_pareto,
    plot_scores,
    plot_training_curves,
    plot_tuning,
)
from harness.report.records import METRIC_PREFIX, load_record_list, metric_names, missing_runs
from harness.report.render import render_csv, render_html, render_latex, render_markdown
from harness.report.render_plots import render as render_plots

__all__ = ["PUBLISHED_NAMES", "publish", "scores_frame"]

log = logging.getLogger(__name__)

#: What publish writes into ``out_dir`` (with the default stem): nothing else may live there.
PUBLISHED_NAMES = ("scores.csv", "provenance.json", "report_problems.json", "tuning.csv", "teachers.csv", "plots",
                   "timings.md")


def _published_names(stem: str) -> set[str]:
    return {f"{stem}.{ext}" for ext in ("md", "csv", "html", "tex")} | set(PUBLISHED_NAMES)


def _restore_interrupted_swap(out: Path) -> None:
    """A kill between the two renames of a swap left ``out`` missing and the old results under
    ``.<name>.old-*``: put them back."""
    if out.exists():
        return
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.rename(olds[-1], out)
        log.warning("restored %s from %s (an earlier publish was interrupted mid-swap)", out, olds[-1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_staging(out: Path) -> None:
    """Staging directories left by a publish that was killed (its process is gone) are deleted."""
    for p in out.parent.glob(f".{out.name}.staging-*"):
        try:
            pid = int(p.name.rsplit(".staging-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _make_staging(out: Path) -> Path:
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=parent))
        # mkdtemp makes the directory private (0o700); the results keep the old directory's bits or 0o755
        os.chmod(staging, out.stat().st_mode & 0o777 if out.is_dir() else 0o755)
        return staging
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PermissionError(
            f"cannot publish into {out}: its parent directory {parent} is not writable ({reason}); "
            "make it writable or choose another results directory") from None


def _check_out_dir(out: Path, stem: str) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"cannot publish into {out}: it is a file, not a directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _published_names(stem))
    if foreign:
        raise FileExistsError(
            f"cannot publish into {out}: it holds files publish did not write ({', '.join(foreign[:5])}"
            f"{', …' if len(foreign) > 5 else ''}) and would replace them; choose a dedicated results directory")


def _swap_in(staging: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)  # only the unique name is needed
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def _check_provenance(provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    if provenance is None:
        return {}
    if not isinstance(provenance, Mapping):
        raise TypeError(f"provenance must be a flat dict of str -> str/number/bool, got {type(provenance).__name__}")
    for k, v in provenance.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (str, int, float, bool))):
            raise TypeError(f"provenance[{k!r}] = {v!r}: provenance must be flat (str -> str/number/bool/None)")
    return dict(provenance)


def scores_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Every successful run's metric values only (no costs, no timings), long form and sorted, for exact
    comparison of a re-run: ``suite, recipe, role, phase, hparams, teacher_seed, seed, eval_set, metric,
    value``."""
    ok = ok_runs(df)
    keys = ["suite", "recipe", "role", "phase", "hparams", "teacher_seed", "seed", "eval_set"]
    cols = [METRIC_PREFIX + m for m in metric_names(ok)]
    long = ok[keys + cols].melt(id_vars=keys, value_vars=cols, var_name="metric", value_name="value")
    long["metric"] = long["metric"].str.slice(len(METRIC_PREFIX))
    long = long.loc[long["value"].notna()]
    return long.sort_values(keys + ["metric"], kind="stable").reset_index(drop=True)


def publish(
    records: Sequence[str | os.PathLike | Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    primary_metric: str = "rougeL",
    baseline: str = "sft",
    expected: Iterable[tuple[Any, ...]] | None = None,
    curves: Mapping[str, Any] | pd.DataFrame | None = None,
    provenance: Mapping[str, Any] | None = None,
    left_out: Sequence[str] | None = None,
    higher_is_better: Mapping[str, bool] | None = None,
    confidence: float = 0.95,
    alpha: float = 0.05,
    n_boot: int = 10_000,
    rng_seed: int = 0,
    stem: str = "leaderboard",
    processes: int = 1,
) -> dict[str, Path]:
    """Build the report from exactly ``records`` and publish it into ``out_dir`` (see the module doc).

    Args:
        records: record files (paths) or decoded record dicts — an explicit list, never a directory or a
            pattern (a single path raises ``TypeError``). Unreadable ones are listed as problems.
        out_dir: the results directory (replaced as a whole, atomically as far as the file system allows).
        primary_metric, baseline, higher_is_better, confidence, alpha, n_boot, rng_seed: see
            :func:`harness.report.leaderboard.build_report`.
        expected: the runs the plan should have produced, ``(recipe, seed, eval_set[, teacher_seed])``;
            the missing ones are listed.
        curves: training curves (:func:`harness.report.plots.curves_frame`) for the training-curve plot.
        provenance: a flat dict (code revision, fingerprints, library versions, machine…), stamped at the
            top of ``leaderboard.md``/``.html`` and written to ``provenance.json``.
        left_out: records the caller did not pass, with the reason (one string each), listed in the
            leaderboard, ``provenance.json`` and ``report_problems.json``.
        processes: draw the plots in up to this many forked processes (:mod:`harness.report.render_plots`);
            the files are the same as with 1.

    Writes (keys of the returned dict, paths inside ``out_dir``): ``leaderboard_md|csv|html|tex``,
    ``scores_csv`` (metric values only, full precision), ``provenance`` (``provenance.json``: the given
    stamp, the report settings, the records used and left out), ``problems`` (``report_problems.json``),
    ``tuning_csv`` / ``teachers_csv`` when there are tuning records / several teachers, and the plots
    ``scores|pareto|heatmap|tuning|training_curves _png|_svg`` under ``plots/`` (a plot with nothing to
    show is skipped and noted). Raises ``ValueError`` when no record could be read.
    """
    if isinstance(records, (str, os.PathLike, Mapping)):
        raise TypeError(f"publish() takes an explicit list of record files or dicts, got a single "
                        f"{type(records).__name__} {str(records)[:80]!r}; pass the list of files to publish")
    stamp = _check_provenance(provenance)
    left = [str(x) for x in (left_out or [])]
    out = Path(out_dir).absolute()
    _restore_interrupted_swap(out)
    _check_out_dir(out, stem)
    staging = _make_staging(out)
    _remove_stale_staging(out)
    try:
        written = _publish_into(staging, list(records), primary_metric=primary_metric, baseline=baseline,
                                expected=expected, curves=curves, provenance=stamp, left_out=left,
                                higher_is_better=higher_is_better, confidence=confidence, alpha=alpha,
                                n_boot=n_boot, rng_seed=rng_seed, stem=stem,
                                processes=processes)
        _swap_in(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return {k: out / p.relative_to(staging) for k, p in written.items()}


def _publish_into(
    staging: Path,
    records: list[Any],
    *,
    primary_metric: str,
    baseline: str,
    expected: Iterable[tuple[Any, ...]] | None,
    curves: Mapping[str, Any] | pd.DataFrame | None,
    provenance: dict[str, Any],
    left_out: list[str],
    higher_is_better: Mapping[str, bool] | None,
    confidence: float,
    alpha: float,
    n_boot: int,
    rng_seed: int,
    stem: str,
    processes: int,
) -> dict[str, Path]:
    loaded = load_record_list(records)
    df, load_problems = loaded.frame, list(loaded.problems)
    if df.empty:
        raise ValueError("no readable run records: " + ("; ".join(load_problems) or "the list is empty"))
    missing = missing_runs(expected, df) if expected is not None else []
    report = build_report(df, primary_metric, baseline, higher_is_better, confidence=confidence, alpha=alpha,
                          n_boot=n_boot, rng_seed=rng_seed)

    plot_dir = staging / "plots"
    jobs = [
        ("scores", lambda p: plot_scores(report, p)),
        ("pareto", lambda p: plot_pareto(report, p)),
        ("heatmap", lambda p: plot_heatmap(report, p)),
    ]
    if not report.tuning.empty:
        jobs.append(("tuning", lambda p: plot_tuning(report, p)))
    if curves is not None:
        jobs.append(("training_curves", lambda p: plot_training_curves(curves, p, confidence=confidence)))
    drawn, skipped = render_plots(jobs, plot_dir, processes, first=("training_curves", "tuning", "heatmap"))
    written: dict[str, Path] = {}
    for name, (png, svg) in drawn.items():
        written[f"{name}_png"], written[f"{name}_svg"] = png, svg

    final = final_runs(df)
    failed = final.loc[final["failed"]]
    failed_runs = [
        {"recipe": r.recipe, "teacher_seed": int(r.teacher_seed), "seed": int(r.seed), "eval_set": r.eval_set,
         "path": r.path, "failure": r.failure}
        for r in failed.sort_values(["recipe", "teacher_seed", "seed", "eval_set"]).itertuples(index=False)
    ]
    missing_text = [
        f"missing run: recipe {m[0]!r}, seed {m[1]}, set {m[2]!r}" + (f", teacher {m[3]}" if len(m) == 4 else "")
        for m in missing
    ]
    problems = load_problems + missing_text + skipped
    lb = report.leaderboard
    written["leaderboard_md"] = write_text_atomic(
        staging / f"{stem}.md", render_markdown(report, problems, provenance=provenance, left_out=left_out))
    written["leaderboard_csv"] = write_text_atomic(staging / f"{stem}.csv", render_csv(report))
    written["leaderboard_html"] = write_text_atomic(
        staging / f"{stem}.html", render_html(report, problems, provenance=provenance, left_out=left_out))
    written["leaderboard_tex"] = write_text_atomic(staging / f"{stem}.tex", render_latex(report))
    written["scores_csv"] = write_text_atomic(
        staging / "scores.csv", scores_frame(df).to_csv(index=False, lineterminator="\n"))
    if not report.tuning.empty:
        written["tuning_csv"] = write_text_atomic(
            staging / "tuning.csv", report.tuning.drop(columns=["hparams"]).to_csv(index=False, lineterminator="\n"))
    if not report.per_teacher.empty:
        written["teachers_csv"] = write_text_atomic(
            staging / "teachers.csv", report.per_teacher.to_csv(index=False, lineterminator="\n"))
    settings = {k: v for k, v in lb.attrs.items()}
    written["provenance"] = write_json_atomic(staging / "provenance.json", {
        "provenance": provenance,
        "report": settings,
        "records_used": int(len(df)),
        "left_out": left_out,
    })
    written["problems"] = write_json_atomic(staging / "report_problems.json", {
        "unreadable_records": load_problems,
        "missing_runs": [dict(zip(("recipe", "seed", "eval_set", "teacher_seed"), m)) for m in missing],
        "failed_runs": failed_runs,
        "skipped_plots": skipped,
        "left_out": left_out,
    })
    return written
