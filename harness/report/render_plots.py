"""Render a report's figures, in forked processes when more than one CPU is given.

A figure is a pure function of the report, and drawing it (layout, PNG at the publication dpi, SVG) is all
single-threaded matplotlib: the tiny suite's five figures take ~15 s in one process, at the end of a run when
nothing else is left to do. :func:`render` draws them in up to ``processes`` forked children (Linux only; one
figure per child at a time, the slowest first) and returns what each wrote, in the order of ``jobs`` — exactly
what drawing them one after another in this process returns. The pictures are the same: each is drawn by the same
code from the same inherited report (a PNG is byte-identical; an SVG differs only in matplotlib's random element
ids, as between any two renders).
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.report.plots import NothingToPlot

#: ``(name, draw)``: ``draw(path_stem) -> [png_path, svg_path]``, raising :class:`NothingToPlot` when empty
Job = tuple[str, Callable[[Path], Sequence[Path]]]

#: the jobs of the render in progress, inherited by the forked children (closures cannot be pickled)
_JOBS: list[tuple[Job, Path]] = []


def _draw(k: int) -> tuple[int, tuple[Path, Path] | str]:
    """Draw job ``k`` of :data:`_JOBS`: ``(k, (png, svg))``, or ``(k, reason)`` when there is nothing to plot."""
    (name, draw), stem = _JOBS[k]
    try:
        png, svg = draw(stem)
    except NothingToPlot as exc:
        return k, f"plot {name!r} skipped: {exc}"
    return k, (Path(png), Path(svg))


def render(jobs: Sequence[Job], plot_dir: Path, processes: int = 1,
           first: Sequence[str] = ()) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Draw every job into ``plot_dir / name``; return ``({name: (png, svg)}, skipped)`` in the order of ``jobs``.

    ``processes`` > 1 draws them in that many forked children (fewer if there are fewer jobs; one process where
    ``fork`` is not the platform's safe default, i.e. outside Linux), starting with the names in ``first``
    (the slow figures, so the others fill in beside them). Any error other than :class:`NothingToPlot` is raised
    here, as in one process.
    """
    global _JOBS
    items = [(job, plot_dir / job[0]) for job in jobs]
    rank = {name: r for r, name in enumerate(first)}
    order = sorted(range(len(items)), key=lambda k: (rank.get(items[k][0][0], len(rank)), k))
    n = max(1, min(int(processes), len(items)))
    _JOBS = items
    try:
        if n == 1 or not sys.platform.startswith("linux"):
            outcomes = dict(_draw(k) for k in order)
        else:
            with multiprocessing.get_context("fork").Pool(n) as pool:
                outcomes = dict(pool.imap_unordered(_draw, order, chunksize=1))
    finally:
        _JOBS = []
    written, skipped = {}, []
    for k, (job, _stem) in enumerate(items):
        out = outcomes[k]
        if isinstance(out, str):
            skipped.append(out)
        else:
            written[job[0]] = out
    return written, skipped
