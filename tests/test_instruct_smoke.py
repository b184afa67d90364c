"""The MiniLLM / DistiLLM protocol's code path on the real evaluation sets (../shared/data), tiny models."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from harness.data.instruct import check_set_spec
from harness.suite import load_suite
from tests.test_pipeline import REPO, snakemake

SHARED = Path(os.environ.get("DISTILLBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))
needs_shared = pytest.mark.skipif(not (SHARED / "instruct" / "dolly_valid.jsonl").exists(),
                                  reason="real instruction data not found (set DISTILLBENCH_SHARED_DATA)")
INSTRUCT_SUITES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "config").glob("instruct*.yaml"))
PAPER_SUITES = [s for s in INSTRUCT_SUITES if s != "config/instruct-smoke.yaml"]


@needs_shared
@pytest.mark.slow
def test_instruct_smoke_gives_a_column_per_evaluation_set(tmp_path):
    snakemake("--cores", "2", "--configfile", "config/instruct-smoke.yaml", "--config",
              f"workdir={tmp_path / 'work'}", f"results={tmp_path / 'results'}")
    with (tmp_path / "work" / "leaderboard" / "leaderboard.csv").open() as f:
        header = next(csv.reader(f))
    for name in ("dolly", "self-inst", "vicuna", "sinst"):
        assert f"ROUGE-L [{name}] mean" in header, name
    assert "ROUGE-L [avg] mean" in header
    valid = (tmp_path / "work" / "data" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(valid) == 100  # MiniLLM's split in miniature: the first rows of the file


def test_every_instruct_suite_parses_with_checked_set_entries():
    assert {"config/instruct.yaml", "config/instruct-opt.yaml", "config/instruct-openllama.yaml",
            "config/instruct-qwen.yaml", "config/instruct-smoke.yaml"} <= set(INSTRUCT_SUITES)
    for path in INSTRUCT_SUITES:
        suite = load_suite(REPO / path)
        assert suite.data["kind"] == "instruct", path
        for split in ("train", "valid"):
            assert suite.data[split] is not None, (path, split)
            check_set_spec(suite.data[split], path, f"data.{split}", default_name=split)
        names = [check_set_spec(e, path, f"evaluation.sets[{i}]")["name"]
                 for i, e in enumerate(suite.evaluation["sets"])]
        if path in PAPER_SUITES:
            assert names == ["dolly", "self-inst", "vicuna", "sinst", "uinst"], path
            assert suite.data["train"]["select"] == {"start": 1000} and suite.data["valid"]["select"] == {"stop": 1000}
            assert all(e.get("list_output") is None for e in suite.evaluation["sets"])  # MiniLLM: text is text
            assert suite.teacher["hub"] and suite.student["hub"], path


@pytest.mark.parametrize("suite_file", PAPER_SUITES)
def test_paper_suite_plans_with_every_set_and_recipe(suite_file, tmp_path):
    out = snakemake("-n", "--configfile", suite_file, "--config",
                    f"workdir={tmp_path / 'work'}", f"results={tmp_path / 'results'}")
    assert "distill" in out.stdout and "leaderboard" in out.stdout
