"""One function per pipeline step (= one Snakemake rule = one CLI subcommand).

data → tokenizer → teacher → student init → [teacher cache] → distill {recipe} × {seed} → evaluate → publish.
Each step reads the suite and the files of earlier steps and writes its own files under the suite's
``workdir`` (or ``results`` for publish), atomically, so an interrupted pipeline resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

from . import __version__
from .data.instruct import filter_long_prompts, load_eval_set, load_jsonl, write_jsonl_atomic
from .data.tokenizer import item_texts, load_tokenizer, train_tokenizer
from .data.tiny import write_tiny
from .fingerprint import Fingerprints
from .io import read_json, write_json_atomic
from .recipes import Recipe
from .suite import Suite
from .train_config import TrainConfig

# torch, transformers and the training/model modules are imported inside the steps that use them, so a step
# pays only for what it needs (data, leaderboard, publish, check and status import no torch; `python -m
# harness.bench startup` measures each step's start-up).

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- helpers
def load_model(*args, **kwargs):
    """:func:`harness.models.load_model`, imported on first use (it needs torch and transformers)."""
    from .models import load_model as load

    return load(*args, **kwargs)


def resolve_device(requested: str | None = "auto") -> str:
    """:func:`harness.models.resolve_device`; a named device needs no torch (``auto`` asks torch for CUDA)."""
    if requested not in (None, "auto"):
        return requested
    from .models import resolve_device as resolve

    return resolve(requested)


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import torch
    import transformers

    return {"harness": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine(device: str) -> str:
    """The GPU's name, or the CPU and torch's thread count. Without torch loaded (the leaderboard step, which
    needs none) the CPU's thread count is the cores this process may use, which the jobs' torch also sees."""
    if "torch" not in sys.modules and not device.startswith("cuda"):
        return f"{platform.processor() or platform.machine()} ({len(os.sched_getaffinity(0))} threads)"
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _model_source(entry: dict, default_dir: Path) -> str:
    """Where to load a model from: the local path wins over the hub id; a tiny model lives in default_dir."""
    return entry["path"] or entry["hub"] or str(default_dir)


def train_items(suite: Suite) -> list[dict]:
    return load_jsonl(suite.data_path("train"), name="train")


@lru_cache(maxsize=4)
def _encoded_train(tokenizer_dir: str, max_prompt: int, max_length: int,
                   data_file: str) -> list[dict]:
    from .data import batching

    tokenizer = load_tokenizer(tokenizer_dir)
    items, dropped = filter_long_prompts(load_jsonl(data_file, name="train"), tokenizer, max_prompt)
    if dropped:  # MiniLLM's filter: training prompts longer than the prompt budget are dropped, not cut
        log.info("dropped %d of %d training items whose prompt exceeds %d tokens", dropped, dropped + len(items),
                 max_prompt)
    return [batching.encode(tokenizer, item, max_prompt, max_length) for item in items]


def encoded_train(suite: Suite, tokenizer_dir: Path | None = None) -> list[dict]:
    cfg = suite.training
    return _encoded_train(str(tokenizer_dir or suite.tokenizer_dir), cfg.max_prompt_tokens, cfg.max_length,
                          str(suite.data_path("train")))


def reference_batches(suite: Suite, examples: list[dict], pad_id: int, seed: int):
    """``next_batch(i)``: the i-th reference micro-batch; order fixed by the training seed, not the recipe."""
    import torch

    from .data import batching
    from .distill import batch_order

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
    from .data.instruct import prepare_instruct_data

    paths = prepare_instruct_data(suite.data, suite.evaluation["sets"], out, where=suite.origin)
    if suite.data["max_train_items"]:
        items = load_jsonl(paths["train"], name="train")[: suite.data["max_train_items"]]
        paths["train"] = write_jsonl_atomic(suite.data_path("train"), items)
    return paths


def prepare_tokenizer(suite: Suite):
    """Train the suite's tokenizer on the training data, or save the named one, into ``workdir/tokenizer``."""
    spec = suite.tokenizer
    if suite.cross_tokenizer:  # the student's own tokenizer too (harness.cross_tokenizer)
        from .cross_tokenizer import prepare_student_tokenizer

        prepare_student_tokenizer(suite)
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
            sum((load_eval_set(eval_set_spec(suite, s)) for s in suite.evaluation["sets"]), []),
            include_responses=False),
            spec["vocab_size"], suite.tokenizer_dir)  # evaluation prompts, never their answers
    return train_tokenizer(item_texts(items), spec["vocab_size"], suite.tokenizer_dir)


def _special_ids(tok) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _max_positions(suite: Suite) -> int:
    return max(suite.training.max_length, suite.evaluation["max_length"])


def _is_existing(entry: dict) -> bool:
    return bool(entry["path"] or entry["hub"] or not entry["arch"])


def _sft(model, suite: Suite, tok, pretrain: dict, seed: int, name: str, progress: bool, tokenizer_dir=None):
    """Supervised fine-tuning on the suite's training data with the same loop (objective ``ce``)."""
    from .distill import train
    from .objectives import get as get_objective

    device = resolve_device(suite.device)
    cfg = TrainConfig(**{**suite.training.__dict__, **pretrain, "device": device, "chunk_size": None,
                         "checkpoint_every": 0})
    examples = encoded_train(suite, tokenizer_dir)
    result = train(model, reference_batches(suite, examples, tok.pad_token_id, seed=seed), cfg, seed=seed,
                   objective=get_objective("ce"), name=name, progress=progress)
    return result, cfg


def prepare_teacher(suite: Suite, progress: bool = True) -> Path:
    """The suite's teacher: a tiny model pre-trained here, an existing model fine-tuned here (``pretrain``,
    MiniLLM's SFT teacher), or an existing model used as it is (a pointer, nothing copied).

    ``suite.teacher_seed`` seeds the teacher's initialisation and data order (``teacher_seeds``: one teacher per
    seed, each in its own directory)."""
    from .models import build_tiny

    out = suite.teacher_dir
    marker = out / "teacher.json"
    tok = load_tokenizer(suite.tokenizer_dir)
    entry = suite.teacher
    if _is_existing(entry) and not entry["pretrain"]:
        # the model stays where it is (a pointer); its tokenizer is saved here so later steps need no download
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(_model_source(entry, out)).save_pretrained(str(out / "tokenizer"))
        write_json_atomic(marker, {"source": _model_source(entry, out), "tokenizer": str(out / "tokenizer"),
                                   "trained_here": False})
        return marker
    if _is_existing(entry):
        model = load_model(_model_source(entry, out), device=resolve_device(suite.device), dtype="float32")
    else:
        model = build_tiny(entry, len(tok), seed=suite.teacher_seed, max_positions=_max_positions(suite),
                           special_ids=_special_ids(tok))
    name = "teacher" if suite.primary_teacher else f"teacher{suite.teacher_seed}"
    result, cfg = _sft(model, suite, tok, dict(entry["pretrain"] or {}), suite.teacher_seed, name, progress)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_json_atomic(marker, {"source": str(out), "trained_here": True, "teacher_seed": suite.teacher_seed,
                               "costs": result.costs(),
                               "curve": result.curve, "train_config": cfg.__dict__})
    return marker


def teacher_source(suite: Suite) -> str:
    return read_json(suite.teacher_dir / "teacher.json")["source"]


def teacher_tokenizer(suite: Suite):
    """The teacher's tokenizer, from the local copy the teacher step made (never a download)."""
    meta = read_json(suite.teacher_dir / "teacher.json")
    return load_tokenizer(meta.get("tokenizer") or meta["source"])


def init_student(suite: Suite, seed: int, progress: bool = True) -> Path:
    """The initial student of a training seed, the same for every recipe: a tiny model initialised with the
    seed, or an existing model, optionally fine-tuned first (``pretrain``: MiniLLM's / DistiLLM's SFT init)."""
    from .models import build_tiny

    out = suite.student_init_dir(seed)
    tok = load_tokenizer(suite.student_tokenizer_dir)
    entry = suite.student
    if _is_existing(entry):
        model = load_model(_model_source(entry, out), device=resolve_device(suite.device), dtype="float32")
    else:
        model = build_tiny(entry, len(tok), seed=seed, max_positions=_max_positions(suite),
                           special_ids=_special_ids(tok))
    if entry["pretrain"]:
        _sft(model, suite, tok, dict(entry["pretrain"]), seed, f"student-init/seed{seed}", progress,
             suite.student_tokenizer_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def live_teacher(teacher, prefix=None):
    """The teacher function of :func:`harness.distill.train`: ``f(batch)`` the teacher's logits [B, T, V] (0 outside
    the loss mask), ``f.rows(batch)`` those of the counted positions only, [N, V] (:func:`harness.models.counted_rows`).
    ``prefix``: the teacher's :class:`harness.teacher_prefix.PrefixCache` (its prompts' keys and values), if any."""
    from .models import counted_logits, counted_rows

    def past(batch: dict):
        return None if prefix is None else prefix.for_rows(batch, batch["loss_mask"] > 0)

    def teacher_logits(batch: dict) -> torch.Tensor:
        return counted_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], past(batch))

    teacher_logits.rows = lambda batch: counted_rows(teacher, batch["input_ids"], batch["attention_mask"],
                                                     batch["loss_mask"], past(batch))
    return teacher_logits


def cache_settings(suite: Suite) -> dict | None:
    """The suite's teacher-cache settings (validated, defaults filled by harness.suite), or None."""
    return suite.teacher_cache


def build_teacher_cache(suite: Suite, progress: bool = True) -> Path:
    """Compute the teacher's log-probabilities on every training example once (see harness.teacher_cache)."""
    from .teacher_cache import build_cache

    settings = cache_settings(suite)
    if settings is None:
        raise ValueError(f"{suite.path}: the suite has no 'teacher_cache' section")
    device = resolve_device(suite.device)
    tok = load_tokenizer(suite.tokenizer_dir)
    teacher = load_model(teacher_source(suite), device=device)
    t0 = time.perf_counter()
    cache = build_cache(teacher, encoded_train(suite), tok.pad_token_id, mode=settings["mode"],
                        top_k=settings["top_k"], samples=settings["samples"], temperature=settings["temperature"],
                        seed=settings["seed"], dtype=settings["dtype"], batch_size=settings["batch_size"],
                        device=device, progress=progress,
                        meta={"settings": settings, "teacher": teacher_source(suite)})
    cache.meta["build_s"] = round(time.perf_counter() - t0, 3)
    cache.save(suite.cache_path)
    write_json_atomic(suite.cache_path.with_suffix(".json"), {
        **cache.meta, "positions": cache.n_positions, "bytes_per_position": cache.bytes_per_position(),
        "file_bytes": suite.cache_path.stat().st_size,
    })
    return suite.cache_path


def reusable_search_run(suite: Suite, recipe: Recipe, seed: int) -> Path | None:
    """The search's run that IS this final run, or None.

    A final run with the primary teacher, at a seed the search also trained, at the learning rate the search
    chose, has exactly the inputs of that search run (same initial student, data order, teacher, recipe, budget
    and learning rate; the fingerprints say so), so training it again would repeat the same computation. Only a
    successful search run whose fingerprint matches the plan's and whose model is complete qualifies.
    """
    t = suite.tuning
    if not t or not suite.primary_teacher or seed not in t["seeds"] or not suite.chosen_path(recipe.name).exists():
        return None
    lr = read_json(suite.chosen_path(recipe.name))["learning_rate"]
    if lr not in t["learning_rate"]:
        return None
    index = t["learning_rate"].index(lr)
    src = suite.tune_run_dir(recipe.name, index, seed)
    if not (src / "run.json").exists() or not (src / "model" / "config.json").exists():
        return None
    run = read_json(src / "run.json")
    want = Fingerprints(suite, {recipe.name: recipe}).run(recipe.name, seed, index)
    return src if run.get("status") == "ok" and run.get("fingerprint") == want else None


def _reuse_search_run(suite: Suite, recipe: Recipe, seed: int, src: Path, out: Path) -> Path:
    """Copy a search run (model and run.json) as the final run; run.json keeps its costs and says where from."""
    import shutil

    run = read_json(src / "run.json")
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / "model", tmp)
    shutil.rmtree(out / "model", ignore_errors=True)
    tmp.replace(out / "model")
    fingerprint = Fingerprints(suite, {recipe.name: recipe}).run(recipe.name, seed)
    log.info("%s/seed%d: the search's run at learning rate %s is this run (same inputs); reused from %s",
             recipe.name, seed, (run.get("hparams") or {}).get("learning_rate"), src)
    write_json_atomic(out / "run.json", {**run, "phase": "final", "fingerprint": fingerprint,
                                         "teacher_seed": suite.teacher_seed if recipe.uses_teacher else None,
                                         "reused_from": str(src)})
    return out


def distill(suite: Suite, recipe: Recipe, seed: int, progress: bool = True, lr_index: int | None = None,
            reuse_search: bool = True) -> Path:
    """Train the seed's initial student under one recipe; save the student and ``run.json``.

    ``lr_index``: a run of the hyperparameter search, at grid value ``tuning.learning_rate[lr_index]`` (written
    under ``workdir/tuning``). Otherwise, with a search in the suite, the run uses the learning rate the search
    chose for this recipe (:func:`tune`). A failed run (diverged, or nothing trained) writes ``run.json`` with
    ``status: failed`` and the reason, so the pipeline goes on and the leaderboard lists it as failed.

    ``reuse_search``: a final run that the search already trained with the same inputs
    (:func:`reusable_search_run`) is copied from it rather than trained again.
    """
    from . import modes, teacher_prefix
    from .distill import TrainingFailed, TrainResult, disable_dropout, train
    from .models import check_same_tokenizer

    out = suite.run_dir(recipe.name, seed) if lr_index is None else suite.tune_run_dir(recipe.name, lr_index, seed)
    out.mkdir(parents=True, exist_ok=True)
    if lr_index is None and reuse_search and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        src = reusable_search_run(suite, recipe, seed)
        if src is not None:
            return _reuse_search_run(suite, recipe, seed, src, out)
    device = resolve_device(suite.device)
    tok = load_tokenizer(suite.student_tokenizer_dir)
    student = load_model(suite.student_init_dir(seed), device=device, dtype="float32")
    if recipe.dropout == "disable":
        disable_dropout(student)
    hparams = None
    if lr_index is not None:
        hparams = {"learning_rate": suite.tuning["learning_rate"][lr_index]}
    elif suite.tuning:
        hparams = {"learning_rate": read_json(suite.chosen_path(recipe.name))["learning_rate"]}
    cfg = TrainConfig(**{**suite.training.__dict__, "device": device, **(hparams or {})})
    loss = recipe.build_loss()
    examples = encoded_train(suite, suite.student_tokenizer_dir)
    prompts = [e["input_ids"][:e["prompt_len"]] for e in examples]  # what a live teacher caches (teacher_prefix)
    teacher_fn = teacher_model = prefix = None
    if getattr(modes.get(recipe.mode, recipe.base_dir), "generates_with_teacher", False):  # samples the teacher
        check_same_tokenizer(teacher_tokenizer(suite), tok)
        teacher_model = load_model(teacher_source(suite), device=device)
        prefix = teacher_prefix.for_teacher(teacher_model, prompts, cfg.teacher_prefix_mb)
    if loss.needs_teacher and suite.cross_tokenizer:  # the teacher scores its own tokens live (harness.cross_tokenizer)
        from . import cross_tokenizer

        loss, teacher_fn, teacher_model = cross_tokenizer.teacher_side(suite, loss, device)
        prefix = None
    elif loss.needs_teacher:
        check_same_tokenizer(teacher_tokenizer(suite), tok)
        cached = cache_settings(suite) is not None and suite.cache_path.exists()
        # A cached off-policy run never needs the teacher's weights; other modes score student samples live.
        if teacher_model is None and not (cached and not recipe.samples_student):
            teacher_model = load_model(teacher_source(suite), device=device)
            prefix = teacher_prefix.for_teacher(teacher_model, prompts, cfg.teacher_prefix_mb)
        live = None if teacher_model is None else live_teacher(teacher_model, prefix)
        if cached:
            from .teacher_cache import TeacherCache, cached_or_live

            teacher_fn = cached_or_live(TeacherCache.load(suite.cache_path), live)
        else:
            teacher_fn = live
    reference = reference_batches(suite, examples, tok.pad_token_id, seed)
    if loss.needs_teacher and suite.cross_tokenizer:
        reference = cross_tokenizer.paired_reference(suite, reference, tok, teacher_tokenizer(suite))
    fingerprint = Fingerprints(suite, {recipe.name: recipe}).run(recipe.name, seed, lr_index)
    t0 = time.perf_counter()
    common = {"suite": suite.name, "recipe": recipe.name, "seed": seed, "fingerprint": fingerprint, "hparams": hparams,
              "teacher_seed": suite.teacher_seed if recipe.uses_teacher else None,
              "phase": "tune" if lr_index is not None else "final",
              "recipe_config": recipe.to_dict(), "loss": repr(loss), "train_config": cfg.__dict__, "device": device,
              "machine": machine(device), "git_rev": git_revision(), "versions": versions()}
    valid_items = load_jsonl(suite.data_path("valid"), name="valid")[:64] if suite.data_path("valid").exists() else []
    ctx = modes.ModeContext(  # what a training mode may use: reference batches, the student, budgets
        reference=reference, student=student, tokenizer=tok,
        pad_id=tok.pad_token_id, seed=seed, max_steps=cfg.max_steps, grad_accum=cfg.gradient_accumulation_steps,
        world_size=int(os.environ.get("WORLD_SIZE", "1")), batch_size=cfg.per_device_train_batch_size,
        n_train=len(examples), max_length=cfg.max_length, max_new_tokens=cfg.max_new_tokens, teacher=teacher_model,
        teacher_prefix=prefix,
        val_loss=modes.validation_loss(student, tok, valid_items, pad_id=tok.pad_token_id,
                                       max_prompt_tokens=cfg.max_prompt_tokens, max_length=cfg.max_length,
                                       batch_size=cfg.per_device_train_batch_size) if valid_items else None,
    )
    source = modes.build(recipe.mode, recipe.mode_params, ctx, base_dir=recipe.base_dir)
    try:
        result: TrainResult = train(
            student, source, cfg, seed=seed, loss=loss, teacher_logits=teacher_fn, state_path=out / "state.pt",
            fingerprint=fingerprint, name=f"{recipe.name}/seed{seed}", progress=progress,
        )
    except TrainingFailed as exc:
        log.error("%s", exc)
        write_json_atomic(out / "run.json", {**common, "status": "failed", "error": str(exc)})
        return out
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, one writer: the main process
        return out
    student.save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    costs = result.costs()
    write_json_atomic(out / "run.json", {
        **common, "status": "ok", "curve": result.curve, "loss_terms": result.parts, "mode_stats": source.stats,
        "costs": {**costs, **{k: round(v, 4) for k, v in source.timings.items()},
                  **source.generation_costs(costs.get("train_time_s") or 0.0)},
        "resumed_from_step": result.resumed_from, "wall_s": round(time.perf_counter() - t0, 3),
        "num_processes": int(os.environ.get("WORLD_SIZE", "1")),
    })
    (out / "state.pt").unlink(missing_ok=True)
    return out


def tune_record_path(suite: Suite, recipe: str, index: int, seed: int) -> Path:
    return suite.tune_run_dir(recipe, index, seed) / "record.json"


def tune(suite: Suite, recipe: Recipe, progress: bool = True) -> Path:
    """The equal hyperparameter search of one recipe: train at every grid value (``tuning.learning_rate``) with the
    search's seeds, score each student on the validation set by the primary metric, and write the choice.

    Every recipe of a suite gets the same grid, seeds and scoring; the test sets are never seen. Ties go to the
    first grid value. Writes one record per run (``phase: tune``, for the leaderboard's search table) and
    ``chosen.json``.
    """
    from .distill import TrainingFailed
    from .evaluation.evaluate_run import evaluate_model
    from .report.metric_info import is_higher_better

    suite = suite.for_teacher(None)  # the search distils from the primary teacher; its choice holds for all
    t = suite.tuning
    if not t:
        raise ValueError(f"{suite.origin}: the suite has no 'tuning' section")
    fps = Fingerprints(suite, {recipe.name: recipe}).tuning_records(recipe.name)
    device = resolve_device(suite.device)
    tok = load_tokenizer(suite.student_tokenizer_dir)
    name = t["set"].get("name", "valid")
    items = load_eval_set(eval_set_spec(suite, t["set"]), where=suite.origin, key="tuning.set")
    items = items[: suite.evaluation["max_items"]]
    ev = suite.evaluation
    gen_cfg = {k: ev[k] for k in ("do_sample", "temperature", "top_p", "top_k", "no_repeat_ngram_size",
                                  "max_prompt_tokens", "max_length", "max_new_tokens", "batch_size")}
    primary = ev["primary_metric"]
    scores: dict[float, list[float]] = {}
    for i, lr in enumerate(t["learning_rate"]):
        for seed in t["seeds"]:
            run_dir = distill(suite, recipe, seed, progress=progress, lr_index=i)
            run = read_json(run_dir / "run.json")
            record = {"suite": suite.name, "recipe": recipe.name, "seed": seed, "eval_set": name, "role": "student",
                      "phase": "tune", "hparams": {"learning_rate": lr}, "fingerprint": fps[(i, seed)],
                      "config": {"recipe": run.get("recipe_config")}, "costs": run.get("costs", {})}
            if run.get("status") != "ok":
                write_json_atomic(tune_record_path(suite, recipe.name, i, seed),
                                  {**record, "status": "failed", "error": run.get("error"), "metrics": {}})
                continue
            metrics = evaluate_model(load_model(run_dir / "model", device=device), tok, {name: items},
                                     gen_cfg={**gen_cfg, "progress": progress}, eval_seeds=t["eval_seeds"])[name]
            metrics = {k: v for k, v in metrics.items() if k not in TIMING_KEYS and k not in DETAIL_KEYS}
            write_json_atomic(tune_record_path(suite, recipe.name, i, seed),
                              {**record, "status": "ok", "error": None, "metrics": metrics})
            if metrics.get(primary) is not None:
                scores.setdefault(lr, []).append(float(metrics[primary]))
            log.info("%s: learning rate %g, seed %d: validation %s %.3f", recipe.name, lr, seed, primary,
                     metrics.get(primary) or float("nan"))
    if not scores:
        raise TrainingFailed(f"{recipe.name}: every run of the search failed; see {suite.workdir / 'tuning'}")
    sign = 1.0 if is_higher_better(primary) else -1.0
    means = {lr: sum(v) / len(v) for lr, v in scores.items()}
    best = max(t["learning_rate"], key=lambda lr: (sign * means[lr], -t["learning_rate"].index(lr))
               if lr in means else (float("-inf"), 0))
    return write_json_atomic(suite.chosen_path(recipe.name), {
        "recipe": recipe.name, "learning_rate": best, "metric": primary, "set": name,
        "validation_means": {str(k): v for k, v in means.items()}, "seeds": t["seeds"]})


# ----------------------------------------------------------------------------------------------- evaluate
def _target_model_dir(suite: Suite, target: str, seed: int) -> tuple[str, str, dict]:
    """(model source, role, run.json contents) of an evaluation target."""
    if target == "teacher":
        meta = read_json(suite.teacher_dir / "teacher.json")
        return meta["source"], "teacher", meta
    if target == "init":
        return str(suite.student_init_dir(seed)), "init", {}
    run = read_json(suite.run_dir(target, seed) / "run.json")
    return str(suite.run_dir(target, seed) / "model"), "student", run


def eval_set_spec(suite: Suite, spec: dict) -> dict:
    """An evaluation-set entry with ``split: test`` (no path) names the suite's own generated split."""
    if "split" in spec and not spec.get("path") and not spec.get("hub"):
        return {**{k: v for k, v in spec.items() if k != "split"}, "path": str(suite.data_path(spec["split"]))}
    return spec


def eval_sets(suite: Suite) -> dict[str, list[dict]]:
    limit = suite.evaluation["max_items"]
    return {spec["name"]: load_eval_set(eval_set_spec(suite, spec), where=suite.origin, key=f"evaluation.sets[{i}]")[:limit]
            for i, spec in enumerate(suite.evaluation["sets"])}


def lm_eval_tasks(suite: Suite, sets: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Task files for lm-eval built from the evaluation sets (``evaluation.lm_eval.tasks``).

    A ``mc`` task keeps the items that carry ``choices``/``label``; ``mc_skills`` builds 4-way choices from the
    one-answer skill items (arithmetic, list tasks: what a small student can learn; distractors are other items'
    answers of the same family); a ``gen`` task uses every item.
    """
    from .evaluation.lm_eval_bridge import mc_items_from_answers

    spec = suite.evaluation["lm_eval"] or {}
    tasks: dict[str, dict] = {}
    out_dir = suite.workdir / "lm_eval"
    for entry in spec.get("tasks", []):
        items = sets[entry["set"]]
        if entry["kind"] == "mc":
            items = [it for it in items if "choices" in it and "label" in it]
        elif entry["kind"] == "mc_skills":
            items = mc_items_from_answers([it for it in items if "choices" not in it])
        path = write_jsonl_atomic(out_dir / f"{entry['name']}.jsonl", items)
        kind = "mc" if entry["kind"] == "mc_skills" else entry["kind"]
        tasks.setdefault(entry["set"], {})[entry["name"]] = {"path": str(path), "kind": kind}
    kwargs = {"limit": spec.get("limit"), "standard_tasks": tuple(spec.get("standard") or ())}
    if kwargs["standard_tasks"] and sets:  # standard tasks (Hub data) run once, reported with the first set
        tasks.setdefault(next(iter(sets)), {})
    return tasks, kwargs


def held_out_batches(suite: Suite, tok, items: list[dict], batch_size: int = 64) -> list[dict]:
    from .data import batching

    cfg = suite.training
    encoded = [batching.encode(tok, it, cfg.max_prompt_tokens, cfg.max_length) for it in items]
    return [batching.collate(encoded[i : i + batch_size], tok.pad_token_id) for i in range(0, len(encoded), batch_size)]


TIMING_KEYS = ("generation_s", "model_metrics_s", "lm_eval_s", "eval_time_s")
#: bookkeeping values kept in a record's ``details`` rather than its leaderboard ``metrics``
DETAIL_KEYS = ("greedy", "n_items", "n_eval_seeds", "n_response_tokens", "rougeL_seed_std", "response_ppl")


def record_path(suite: Suite, target: str, seed: int, eval_set: str) -> Path:
    return suite.records_dir / target / f"seed{seed}" / f"{eval_set}.json"


def evaluate(suite: Suite, target: str, seeds: int | list[int], progress: bool = True) -> list[Path]:
    """Evaluate a student (``target`` = recipe name), the teacher or the untrained student (``init``).

    ``seeds``: the training seeds to evaluate in this process (the teacher, tokenizer and evaluation data are
    loaded once for all of them). Writes one record per (seed, evaluation set) — see
    harness.report.records for the schema; a failed training run gives failed records, never numbers.
    """
    from .evaluation.evaluate_run import evaluate_model
    from .evaluation.model_metrics import teacher_response_logits

    if target == "init" and not suite.primary_teacher:
        raise ValueError("the untrained student is evaluated against the primary teacher only")
    device = resolve_device(suite.device)
    sets = eval_sets(suite)
    tok = load_tokenizer(suite.tokenizer_dir if target == "teacher" else suite.student_tokenizer_dir)
    ev = suite.evaluation
    gen_cfg = {k: ev[k] for k in ("do_sample", "temperature", "top_p", "top_k", "no_repeat_ngram_size",
                                  "max_prompt_tokens", "max_length", "max_new_tokens", "batch_size")}
    tasks, lm_kwargs = lm_eval_tasks(suite, sets)
    held_out = {name: held_out_batches(suite, tok, items) for name, items in sets.items()}
    # teacher-agreement metrics need a shared tokenizer: none for a student with its own
    teacher = None if target == "teacher" or suite.cross_tokenizer else load_model(teacher_source(suite), device=device)
    teacher_logits = None if teacher is None else {  # the same for every seed's student: computed once
        name: teacher_response_logits(teacher, batches) for name, batches in held_out.items() if batches}
    fingerprints = Fingerprints(suite)
    paths = []
    for seed in [seeds] if isinstance(seeds, int) else seeds:
        source, role, run = _target_model_dir(suite, target, seed)
        base = {"suite": suite.name, "recipe": target, "seed": seed, "role": role, "phase": "final",
                "teacher_seed": suite.teacher_seed,
                "hparams": run.get("hparams"),
                "fingerprint": fingerprints.record(target, seed), "git_rev": git_revision(),
                "versions": versions(), "device": device, "machine": machine(device),
                "config": {"suite": suite.raw, "recipe": run.get("recipe_config")}}
        if run.get("status") == "failed":
            for name in sets:
                paths.append(write_json_atomic(record_path(suite, target, seed, name), {
                    **base, "eval_set": name, "status": "failed", "error": run.get("error"), "metrics": {},
                    "costs": run.get("costs", {})}))
            continue
        model = load_model(source, device=device)
        t0 = time.perf_counter()
        results = evaluate_model(
            model, tok, sets, teacher=teacher, teacher_logits=teacher_logits, batches_for_model_metrics=held_out,
            gen_cfg={**gen_cfg, "progress": progress}, eval_seeds=ev["seeds"],
            n_coverage_samples=ev["coverage_samples"] or None, lm_eval_tasks=tasks, lm_eval_kwargs=lm_kwargs,
        )
        eval_s = time.perf_counter() - t0
        for name, metrics in results.items():
            eval_timings = {k if k.startswith("eval_") else f"eval_{k}": metrics.pop(k)
                            for k in TIMING_KEYS if k in metrics}
            costs = {**run.get("costs", {}), **eval_timings, "eval_total_s": round(eval_s, 3)}
            details = {k: metrics.pop(k) for k in list(metrics) if k in DETAIL_KEYS or k.endswith("/acc_norm")}
            paths.append(write_json_atomic(record_path(suite, target, seed, name), {
                **base, "eval_set": name, "status": "ok", "error": None, "metrics": metrics, "costs": costs,
                "details": details}))
    return paths


# ----------------------------------------------------------------------------------------------- leaderboard
def expected_runs(suite: Suite) -> list[tuple[str, int, str, int]]:
    """``(target, seed, eval set, teacher seed)`` of every record the leaderboard needs: each recipe and the
    teacher with every teacher; the untrained student with the primary teacher."""
    sets = [s["name"] for s in suite.evaluation["sets"]]
    out = []
    for view in suite.teachers():
        targets = [(r, s) for r in suite.recipes() for s in suite.seeds] + [("teacher", 0)]
        if view.primary_teacher:
            targets += [("init", s) for s in suite.seeds]
        out += [(t, s, x, view.teacher_seed) for t, s in targets for x in sets]
    return out


def select_records(suite: Suite, fingerprints: Fingerprints | None = None) -> tuple[list[Path], list[str]]:
    """The plan's records whose fingerprint matches the current plan, and what was left out and why.

    Only the expected (target, seed, set) files are read — never a glob — so records of recipes, seeds or
    configurations that the plan no longer holds cannot enter the leaderboard.
    """
    fingerprints = fingerprints or Fingerprints(suite)
    expected = {f.suite.teacher_seed: f.expected_records() for f in fingerprints.teachers()}
    chosen, left_out = [], []
    for target, seed, name, tseed in expected_runs(suite):
        path = record_path(suite.for_teacher(tseed), target, seed, name)
        what = f"{target} seed {seed}" + ("" if tseed == suite.teacher_seeds[0] else f" teacher {tseed}")
        if not path.exists():
            left_out.append(f"{what} [{name}]: missing ({path})")
            continue
        found, want = read_json(path).get("fingerprint"), expected[tseed][(target, seed)]
        if found != want:
            left_out.append(f"{what} [{name}]: stale, made by other inputs (fingerprint {found}, the plan's is {want})")
            continue
        chosen.append(path)
    for recipe in fingerprints.recipes:
        for (i, seed), fp in fingerprints.tuning_records(recipe).items():
            path = tune_record_path(suite, recipe, i, seed)
            if not path.exists():
                left_out.append(f"{recipe} search lr{i} seed {seed}: missing ({path})")
            elif read_json(path).get("fingerprint") != fp:
                left_out.append(f"{recipe} search lr{i} seed {seed}: stale, made by other inputs")
            else:
                chosen.append(path)
    return chosen, left_out


def provenance(suite: Suite, fingerprints: Fingerprints) -> dict:
    """The stamp of a leaderboard: what code, plan, libraries and machine made it."""
    from .fingerprint import code_digest, library_versions, report_code_digest

    rev = git_revision()
    dirty = None
    try:
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "harness", "recipes", "config", "Snakefile"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"suite": suite.name, "suite_file": suite.origin, "git_rev": rev, "git_dirty": dirty,
            "code_digest": code_digest(), "report_code_digest": report_code_digest(),
            "plan_digest": fingerprints.plan_digest(),
            "libraries": ", ".join(f"{k} {v}" for k, v in library_versions().items()),
            "machine": machine(resolve_device(suite.device)), "device": resolve_device(suite.device)}


def leaderboard(suite: Suite, processes: int = 1) -> dict[str, Path]:
    """Leaderboards (md/csv/html/tex), scores and plots from the plan's records, into ``workdir/leaderboard``;
    the plots are drawn in up to ``processes`` processes (the files are the same).

    Publishing them into ``results/<suite>`` is a separate, deliberate step (harness.publishing).
    """
    from .report import publish as publish_report

    fingerprints = Fingerprints(suite)
    chosen, left_out = select_records(suite, fingerprints)
    if left_out:
        log.warning("leaving out %d record(s):\n  %s", len(left_out), "\n  ".join(left_out))
    curves = {}
    for recipe in suite.recipes():
        per_seed = {}
        for seed in suite.seeds:
            run_json = suite.run_dir(recipe, seed) / "run.json"
            if run_json.exists():
                per_seed[seed] = read_json(run_json).get("curve", [])
        curves[recipe] = per_seed
    from .timings import timings_table

    written = publish_report(
        chosen, suite.leaderboard_dir, primary_metric=suite.evaluation["primary_metric"], baseline=suite.baseline,
        expected=expected_runs(suite), curves=curves, provenance=provenance(suite, fingerprints), left_out=left_out,
        processes=processes,
    )
    from .io import write_text_atomic

    written["timings"] = write_text_atomic(suite.workdir / "timings.md", timings_table(suite.workdir / "benchmarks"))
    return written
