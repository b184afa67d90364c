"""Cluster fan-out: the SLURM profile plans the paper-scale suite (dry run, no cluster needed)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.test_pipeline import snakemake

pytestmark = pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                                reason="snakemake-executor-plugin-slurm not installed")


def test_slurm_profile_dry_run_plans_the_paper_suite(tmp_path):
    out = snakemake("-n", "--profile", "profiles/slurm", "--configfile", "config/instruct.yaml",
                    "--config", f"workdir={tmp_path / 'plan'}", f"results={tmp_path / 'plan-r'}")
    text = out.stdout + out.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", text, flags=re.M))
    assert counts["distill"] == str(15 * 3)  # 15 recipes x 3 seeds, one job each (distill_jobs: per_run)
    assert counts["evaluate"] == str(15 + 1)  # one job per recipe (all seeds) + the untrained student
    assert counts["evaluate_teacher"] == "1"
