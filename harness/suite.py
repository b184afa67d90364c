"""Suites (``config/<suite>.yaml``): everything a comparison holds fixed across its recipes.

Models, tokenizer, data, evaluation sets, budgets, seeds and the list of recipes. A recipe can change only
its objective, parameters, mode and KD weight (:mod:`harness.recipes`), so fairness is structural: every
run of a suite reads its data order, step count, batch size, seeds and evaluation from here.

Paths in a suite file are relative to the current directory (the repository root under Snakemake);
``${SHARED_DATA}`` expands to ``$DISTILLBENCH_SHARED_DATA`` (default ``../shared/data``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .distill import TrainConfig
from .recipes import Recipe, discover
from .schema import ConfigError, Field, check, read_yaml

#: the suite's ``training:`` keys are TrainConfig's fields (the device comes from the suite's ``device``)
TRAIN_FIELDS = {
    name: Field((int, type(None)) if name == "chunk_size" else (type(default),), default)
    for name, default in TrainConfig().__dict__.items() if name != "device"
}

MODEL_SCHEMA = {
    "arch": Field((str,), None, choices=("gpt2", "llama")),
    "n_layer": Field((int,), None),
    "n_embd": Field((int,), None),
    "n_head": Field((int,), None),
    "intermediate": Field((int,), None),
    "path": Field((str,), None, help="local directory of a saved causal LM (wins over hub)"),
    "hub": Field((str,), None, help="Hugging Face hub id (needs a network)"),
    "dtype": Field((str,), "auto", choices=("auto", "float32", "bfloat16", "float16")),
    "pretrain": Field((dict,), None, help="training budget when the harness trains this model itself"),
}

DATA_SCHEMA = {
    "kind": Field((str,), "tiny", choices=("tiny", "instruct")),
    "seed": Field((int,), 0),
    "prompt_style": Field((str,), "alpaca", choices=("alpaca", "short"), help="tiny: prompt template"),
    "sizes": Field((dict,), None, help="tiny: {train, valid, test} item counts"),
    "train": Field((dict,), None, help="instruct: {path: file.jsonl} or {hub: id, split: name}"),
    "valid": Field((dict,), None),
    "test": Field((dict,), None),
    "max_train_items": Field((int, type(None)), None),
}

TOKENIZER_SCHEMA = {
    "vocab_size": Field((int,), 1000, help="size of a tokenizer trained on the training data"),
    "path": Field((str,), None, help="use a saved tokenizer (local dir) instead"),
    "hub": Field((str,), None),
}

EVAL_SCHEMA = {
    "sets": Field((list,), required=True, help="list of {name, path | hub, split}"),
    "seeds": Field((list,), [10, 20, 30, 40, 50]),
    "do_sample": Field((bool,), True),
    "temperature": Field((float,), 1.0),
    "top_p": Field((float,), 1.0),
    "top_k": Field((int,), 0),
    "no_repeat_ngram_size": Field((int,), 6),
    "max_prompt_tokens": Field((int,), 256),
    "max_length": Field((int,), 512),
    "max_new_tokens": Field((int, type(None)), None),
    "max_items": Field((int, type(None)), None, help="evaluate on the first N items of each set"),
    "batch_size": Field((int,), 32),
    "coverage_samples": Field((int,), 0, help="extra samples per several-answer item for coverage"),
    "lm_eval": Field((dict,), None, help="{tasks: {name: set}, standard: [...], limit: N}"),
    "primary_metric": Field((str,), "rougeL"),
}

SUITE_SCHEMA = {
    "suite": Field((str,), required=True),
    "description": Field((str,), ""),
    "workdir": Field((str,), None, help="intermediate artefacts (default work/<suite>)"),
    "results": Field((str,), None, help="published tables and plots (default results/<suite>)"),
    "recipes_dir": Field((str,), "recipes"),
    "recipes": Field((list, type(None)), None, help="recipe names; null = every recipe in recipes_dir"),
    "baseline": Field((str,), "sft"),
    "seeds": Field((list,), [1, 2, 3]),
    "device": Field((str,), "auto"),
    "num_processes": Field((int,), 1, help="processes per distill run (accelerate launch when > 1)"),
    "threads_per_job": Field((int,), 1),
    "teacher_cache": Field((dict, type(None)), None, help="{mode: exact | sparse, top_k: N}"),
    "data": Field((dict,), required=True),
    "tokenizer": Field((dict,), None),
    "teacher": Field((dict,), required=True),
    "student": Field((dict,), required=True),
    "training": Field((dict,), None),
    "evaluation": Field((dict,), required=True),
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
    teacher_cache: dict | None
    data: dict
    tokenizer: dict
    teacher: dict
    student: dict
    training: TrainConfig
    evaluation: dict
    raw: dict = field(repr=False, default_factory=dict)

    def recipes(self) -> dict[str, Recipe]:
        return discover(self.recipes_dir, self.recipe_names)

    # --- where each step writes (the Snakefile uses the same layout) ---
    def data_path(self, split: str) -> Path:
        return self.workdir / "data" / f"{split}.jsonl"

    @property
    def tokenizer_dir(self) -> Path:
        return self.workdir / "tokenizer"

    @property
    def teacher_dir(self) -> Path:
        return self.workdir / "teacher"

    def student_init_dir(self, seed: int) -> Path:
        return self.workdir / "student_init" / f"seed{seed}"

    def run_dir(self, recipe: str, seed: int) -> Path:
        return self.workdir / "runs" / recipe / f"seed{seed}"

    @property
    def records_dir(self) -> Path:
        return self.workdir / "records"

    @property
    def cache_path(self) -> Path:
        return self.workdir / "teacher_cache.pt"


def load_suite(path: str | Path) -> Suite:
    """Load and validate a suite file; errors name the file and key."""
    path = Path(path)
    where = str(path)
    raw = _expand(read_yaml(path))
    top = check(raw, SUITE_SCHEMA, where)
    data = check(top["data"], DATA_SCHEMA, where, "data.")
    tokenizer = check(top["tokenizer"] or {}, TOKENIZER_SCHEMA, where, "tokenizer.")
    teacher = check(top["teacher"], MODEL_SCHEMA, where, "teacher.")
    student = check(top["student"], MODEL_SCHEMA, where, "student.")
    training = TrainConfig(**check(top["training"] or {}, TRAIN_FIELDS, where, "training."))
    evaluation = check(top["evaluation"], EVAL_SCHEMA, where, "evaluation.")
    for role, model in (("teacher", teacher), ("student", student)):
        if not (model["path"] or model["hub"] or model["arch"]):
            raise ConfigError(f"{where}: key {role!r} needs one of 'arch' (tiny model), 'path' or 'hub'")
        if model["arch"] and not model["path"] and not model["hub"]:
            for key in ("n_layer", "n_embd", "n_head"):
                if model[key] is None:
                    raise ConfigError(f"{where}: key '{role}.{key}' is required for arch {model['arch']!r}")
    for i, entry in enumerate(evaluation["sets"]):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{where}: key 'evaluation.sets[{i}]' must be a mapping with a 'name'")
    if not top["seeds"] or not all(isinstance(s, int) for s in top["seeds"]):
        raise ConfigError(f"{where}: key 'seeds' must be a non-empty list of integers")
    name = top["suite"]
    return Suite(
        name=name, path=str(path),
        workdir=Path(top["workdir"] or f"work/{name}"), results=Path(top["results"] or f"results/{name}"),
        recipes_dir=Path(top["recipes_dir"]), recipe_names=top["recipes"], baseline=top["baseline"],
        seeds=list(top["seeds"]), device=top["device"], num_processes=top["num_processes"],
        threads_per_job=top["threads_per_job"], teacher_cache=top["teacher_cache"], data=data,
        tokenizer=tokenizer, teacher=teacher, student=student, training=training, evaluation=evaluation,
        raw=raw,
    )
