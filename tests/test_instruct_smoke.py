"""The MiniLLM / DistiLLM protocol's code path on the real evaluation sets (../shared/data), tiny models."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from tests.test_pipeline import REPO, snakemake

SHARED = Path(os.environ.get("DISTILLBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (SHARED / "instruct" / "dolly_valid.jsonl").exists(),
                                reason="real instruction data not found (set DISTILLBENCH_SHARED_DATA)")


@pytest.mark.slow
def test_instruct_smoke_gives_a_column_per_evaluation_set(tmp_path):
    snakemake("--cores", "2", "--configfile", "config/instruct-smoke.yaml", "--config",
              f"workdir={tmp_path / 'work'}", f"results={tmp_path / 'results'}")
    with (tmp_path / "results" / "leaderboard.csv").open() as f:
        header = next(csv.reader(f))
    for name in ("dolly", "self-inst", "vicuna", "sinst"):
        assert f"ROUGE-L [{name}] mean" in header, name
    assert "ROUGE-L [avg] mean" in header


def test_paper_suite_plans_with_every_set_and_recipe():
    out = snakemake("-n", "--configfile", "config/instruct.yaml", "--config",
                    "workdir=/tmp/distillbench-instruct-plan", "results=/tmp/distillbench-instruct-plan-r")
    assert "distill" in out.stdout and "publish" in out.stdout
