"""Start-up of each pipeline step: seconds from process start until the step is ready to work.

    python -m harness.bench startup [--config config/tiny.yaml] [--repeats 3] [--out FILE]

Every Snakemake job is a fresh ``python -m harness.cli <step> ...`` process, so its imports are paid once per
job. For each step this runs that exact command with ``DISTILLBENCH_STARTUP_PROBE=1``
(:data:`harness.cli.PROBE_ENV`): the command parses its arguments, loads the suite (and, for ``distill`` and
``tune``, validates the plan and reads the recipe), imports what the step needs (:data:`harness.cli.STEP_MODULES`
plus the suite's model classes), prints ``ready <unix time>`` and exits before doing the step's work, so
nothing is written. Start-up = that time minus the time just before the process was spawned (interpreter
start included). ``--help``, ``recipes`` and ``objectives`` do all their work before exiting: their whole run
is timed. The median of ``--repeats`` runs is printed per step, with whether the step loaded torch.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: the target of issue #18: a job's start-up, in seconds
TARGET_S = 1.5


def _commands(config: str, recipe: str, tuning: bool) -> list[tuple[str, list[str], bool]]:
    """(label, cli arguments, probed) per step; probed = stops at ready (else the whole run is timed)."""
    c = ["--config", config, "--threads", "1"]
    rows = [
        ("--help", ["--help"], False),
        ("data", ["data", *c], True),
        ("tokenizer", ["tokenizer", *c], True),
        ("teacher", ["teacher", *c], True),
        ("student-init", ["student-init", *c, "--seed", "1"], True),
        ("teacher-cache", ["teacher-cache", *c], True),
        (f"distill ({recipe})", ["distill", *c, "--recipe", recipe, "--seed", "1"], True),
    ]
    if tuning:
        rows.append((f"tune ({recipe})", ["tune", *c, "--recipe", recipe], True))
    rows += [
        ("evaluate (teacher)", ["evaluate", *c, "--target", "teacher"], True),
        ("leaderboard", ["leaderboard", *c], True),
        ("publish", ["publish", *c], True),
        ("status", ["status", *c], True),
        ("check", ["check", *c], True),
        ("recipes", ["recipes"], False),
        ("objectives", ["objectives"], False),
    ]
    return rows


def time_command(args: list[str], probed: bool) -> tuple[float, bool | None]:
    """(seconds from spawn to ready — or to exit when not probed, whether torch was loaded or None)."""
    from .cli import PROBE_ENV

    env = {**os.environ, PROBE_ENV: "1" if probed else ""}
    env.pop("OMP_NUM_THREADS", None)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "harness.cli", "--no-progress", *args], env=env,
                         capture_output=True, text=True)
    end = time.time()
    if not probed:
        if out.returncode != 0:
            raise RuntimeError(f"harness.cli {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
        return end - t0, None
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ready ")), None)
    if line is None:
        raise RuntimeError(f"harness.cli {' '.join(args)} never got ready (exit {out.returncode}): "
                           f"{(out.stderr or out.stdout).strip()[-500:]}")
    fields = line.split()
    return float(fields[1]) - t0, fields[2] == "torch=yes"


def bench_startup(args) -> str:
    from .suite import load_suite

    suite = load_suite(args.config)
    names = list(suite.recipe_names or []) or sorted(p.stem for p in Path(suite.recipes_dir).glob("*.yaml"))
    recipe = args.recipe or ("fkl" if "fkl" in names else names[0])
    rows = []
    for label, cli_args, probed in _commands(args.config, recipe, bool(suite.tuning)):
        time_command(cli_args, probed)  # warm-up: file-system caches
        times, torch_loaded = [], None
        for _ in range(args.repeats):
            t, torch_loaded = time_command(cli_args, probed)
            times.append(t)
        rows.append((label, statistics.median(times), min(times), torch_loaded, probed))
        print(f"{label:24s} {statistics.median(times):6.2f} s", file=sys.stderr, flush=True)
    try:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    lines = [
        "# Start-up per pipeline step",
        "",
        f"- command: `python -m harness.bench startup --config {args.config} --repeats {args.repeats}`",
        f"- seconds from spawning `python -m harness.cli <step> ...` to the step being ready (imports done, "
        f"suite loaded; see harness/bench_startup.py); median and min of {args.repeats} runs after a warm-up",
        f"- target: <= {TARGET_S} s per job; load average (1/5/15 min): {load} (other processes share the cores)",
        "",
        "| step | start-up s (median) | min s | torch loaded | <= target |",
        "|---|---:|---:|---|---|",
    ]
    for label, med, lo, torch_loaded, probed in rows:
        what = label if probed else f"{label} (whole run)"
        flag = "—" if torch_loaded is None else ("yes" if torch_loaded else "no")
        lines.append(f"| {what} | {med:.2f} | {lo:.2f} | {flag} | {'yes' if med <= TARGET_S else 'NO'} |")
    return "\n".join(lines) + "\n"
