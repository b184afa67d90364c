"""End to end: the Snakefile on the smoke suite, in a temporary workdir (a few minutes on 2 cores)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env():
    """No activated environment: the venv's bin directory is NOT on PATH (the Snakefile must not need it)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def snakemake(*args, cwd=REPO, check=True):
    out = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                         env=_env(), timeout=1500)
    if check and out.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    (tmp / "two-teachers.yaml").write_text("teacher_seeds: [0, 1]\n")  # the smoke suite with a second teacher
    overrides = ["--config", f"workdir={tmp / 'work'}", f"results={tmp / 'results'}"]
    configs = ["--configfile", "config/smoke.yaml", str(tmp / "two-teachers.yaml")]
    snakemake("--cores", "2", *configs, *overrides)
    return tmp, [*configs, *overrides]


@pytest.mark.slow
def test_smoke_suite_writes_a_leaderboard_under_work_only(smoke_run):
    tmp, _ = smoke_run
    results = tmp / "work" / "leaderboard"
    assert not (tmp / "results").exists(), "a run must not write the published results"
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "leaderboard.tex", "scores.csv",
                 "provenance.json", "plots/scores.png", "plots/pareto.png", "plots/heatmap.png",
                 "plots/training_curves.png"):
        assert (results / name).stat().st_size > 0, name
    rows = {r["Recipe"]: r for r in csv.DictReader((results / "leaderboard.csv").open())}
    assert {"sft", "fkl", "srkl"} <= set(rows)
    assert any(r["Kind"] == "teacher" for r in rows.values()) and any(r["Kind"] == "init" for r in rows.values())
    assert all(r["Status"] == "ok" for r in rows.values())
    problems = json.loads((results / "report_problems.json").read_text())
    assert problems["missing_runs"] == [] and problems["failed_runs"] == []
    # every record carries metrics and costs; the same data order and budget for every recipe
    runs = [json.loads(p.read_text()) for p in (tmp / "work" / "runs").glob("*/seed*/run.json")]
    assert len(runs) == 3 * 2
    # the second teacher: its own weights; every teacher-using recipe trained again with it, SFT once
    import torch
    from safetensors.torch import load_file

    w0, w1 = (load_file(tmp / "work" / d / "model.safetensors") for d in ("teacher", "teacher1"))
    assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0)
    again = {p.parent.parent.name: json.loads(p.read_text())
             for p in (tmp / "work" / "runs-teacher1").glob("*/seed1/run.json")}
    assert sorted(again) == ["fkl", "srkl"]
    assert again["fkl"]["teacher_seed"] == 1 and json.loads(
        (tmp / "work" / "runs" / "fkl" / "seed1" / "run.json").read_text())["teacher_seed"] == 0
    assert again["fkl"]["fingerprint"] != json.loads(
        (tmp / "work" / "runs" / "fkl" / "seed1" / "run.json").read_text())["fingerprint"]
    for target in ("sft", "fkl", "teacher"):
        seed = 0 if target == "teacher" else 2
        rec = json.loads((tmp / "work" / "records-teacher1" / target / f"seed{seed}" / "test.json").read_text())
        assert rec["teacher_seed"] == 1 and rec["status"] == "ok", target
    assert not (tmp / "work" / "records-teacher1" / "init").exists()  # the untrained student: primary only
    assert rows["fkl"]["Teachers"] == "2" and rows["fkl"]["n runs"] == "4" and rows["init"]["n runs"] == "2"
    per_teacher = list(csv.DictReader((results / "teachers.csv").open()))
    assert {(r["recipe"], r["teacher_seed"]) for r in per_teacher} >= {("fkl", "0"), ("fkl", "1"), ("sft", "1")}
    assert "## Per teacher" in (results / "leaderboard.md").read_text()
    assert "0 vs 1" in (results / "leaderboard.md").read_text()  # the rank correlation between the teachers
    assert len({(r["costs"]["steps"], r["costs"]["samples"]) for r in runs}) == 1
    for seed in (1, 2):
        tokens = {r["costs"]["tokens"] for r in runs if r["seed"] == seed}
        assert len(tokens) == 1, "recipes of one seed must see exactly the same tokens"
    # the equal learning-rate search: every recipe searched, the final runs trained with the choice
    for recipe in ("sft", "fkl", "srkl"):
        chosen = json.loads((tmp / "work" / "tuning" / recipe / "chosen.json").read_text())
        assert chosen["learning_rate"] in (0.002, 0.005) and chosen["set"] == "valid"
        final = json.loads((tmp / "work" / "runs" / recipe / "seed1" / "run.json").read_text())
        assert final["hparams"] == {"learning_rate": chosen["learning_rate"]}
        assert final["train_config"]["learning_rate"] == chosen["learning_rate"]
    assert (results / "plots" / "tuning.png").stat().st_size > 0
    assert "## Hyperparameter search (validation split)" in (results / "leaderboard.md").read_text()
    prov = json.loads((results / "provenance.json").read_text())["provenance"]
    for key in ("code_digest", "plan_digest", "libraries", "machine", "git_rev"):  # the stamp
        assert key in prov, key
    assert "code_digest" in (results / "leaderboard.md").read_text()  # the stamp is on the table
    record = json.loads((tmp / "work" / "records" / "fkl" / "seed1" / "test.json").read_text())
    for key in ("rougeL", "exact_match", "ece", "top1_agreement", "kl_to_teacher", "lm_eval/smoke_mc/acc"):
        assert key in record["metrics"], key
    assert record["costs"]["train_time_s"] > 0 and record["git_rev"] is not None


@pytest.mark.slow
def test_publish_then_check_reports_reproduced(smoke_run):
    tmp, overrides = smoke_run
    cfg = tmp / "smoke-published.yaml"
    import yaml

    d = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    d.update(workdir=str(tmp / "work"), results=str(tmp / "results"), origin="config/smoke.yaml", teacher_seeds=[0, 1])
    cfg.write_text(yaml.safe_dump(d))
    run = lambda *a: subprocess.run([sys.executable, "-m", "harness.cli", *a, "--config", str(cfg)], cwd=REPO,
                                    capture_output=True, text=True, env=_env(), timeout=300)
    before = run("check")
    assert before.returncode == 1 and "nothing published" in before.stdout
    out = run("publish")
    assert out.returncode == 0, out.stderr
    assert (tmp / "results" / "leaderboard.md").read_text() == (tmp / "work" / "leaderboard" / "leaderboard.md").read_text()
    out = run("check")
    assert out.returncode == 0 and "current:" in out.stdout and "reproduced: all" in out.stdout, out.stdout



@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git history of a clone")
def test_bench_runs_trains_both_sides_on_the_work_directorys_prerequisites(smoke_run):
    """``python -m harness.bench runs``: this checkout and a revision (here HEAD) each train the recipe afresh on the
    smoke run's prerequisites (linked, never written: the smoke run's own runs stay as they were)."""
    tmp, _ = smoke_run
    before = sorted(p.name for p in (tmp / "work" / "runs" / "fkl").iterdir())
    out = subprocess.run([sys.executable, "-m", "harness.bench", "runs", "--config", "config/smoke.yaml", "--workdir",
                          str(tmp / "work"), "--recipes", "fkl", "--seed", "2", "--against", "HEAD", "--rounds", "1",
                          "--out", str(tmp / "runs.md")], cwd=REPO, capture_output=True, text=True, env=_env(),
                         timeout=600)
    assert out.returncode == 0, out.stderr
    row = next(line for line in (tmp / "runs.md").read_text().splitlines() if line.startswith("| fkl "))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert len(cells) == 8 and float(cells[1]) > 0 and float(cells[2]) > 0 and cells[6] == cells[7] == "0"
    assert "round 1/1: fkl this" in out.stderr and sorted(p.name for p in (tmp / "work" / "runs" / "fkl").iterdir()) == before
    bad = subprocess.run([sys.executable, "-m", "harness.bench", "runs", "--config", "config/smoke.yaml", "--workdir",
                          str(tmp / "nowhere"), "--against", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert bad.returncode != 0 and "lacks data" in bad.stderr and "make reproduce" in bad.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git history of a clone")
def test_bench_evaluate_scores_the_same_students_on_both_sides(smoke_run):
    """``python -m harness.bench evaluate``: this checkout and a revision (here HEAD, the same code) each evaluate the
    smoke run's students in a work directory of their own: the same metrics, and the smoke run's records untouched."""
    tmp, _ = smoke_run
    records = sorted((tmp / "work" / "records" / "fkl").rglob("*.json"))
    before = [p.read_bytes() for p in records]
    out = subprocess.run([sys.executable, "-m", "harness.bench", "evaluate", "--config", "config/smoke.yaml",
                          "--workdir", str(tmp / "work"), "--targets", "fkl", "--against", "HEAD", "--rounds", "1",
                          "--out", str(tmp / "evaluate.md")], cwd=REPO, capture_output=True, text=True, env=_env(),
                         timeout=600)
    assert out.returncode == 0, out.stderr
    row = next(line for line in (tmp / "evaluate.md").read_text().splitlines() if line.startswith("| fkl "))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert len(cells) == 10 and float(cells[1]) > 0 and float(cells[4]) > 0 and cells[9] == "yes", row
    assert "round 1/1: fkl this" in out.stderr and [p.read_bytes() for p in records] == before

@pytest.mark.slow
def test_a_rerun_after_success_does_nothing(smoke_run):
    _, overrides = smoke_run
    out = snakemake("-n", *overrides)
    assert "Nothing to be done" in out.stdout + out.stderr
    # the same suite from a file at another path: another resolved config file, the same plan — nothing re-runs
    # (a step's parameters hold its fingerprint and teacher seed, never the resolved file's name)
    tmp, _ = smoke_run
    copy = tmp / "two-teachers-copy.yaml"  # the last config file names the suite's origin
    copy.write_text((tmp / "two-teachers.yaml").read_text())
    moved = [str(copy) if a == str(tmp / "two-teachers.yaml") else a for a in overrides]
    assert moved != overrides
    out = snakemake("-n", *moved)
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout[-3000:]


@pytest.mark.slow
def test_report_is_an_html_file_with_the_plots(smoke_run):
    tmp, overrides = smoke_run
    snakemake(*overrides, "--report", str(tmp / "report.html"))
    assert (tmp / "report.html").stat().st_size > 10_000


def test_dry_run_plans_the_tiny_suite(tmp_path):
    out = snakemake("-n", "--configfile", "config/tiny.yaml", "--config", f"workdir={tmp_path / 'plan'}",
                    f"results={tmp_path / 'plan-results'}")
    text = out.stdout + out.stderr
    assert "distill" in text and "evaluate" in text and "leaderboard" in text
    assert "gpu=1" not in text or __import__("torch").cuda.is_available()  # a CPU machine asks for no GPU
