"""Load run records (one JSON file per suite × recipe × training seed × evaluation set) into a table.

Layout of the returned :class:`pandas.DataFrame` — *wide*, one row per record:

==================  ==========================================================================
column              meaning
==================  ==========================================================================
``path``            the file the row came from
``suite``           suite name
``recipe``          recipe name (``"teacher"`` and ``"init"`` for the reference rows)
``seed``            training seed (int)
``teacher_seed``    seed of the teacher the run distilled from (int; absent in the record = 0)
``eval_set``        evaluation set name
``phase``           ``"final"`` (test-split runs; also when absent) | ``"tune"`` (validation-split runs of the
                    hyperparameter search)
``hparams``         the run's tuned hyperparameters as canonical JSON (sorted keys, ``"{}"`` when absent),
                    e.g. ``{"learning_rate": 0.003}``; :func:`hparams_dict` decodes it
``n_eval_seeds``    evaluation seeds averaged inside the run (``details.n_eval_seeds``), or NaN
``role``            ``"student"`` | ``"teacher"`` | ``"init"`` (inferred from the recipe if absent)
``status``          the status written by the run (``"ok"`` | ``"failed"`` | anything else)
``error``           the run's error message, or ``None``
``failed``          bool: excluded from statistics (status not ``"ok"``, or a metric NaN/±inf or
                    not a number)
``failure``         why the row counts as failed (the run's error, or e.g.
                    ``"non-finite metric(s): kl_to_teacher=nan"``); ``None`` when not failed
``git_rev``         git revision, or ``None``
``device``          device string, or ``None``
``recipe_config``   the recipe configuration of the run (``config.recipe``, a dict) or ``None``
``metric:<name>``   one float column per metric name seen in any record (NaN where a record
                    lacks it or wrote ``null`` — ``null`` means "not applicable", not failure)
``cost:<name>``     one float column per cost name, same convention
==================  ==========================================================================

``versions`` and the suite configuration are not flattened (they are not statistics); read the record
file named in ``path`` for them.

Loading never stops at a bad file: unreadable, corrupt, partial (missing one of ``suite``, ``recipe``,
``seed``, ``eval_set``), non-object and duplicate records are skipped and described, each by file
name, in the ``problems`` list returned next to the table. :func:`load_record_list` reads exactly the
files (or already decoded dicts) it is given — no directory listing, no glob — and is what
:func:`harness.report.publish` uses.
"""

from __future__ import annotations

import glob
import json
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
    "hparams_dict",
    "hparams_label",
    "load_record_list",
    "load_records",
    "metric_names",
    "missing_runs",
    "parse_record",
    "records_frame",
]

log = logging.getLogger(__name__)

METRIC_PREFIX = "metric:"
COST_PREFIX = "cost:"
KEY_COLUMNS = ("suite", "recipe", "teacher_seed", "seed", "eval_set", "role", "phase", "hparams")
REQUIRED_KEYS = ("suite", "recipe", "seed", "eval_set")
BASE_COLUMNS = (
    "path", "suite", "recipe", "teacher_seed", "seed", "eval_set", "role", "phase", "hparams", "status",
    "error", "failed", "failure", "n_eval_seeds", "git_rev", "device", "recipe_config",
)
PHASES = ("final", "tune")
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


def _int_field(raw: dict[str, Any], key: str, default: int | None, where: str) -> int:
    value = raw.get(key, default)
    if value is None and default is not None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: {key} {value!r} is not an integer")
    try:
        as_float = float(value)
        as_int = int(as_float)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} {value!r} is not an integer") from None
    if as_int != as_float:
        raise ValueError(f"{where}: {key} {value!r} is not an integer")
    return as_int


def _hparams_json(raw: dict[str, Any], where: str) -> str:
    hp = raw.get("hparams")
    if hp is None:
        return "{}"
    if not isinstance(hp, dict):
        raise ValueError(f"{where}: 'hparams' must be a JSON object like {{\"learning_rate\": 0.003}}, "
                         f"got {type(hp).__name__}")
    for k, v in hp.items():
        if isinstance(v, (dict, list)):
            raise ValueError(f"{where}: hparams.{k} must be a number, string or boolean, got {v!r}")
    return json.dumps(hp, sort_keys=True)


def hparams_dict(text: str | None) -> dict[str, Any]:
    """Decode the ``hparams`` column (canonical JSON) back into a dict (``{}`` for empty/None)."""
    if not text or (isinstance(text, float) and math.isnan(text)):
        return {}
    return dict(json.loads(text))


def hparams_label(text: str | dict | None) -> str:
    """``'{"learning_rate": 0.003}'`` → ``"learning_rate=0.003"`` (``""`` when empty)."""
    hp = text if isinstance(text, dict) else hparams_dict(text)
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(hp.items()))


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
    seed = _int_field(raw, "seed", None, where)
    teacher_seed = _int_field(raw, "teacher_seed", 0, where)
    phase = str(raw.get("phase") or "final")
    if phase not in PHASES:
        raise ValueError(f"{where}: phase {phase!r} is not one of {', '.join(PHASES)} (absent means final)")
    hparams = _hparams_json(raw, where)
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

    details = raw.get("details") if isinstance(raw.get("details"), dict) else {}
    try:
        n_eval_seeds = float(details.get("n_eval_seeds")) if details.get("n_eval_seeds") is not None else math.nan
    except (TypeError, ValueError):
        n_eval_seeds = math.nan
    config = raw.get("config") if isinstance(raw.get("config"), dict) else {}
    recipe_config = config.get("recipe") if isinstance(config.get("recipe"), dict) else None
    row: dict[str, Any] = {
        "path": where,
        "suite": str(raw["suite"]),
        "recipe": recipe,
        "teacher_seed": teacher_seed,
        "seed": seed,
        "eval_set": str(raw["eval_set"]),
        "role": str(role),
        "phase": phase,
        "hparams": hparams,
        "status": status,
        "error": raw.get("error"),
        "n_eval_seeds": n_eval_seeds,
        "git_rev": raw.get("git_rev"),
        "device": raw.get("device"),
        "recipe_config": recipe_config,
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
    df["teacher_seed"] = df["teacher_seed"].astype("int64")
    df["n_eval_seeds"] = pd.to_numeric(df["n_eval_seeds"], errors="coerce").astype("float64")
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
    return _load(paths, problems)


def load_record_list(items: Sequence[str | os.PathLike | dict[str, Any]]) -> LoadedRecords:
    """Read exactly the given record files, or take already decoded record dicts (named
    ``<record #i>`` in messages, or by their own ``path`` key). No directory is listed and no pattern
    expanded: a directory in the list is reported as a problem. Otherwise as :func:`load_records`."""
    if isinstance(items, (str, os.PathLike, dict)):
        raise TypeError(
            f"expected a list of record files or record dicts, got a single {type(items).__name__} "
            f"{str(items)[:80]!r}; pass e.g. sorted(Path(d).glob('*.json')) after checking them")
    problems: list[str] = []
    sources: list[Path | tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            sources.append((str(item.get("path") or f"<record #{i}>"), item))
        elif isinstance(item, (str, os.PathLike)):
            p = Path(item)
            if p.is_dir():
                problems.append(f"{p}: is a directory, not a record file (list its files explicitly)")
            else:
                sources.append(p)
        else:
            problems.append(f"<record #{i}>: a {type(item).__name__}, expected a path or a dict")
    return _load(sources, problems)


def _load(sources: Sequence[Path | tuple[str, dict[str, Any]]], problems: list[str]) -> LoadedRecords:
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    for source in sources:
        path, raw = (source if isinstance(source, tuple) else (source, None))
        try:
            if raw is None:
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
    expected: Iterable[tuple[Any, ...]],
    df: pd.DataFrame,
) -> list[tuple[Any, ...]]:
    """The expected runs that have no final-phase record in ``df``.

    ``expected`` holds ``(recipe, seed, eval_set)`` triples (teacher seed 0) or ``(recipe, seed, eval_set,
    teacher_seed)`` quadruples; the result keeps each item's form and the order of ``expected``, without
    repeats. A run whose record exists but failed is *not* missing (the leaderboard lists it as failed).
    """
    final = df.loc[df["phase"] == "final"] if "phase" in df.columns else df
    teachers = final["teacher_seed"].astype(int) if "teacher_seed" in final.columns else [0] * len(final)
    have = set(zip(final["recipe"].astype(str), final["seed"].astype(int), final["eval_set"].astype(str),
                   teachers))
    out: list[tuple[Any, ...]] = []
    for item in expected:
        if len(item) not in (3, 4):
            raise ValueError(f"expected run {item!r}: give (recipe, seed, eval_set[, teacher_seed])")
        recipe, seed, eval_set = str(item[0]), int(item[1]), str(item[2])
        teacher = int(item[3]) if len(item) == 4 else 0
        key = (recipe, seed, eval_set) if len(item) == 3 else (recipe, seed, eval_set, teacher)
        if (recipe, seed, eval_set, teacher) not in have and key not in out:
            out.append(key)
    return out
