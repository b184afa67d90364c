"""One function per pipeline step (= one Snakemake rule = one CLI subcommand).

data → tokenizer → teacher → student init → [teacher cache] → distill {recipe} × {seed} → evaluate → publish.
Each step reads the suite and the files of earlier steps and writes its own files under the suite's
``workdir`` (or ``results`` for publish), atomically, so an interrupted pipeline resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import torch

from . import __version__
from .data import batching
from .data.instruct import filter_long_prompts, load_eval_set, load_jsonl, write_jsonl_atomic
from .data.tokenizer import item_texts, load_tokenizer, train_tokenizer
from .data.tiny import write_tiny
from .distill import TrainConfig, TrainResult, batch_order, train
from .io import read_json, write_json_atomic
from .models import build_tiny, check_same_tokenizer, load_model, resolve_device
from .objectives import get as get_objective
from .recipes import Recipe
from .suite import Suite

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- helpers
def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import transformers

    return {"harness": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _model_source(entry: dict, default_dir: Path) -> str:
    """Where to load a model from: the local path wins over the hub id; a tiny model lives in default_dir."""
    return entry["path"] or entry["hub"] or str(default_dir)


def train_items(suite: Suite) -> list[dict]:
    return load_jsonl(suite.data_path("train"), name="train")


@lru_cache(maxsize=4)
def _encoded_train(suite_path: str, tokenizer_dir: str, max_prompt: int, max_length: int,
                   data_file: str) -> list[dict]:
    tokenizer = load_tokenizer(tokenizer_dir)
    return [batching.encode(tokenizer, item, max_prompt, max_length) for item in load_jsonl(data_file, name="train")]


def encoded_train(suite: Suite) -> list[dict]:
    cfg = suite.training
    return _encoded_train(suite.path, str(suite.tokenizer_dir), cfg.max_prompt_tokens, cfg.max_length,
                          str(suite.data_path("train")))


def reference_batches(suite: Suite, examples: list[dict], pad_id: int, seed: int):
    """``next_batch(i)``: the i-th reference micro-batch; order fixed by the training seed, not the recipe."""
    bs = suite.training.per_device_train_batch_size

    def next_batch(i: int) -> dict:
        idx = batch_order(len(examples), bs, seed, i)
        batch = batching.collate([examples[j] for j in idx], pad_id)
        batch["example_ids"] = torch.tensor(idx)
        return batch

    return next_batch


# ----------------------------------------------------------------------------------------------- steps
def prepare_data(suite: Suite) -> dict[str, Path]:
    """Write train/valid/test JSONL in the shared schema under ``workdir/data``."""
    out = suite.data_path("train").parent
    if suite.data["kind"] == "tiny":
        return write_tiny(out, seed=suite.data["seed"], sizes=suite.data["sizes"], prompt_style=suite.data["prompt_style"])
    paths = {}
    for split in ("train", "valid"):
        spec = suite.data[split]
        if spec is None:
            continue
        items = load_eval_set({"name": split, **spec})
        if split == "train" and suite.data["max_train_items"]:
            items = items[: suite.data["max_train_items"]]
        paths[split] = write_jsonl_atomic(suite.data_path(split), items)
    return paths


def prepare_tokenizer(suite: Suite):
    """Train the suite's tokenizer on the training data, or save the named one, into ``workdir/tokenizer``."""
    spec = suite.tokenizer
    if spec["path"] or spec["hub"]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec["path"] or spec["hub"])
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(str(suite.tokenizer_dir))
        return tok
    items = train_items(suite)
    if suite.data["kind"] != "tiny":
        return train_tokenizer(item_texts(items) + item_texts(
            sum((load_eval_set(s) for s in suite.evaluation["sets"]), []), include_responses=False),
            spec["vocab_size"], suite.tokenizer_dir)  # evaluation prompts, never their answers
    return train_tokenizer(item_texts(items), spec["vocab_size"], suite.tokenizer_dir)


def _special_ids(tok) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _max_positions(suite: Suite) -> int:
    return max(suite.training.max_length, suite.evaluation["max_length"])


def prepare_teacher(suite: Suite, progress: bool = True) -> Path:
    """Pre-train the tiny teacher with the same loop (objective ``ce``), or point to an existing one."""
    out = suite.teacher_dir
    marker = out / "teacher.json"
    tok = load_tokenizer(suite.tokenizer_dir)
    if not suite.teacher["arch"] or suite.teacher["path"] or suite.teacher["hub"]:
        source = _model_source(suite.teacher, out)
        write_json_atomic(marker, {"source": source, "trained_here": False})
        return marker
    device = resolve_device(suite.device)
    model = build_tiny(suite.teacher, len(tok), seed=0, max_positions=_max_positions(suite),
                       special_ids=_special_ids(tok))
    pre = dict(suite.teacher["pretrain"] or {})
    cfg = TrainConfig(**{**suite.training.__dict__, **pre, "device": device, "chunk_size": None})
    examples = encoded_train(suite)
    result = train(model, reference_batches(suite, examples, tok.pad_token_id, seed=0), cfg, seed=0,
                   objective=get_objective("ce"), name="teacher", progress=progress)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_json_atomic(marker, {"source": str(out), "trained_here": True, "costs": result.costs(),
                               "curve": result.curve, "train_config": cfg.__dict__})
    return marker


def teacher_source(suite: Suite) -> str:
    return read_json(suite.teacher_dir / "teacher.json")["source"]


def init_student(suite: Suite, seed: int) -> Path:
    """The initial student of a training seed: the same for every recipe."""
    out = suite.student_init_dir(seed)
    tok = load_tokenizer(suite.tokenizer_dir)
    if not suite.student["arch"] or suite.student["path"] or suite.student["hub"]:
        model = load_model(_model_source(suite.student, out), device="cpu", dtype="float32")
    else:
        model = build_tiny(suite.student, len(tok), seed=seed, max_positions=_max_positions(suite),
                           special_ids=_special_ids(tok))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def live_teacher(teacher):
    def teacher_logits(batch: dict) -> torch.Tensor:
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return teacher_logits


def distill(suite: Suite, recipe: Recipe, seed: int, progress: bool = True) -> Path:
    """Train the seed's initial student under one recipe; save the student and ``run.json``."""
    out = suite.run_dir(recipe.name, seed)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(suite.device)
    tok = load_tokenizer(suite.tokenizer_dir)
    student = load_model(suite.student_init_dir(seed), device=device, dtype="float32")
    cfg = TrainConfig(**{**suite.training.__dict__, "device": device})
    teacher = teacher_fn = None
    if recipe.uses_teacher:
        teacher = load_model(teacher_source(suite), device=device)
        check_same_tokenizer(load_tokenizer(teacher_source(suite)), tok)
        teacher_fn = live_teacher(teacher)
    examples = encoded_train(suite)
    t0 = time.perf_counter()
    result: TrainResult = train(
        student, reference_batches(suite, examples, tok.pad_token_id, seed), cfg, seed=seed,
        objective=recipe.build_objective(), kd_weight=recipe.kd_weight, temperature=recipe.temperature,
        teacher_logits=teacher_fn, state_path=out / "state.pt", name=f"{recipe.name}/seed{seed}",
        progress=progress,
    )
    student.save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    write_json_atomic(out / "run.json", {
        "suite": suite.name, "recipe": recipe.name, "seed": seed, "recipe_config": recipe.to_dict(),
        "train_config": cfg.__dict__, "costs": result.costs(), "curve": result.curve,
        "wall_s": round(time.perf_counter() - t0, 3), "device": device, "machine": machine(device),
        "git_rev": git_revision(), "versions": versions(),
    })
    (out / "state.pt").unlink(missing_ok=True)
    return out
