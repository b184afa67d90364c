"""Suites (``config/<suite>.yaml``): everything a comparison holds fixed across its recipes.

Models, tokenizer, data, evaluation sets, budgets, seeds and the list of recipes. A recipe can change only
its objective, parameters, mode and KD weight (:mod:`harness.recipes`), so fairness is structural: every
run of a suite reads its data order, step count, batch size, seeds and evaluation from here.

Paths in a suite file are relative to the current directory (the repository root under Snakemake);
``${SHARED_DATA}`` expands to ``$DISTILLBENCH_SHARED_DATA`` (default ``../shared/data``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from .train_config import TrainConfig
from .recipes import Recipe, discover
from .schema import ConfigError, Field, check, read_yaml
from .cache_schema import CACHE_SCHEMA

#: the suite's ``training:`` keys are TrainConfig's fields (the device comes from the suite's ``device``)
_TRAIN_LIMITS = {
    "max_steps": dict(ge=1, help="optimizer steps of every run"),
    "per_device_train_batch_size": dict(ge=1, help="sequences per micro-batch (per process)"),
    "gradient_accumulation_steps": dict(ge=1, help="micro-batches per optimizer step"),
    "learning_rate": dict(gt=0, help="peak AdamW learning rate (cosine schedule with warmup)"),
    "weight_decay": dict(ge=0, help="AdamW weight decay of matrices"),
    "warmup_ratio": dict(ge=0, le=1, help="share of steps with linear warmup"),
    "max_grad_norm": dict(gt=0, help="gradient clipping norm"),
    "max_length": dict(ge=2, help="tokens per training sequence, prompt + response"),
    "max_prompt_tokens": dict(ge=1, help="prompt budget; longer training prompts are dropped (MiniLLM)"),
    "chunk_size": dict(ge=1, help="positions per loss chunk (null: dense)"),
    "kernel": dict(choices=("auto", "triton", "torch"),
                   help="loss kernels: auto = fused Triton forward+backward on CUDA, PyTorch elsewhere (same values)"),
    "max_new_tokens": dict(ge=1, help="sampling budget of the modes that generate (null: up to max_length)"),
    "teacher_prefix_mb": dict(ge=0, help="MiB for a live teacher's cached prompt keys and values, reused by the "
                              "runs of a process (harness.teacher_prefix); used only when all training prompts fit; 0: off"),
    "checkpoint_every": dict(ge=0, help="optimizer steps between resumable checkpoints (0: none)"),
    "log_every": dict(ge=1, help="optimizer steps between logged losses"),
    "report_to": dict(choices=("none", "tensorboard"), help="live training curves: tensorboard writes "
                      "<run dir>/tensorboard (pip install -e '.[tensorboard]'; tensorboard --logdir work/<suite>/runs)"),
}
TRAIN_FIELDS = {
    name: Field((int, type(None)) if name in ("chunk_size", "max_new_tokens") else (type(default),), default,
                **_TRAIN_LIMITS.get(name, {}))
    for name, default in TrainConfig().__dict__.items() if name != "device"
}

MODEL_SCHEMA = {
    "arch": Field((str,), None, choices=("gpt2", "llama"), help="a tiny model built here with this architecture"),
    "n_layer": Field((int,), None, ge=1),
    "n_embd": Field((int,), None, ge=1),
    "n_head": Field((int,), None, ge=1),
    "intermediate": Field((int,), None, ge=1),
    "path": Field((str,), None, help="local directory of a saved causal LM (wins over hub)"),
    "hub": Field((str,), None, help="Hugging Face hub id (needs a network)"),
    "dtype": Field((str,), "auto", choices=("auto", "float32", "bfloat16", "float16")),
    "pretrain": Field((dict,), None, help="training budget when the harness trains this model itself"),
    "tokenizer": Field((dict, type(None)), None,
                       help="student only: its own tokenizer (see student.tokenizer:); default: the suite's "
                            "tokenizer, the teacher's"),
}

DATA_SCHEMA = {
    "kind": Field((str,), "tiny", choices=("tiny", "instruct"), help="tiny: generated here; instruct: files or Hub"),
    "seed": Field((int,), 0, help="tiny: seed of the data generator"),
    "prompt_style": Field((str,), "alpaca", choices=("alpaca", "short"), help="tiny: prompt template"),
    "sizes": Field((dict,), None, help="tiny: {train, valid, test} item counts"),
    "train": Field((dict,), None, help="instruct: a set entry {path | hub + file, select, ...} (see below)"),
    "valid": Field((dict,), None, help="instruct: the validation set (adaptive modes, model selection)"),
    "test": Field((dict,), None, help="instruct: unused (evaluation sets are under evaluation.sets)"),
    "max_train_items": Field((int, type(None)), None),
}

TOKENIZER_SCHEMA = {
    "vocab_size": Field((int,), 1000, ge=16, help="size of a tokenizer trained on the training data"),
    "path": Field((str,), None, help="use a saved tokenizer (local dir) instead"),
    "hub": Field((str,), None, help="a tokenizer's Hugging Face hub id (needs a network)"),
}

#: ``student.tokenizer``: a student with its own tokenizer (cross-tokenizer distillation, harness.cross_tokenizer)
STUDENT_TOKENIZER_SCHEMA = {
    **TOKENIZER_SCHEMA,
    "vocab_size": Field((int,), 1000, ge=259, help="size of the student's tokenizer trained on the training data"),
    "alignment": Field((str,), "index", choices=("index", "text"),
                       help="pairing of response positions across tokenizers: index (in order, truncated to the "
                            "shorter answer: released ULD) or text (GOLD's groups at shared byte boundaries)"),
}

EVAL_SCHEMA = {
    "sets": Field((list,), required=True, min_len=1, help="list of set entries {name, path | hub + file | split, ...}"),
    "seeds": Field((list,), [10, 20, 30, 40, 50], min_len=1, help="evaluation (sampling) seeds; the mean is reported"),
    "do_sample": Field((bool,), True, help="sample (MiniLLM's protocol) or decode greedily"),
    "temperature": Field((float,), 1.0, gt=0, help="sampling temperature"),
    "top_p": Field((float,), 1.0, gt=0, le=1, help="nucleus sampling mass"),
    "top_k": Field((int,), 0, ge=0, help="top-k sampling (0: off)"),
    "no_repeat_ngram_size": Field((int,), 6, ge=0, help="0: off"),
    "max_prompt_tokens": Field((int,), 256, ge=1, help="prompt budget at evaluation"),
    "max_length": Field((int,), 512, ge=2, help="prompt + response budget at evaluation"),
    "max_new_tokens": Field((int, type(None)), None, ge=1, help="null: up to max_length"),
    "max_items": Field((int, type(None)), None, ge=1, help="evaluate on the first N items of each set"),
    "batch_size": Field((int,), 32, ge=1, help="sequences per generation batch"),
    "coverage_samples": Field((int,), 0, ge=0, help="extra samples per several-answer item for coverage"),
    "lm_eval": Field((dict, type(None)), None, help="{tasks: [{name, set, kind: mc|gen}], standard: [...], limit: N}"),
    "primary_metric": Field((str,), "rougeL", help="the metric that ranks the leaderboard"),
}

TUNING_SCHEMA = {
    "learning_rate": Field((list,), required=True, min_len=2,
                           help="the learning-rate grid every recipe is searched over (the same for all)"),
    "seeds": Field((list,), None, min_len=1, help="training seeds of the search (default: the suite's first seed)"),
    "eval_seeds": Field((list,), None, min_len=1, help="evaluation seeds of the search (default: the first one)"),
    "set": Field((dict,), None, help="the validation set the search is scored on (default: the suite's valid split); "
                                      "never a test set"),
}

LM_EVAL_SCHEMA = {
    "tasks": Field((list,), [], help="tasks built from evaluation sets: [{name, set, kind: mc | gen}]"),
    "standard": Field((list,), [], help="lm-eval's own task names (need their data: Hub or cache)"),
    "limit": Field((int, type(None)), None, ge=1, help="documents per task"),
}
LM_EVAL_TASK_SCHEMA = {
    "name": Field((str,), required=True, help="task name (letters, digits, _)"),
    "set": Field((str,), required=True, help="the evaluation set (evaluation.sets[].name) it is built from"),
    "kind": Field((str,), required=True, choices=("mc", "mc_skills", "gen"),
                  help="mc: the set's own choices; mc_skills: choices built from one-answer skill items; gen: generate"),
}

SUITE_SCHEMA = {
    "suite": Field((str,), required=True, help="the suite's name (work/<suite>, results/<suite>)"),
    "description": Field((str,), "", help="what the comparison is, in a sentence or two"),
    "workdir": Field((str,), None, help="intermediate artefacts (default work/<suite>)"),
    "results": Field((str,), None, help="published tables and plots (default results/<suite>)"),
    "recipes_dir": Field((str,), "recipes", help="directory of recipe files, relative to where you run"),
    "recipes": Field((list, type(None)), None, help="recipe names; null = every recipe in recipes_dir"),
    "baseline": Field((str,), "sft", help="the recipe every other is compared with (paired differences)"),
    "seeds": Field((list,), [1, 2, 3], min_len=1, help="training seeds: the initial student and data order"),
    "teacher_seeds": Field((list,), [0], min_len=1,
                           help="seeds of the teachers trained here (init and data order); every final run is repeated "
                                "with each, so the leaderboard says whether the ranking holds across teachers. The "
                                "first is the primary teacher: the search, the untrained student's row and the "
                                "published plots use it"),
    "device": Field((str,), "auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps"),
    "num_processes": Field((int,), 1, ge=1, help="processes per distill run (accelerate launch when > 1)"),
    "distill_jobs": Field((str,), "per_run", choices=("per_run", "per_recipe"),
                          help="per_run: one job per (recipe, seed), parallel on GPUs/clusters; per_recipe: one job "
                               "trains every seed of a recipe (start-up paid once: small models on a CPU)"),
    "threads_per_job": Field((int,), 1, ge=1, help="torch CPU threads per job"),
    "teacher_cache": Field((dict, type(None)), None, help="{mode: exact | sparse | sampled, top_k, samples, temperature, seed, dtype, batch_size}"),
    "origin": Field((str,), None, help="(written by the Snakefile) the suite file this resolved copy came from"),
    "data": Field((dict,), required=True, help="training data (see data:)"),
    "tokenizer": Field((dict,), None, help="trained here, or a saved one (see tokenizer:)"),
    "teacher": Field((dict,), required=True, help="the teacher model (see teacher:)"),
    "student": Field((dict,), required=True, help="the initial student (see student:)"),
    "training": Field((dict,), None, help="budgets shared by every recipe (see training:)"),
    "evaluation": Field((dict,), required=True, help="evaluation sets and protocol (see evaluation:)"),
    "tuning": Field((dict, type(None)), None, help="an equal hyperparameter search for every recipe, selected on "
                                                    "the validation split by the primary metric (see tuning:)"),
}


def _expand(value: Any) -> Any:
    shared = os.environ.get("DISTILLBENCH_SHARED_DATA", "../shared/data")
    if isinstance(value, str):
        return value.replace("${SHARED_DATA}", shared)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


@dataclass
class Suite:
    name: str
    path: str
    workdir: Path
    results: Path
    recipes_dir: Path
    recipe_names: list[str] | None
    baseline: str
    seeds: list[int]
    device: str
    num_processes: int
    threads_per_job: int
    distill_jobs: str
    tuning: dict | None
    teacher_cache: dict | None
    data: dict
    tokenizer: dict
    teacher: dict
    student: dict
    training: TrainConfig
    evaluation: dict
    raw: dict = field(repr=False, default_factory=dict)
    origin: str = ""  # the user's suite file (errors name it)
    teacher_seeds: list[int] = field(default_factory=lambda: [0])
    teacher_seed: int | None = None  # the teacher this view of the suite distils from (None: the primary)

    def __post_init__(self):
        if self.teacher_seed is None:
            self.teacher_seed = self.teacher_seeds[0]

    def recipes(self) -> dict[str, Recipe]:
        return discover(self.recipes_dir, self.recipe_names)

    # --- teachers: the primary keeps the plain layout; another teacher's outputs carry its seed ---
    @property
    def primary_teacher(self) -> bool:
        return self.teacher_seed == self.teacher_seeds[0]

    def for_teacher(self, seed: int | None) -> "Suite":
        """This suite as seen by the runs that distil from teacher ``seed`` (None: the primary teacher)."""
        if seed is not None and seed not in self.teacher_seeds:
            raise ConfigError(f"{self.origin}: teacher seed {seed} is not in 'teacher_seeds' {self.teacher_seeds}")
        return replace(self, teacher_seed=self.teacher_seeds[0] if seed is None else int(seed))

    def teachers(self) -> list["Suite"]:
        """One view per teacher seed, the primary first."""
        return [self.for_teacher(t) for t in self.teacher_seeds]

    @property
    def _tsuffix(self) -> str:
        return "" if self.primary_teacher else f"-teacher{self.teacher_seed}"

    @cached_property
    def _teacher_free(self) -> set[str]:
        return {name for name, r in self.recipes().items() if not r.uses_teacher}

    # --- where each step writes (the Snakefile uses the same layout) ---
    def data_path(self, split: str) -> Path:
        return self.workdir / "data" / f"{split}.jsonl"

    @property
    def tokenizer_dir(self) -> Path:
        return self.workdir / "tokenizer"

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the student has its own tokenizer (``student.tokenizer``; see harness.cross_tokenizer)."""
        return self.student.get("tokenizer") is not None

    @property
    def student_tokenizer_dir(self) -> Path:
        """The student's tokenizer: its own (``workdir/student_tokenizer``) or the suite's (the teacher's)."""
        return self.workdir / "student_tokenizer" if self.cross_tokenizer else self.tokenizer_dir

    @property
    def teacher_dir(self) -> Path:
        return self.workdir / ("teacher" if self.primary_teacher else f"teacher{self.teacher_seed}")

    def student_init_dir(self, seed: int) -> Path:
        return self.workdir / "student_init" / f"seed{seed}"

    def run_dir(self, recipe: str, seed: int) -> Path:
        """A final run. A recipe that does not use the teacher has one run per seed, whatever the teacher."""
        shared = self.primary_teacher or recipe in self._teacher_free
        return self.workdir / ("runs" if shared else f"runs{self._tsuffix}") / recipe / f"seed{seed}"

    @property
    def records_dir(self) -> Path:
        return self.workdir / f"records{self._tsuffix}"

    @property
    def cache_path(self) -> Path:
        return self.workdir / f"teacher_cache{self._tsuffix}.pt"

    def tune_run_dir(self, recipe: str, index: int, seed: int) -> Path:
        """A run of the hyperparameter search: grid value ``index`` of ``tuning.learning_rate``."""
        return self.workdir / "tuning" / recipe / f"lr{index}" / f"seed{seed}"

    def chosen_path(self, recipe: str) -> Path:
        """The search's choice for ``recipe`` (``{"learning_rate": ..., "scores": ...}``)."""
        return self.workdir / "tuning" / recipe / "chosen.json"

    @property
    def leaderboard_dir(self) -> Path:
        """Where a run writes its leaderboard; ``results`` is where ``distillbench publish`` copies it."""
        return self.workdir / "leaderboard"


DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def load_suite(path: str | Path) -> Suite:
    """Load and validate a suite file; errors name the file (the user's, for a resolved copy) and key."""
    path = Path(path)
    raw = _expand(read_yaml(path))
    where = str(raw.get("origin") or path)
    top = check(raw, SUITE_SCHEMA, where)
    data = check(top["data"], DATA_SCHEMA, where, "data.")
    tokenizer = check(top["tokenizer"] or {}, TOKENIZER_SCHEMA, where, "tokenizer.")
    teacher = check(top["teacher"], MODEL_SCHEMA, where, "teacher.")
    student = check(top["student"], MODEL_SCHEMA, where, "student.")
    training = TrainConfig(**check(top["training"] or {}, TRAIN_FIELDS, where, "training."))
    evaluation = check(top["evaluation"], EVAL_SCHEMA, where, "evaluation.")
    cache = check(top["teacher_cache"], CACHE_SCHEMA, where, "teacher_cache.") if top["teacher_cache"] is not None else None
    if not DEVICE_RE.match(top["device"]):
        raise ConfigError(f"{where}: key 'device' has value {top['device']!r}; accepted: auto, cpu, cuda, cuda:N, mps")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", top["suite"]):
        raise ConfigError(f"{where}: key 'suite' has value {top['suite']!r}; use letters, digits, '_', '-', '.'")
    if teacher["tokenizer"] is not None:
        raise ConfigError(f"{where}: key 'teacher.tokenizer': the teacher's tokenizer is the suite's 'tokenizer:'; "
                          "only the student may have its own ('student.tokenizer')")
    if student["tokenizer"] is not None:
        student["tokenizer"] = check(student["tokenizer"], STUDENT_TOKENIZER_SCHEMA, where, "student.tokenizer.")
    for role, model in (("teacher", teacher), ("student", student)):
        if not (model["path"] or model["hub"] or model["arch"]):
            raise ConfigError(f"{where}: key {role!r} needs one of 'arch' (tiny model), 'path' or 'hub'")
        if model["arch"] and not model["path"] and not model["hub"]:
            for key in ("n_layer", "n_embd", "n_head"):
                if model[key] is None:
                    raise ConfigError(f"{where}: key '{role}.{key}' is required for arch {model['arch']!r}")
    if training.max_prompt_tokens >= training.max_length:
        raise ConfigError(f"{where}: key 'training.max_prompt_tokens' ({training.max_prompt_tokens}) must be below "
                          f"'training.max_length' ({training.max_length}), or no response token would be trained")
    if data["kind"] == "tiny":
        sizes = data["sizes"] or {}
        for split in ("train", "valid", "test"):
            if split in sizes and (not isinstance(sizes[split], int) or isinstance(sizes[split], bool) or sizes[split] < 1):
                raise ConfigError(f"{where}: key 'data.sizes.{split}' must be an integer >= 1, got {sizes[split]!r}")
    from .data.instruct import check_set_spec

    if data["kind"] == "instruct":
        for split in ("train", "valid"):
            if data[split] is not None:
                check_set_spec(data[split], where, f"data.{split}", default_name=split)
    names = []
    for i, entry in enumerate(evaluation["sets"]):
        if isinstance(entry, dict):
            check_set_spec(entry, where, f"evaluation.sets[{i}]")
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ConfigError(f"{where}: key 'evaluation.sets[{i}]' must be a mapping with a non-empty 'name'")
        if entry["name"] in names:
            raise ConfigError(f"{where}: key 'evaluation.sets[{i}].name': {entry['name']!r} is used twice; "
                              "evaluation set names must be unique")
        names.append(entry["name"])
    for key in ("seeds",):
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in evaluation[key]):
            raise ConfigError(f"{where}: key 'evaluation.{key}' must be a non-empty list of integers, got {evaluation[key]!r}")
    if len(set(evaluation["seeds"])) != len(evaluation["seeds"]):
        raise ConfigError(f"{where}: key 'evaluation.seeds' lists a seed twice: {evaluation['seeds']!r}")
    lm = check(evaluation["lm_eval"] or {}, LM_EVAL_SCHEMA, where, "evaluation.lm_eval.")
    for i, task in enumerate(lm["tasks"]):
        t = check(task, LM_EVAL_TASK_SCHEMA, where, f"evaluation.lm_eval.tasks[{i}].")
        if t["set"] not in names:
            raise ConfigError(f"{where}: key 'evaluation.lm_eval.tasks[{i}].set' names {t['set']!r}, which is not an "
                              f"evaluation set; sets: {', '.join(names)}")
    tseeds = top["teacher_seeds"]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in tseeds) or len(set(tseeds)) != len(tseeds):
        raise ConfigError(f"{where}: key 'teacher_seeds' must be a list of distinct integers >= 0, got {tseeds!r}")
    if len(tseeds) > 1 and (teacher["path"] or teacher["hub"]) and not teacher["pretrain"]:
        raise ConfigError(f"{where}: key 'teacher_seeds' lists {len(tseeds)} seeds, but the teacher is an existing "
                          "model used as it is (no 'teacher.pretrain'): every seed would be the same teacher; use "
                          "one seed, or fine-tune the teacher here")
    seeds = top["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where}: key 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: key 'seeds' lists a seed twice: {seeds!r}")
    if top["recipes"] is not None and (not top["recipes"] or not all(isinstance(r, str) and r for r in top["recipes"])):
        raise ConfigError(f"{where}: key 'recipes' must be null (every recipe) or a non-empty list of recipe names, "
                          f"got {top['recipes']!r}")
    tuning = None
    if top["tuning"] is not None:
        tuning = check(top["tuning"], TUNING_SCHEMA, where, "tuning.")
        grid = tuning["learning_rate"]
        lr_field = Field((float,), gt=0, help="a learning rate")
        from .schema import check_value

        grid = [check_value(v, lr_field, where, f"tuning.learning_rate[{i}]") for i, v in enumerate(grid)]
        if len(set(grid)) != len(grid):
            raise ConfigError(f"{where}: key 'tuning.learning_rate' lists a value twice: {grid!r}")
        for key in ("seeds", "eval_seeds"):
            values = tuning[key]
            if values is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"{where}: key 'tuning.{key}' must be a list of integers, got {values!r}")
        tset = tuning["set"] or {"name": "valid", "split": "valid"}
        check_set_spec(tset, where, "tuning.set")
        if tset.get("name") in names and tset.get("name") != "valid":
            raise ConfigError(f"{where}: key 'tuning.set' names {tset['name']!r}, an evaluation set: the search must "
                              "be scored on a validation set, never on a set the leaderboard reports")
        tuning = {"learning_rate": grid, "seeds": tuning["seeds"] or [seeds[0]],
                  "eval_seeds": tuning["eval_seeds"] or evaluation["seeds"][:1], "set": tset}
    name = top["suite"]
    return Suite(
        name=name, path=str(path),
        workdir=Path(top["workdir"] or f"work/{name}"), results=Path(top["results"] or f"results/{name}"),
        recipes_dir=Path(top["recipes_dir"]), recipe_names=top["recipes"], baseline=top["baseline"],
        seeds=list(seeds), device=top["device"], num_processes=top["num_processes"],
        threads_per_job=top["threads_per_job"], distill_jobs=top["distill_jobs"], tuning=tuning, teacher_cache=cache, data=data,
        tokenizer=tokenizer, teacher=teacher, student=student, training=training, evaluation=evaluation,
        raw=raw, origin=where, teacher_seeds=list(tseeds),
    )
