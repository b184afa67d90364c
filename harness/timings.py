"""Where the time of a pipeline run went: Snakemake's ``benchmark:`` files summed per rule, and when each ran.

Each heavy rule writes ``work/<suite>/benchmarks/<rule>[_<wildcards>].tsv`` (wall seconds ``s``, ``cpu_time``,
``max_rss`` in MB, ...). :func:`timings_table` sums them per rule; the leaderboard step writes the table to
``work/<suite>/timings.md`` and ``distillbench publish`` publishes it next to the leaderboard.

A step run by the warm worker (:mod:`harness.forkserver`) is a child of the worker, not of the job Snakemake
measures: its CPU seconds and peak RSS come from ``logs/<same stem>.log.usage.json``, which the job's client writes
(added to the client's own CPU time; the larger RSS).

When the jobs ran (:func:`schedule`): Snakemake writes a job's benchmark file when the job ends, so the file's
modification time is the job's end and that minus its wall seconds its start. From these intervals: the run's span,
the most jobs that ran at once (the cores it had), the core-seconds no job used (idle), and how many of those fell
while a teacher trained — whether anything waited for the teacher. (A copied work directory loses the times.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

RULES = ("teacher_cache", "teacher", "student_init", "tune", "distill", "evaluate_teacher", "evaluate", "leaderboard",
         "data", "tokenizer")
#: a number of jobs counts as running at once only when it lasts this long (a job's file is written a few
#: milliseconds after its process ends, when the next job may already have started)
MIN_SEGMENT_S = 0.5


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


def read_benchmarks(bench_dir: Path) -> list[tuple[str, dict, float]]:
    """Every benchmark file of ``bench_dir`` read once: ``(rule, record, end)`` per job, in file-name order —
    ``record`` the file's row with the warm worker's usage folded in (:func:`_with_worker_usage`), ``end`` the
    file's modification time (when the job ended)."""
    jobs = []
    for path in sorted(Path(bench_dir).glob("*.tsv")):
        with open(path, newline="") as fh:
            recs = list(csv.DictReader(fh, delimiter="\t"))
        if recs:
            jobs.append((_rule(path.stem), _with_worker_usage(recs[0], path), path.stat().st_mtime))
    return jobs


def _number(rec: dict, key: str) -> float:
    try:
        return float(rec.get(key) or 0.0)
    except ValueError:
        return 0.0


def timings_table(bench_dir: Path) -> str:
    """A Markdown table: per rule, jobs, total and mean wall seconds, total CPU seconds, largest peak RSS; then
    when the jobs ran (:func:`schedule_text`)."""
    jobs = read_benchmarks(bench_dir)
    if not jobs:
        return "(no benchmark files)\n"
    rows: dict[str, list[dict]] = {}
    for rule, rec, _ in jobs:
        rows.setdefault(rule, []).append(rec)
    f = _number
    lines = ["| rule | jobs | wall s (sum) | wall s (mean) | CPU s (sum) | peak RSS MB (max) |",
             "|---|---:|---:|---:|---:|---:|"]
    total_wall = total_cpu = 0.0
    for rule, recs in sorted(rows.items(), key=lambda kv: -sum(f(r, "s") for r in kv[1])):
        wall, cpu = sum(f(r, "s") for r in recs), sum(f(r, "cpu_time") for r in recs)
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        lines.append(f"| {rule} | {len(recs)} | {wall:.1f} | {wall / len(recs):.1f} | {cpu:.1f} | "
                     f"{max(f(r, 'max_rss') for r in recs):.0f} |")
    lines.append(f"| **all jobs** | {len(jobs)} | {total_wall:.1f} | | {total_cpu:.1f} | |")
    when = schedule_text(_intervals(jobs))
    return ("Time per rule, from Snakemake's benchmark files (jobs run in parallel, so the sum of wall seconds "
            "exceeds the run's wall time).\n\n" + "\n".join(lines) + "\n" + ("\n" + when if when else ""))


def _intervals(jobs: list[tuple[str, dict, float]]) -> list[tuple[str, float, float]]:
    return [(rule, end - _number(rec, "s"), end) for rule, rec, end in jobs]


def job_intervals(bench_dir: Path) -> list[tuple[str, float, float]]:
    """``(rule, start, end)`` of every benchmarked job, in seconds since the epoch: ``end`` is the benchmark file's
    modification time, ``start`` that minus the job's wall seconds (``s``)."""
    return _intervals(read_benchmarks(bench_dir))


def _segments(intervals: list[tuple[str, float, float]]) -> list[tuple[float, float, int, bool]]:
    """The run cut where any job starts or ends: ``(start, end, jobs running, a teacher among them)``; one sweep
    over the sorted starts and ends (a job runs over ``[start, end)``)."""
    events: dict[float, list[int]] = {}
    for rule, a, b in intervals:
        teacher = int(rule == "teacher")
        for t, sign in ((a, 1), (b, -1)):
            delta = events.setdefault(t, [0, 0])
            delta[0] += sign
            delta[1] += sign * teacher
    out, running, teachers = [], 0, 0
    cuts = sorted(events)
    for a, b in zip(cuts, cuts[1:]):
        running, teachers = running + events[a][0], teachers + events[a][1]
        out.append((a, b, running, teachers > 0))
    return out


def schedule(intervals: list[tuple[str, float, float]]) -> dict:
    """When the jobs ran: ``span`` (first start to last end, s), ``work`` (sum of the jobs' wall s), ``cores`` (the
    most jobs running at once for at least :data:`MIN_SEGMENT_S`), ``bound`` (``work / cores``: no schedule on
    those cores is shorter), ``idle`` (core-seconds with no job: ``∫ max(0, cores − running) dt``), ``idle_teacher``
    (the idle core-seconds while a teacher trained) and ``teacher_s`` (how long any teacher trained), and per rule
    ``(first start, last end)`` in seconds from the first start (``rules``)."""
    if not intervals:
        raise ValueError("schedule: no jobs")
    t0 = min(a for _, a, _ in intervals)
    segments = _segments(intervals)
    cores = max((n for a, b, n, _ in segments if b - a >= MIN_SEGMENT_S), default=1) or 1
    idle = sum((b - a) * max(0, cores - n) for a, b, n, _ in segments)
    idle_teacher = sum((b - a) * max(0, cores - n) for a, b, n, teacher in segments if teacher)
    rules: dict[str, tuple[float, float]] = {}
    for rule, a, b in intervals:
        first, last = rules.get(rule, (a, b))
        rules[rule] = (min(first, a), max(last, b))
    work = sum(b - a for _, a, b in intervals)
    return {"span": max(b for _, _, b in intervals) - t0, "work": work, "cores": cores, "bound": work / cores,
            "idle": idle, "idle_teacher": idle_teacher, "jobs": len(intervals),
            "teacher_s": sum(b - a for a, b, _, teacher in segments if teacher),
            "rules": {r: (a - t0, b - t0) for r, (a, b) in sorted(rules.items(), key=lambda kv: kv[1])}}


def schedule_text(intervals: list[tuple[str, float, float]]) -> str:
    """:func:`schedule` of a run's job intervals (:func:`job_intervals`) in words and a table (empty without
    jobs)."""
    if not intervals:
        return ""
    s = schedule(intervals)
    teacher = (f" {s['idle_teacher']:.1f} of them while a teacher trained ({s['teacher_s']:.0f} s): "
               + ("no core waited for the teacher, whose time costs the run only its share of the work."
                  if s["idle_teacher"] < 1.0 else "cores waited while the teacher trained.")) if s["teacher_s"] else ""
    lines = [f"When the jobs ran (each job's end is its benchmark file's modification time, its start that minus "
             f"its wall seconds): {s['jobs']} jobs in {s['span']:.0f} s on up to {s['cores']} cores at once. Their "
             f"wall seconds sum to {s['work']:.1f}, so {s['cores']} cores need at least {s['bound']:.1f} s; the run "
             f"took {s['span'] - s['bound']:.1f} s more: {s['idle']:.1f} core-seconds had no job to run,{teacher}",
             "", "| rule | first start s | last end s |", "|---|---:|---:|"]
    lines += [f"| {rule} | {a:.1f} | {b:.1f} |" for rule, (a, b) in s["rules"].items()]
    return "\n".join(lines) + "\n"
