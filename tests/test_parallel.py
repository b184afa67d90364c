"""Data parallelism: two CPU processes (torchrun + accelerate, gloo) reproduce one process's run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import steps
from harness.suite import load_suite

REPO = Path(__file__).resolve().parents[1]


def _suite_file(tmp: Path, name: str, batch: int, processes: int) -> Path:
    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    cfg.pop("tuning", None)  # a single distill run at the suite's learning rate
    cfg.update(workdir=str(tmp / "work"), results=str(tmp / "results"), recipes=["sft", "fkl"], seeds=[1],
               num_processes=processes)
    cfg["training"].update(per_device_train_batch_size=batch, max_steps=4, log_every=1)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process_with_twice_the_batch(tmp_path):
    one = _suite_file(tmp_path, "one", batch=16, processes=1)
    two = _suite_file(tmp_path, "two", batch=8, processes=2)
    suite = load_suite(one)  # both suites share the workdir: data, tokenizer, teacher, cache, init
    steps.prepare_data(suite)
    steps.prepare_tokenizer(suite)
    steps.prepare_teacher(suite, progress=False)
    steps.build_teacher_cache(suite, progress=False)
    steps.init_student(suite, 1)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    run_json = suite.run_dir("fkl", 1) / "run.json"

    steps.distill(suite, suite.recipes()["fkl"], 1, progress=False)
    single = json.loads(run_json.read_text())
    shutil.rmtree(suite.run_dir("fkl", 1))

    from harness.parallel import launch_prefix

    prefix = launch_prefix(2, "cpu").split()
    cmd = [str(Path(sys.executable).parent / prefix[0]), *prefix[1:], "--no-progress",
           "distill", "--config", str(two), "--recipe", "fkl", "--seed", "1", "--threads", "1"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    double = json.loads(run_json.read_text())

    assert double["num_processes"] == 2 and single["num_processes"] == 1
    # the same sequences, the same global token-mean loss, the same optimizer steps
    assert double["costs"]["samples"] == single["costs"]["samples"]
    assert double["costs"]["tokens"] == single["costs"]["tokens"]
    assert [s for s, _ in double["curve"]] == [s for s, _ in single["curve"]]
    assert [l for _, l in double["curve"]] == pytest.approx([l for _, l in single["curve"]], rel=1e-4)
    # one writer: a single model directory and run.json, no leftovers from rank 1
    files = sorted(p.name for p in suite.run_dir("fkl", 1).iterdir())
    assert files == ["model", "run.json"]
