"""``distillbench status``: what ran, what failed and why, what is stale, and the top of the leaderboard.

Reads only files (run.json, records, the leaderboard); starts nothing. "Stale" means a file exists but was made
by other inputs than the current plan's (its fingerprint differs), so the next run will redo it.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .fingerprint import Fingerprints
from .io import JSONReadError, read_json


def _state(path: Path, expected_fp: str) -> tuple[str, str]:
    if not path.exists():
        return "missing", ""
    try:
        data = read_json(path)
    except JSONReadError as exc:
        return "unreadable", str(exc)
    if data.get("fingerprint") != expected_fp:
        return "stale", f"made by other inputs ({data.get('fingerprint')} ≠ {expected_fp})"
    if data.get("status") == "failed":
        return "failed", (data.get("error") or "")[:200]
    return "ok", ""


def status(suite, top: int = 5) -> str:
    fp = Fingerprints(suite)
    lines = [f"suite {suite.name!r} ({suite.origin}), work directory {suite.workdir}"]
    counts: dict[str, int] = {}
    details = []
    runs = {}  # a recipe without the teacher has one run per seed, whatever the teacher
    for f in fp.teachers():
        for recipe in fp.recipes:
            for seed in suite.seeds:
                runs.setdefault(f.suite.run_dir(recipe, seed), (f.run(recipe, seed), f"{recipe}/seed{seed}"
                                + ("" if f.suite.primary_teacher else f" (teacher {f.suite.teacher_seed})")))
    for run_dir, (expected, what) in runs.items():
        state, why = _state(run_dir / "run.json", expected)
        counts[state] = counts.get(state, 0) + 1
        if state in ("failed", "stale", "unreadable"):
            details.append(f"  {what}: {state}{': ' + why if why else ''}")
    total = sum(counts.values())
    lines.append(f"training runs: {total} planned — " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    lines += details[:30] + ([f"  … and {len(details) - 30} more"] if len(details) > 30 else [])
    rec_counts: dict[str, int] = {}
    sets = [s["name"] for s in suite.evaluation["sets"]]
    for f in fp.teachers():
        for (target, seed), expected in f.expected_records().items():
            for name in sets:
                state, _ = _state(f.suite.records_dir / target / f"seed{seed}" / f"{name}.json", expected)
                rec_counts[state] = rec_counts.get(state, 0) + 1
    lines.append("evaluation records: " + ", ".join(f"{v} {k}" for k, v in sorted(rec_counts.items())))
    board = suite.leaderboard_dir / "leaderboard.csv"
    prov = suite.leaderboard_dir / "provenance.json"
    if board.exists():
        current = prov.exists() and (read_json(prov).get("provenance") or {}).get("plan_digest") == fp.plan_digest()
        lines.append(f"leaderboard {board} ({'current' if current else 'STALE: made by another plan'}); top {top}:")
        with open(board, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if (r.get("Rank") or "").strip().isdigit()]
        metric = next((k for k in (rows[0] if rows else {}) if k.endswith(" mean")), None)
        for r in sorted(rows, key=lambda r: int(r["Rank"]))[:top]:
            value = f"{float(r[metric]):.2f}" if metric and r.get(metric) else "—"
            lines.append(f"  {r['Rank']:>2}. {r['Recipe']:<16} {metric.removesuffix(' mean') if metric else ''} {value}")
    else:
        lines.append("no leaderboard yet (snakemake --cores all)")
    return "\n".join(lines)
