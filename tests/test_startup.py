"""Start-up of the pipeline steps (issue #18): what each step imports, not how long it takes.

The seconds are measured by ``python -m harness.bench startup`` (a benchmark that prints numbers); these
tests check the import structure behind them with the same start-up probe the benchmark uses
(``DISTILLBENCH_STARTUP_PROBE``: the real ``python -m harness.cli <step>`` command stops once ready and says
whether torch was loaded).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import PROBE_ENV, STEP_MODULES

ROOT = Path(__file__).resolve().parents[1]


def probe(*args: str) -> str:
    """The ``ready ...`` line of ``python -m harness.cli <args>`` under the start-up probe."""
    env = {**os.environ, PROBE_ENV: "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "harness.cli", "--no-progress", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ready ")]
    assert out.returncode == 0 and lines, (out.returncode, out.stdout, out.stderr)
    return lines[0]


@pytest.mark.parametrize("step", ["data", "publish"])
def test_steps_without_models_do_not_import_torch(step):
    assert probe(step, "--config", "config/tiny.yaml", "--threads", "1").endswith("torch=no")


def test_a_model_step_is_ready_with_torch_and_its_model_class():
    assert probe("student-init", "--config", "config/tiny.yaml", "--threads", "1", "--seed", "1").endswith("torch=yes")


def test_help_imports_neither_torch_nor_the_steps():
    code = ("import sys, runpy; sys.argv = ['distillbench', '--help']\n"
            "try:\n    runpy.run_module('harness.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'torch' in sys.modules, 'harness.steps' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "LOADED False False", out.stdout + out.stderr


def test_step_modules_name_importable_modules():
    import importlib.util

    for step, modules in STEP_MODULES.items():
        for module in modules:
            assert importlib.util.find_spec(module) is not None, (step, module)


def test_harness_data_names_load_on_first_use():
    code = ("import sys, harness.data as d\n"
            "before = 'harness.data.batching' in sys.modules\n"
            "from harness.data import collate, load_jsonl, IGNORE_INDEX\n"
            "print(before, 'harness.data.batching' in sys.modules, IGNORE_INDEX, callable(collate))\n"
            "try:\n    d.no_such_name\nexcept AttributeError as e:\n    print('AttributeError', e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "False True -100 True", out.stdout + out.stderr
    assert lines[1].startswith("AttributeError") and "no_such_name" in lines[1]


def test_re_exports_keep_their_old_homes():
    from harness.cache_schema import CACHE_SCHEMA
    from harness.distill import TrainConfig
    from harness.teacher_cache import CACHE_SCHEMA as CACHE_SCHEMA_OLD, DTYPES
    from harness.train_config import TrainConfig as TrainConfigNew

    assert TrainConfig is TrainConfigNew and CACHE_SCHEMA is CACHE_SCHEMA_OLD
    assert CACHE_SCHEMA["dtype"].choices == tuple(DTYPES)
