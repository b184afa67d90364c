"""Where the time of a pipeline run went: Snakemake's ``benchmark:`` files summed per rule.

Each heavy rule writes ``work/<suite>/benchmarks/<rule>[_<wildcards>].tsv`` (wall seconds ``s``, ``cpu_time``,
``max_rss`` in MB, ...). :func:`timings_table` sums them per rule; the leaderboard step writes the table to
``work/<suite>/timings.md`` and ``distillbench publish`` publishes it next to the leaderboard.

A step run by the warm worker (:mod:`harness.forkserver`) is a child of the worker, not of the job Snakemake
measures: its CPU seconds and peak RSS come from ``logs/<same stem>.log.usage.json``, which the job's client writes
(added to the client's own CPU time; the larger RSS).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

RULES = ("teacher_cache", "teacher", "student_init", "tune", "distill", "evaluate_teacher", "evaluate", "leaderboard")


def _rule(stem: str) -> str:
    for rule in RULES:
        if stem == rule or stem.startswith(rule + "_"):
            return rule
    return stem


def _with_worker_usage(rec: dict, bench: Path) -> dict:
    usage = bench.parent.parent / "logs" / f"{bench.stem}.log.usage.json"
    if not usage.exists():
        return rec
    worker = json.loads(usage.read_text())
    cpu = float(rec.get("cpu_time") or 0.0) + float(worker["cpu_s"])
    return {**rec, "cpu_time": cpu, "max_rss": max(float(rec.get("max_rss") or 0.0), float(worker["max_rss_mb"]))}


def timings_table(bench_dir: Path) -> str:
    """A Markdown table: per rule, jobs, total and mean wall seconds, total CPU seconds, largest peak RSS."""
    rows: dict[str, list[dict]] = {}
    for path in sorted(Path(bench_dir).glob("*.tsv")):
        with open(path, newline="") as fh:
            for rec in csv.DictReader(fh, delimiter="\t"):
                rows.setdefault(_rule(path.stem), []).append(_with_worker_usage(rec, path))
    if not rows:
        return "(no benchmark files)\n"

    def f(rec, key):
        try:
            return float(rec.get(key) or 0.0)
        except ValueError:
            return 0.0

    lines = ["| rule | jobs | wall s (sum) | wall s (mean) | CPU s (sum) | peak RSS MB (max) |",
             "|---|---:|---:|---:|---:|---:|"]
    total_wall = total_cpu = 0.0
    for rule, recs in sorted(rows.items(), key=lambda kv: -sum(f(r, "s") for r in kv[1])):
        wall, cpu = sum(f(r, "s") for r in recs), sum(f(r, "cpu_time") for r in recs)
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        lines.append(f"| {rule} | {len(recs)} | {wall:.1f} | {wall / len(recs):.1f} | {cpu:.1f} | "
                     f"{max(f(r, 'max_rss') for r in recs):.0f} |")
    lines.append(f"| **all jobs** | {sum(len(r) for r in rows.values())} | {total_wall:.1f} | | {total_cpu:.1f} | |")
    return ("Time per rule, from Snakemake's benchmark files (jobs run in parallel, so the sum of wall seconds "
            "exceeds the run's wall time).\n\n" + "\n".join(lines) + "\n")
