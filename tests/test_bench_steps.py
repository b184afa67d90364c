"""``python -m harness.bench steps``: the suite-batch measurement and the side-by-side run against a git revision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(*argv, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "harness.bench", "steps", "--config", "config/smoke.yaml", *argv],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_steps_on_the_suites_own_batches():
    out = _bench("--ids", "ce", "fkl", "--steps", "2", "--warmup", "1")
    assert out.returncode == 0, out.stderr
    assert "batches of" in out.stdout and "the suite's own training examples" in out.stdout
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ce ") or
            line.startswith("| fkl ")}
    assert set(rows) == {"ce", "fkl"} and rows["ce"].split("|")[3].strip() == "1.00"


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git history of a clone")
def test_against_a_revision_runs_both_alternately_and_names_a_bad_revision(tmp_path):
    out = _bench("--ids", "ce", "--steps", "2", "--warmup", "1", "--against", "HEAD", "--rounds", "1",
                 "--out", str(tmp_path / "ab.md"))
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "ab.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| ce "))
    assert len(row.split("|")) == 8 and "round 1/1" in out.stderr
    bad = _bench("--ids", "ce", "--against", "no-such-revision")
    assert bad.returncode != 0 and "is not a git revision" in bad.stderr
