"""Fingerprints: a short hash of everything that determines a file the pipeline writes.

A run's result depends on the suite's sections that reach it, the recipe (and the source of every user
objective it names), the data, the teacher, the harness's code and the libraries' versions. Each step's
fingerprint hashes exactly those; it is

- a Snakemake ``params`` value of the step's rule, so a change of any input re-runs the step;
- stored in the checkpoint, so a run resumes only from a checkpoint made by the same inputs;
- stored in every record, so publishing takes only records made by the current plan.

Chain: ``data → tokenizer → teacher → (cache) → student_init(seed) → run(recipe, seed) → record(target, seed)``;
each fingerprint includes its parents', so a change upstream changes everything below it.

Code: :func:`code_digest` hashes the harness's source files (``.py``, ``.yaml``, ``.json`` under
``harness/``), except the reporting package, which only the leaderboard step depends on
(:func:`report_code_digest`). Library versions: :func:`library_versions`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
LIBRARIES = ("torch", "transformers", "tokenizers", "accelerate", "lm_eval", "evaluate", "rouge_score", "nltk",
             "numpy", "pandas", "scipy")


def digest(obj: Any, n: int = 16) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys), first ``n`` hex digits."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def file_digest(path: str | Path, n: int = 16) -> str:
    """SHA-256 of a file's bytes (a directory: of its files' relative names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:n]


def _tree_digest(root: Path, exclude: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if not f.is_file() or f.suffix not in (".py", ".yaml", ".json") or "__pycache__" in rel:
            continue
        if any(rel == e or rel.startswith(e + "/") for e in exclude):
            continue
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """The harness code that computes models and metrics (everything but ``report/``, the benchmarks, which no
    pipeline step runs: ``bench.py``, ``bench_cache.py``, and ``forkserver.py``, which only decides which process
    runs a step: a step writes the same bytes through the warm worker as in its own process, tested in
    tests/test_forkserver.py)."""
    return _tree_digest(PACKAGE, exclude=("report", "bench.py", "bench_cache.py", "forkserver.py"))


@lru_cache(maxsize=1)
def report_code_digest() -> str:
    """The reporting code (``harness/report``): an input of the leaderboard step only."""
    return _tree_digest(PACKAGE / "report")


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = "absent"
    return out


def source_digest(paths: list[str]) -> str:
    """Digest of a list of source files (a recipe and its user objective modules)."""
    return digest({Path(p).name + f"#{i}": file_digest(p) for i, p in enumerate(paths) if Path(p).exists()})


def model_source_digest(entry: dict) -> Any:
    """What identifies a model named by a suite entry: a hub id as written; a local directory by its files."""
    if entry.get("path") and Path(entry["path"]).is_dir():
        d = Path(entry["path"])
        return {"path": entry["path"], "files": {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}}
    return {k: entry.get(k) for k in ("hub", "path")}


def data_files_digest(spec: Any) -> Any:
    """Replace every local file path in a data specification by (path, digest), recursively."""
    if isinstance(spec, dict):
        out = {k: data_files_digest(v) for k, v in spec.items()}
        path = spec.get("path")
        if isinstance(path, str) and Path(path).exists():
            out["path_digest"] = file_digest(path)
        return out
    if isinstance(spec, list):
        return [data_files_digest(v) for v in spec]
    return spec


class Fingerprints:
    """The fingerprints of one suite's steps (computed from the suite and its recipes, not from outputs)."""

    def __init__(self, suite, recipes: dict | None = None):
        self.suite = suite
        self.recipes = recipes if recipes is not None else suite.recipes()
        self.env = {"code": code_digest(), "libraries": library_versions()}
        self._data = digest({"data": data_files_digest(suite.raw.get("data")), **self.env})

    def data(self) -> str:
        return self._data

    def tokenizer(self) -> str:
        return digest({"up": self._data, "tokenizer": self.suite.raw.get("tokenizer")})

    def teacher(self) -> str:
        t = self.suite.teacher
        return digest({"up": self.tokenizer(), "teacher": t, "model": model_source_digest(t),
                       "training": self.suite.raw.get("training"), "device": self.suite.device,
                       "teacher_seed": self.suite.teacher_seed})

    def for_teacher(self, seed: int | None) -> "Fingerprints":
        """The fingerprints of the runs that distil from teacher ``seed`` (None: the primary)."""
        if seed == self.suite.teacher_seed:
            return self
        return Fingerprints(self.suite.for_teacher(seed), self.recipes)

    def teachers(self) -> list["Fingerprints"]:
        return [self.for_teacher(t) for t in self.suite.teacher_seeds]

    def teacher_cache(self) -> str:
        return digest({"up": self.teacher(), "cache": self.suite.raw.get("teacher_cache"),
                       "training": self.suite.raw.get("training")})

    def student_init(self, seed: int) -> str:
        s = self.suite.student
        return digest({"up": self.tokenizer(), "student": s, "model": model_source_digest(s), "seed": seed,
                       "training": self.suite.raw.get("training"), "device": self.suite.device})

    def run(self, recipe: str, seed: int, lr_index: int | None = None) -> str:
        """A training run; ``lr_index``: a run of the search at that grid value. With a search in the suite, a
        final run's learning rate is the search's choice, a function of the search's records: their fingerprints
        stand for it."""
        r = self.recipes[recipe]
        body = {k: v for k, v in r.to_dict().items() if k not in ("path", "description", "reference", "name")}
        tuning = self.suite.tuning
        if lr_index is not None:
            hparams = {"learning_rate": tuning["learning_rate"][lr_index]}
        elif tuning:  # the search runs with the primary teacher; its choice holds for every teacher
            hparams = {"search": sorted(self.for_teacher(None).tuning_records(recipe).values())}
        else:
            hparams = None
        return digest({"hparams": hparams,"teacher": self.teacher() if r.uses_teacher else None,
                       "cache": self.teacher_cache() if r.uses_teacher and self.suite.teacher_cache else None,
                       "init": self.student_init(seed), "recipe": body, "sources": source_digest(r.source_files()),
                       "training": self.suite.raw.get("training"), "num_processes": self.suite.num_processes,
                       "threads": self.suite.threads_per_job, "seed": seed})

    def tuning_records(self, recipe: str) -> dict[tuple[int, int], str]:
        """``(grid index, seed) → fingerprint`` of the search's validation records of ``recipe``."""
        t = self.suite.tuning
        if not t:
            return {}
        if not self.suite.primary_teacher:
            return self.for_teacher(None).tuning_records(recipe)
        scoring = digest({"set": data_files_digest(t["set"]), "eval_seeds": t["eval_seeds"],
                          "evaluation": data_files_digest(self.suite.raw.get("evaluation")), **self.env})
        return {(i, s): digest({"up": self.run(recipe, s, lr_index=i), "scoring": scoring})
                for i in range(len(t["learning_rate"])) for s in t["seeds"]}

    def evaluation(self) -> str:
        return digest({"evaluation": data_files_digest(self.suite.raw.get("evaluation")), **self.env})

    def record(self, target: str, seed: int) -> str:
        """The fingerprint of the evaluation records of a target (a recipe, ``teacher`` or ``init``) and seed."""
        if target == "teacher":
            up = self.teacher()
        elif target == "init":
            up = self.student_init(seed)
        else:
            up = self.run(target, seed)
        return digest({"up": up, "teacher": self.teacher(), "evaluation": self.evaluation()})

    def expected_records(self) -> dict[tuple[str, int], str]:
        """``(target, seed) → fingerprint`` of every record the plan's leaderboard needs from this teacher (the
        untrained student's rows: with the primary teacher only)."""
        out = {(r, s): self.record(r, s) for r in self.recipes for s in self.suite.seeds}
        out[("teacher", 0)] = self.record("teacher", 0)
        if self.suite.primary_teacher:
            out.update({("init", s): self.record("init", s) for s in self.suite.seeds})
        return out

    def plan_digest(self) -> str:
        """One hash of the whole plan: every expected record's fingerprint, the suite's neutral keys that shape
        the leaderboard (baseline, sets), and the reporting code."""
        tuning = sorted(f"{r}/lr{i}/{s}/{fp}" for r in self.recipes for (i, s), fp in self.tuning_records(r).items())
        records = sorted(f"{f.suite.teacher_seed}/{t}/{s}/{fp}" for f in self.teachers()
                         for (t, s), fp in f.expected_records().items())
        return digest({"records": records,
                       "tuning": tuning,
                       "baseline": self.suite.baseline, "report": report_code_digest(),
                       "primary": self.suite.evaluation["primary_metric"]})
