"""Training modes: where a micro-batch's responses come from (reference data, student samples, a replay buffer).

:func:`batch_source` wraps the suite's reference batches (``reference(i)``, the same for every recipe) into the
``next_batch(i)`` that :func:`harness.distill.train` calls. The divergence never knows the mode; the mode never
knows the divergence. Every batch carries ``source`` in {"reference", "generated", "replay"}.

off_policy
    The reference batches, unchanged (only ``source`` is added): identical losses to passing ``reference``.
on_policy (GKD; TRL ``GKDTrainer``)
    With probability ``lmbda`` (a draw seeded by ``(seed, i)``, independent of the global RNG) the batch's
    responses are replaced by student samples: the rows' prompts, left-padded, one ``model.generate`` call for
    the whole batch with the KV cache, ``do_sample`` with ``temperature``, top-k 0, top-p 1, at most
    ``max_new_tokens`` new tokens and never beyond ``max_length`` in total, stopped at eos.
adaptive_off_policy (DistiLLM's SGO, Ko et al. 2024)
    A FIFO replay buffer of student samples (``buffer_capacity`` rows); a threshold α_a starting at 0 that
    rises by ``threshold_step`` (capped at 1) when the validation loss, checked every ``check_every``
    optimizer steps (and once before the first step), rose by at least ``loss_margin`` since the last check.
    Each micro-batch draws r ~ U(0, 1) (seeded by ``(seed, i)``); with s = α_a·(1 − step/max_steps) it trains on
    a fresh student batch (pushed to the buffer) if r < s, on a uniform draw from the buffer if r < α_a and the
    buffer holds a batch, and on the reference batch otherwise (:func:`choose_source`).

A sampled row is ``prompt + sampled tokens up to and including the first eos`` (the row's prompt: its first
``prompt_len`` tokens). A sample that reaches the token budget without eos is kept as sampled, with no eos
appended (as TRL and DistiLLM do: an appended eos would be a target the student never produced). Rows are
collated with :func:`harness.data.batching.collate`, so the label convention is the reference one: every
sampled token (and the eos) is a target, prompt and padding are not. Token ids are kept as sampled (never
decoded and re-tokenised).

Determinism: every random choice is a function of ``(seed, i)`` (NumPy ``SeedSequence([seed, i, stream])``);
sampling runs under ``torch.random.fork_rng`` with a seed derived the same way, so the global RNG that
``train`` uses (and checkpoints) is never touched, and a seeded run gives the same curve twice.

Resuming: every source has ``state_dict()``/``load_state_dict()`` (counts, timings and, for the adaptive mode,
the replay buffer, the threshold and its reference loss) for ``train``'s checkpoint. On-policy draws depend only
on ``(seed, i)``, so with the model and RNG restored a resumed run continues exactly; the adaptive mode also
needs its state (without it a resumed run restarts with an empty buffer and α_a = 0).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .data.batching import IGNORE_INDEX, collate

SOURCES = ("reference", "generated", "replay")

# independent random streams per micro-batch index
_STREAM_LAMBDA, _STREAM_GENERATE, _STREAM_CHOICE, _STREAM_REPLAY = 1, 2, 3, 4


def _rng(seed: int, i: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(i), stream])))


def _torch_seed(seed: int, i: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(i), stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------- building blocks
class ReplayBuffer:
    """FIFO buffer of encoded rows (``{"input_ids": list[int], "prompt_len": int, ...}``), DistiLLM style.

    ``push`` appends rows and evicts the oldest beyond ``capacity``; ``sample(n, generator)`` draws ``n``
    distinct rows uniformly (without replacement, like DistiLLM's ``random.sample``) with a NumPy generator.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._rows: deque[dict] = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self._rows)

    def push(self, rows: Sequence[dict]) -> None:
        for row in rows:
            self._rows.append(row)

    def sample(self, n: int, generator: np.random.Generator) -> list[dict]:
        if not 1 <= n <= len(self._rows):
            raise ValueError(f"cannot sample {n} rows from a buffer of {len(self._rows)}")
        idx = generator.choice(len(self._rows), size=n, replace=False)
        return [self._rows[int(k)] for k in idx]

    def rows(self) -> list[dict]:
        return list(self._rows)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "rows": list(self._rows)}

    def load_state_dict(self, state: dict) -> None:
        self._rows = deque(state["rows"], maxlen=self.capacity)


class AdaptiveThreshold:
    """DistiLLM's α_a: starts at ``start``, rises by ``step`` (capped at ``max_value``) when the validation loss
    rose by at least ``margin``.

    ``update(val_loss) -> bool`` (True when α_a rose). The first call only sets the reference loss. With
    ``compare_to="last_check"`` (the design document) the reference is the previous check's loss; with
    ``"last_rise"`` it is the loss at the last rise (or the first check), which is what DistiLLM's
    ``finetune.py`` does (``prev_avg_loss`` is updated only when the threshold rises). A non-finite loss is
    ignored. The comparison tolerates float round-off (1e-9), so a rise of exactly ``margin`` counts.
    """

    TOL = 1e-9

    def __init__(self, step: float = 0.1, margin: float = 0.1, start: float = 0.0, max_value: float = 1.0,
                 compare_to: str = "last_check"):
        if compare_to not in ("last_check", "last_rise"):
            raise ValueError(f"compare_to must be 'last_check' or 'last_rise', got {compare_to!r}")
        self.step, self.margin, self.max_value, self.compare_to = float(step), float(margin), float(max_value), compare_to
        self.alpha = float(start)
        self.reference: float | None = None
        self.history: list[dict] = []

    def update(self, val_loss: float, at_step: int | None = None) -> bool:
        val_loss = float(val_loss)
        rose = False
        if math.isfinite(val_loss):
            if self.reference is not None and val_loss - self.reference >= self.margin - self.TOL:
                rose = True
                self.alpha = min(self.alpha + self.step, self.max_value)
            if self.reference is None or rose or self.compare_to == "last_check":
                self.reference = val_loss
        self.history.append({"step": at_step, "val_loss": round(val_loss, 6), "alpha": round(self.alpha, 6),
                             "rose": rose})
        return rose

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "reference": self.reference, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.reference, self.history = state["alpha"], state["reference"], list(state["history"])


def choose_source(r: float, alpha: float, step: int, max_steps: int) -> str:
    """DistiLLM's SGO decision for one draw ``r ~ U(0,1)``: "generated" if r < s = α·(1 − step/max_steps),
    else "replay" if r < α, else "reference". (The caller falls back to "reference" when the buffer is short.)"""
    s = alpha * (1.0 - step / max_steps)
    if r < s:
        return "generated"
    if r < alpha:
        return "replay"
    return "reference"


def sample_rows(model, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int, temperature: float,
                max_new_tokens: int, max_length: int, seed: int) -> list[dict]:
    """Sample one response per prompt from ``model`` in one batched ``generate`` call; return encoded rows.

    Prompts are left-padded; the token budget is ``min(max_new_tokens, max_length − longest prompt)`` (prompts
    are left-truncated to ``max_length − 1`` tokens if needed, so at least one token is sampled). Each row is
    ``prompt + sample cut after its first eos``, ``prompt_len = len(prompt)``; the row also records
    ``sample_len`` and ``ended_with_eos``. The model is put in eval mode for the call and its mode restored;
    the global RNG is forked (``seed`` drives the sampling).
    """
    if not prompts:
        raise ValueError("sample_rows needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = getattr(getattr(model, "config", None), "n_positions", None) or getattr(
        getattr(model, "config", None), "max_position_embeddings", None)
    cap = min(max_length, context) if isinstance(context, int) and context > 0 else max_length
    if cap < 2:
        raise ValueError(f"max_length {max_length} leaves no room for a sampled token")
    prompts = [list(p)[-(cap - 1):] for p in prompts]
    if min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    budget = min(int(max_new_tokens), cap - width)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, width - len(p):] = 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0, max_new_tokens=budget,
                eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True,
            )
    finally:
        model.train(was_training)
    new = out[:, width:].cpu().tolist()
    rows = []
    for p, sample in zip(prompts, new):
        ended = eos_id in sample
        sample = sample[: sample.index(eos_id) + 1] if ended else sample
        rows.append({"input_ids": p + sample, "prompt_len": len(p), "sample_len": len(sample),
                     "ended_with_eos": ended})
    return rows


def validation_loss(student, tokenizer, items: Sequence[dict], *, pad_id: int, max_prompt_tokens: int,
                    max_length: int, batch_size: int = 32) -> Callable[[], float]:
    """``val_loss()``: the student's token-mean cross-entropy on the reference responses of ``items``
    (encoded once, like training rows), without grad, in eval mode (restored after). DistiLLM's
    ``evaluate`` uses the same quantity (the student's LM loss on the dev set)."""
    from .data.batching import encode

    if not items:
        raise ValueError("validation_loss needs at least one item")
    rows = [encode(tokenizer, it, max_prompt_tokens, max_length) for it in items]
    batches = [collate(rows[k: k + batch_size], pad_id) for k in range(0, len(rows), batch_size)]

    def val_loss() -> float:
        device = next(student.parameters()).device
        was_training = student.training
        student.eval()
        total, count = 0.0, 0.0
        try:
            with torch.no_grad():
                for b in batches:
                    logits = student(input_ids=b["input_ids"].to(device),
                                     attention_mask=b["attention_mask"].to(device)).logits.float()
                    total += float(torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), b["labels"].to(device).reshape(-1),
                        ignore_index=IGNORE_INDEX, reduction="sum"))
                    count += float(b["loss_mask"].sum())
        finally:
            student.train(was_training)
        return total / max(count, 1.0)

    return val_loss


# ------------------------------------------------------------------------------------------- batch sources
class BatchSource:
    """``next_batch(i)`` for :func:`harness.distill.train`, with ``timings`` (``generation_s``, ``val_loss_s``)
    and ``stats`` (batches per source, sampled tokens, threshold history, ...). Call it once per micro-batch
    index, in order (as ``train`` does)."""

    mode = "off_policy"

    def __init__(self, reference: Callable[[int], dict], **_: Any):
        self.reference = reference
        self.timings: dict[str, float] = defaultdict(float, generation_s=0.0)
        self.counts: dict[str, int] = {s: 0 for s in SOURCES}

    def __call__(self, i: int) -> dict:
        batch = self.reference(i)
        batch["source"] = "reference"
        self.counts["reference"] += 1
        return batch

    @property
    def stats(self) -> dict:
        return {"mode": self.mode, "batches": dict(self.counts)}

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "timings": dict(self.timings)}

    def load_state_dict(self, state: dict) -> None:
        self.counts.update(state["counts"])
        self.timings.update(state["timings"])


class _Sampling(BatchSource):
    """Shared machinery of the modes that sample from the student."""

    def __init__(self, reference, *, student, tokenizer, pad_id: int, seed: int, max_length: int,
                 temperature: float, max_new_tokens: int, **kw):
        super().__init__(reference)
        if temperature <= 0:
            raise ValueError(f"{self.mode}: sampling temperature must be > 0, got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"{self.mode}: max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(f"{self.mode}: the tokenizer has no eos token")
        self.student, self.eos_id, self.pad_id, self.seed = student, int(eos), int(pad_id), int(seed)
        self.max_length, self.temperature, self.max_new_tokens = int(max_length), float(temperature), int(max_new_tokens)
        self.sampled = {"samples": 0, "tokens": 0, "ended_with_eos": 0}

    def _generate_rows(self, batch: dict, i: int) -> list[dict]:
        ids, plen = batch["input_ids"], batch["prompt_len"]
        prompts = [ids[b, : int(plen[b])].tolist() for b in range(ids.shape[0])]
        start = time.perf_counter()
        rows = sample_rows(self.student, prompts, eos_id=self.eos_id, pad_id=self.pad_id,
                           temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                           max_length=self.max_length, seed=_torch_seed(self.seed, i, _STREAM_GENERATE))
        self.timings["generation_s"] += time.perf_counter() - start
        if "example_ids" in batch:
            for row, j in zip(rows, batch["example_ids"].tolist()):
                row["example_id"] = j
        self.sampled["samples"] += len(rows)
        self.sampled["tokens"] += sum(r["sample_len"] for r in rows)
        self.sampled["ended_with_eos"] += sum(r["ended_with_eos"] for r in rows)
        return rows

    def _collate(self, rows: list[dict], source: str) -> dict:
        batch = collate(rows, self.pad_id)
        batch["source"] = source
        if all("example_id" in r for r in rows):  # the prompts' examples; never used to look up teacher caches
            batch["prompt_example_ids"] = torch.tensor([r["example_id"] for r in rows])
        self.counts[source] += 1
        return batch

    @property
    def stats(self) -> dict:
        n = self.sampled["samples"]
        return {**super().stats, "sampled": {**self.sampled,
                                             "mean_sample_len": round(self.sampled["tokens"] / n, 3) if n else None}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sampled": dict(self.sampled)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sampled.update(state["sampled"])


class OnPolicy(_Sampling):
    mode = "on_policy"

    def __init__(self, reference, *, lmbda: float = 0.5, **kw):
        super().__init__(reference, **kw)
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"on_policy: lmbda must lie in [0, 1], got {lmbda}")
        self.lmbda = float(lmbda)

    def __call__(self, i: int) -> dict:
        batch = self.reference(i)
        # TRL: ``random.random() <= lmbda``; strict ``<`` so that lmbda = 0 never samples
        if _rng(self.seed, i, _STREAM_LAMBDA).random() < self.lmbda:
            return self._collate(self._generate_rows(batch, i), "generated")
        batch["source"] = "reference"
        self.counts["reference"] += 1
        return batch


class AdaptiveOffPolicy(_Sampling):
    mode = "adaptive_off_policy"

    def __init__(self, reference, *, val_loss: Callable[[], float] | None, max_steps: int, grad_accum: int,
                 buffer_capacity: int = 1000, threshold_step: float = 0.1, loss_margin: float = 0.1,
                 check_every: int = 20, compare_to: str = "last_check", **kw):
        super().__init__(reference, **kw)
        if val_loss is None:
            raise ValueError("adaptive_off_policy needs a val_loss callable (the student's validation loss)")
        if check_every < 1 or max_steps < 1 or grad_accum < 1:
            raise ValueError("adaptive_off_policy: check_every, max_steps and grad_accum must be >= 1")
        self.val_loss, self.max_steps, self.grad_accum, self.check_every = val_loss, max_steps, grad_accum, check_every
        self.buffer = ReplayBuffer(buffer_capacity)
        self.threshold = AdaptiveThreshold(threshold_step, loss_margin, compare_to=compare_to)
        self.short_buffer = 0  # replay chosen but the buffer held less than a batch: reference used
        self._last_check = -1

    def _maybe_check(self, i: int) -> None:
        period = self.check_every * self.grad_accum
        if i % period == 0 and i > self._last_check:
            self._last_check = i
            start = time.perf_counter()
            loss = self.val_loss()
            self.timings["val_loss_s"] += time.perf_counter() - start
            self.threshold.update(loss, at_step=i // self.grad_accum)

    def __call__(self, i: int) -> dict:
        self._maybe_check(i)
        batch = self.reference(i)
        step = i // self.grad_accum
        r = _rng(self.seed, i, _STREAM_CHOICE).random()
        choice = choose_source(r, self.threshold.alpha, step, self.max_steps)
        n = int(batch["input_ids"].shape[0])
        if choice == "generated":
            rows = self._generate_rows(batch, i)
            self.buffer.push(rows)
            return self._collate(rows, "generated")
        if choice == "replay":
            if len(self.buffer) >= n:
                return self._collate(self.buffer.sample(n, _rng(self.seed, i, _STREAM_REPLAY)), "replay")
            self.short_buffer += 1
        batch["source"] = "reference"
        self.counts["reference"] += 1
        return batch

    @property
    def stats(self) -> dict:
        return {**super().stats, "threshold": round(self.threshold.alpha, 6),
                "threshold_history": list(self.threshold.history), "buffer_size": len(self.buffer),
                "replay_fallback_to_reference": self.short_buffer}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict(), "threshold": self.threshold.state_dict(),
                "short_buffer": self.short_buffer, "last_check": self._last_check}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
        self.threshold.load_state_dict(state["threshold"])
        self.short_buffer, self._last_check = state["short_buffer"], state["last_check"]


_MODES = {"off_policy": BatchSource, "on_policy": OnPolicy, "adaptive_off_policy": AdaptiveOffPolicy}


def batch_source(mode: str, mode_params: dict | None, *, reference: Callable[[int], dict], student=None,
                 tokenizer=None, examples: list[dict] | None = None, pad_id: int | None = None, seed: int = 0,
                 max_steps: int = 1, grad_accum: int = 1, max_length: int = 512,
                 val_loss: Callable[[], float] | None = None) -> BatchSource:
    """The ``next_batch(i)`` of a training mode (see the module docstring).

    ``mode_params`` are the recipe's (defaults from :data:`harness.recipes.MODE_PARAMS` fill the gaps);
    ``reference(i)`` gives the i-th reference micro-batch; ``student`` and ``tokenizer`` (its eos) are used for
    sampling; ``pad_id`` pads sampled rows; ``seed`` seeds every draw together with the micro-batch index;
    ``max_steps`` and ``grad_accum`` map micro-batch ``i`` to optimizer step ``i // grad_accum``;
    ``max_length`` bounds prompt + sample; ``val_loss()`` is the validation loss the adaptive mode checks.
    ``examples`` (the encoded training rows) is accepted for custom modes; the built-in ones take each row's
    prompt from the reference batch itself (its first ``prompt_len`` tokens), which is the same thing.
    """
    from .recipes import MODE_PARAMS

    if mode not in _MODES:
        raise ValueError(f"unknown training mode {mode!r}; accepted: {', '.join(_MODES)}")
    known = MODE_PARAMS[mode]
    unknown = set(mode_params or {}) - set(known)
    if unknown:
        raise ValueError(f"{mode}: unknown mode parameter(s) {sorted(unknown)}; accepted: {', '.join(known) or 'none'}")
    params = {name: f.default for name, f in known.items()}
    params.update(mode_params or {})
    if mode == "off_policy":
        return BatchSource(reference)
    if student is None or tokenizer is None or pad_id is None:
        raise ValueError(f"{mode}: sampling needs the student, the tokenizer and pad_id")
    common = dict(student=student, tokenizer=tokenizer, pad_id=pad_id, seed=seed, max_length=max_length)
    if mode == "on_policy":
        return OnPolicy(reference, **common, **params)
    return AdaptiveOffPolicy(reference, **common, **params, val_loss=val_loss, max_steps=max_steps,
                             grad_accum=grad_accum)
