"""The training loop: teacher pre-training, the SFT baseline and distillation are the same function.

Read it top to bottom, nanoGPT style: configuration, data order, optimizer and schedule, resume, the loop
(teacher forward → student forward → loss → backward → optimizer), checkpoint. What changes between
recipes is only (a) the objective and its KD weight and (b) where a batch's responses come from
(:mod:`harness.modes`); data order, steps, tokens and seeds come from the suite and are the same for every
recipe of a comparison.

Loss of one optimizer step, with ``n`` the number of counted response tokens over all its micro-batches::

    loss = (1 − λ_kd) · CE + λ_kd · D(student ‖ teacher)       (each a token mean over the n tokens)

so gradient accumulation gives exactly the gradient of one large batch (the ``normalizer`` of the
objectives). ``ce`` recipes are pure SFT and never call the teacher.
"""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import objectives
from .data.batching import epoch_order
from .models import align_vocab, counted_logits, counted_rows
from .parallel import world as parallel_world
from .train_config import TrainConfig  # noqa: F401  (re-exported: harness.distill.TrainConfig)

log = logging.getLogger(__name__)


#: compute rowwise losses on the counted rows [N, V] (False: on [B, T, V] as sequence-level losses are; for tests)
_ROWS = True


class TrainingFailed(RuntimeError):
    """A run that must not be published as ok; the message says why and what was kept."""


class TrainingDiverged(TrainingFailed):
    """A non-finite loss or gradient."""


class NothingTrained(TrainingFailed):
    """No response token entered the loss, or the loss never moved: the weights are (close to) the initial ones."""


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0  # counted (response) tokens that entered the loss
    samples: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    parts: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # each loss term at logged steps
    loss_moved: bool = False  # some step's loss differed from the first step's
    first_loss: float | None = None
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    resumed_from: int = 0

    def costs(self) -> dict:
        t = dict(self.timings)
        wall = t.get("train_time_s", 0.0)
        return {
            **{k: round(v, 4) for k, v in t.items()},
            "student_fwd_bwd_s": round(t.get("student_forward_s", 0.0) + t.get("student_backward_s", 0.0), 4),
            "steps": self.steps,
            "tokens": self.tokens,
            "samples": self.samples,
            "tokens_per_s": round(self.tokens / wall, 1) if wall else None,
            "cpu_time_s": round(t.get("cpu_time_s", 0.0), 4),
            "sec_per_sample": round(wall / self.samples, 6) if self.samples else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        }


@contextmanager
def timed(timings: dict, phase: str, device: str):
    """Accumulate wall time of a phase (synchronising CUDA so GPU time lands in the right phase)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    timings[phase] += time.perf_counter() - start


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The epoch's permutation, computed once per epoch rather than once per micro-batch."""
    return tuple(epoch_order(n, seed, epoch))


def batch_order(n_examples: int, batch_size: int, data_seed: int, index: int) -> list[int]:
    """Example indices of the ``index``-th micro-batch: a pure function of (data_seed, index).

    Epoch e visits the permutation ``epoch_order(n, data_seed, e)``; the same for every recipe, and a
    resumed run continues exactly where it stopped.
    """
    start = index * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_examples)
        out.extend(_epoch_order(n_examples, data_seed, epoch)[offset : offset + batch_size - len(out)])
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, **state) -> None:
    """Atomic ``torch.save``: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _tracker(report_to: str, log_dir: Path | None, is_main: bool):
    """A TensorBoard ``SummaryWriter`` for ``report_to: tensorboard`` (optional dependency), else None."""
    if report_to in ("none", None) or not is_main or log_dir is None:
        return None
    if report_to != "tensorboard":
        raise ValueError(f"training.report_to {report_to!r}; accepted: none, tensorboard")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError("training.report_to: tensorboard needs the tensorboard package: "
                         "pip install -e '.[tensorboard]'") from exc
    return SummaryWriter(log_dir=str(log_dir))


def disable_dropout(model) -> None:
    """Set every dropout probability of ``model`` to 0 (TRL's ``disable_dropout_in_model``, also attention)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel (one pass over each parameter instead of a dozen foreach ops:
    a tiny CPU student's optimizer step is ~3× cheaper) where the parameters' device supports it, else the
    default implementation. Same update rule (decoupled weight decay, bias correction); round-off may differ."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, **kwargs)


def train(
    student,
    next_batch: Callable[[int], dict],
    cfg: TrainConfig,
    *,
    seed: int,
    objective: objectives.Objective | None = None,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    loss=None,
    teacher_logits: Callable[[dict], torch.Tensor] | None = None,
    state_path: Path | None = None,
    fingerprint: str | None = None,
    name: str = "run",
    progress: bool = True,
    on_step: Callable[[int, "TrainResult"], None] | None = None,
) -> TrainResult:
    """Train ``student`` for ``cfg.max_steps`` optimizer steps and return costs and the loss curve.

    The loss is ``loss`` (a :class:`harness.objectives.composite.WeightedLoss`, a recipe's weighted sum of
    terms) or, in the short form, ``(1 − kd_weight)·CE + kd_weight·objective`` at ``temperature``.
    ``next_batch(i)`` gives the i-th micro-batch (a dict of ``input_ids``, ``attention_mask``, ``labels``,
    ``loss_mask`` [B, T], see :mod:`harness.data.batching`); ``teacher_logits(batch)`` gives the teacher's
    logits ``[B, T, V]`` for it (a live forward or the teacher cache), or is ``None`` for pure SFT.
    ``teacher_logits.rows(batch)``, where the function has it (:func:`harness.steps.live_teacher`,
    :func:`harness.teacher_cache.cached_or_live`), gives the counted positions' rows only, ``[N, V]`` in row-major
    order of ``loss_mask > 0``; without it they are ``teacher_logits(batch)[loss_mask > 0]``.

    A loss without sequence-level terms (``loss.rowwise``) is computed on the counted rows alone: student
    :func:`~harness.models.counted_rows` [N, V], the teacher's rows [N, V], ``labels[loss_mask > 0]`` [N] and an
    all-ones [N] mask; the same value as on ``[B, T, V]`` (no such term reads another position), without
    building, filling and reading back two ``[B, T, V]`` tensors. Sequence-level terms (and cross-tokenizer
    losses) get ``[B, T, V]`` (:func:`~harness.models.counted_logits`, 0 outside the mask) and the batch.
    ``state_path``: where resumable checkpoints go. An existing one is resumed (model, optimizer, schedule,
    RNG and data position) only when it was written under the same ``fingerprint`` (the hash of every input of
    the run); otherwise it is discarded and training starts from the beginning.

    Raises :class:`TrainingDiverged` on a non-finite loss or gradient and :class:`NothingTrained` when no
    response token entered the loss or the loss never changed over two or more steps.
    """
    from transformers import get_cosine_schedule_with_warmup

    from .objectives.composite import WeightedLoss

    if loss is None:
        if objective is None:
            raise ValueError(f"{name}: train() needs a loss (or an objective)")
        loss = WeightedLoss.kd(objective, kd_weight, temperature)
    device = cfg.device
    uses_teacher = loss.needs_teacher
    if uses_teacher and teacher_logits is None:
        raise ValueError(f"{name}: the loss {loss!r} needs a teacher")
    chunk = cfg.chunk_size
    rowwise = _ROWS and getattr(loss, "rowwise", False)
    teacher_rows = None
    if uses_teacher and rowwise:
        teacher_rows = getattr(teacher_logits, "rows", None) or (lambda b: teacher_logits(b)[b["loss_mask"] > 0])

    seed_everything(seed)
    group = parallel_world(device)  # one process unless started by `accelerate launch`
    student.to(device).train()
    decay = [p for n, p in student.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.dim() < 2]
    optimizer = adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps
    )
    result = TrainResult()

    if state_path is not None and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state.get("fingerprint") != fingerprint:
            log.warning("%s: discarding checkpoint %s (written for inputs %s, this run's are %s): starting at step 0",
                        name, state_path, state.get("fingerprint"), fingerprint)
            state_path.unlink()
        else:
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            if state.get("batch_source") is not None and hasattr(next_batch, "load_state_dict"):
                next_batch.load_state_dict(state["batch_source"])  # a mode's counts, buffer and threshold
            result = state["result"]
            result.timings = defaultdict(float, result.timings)
            result.resumed_from = result.steps
            log.info("%s: resumed from step %d (%s)", name, result.steps, state_path)

    def checkpoint():
        if state_path is not None and group.is_main:
            save_state(state_path, model=student.state_dict(), optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict(), rng=_rng_state(), result=result, fingerprint=fingerprint,
                       batch_source=next_batch.state_dict() if hasattr(next_batch, "state_dict") else None)

    def kept() -> str:
        if state_path is not None and state_path.exists():
            return f"the last checkpoint ({state_path}, step {torch.load(state_path, weights_only=False)['result'].steps}) is kept"
        return "no checkpoint was written (training.checkpoint_every is 0 or no checkpoint step was reached)"

    tracker = _tracker(cfg.report_to, state_path.parent / "tensorboard" if state_path is not None else None,
                       group.is_main)
    model = group.wrap(student)  # DDP (or FSDP / DeepSpeed per the accelerate config) when distributed
    bar = tqdm(total=cfg.max_steps, initial=result.steps, desc=name, disable=not (progress and group.is_main),
               dynamic_ncols=True)
    t_start = time.perf_counter() - result.timings["train_time_s"]
    cpu_start = time.process_time() - result.timings["cpu_time_s"]
    timings = result.timings
    accum = cfg.gradient_accumulation_steps
    aligned_logged = False
    for step in range(result.steps, cfg.max_steps):
        # rank r of N takes every N-th micro-batch of the one global order: N processes see what one would
        micro = [next_batch((step * accum + k) * group.size + group.rank) for k in range(accum)]
        micro = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro]
        n_tokens = group.sum(sum(float(b["loss_mask"].sum()) for b in micro), device)  # global token count
        step_loss = 0.0
        step_parts: dict[str, float] = defaultdict(float)
        for batch in micro:
            mask, labels = batch["loss_mask"], batch["labels"]
            t_logits = None
            if uses_teacher:
                with timed(timings, "teacher_forward_s", device), torch.no_grad():
                    t_logits = teacher_rows(batch) if rowwise else teacher_logits(batch)
            with timed(timings, "student_forward_s", device):
                if rowwise:  # [N, V], [N]: the counted positions in row-major order
                    s_logits = counted_rows(model, batch["input_ids"], batch["attention_mask"], mask)
                    labels = labels[mask > 0]
                    mask = mask.new_ones(s_logits.shape[0])
                else:
                    s_logits = counted_logits(model, batch["input_ids"], batch["attention_mask"], mask)
            with timed(timings, "loss_s", device):
                norm = max(n_tokens, 1.0) / group.size  # DDP averages gradients over the N processes
                s_al, t_al = align_vocab(s_logits, t_logits) if t_logits is not None else (s_logits, None)
                if t_logits is not None and s_logits.shape[-1] != t_logits.shape[-1] and not aligned_logged:
                    aligned_logged = True
                    log.info("%s: aligned vocabularies: student %d vs teacher %d logit columns; the %d padded "
                             "columns are masked as -inf on both sides", name, s_logits.shape[-1],
                             t_logits.shape[-1], abs(s_logits.shape[-1] - t_logits.shape[-1]))
                value, parts = loss(s_al, t_al, mask, labels=labels, normalizer=norm, chunk_size=chunk,
                                    kernel=cfg.kernel, batch=batch)
            if not torch.isfinite(value):
                raise TrainingDiverged(
                    f"{name}: non-finite loss ({float(value.detach())}) at optimizer step {step + 1} "
                    f"(terms: {', '.join(f'{k}={v:.4g}' for k, v in parts.items())}); {kept()}"
                )
            with timed(timings, "student_backward_s", device):
                value.backward()
            step_loss += float(value.detach())
            for k, v in parts.items():
                step_parts[k] += v
            result.samples += int(batch["input_ids"].shape[0]) * group.size
        with timed(timings, "optimizer_s", device):
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise TrainingDiverged(f"{name}: non-finite gradient norm at optimizer step {step + 1}; {kept()}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        result.steps = step + 1
        result.tokens += int(n_tokens)
        if result.first_loss is None:
            result.first_loss = step_loss
        elif step_loss != result.first_loss:
            result.loss_moved = True
        timings["train_time_s"] = time.perf_counter() - t_start
        timings["cpu_time_s"] = time.process_time() - cpu_start
        if result.steps % cfg.log_every == 0 or result.steps == cfg.max_steps:
            step_loss = group.sum(step_loss, device) / group.size  # the global token mean
            result.curve.append((result.steps, round(step_loss, 6)))
            result.parts.append((result.steps, {k: round(v, 6) for k, v in step_parts.items()}))
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if tracker is not None:
                tracker.add_scalar("train/loss", step_loss, result.steps)
                for k, v in step_parts.items():
                    tracker.add_scalar(f"train/loss_{k}", v, result.steps)
                tracker.add_scalar("train/learning_rate", scheduler.get_last_lr()[0], result.steps)
                tracker.flush()
            if group.is_main:
                elapsed = timings["train_time_s"]
                done = result.steps - result.resumed_from
                eta = elapsed / max(done, 1) * (cfg.max_steps - result.steps) if done else 0.0
                log.info("%s: step %d/%d loss %.4f | %.0f tok/s | %.0fs elapsed, ~%.0fs left", name, result.steps,
                         cfg.max_steps, step_loss, result.tokens / max(elapsed, 1e-9), elapsed, eta)
        bar.update(1)
        if on_step is not None:
            on_step(result.steps, result)
        if cfg.checkpoint_every and result.steps % cfg.checkpoint_every == 0 and result.steps < cfg.max_steps:
            checkpoint()
    bar.close()
    if tracker is not None:
        tracker.close()
    timings["train_time_s"] = time.perf_counter() - t_start
    timings["cpu_time_s"] = time.process_time() - cpu_start
    group.barrier()
    student.eval()
    if result.tokens == 0:
        raise NothingTrained(
            f"{name}: no response token entered the loss in {result.steps} steps (every response was cut off: "
            "raise training.max_length or lower training.max_prompt_tokens)")
    if result.steps - result.resumed_from >= 2 and not result.loss_moved:
        raise NothingTrained(
            f"{name}: the loss stayed at {result.first_loss!r} for all {result.steps} steps: the objective gives no "
            "training signal (check the recipe's parameters and temperature)")
    return result
