"""harness.report.render_plots: figures drawn in forked processes are the figures drawn one after another."""

from __future__ import annotations

import os
import sys

import pytest

from harness.report import render_plots
from harness.report.plots import NothingToPlot, _new_figure, save_figure


def _line(values, title):
    def draw(stem):
        fig = _new_figure(3, 2)
        ax = fig.add_subplot()
        ax.plot(values, marker="o")
        ax.set_title(title)
        return save_figure(fig, stem)
    return draw


def _empty(stem):
    raise NothingToPlot("no successful run")


def _pid(stem):
    """Writes the id of the process that drew it (a figure that shows where it was drawn)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    png.write_text(str(os.getpid()))
    svg.write_text("")
    return png, svg


JOBS = [("a", _line([1, 3, 2], "a")), ("empty", _empty), ("b", _line([2, 2, 5, 1], "b")),
        ("c", _line([0, 1], "c"))]


@pytest.mark.parametrize("processes", [2, 3, 8])
def test_forked_render_equals_one_process(tmp_path, processes):
    one, skipped_one = render_plots.render(JOBS, tmp_path / "one", 1)
    many, skipped_many = render_plots.render(JOBS, tmp_path / "many", processes, first=("c",))
    assert list(one) == list(many) == ["a", "b", "c"]  # the order of the jobs, whatever order they ran in
    assert skipped_one == skipped_many == ["plot 'empty' skipped: no successful run"]
    for name in one:
        png_one, svg_one = one[name]
        png_many, svg_many = many[name]
        assert png_many == tmp_path / "many" / f"{name}.png" and svg_many == tmp_path / "many" / f"{name}.svg"
        assert png_one.read_bytes() == png_many.read_bytes()  # the same picture, byte for byte
        assert svg_many.read_bytes().startswith(b"<?xml")
    assert render_plots._JOBS == []  # nothing of this render is kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked rendering is used on Linux only")
def test_processes_are_used_only_when_asked(tmp_path):
    jobs = [("p", _pid), ("q", _pid)]
    serial, _ = render_plots.render(jobs, tmp_path / "serial", 1)
    assert {int(png.read_text()) for png, _svg in serial.values()} == {os.getpid()}
    forked, _ = render_plots.render(jobs, tmp_path / "forked", 2)
    assert os.getpid() not in {int(png.read_text()) for png, _svg in forked.values()}


def test_an_error_in_a_child_reaches_the_caller(tmp_path):
    def broken(stem):
        raise RuntimeError("bad axis")

    with pytest.raises(RuntimeError, match="bad axis"):
        render_plots.render([("a", _line([1, 2], "a")), ("broken", broken)], tmp_path, 2)
    assert render_plots._JOBS == []
