"""Load run records (one JSON file per suite × recipe × training seed × evaluation set) into a table.

Layout of the returned :class:`pandas.DataFrame` — *wide*, one row per record:

==================  ==========================================================================
column              meaning
==================  ==========================================================================
``path``            the file the row came from
``suite``           suite name
``recipe``          recipe name (``"teacher"`` and ``"init"`` for the reference rows)
``seed``            training seed (int)
``eval_set``        evaluation set name
``role``            ``"student"`` | ``"teacher"`` | ``"init"`` (inferred from the recipe if absent)
``status``          the status written by the run (``"ok"`` | ``"failed"`` | anything else)
``error``           the run's error message, or ``None``
``failed``          bool: excluded from statistics (status not ``"ok"``, or a metric NaN/±inf or
                    not a number)
``failure``         why the row counts as failed (the run's error, or e.g.
                    ``"non-finite metric(s): kl_to_teacher=nan"``); ``None`` when not failed
``git_rev``         git revision, or ``None``
``device``          device string, or ``None``
``metric:<name>``   one float column per metric name seen in any record (NaN where a record
                    lacks it or wrote ``null`` — ``null`` means "not applicable", not failure)
``cost:<name>``     one float column per cost name, same convention
==================  ==========================================================================

``config`` and ``versions`` are not flattened (they are not statistics); read the record file named in
``path`` for them.

Loading never stops at a bad file: unreadable, corrupt, partial (missing one of ``suite``, ``recipe``,
``seed``, ``eval_set``), non-object and duplicate records are skipped and described, each by file
name, in the ``problems`` list returned next to the table.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from harness.io import JSONReadError, read_json

__all__ = [
    "COST_PREFIX",
    "KEY_COLUMNS",
    "METRIC_PREFIX",
    "LoadedRecords",
    "cost_names",
    "find_record_files",
    "load_records",
    "metric_names",
    "missing_runs",
    "parse_record",
    "records_frame",
]

log = logging.getLogger(__name__)

METRIC_PREFIX = "metric:"
COST_PREFIX = "cost:"
KEY_COLUMNS = ("suite", "recipe", "seed", "eval_set", "role")
REQUIRED_KEYS = ("suite", "recipe", "seed", "eval_set")
BASE_COLUMNS = (
    "path", "suite", "recipe", "seed", "eval_set", "role", "status", "error", "failed", "failure",
    "git_rev", "device",
)
REFERENCE_ROLES = {"teacher": "teacher", "init": "init"}


class LoadedRecords(NamedTuple):
    """What :func:`load_records` returns: the table and the problems met, each naming its file."""

    frame: pd.DataFrame
    problems: list[str]


def find_record_files(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Resolve ``source`` to a sorted, de-duplicated list of record files.

    ``source`` may be a directory (its ``*.json`` files, not recursive), a file, a glob pattern
    (``"work/*/records/*.json"``), or an iterable mixing these.
    """
    items: Iterable[str | os.PathLike]
    if isinstance(source, (str, os.PathLike)):
        items = [source]
    else:
        items = list(source)
    found: set[Path] = set()
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.update(q for q in p.glob("*.json") if q.is_file())
        elif p.exists():
            found.add(p)
        elif glob.has_magic(str(item)):
            found.update(Path(q) for q in glob.glob(str(item)) if Path(q).is_file())
        else:
            found.add(p)  # reported as unreadable by the loader
    return sorted(found)


def _to_float(value: Any) -> float | None:
    """``None`` for null; a float for numbers and numeric strings; raises ``ValueError`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return float(value)  # raises ValueError for non-numeric strings
    raise ValueError(f"not a number: {value!r}")


def parse_record(raw: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Flatten one decoded record into a row dict (see the module docstring for the columns).

    Pure: no I/O. Raises ``ValueError`` naming ``path`` when the record is unusable (not an object,
    a required key missing, a seed that is not an integer, an ``ok`` record without metrics).
    """
    where = str(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: record is a JSON {type(raw).__name__}, expected an object")
    missing = [k for k in REQUIRED_KEYS if raw.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{where}: partial record, missing {', '.join(missing)}")
    try:
        seed = int(raw["seed"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: seed {raw['seed']!r} is not an integer") from None
    recipe = str(raw["recipe"])
    status = str(raw.get("status") or "ok")
    role = raw.get("role") or REFERENCE_ROLES.get(recipe, "student")
    metrics = raw.get("metrics")
    costs = raw.get("costs") or {}
    if metrics is None:
        if status == "ok":
            raise ValueError(f"{where}: partial record, status 'ok' but no 'metrics'")
        metrics = {}
    if not isinstance(metrics, dict) or not isinstance(costs, dict):
        raise ValueError(f"{where}: 'metrics' and 'costs' must be JSON objects")

    row: dict[str, Any] = {
        "path": where,
        "suite": str(raw["suite"]),
        "recipe": recipe,
        "seed": seed,
        "eval_set": str(raw["eval_set"]),
        "role": str(role),
        "status": status,
        "error": raw.get("error"),
        "git_rev": raw.get("git_rev"),
        "device": raw.get("device"),
    }
    bad: list[str] = []
    for name, value in metrics.items():
        try:
            f = _to_float(value)
        except (TypeError, ValueError):
            bad.append(f"{name}={value!r}")
            row[METRIC_PREFIX + name] = math.nan
            continue
        if f is not None and not math.isfinite(f):
            bad.append(f"{name}={f}")
        row[METRIC_PREFIX + name] = math.nan if f is None else f
    for name, value in costs.items():
        try:
            f = _to_float(value)
        except (TypeError, ValueError):
            f = None  # costs are descriptive; a bad one is dropped, not a failure
        row[COST_PREFIX + name] = math.nan if f is None else f

    failure = None
    if status != "ok":
        failure = str(raw.get("error") or f"status {status!r} (no error message recorded)")
    elif bad:
        failure = "non-finite or non-numeric metric(s): " + ", ".join(bad)
    row["failed"] = failure is not None
    row["failure"] = failure
    return row


def records_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Build the wide table from parsed rows: base columns first, then sorted metric and cost columns."""
    metric_cols = sorted({k for r in rows for k in r if k.startswith(METRIC_PREFIX)})
    cost_cols = sorted({k for r in rows for k in r if k.startswith(COST_PREFIX)})
    columns = list(BASE_COLUMNS) + metric_cols + cost_cols
    df = pd.DataFrame(list(rows), columns=columns)
    df["seed"] = df["seed"].astype("int64")
    df["failed"] = df["failed"].astype(bool)
    for col in metric_cols + cost_cols:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def load_records(source: str | os.PathLike | Iterable[str | os.PathLike]) -> LoadedRecords:
    """Read every record file named by ``source`` (see :func:`find_record_files`).

    Returns ``LoadedRecords(frame, problems)`` (a named tuple, so ``df, problems = load_records(d)``
    works). Bad files never raise: each is skipped and described in ``problems`` by its path (also
    logged as a warning). If two files describe the same (suite, recipe, seed, eval_set, role), the
    first in path order is kept and the others are reported as duplicates.
    """
    paths = find_record_files(source)
    problems: list[str] = []
    if not paths:
        problems.append(f"{source}: no record files (*.json) found")
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    for path in paths:
        try:
            raw = read_json(path)
            row = parse_record(raw, path)
        except (OSError, JSONReadError, ValueError) as exc:
            msg = str(exc)
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            problems.append(msg)
            continue
        key = tuple(row[k] for k in KEY_COLUMNS)
        if key in seen:
            problems.append(f"{path}: duplicate of {seen[key]} for {dict(zip(KEY_COLUMNS, key))}; ignored")
            continue
        seen[key] = str(path)
        rows.append(row)
    for p in problems:
        log.warning("run record skipped: %s", p)
    return LoadedRecords(records_frame(rows), problems)


def metric_names(df: pd.DataFrame) -> list[str]:
    """Metric names present in ``df`` (without the ``metric:`` prefix), in column order."""
    return [c[len(METRIC_PREFIX):] for c in df.columns if c.startswith(METRIC_PREFIX)]


def cost_names(df: pd.DataFrame) -> list[str]:
    """Cost names present in ``df`` (without the ``cost:`` prefix), in column order."""
    return [c[len(COST_PREFIX):] for c in df.columns if c.startswith(COST_PREFIX)]


def missing_runs(
    expected: Iterable[tuple[str, int, str]],
    df: pd.DataFrame,
) -> list[tuple[str, int, str]]:
    """The expected ``(recipe, seed, eval_set)`` triples that have no record in ``df``.

    A run whose record exists but failed is *not* missing (the leaderboard lists it as failed). The
    result keeps the order of ``expected`` and drops repeats.
    """
    have = set(zip(df["recipe"].astype(str), df["seed"].astype(int), df["eval_set"].astype(str)))
    out: list[tuple[str, int, str]] = []
    for recipe, seed, eval_set in expected:
        key = (str(recipe), int(seed), str(eval_set))
        if key not in have and key not in out:
            out.append(key)
    return out
