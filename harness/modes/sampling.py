"""Student sampling shared by the modes that train on student samples: ``sample_rows``, a replay buffer, and the
:class:`SamplingSource` base class.

A sampled row is ``prompt + sampled tokens up to and including the first eos`` (the prompt: the reference row's
first ``prompt_len`` tokens). A sample that reaches the token budget without eos is kept as sampled, with no eos
appended (as TRL and DistiLLM do: an appended eos would be a target the student never produced). Rows are
collated with :func:`harness.data.batching.collate`, so the label convention is the reference one: every sampled
token (and the eos that stopped it) is a target, prompt and padding are not. Token ids are kept as sampled (never
decoded and re-tokenised).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Sequence

import numpy as np
import torch

from .. import gpt2_fast
from ..data.batching import collate
from ..draw import sampling_processors
from ..schema import Field
from .base import STREAM_GENERATE, BatchSource, ModeContext, torch_seed


def sample_rows(model, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int, temperature: float,
                max_new_tokens: int | None, max_length: int, seed: int, top_k: int = 0,
                top_p: float = 1.0, prefix=None) -> list[dict]:
    """Sample one response per prompt from ``model`` in one batched ``generate`` call (KV cache); return rows.

    Prompts are left-padded; the token budget is ``max_length − longest prompt``, further capped by
    ``max_new_tokens`` when it is not ``None`` (prompts are left-truncated to ``max_length − 1`` tokens if needed,
    so at least one token is sampled; ``max_length`` is capped by the model's context). Sampling is multinomial
    with ``temperature``, ``top_k`` (0 = off) and ``top_p`` (1 = off) and nothing else: the generation config is
    built here, so defaults shipped in the model's ``generation_config`` (repetition penalty, n-gram blocking, its
    own top-p, ...) do not leak in. Tokens are drawn by :func:`harness.draw.categorical` (one uniform per row,
    from a generator seeded with ``seed``; the global RNG is untouched) through ``generate`` run greedy on
    :func:`harness.draw.sampling_processors`. Each row is ``prompt + sample cut after its first eos`` with
    ``prompt_len = len(prompt)``, ``sample_len`` and ``ended_with_eos``. The model is put in eval mode for the
    call (no dropout; DistiLLM's ``SampleGenerator`` does the same) and its mode restored. ``prefix``: the model's
    :class:`harness.teacher_prefix.PrefixCache` (a frozen teacher's prompts, computed once), if any.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if not prompts:
        raise ValueError("sample_rows needs at least one prompt")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
    config = getattr(model, "config", None)
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    cap = min(max_length, context) if isinstance(context, int) and context > 0 else max_length
    if cap < 2:
        raise ValueError(f"max_length {max_length} leaves no room for a sampled token")
    prompts = [list(p)[-(cap - 1):] for p in prompts]
    if min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    budget = cap - width if max_new_tokens is None else min(int(max_new_tokens), cap - width)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, width - len(p):] = 1
    generation = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=budget, eos_token_id=eos_id,
                                  pad_token_id=pad_id, use_cache=True)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed) % (2**63))
    processors = LogitsProcessorList(sampling_processors(temperature, top_k, top_p, generator))
    was_training, shipped = model.training, getattr(model, "generation_config", None)
    model.eval()
    # generate() fills every field we leave unset from model.generation_config: swap in the library defaults
    model.generation_config = GenerationConfig()
    try:
        with torch.no_grad():
            if gpt2_fast.eligible(model):  # the same decoding without the library's per-step overhead
                past = None if prefix is None else prefix.for_prompts(prompts, device)
                out = gpt2_fast.decode(model, input_ids.to(device), attention_mask.to(device), max_new_tokens=budget,
                                       eos_id=eos_id, pad_id=pad_id, processors=processors, past=past)
            else:
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     generation_config=generation, logits_processor=processors)
    finally:
        model.train(was_training)
        model.generation_config = shipped
    new = out[:, width:].cpu().tolist()
    rows = []
    for p, sample in zip(prompts, new):
        ended = eos_id in sample
        sample = sample[: sample.index(eos_id) + 1] if ended else sample
        rows.append({"input_ids": p + sample, "prompt_len": len(p), "sample_len": len(sample),
                     "ended_with_eos": ended})
    return rows


def pack_rows(rows: Sequence[dict], per_token: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Sampled rows (as :func:`sample_rows` returns them, with ``example_id``) -> flat tensors, for a checkpoint:
    one tensor per field instead of a list per row. Tokens are concatenated (int32); so are the ``per_token``
    fields (float64, ``sample_len`` values per row, e.g. MiniLLM's log-probabilities); the rest is one value per
    row. :func:`unpack_rows` inverts it."""
    out = {"tokens": torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.int32),
           "lengths": torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long),
           "ended_with_eos": torch.tensor([bool(r["ended_with_eos"]) for r in rows], dtype=torch.bool)}
    for key in ("example_id", "prompt_len", "sample_len"):
        out[key] = torch.tensor([int(r[key]) for r in rows], dtype=torch.long)
    for key in per_token:
        out[key] = torch.tensor([x for r in rows for x in r[key]], dtype=torch.float64)
    return out


def unpack_rows(packed: dict[str, torch.Tensor], per_token: Sequence[str] = ()) -> list[dict]:
    """The rows :func:`pack_rows` packed, in their order."""
    def pieces(flat: torch.Tensor, sizes: torch.Tensor) -> list[list]:
        return [part.tolist() for part in torch.split(flat, sizes.tolist())]

    tokens = pieces(packed["tokens"], packed["lengths"])
    fields = {key: pieces(packed[key], packed["sample_len"]) for key in per_token}
    return [{"input_ids": tokens[k], "prompt_len": int(packed["prompt_len"][k]),
             "sample_len": int(packed["sample_len"][k]), "ended_with_eos": bool(packed["ended_with_eos"][k]),
             "example_id": int(packed["example_id"][k]), **{key: fields[key][k] for key in per_token}}
            for k in range(len(tokens))]


class ReplayBuffer:
    """FIFO buffer of encoded rows (``{"input_ids": list[int], "prompt_len": int, ...}``), as DistiLLM's
    ``distillm/buffer.py`` (a ``deque(maxlen=capacity)`` of rows).

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

    @property
    def full(self) -> bool:
        return len(self._rows) >= self.capacity

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
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"replay buffer: saved capacity {state['capacity']} != configured {self.capacity}")
        self._rows = deque(state["rows"], maxlen=self.capacity)


class SamplingSource(BatchSource):
    """Base class of the modes that sample from the student (not a mode itself).

    Sampling parameters (method parameters; the budget ``max_new_tokens`` is the suite's, ``ctx.max_new_tokens``):
    ``temperature``, ``top_k`` (0 = off), ``top_p`` (1 = off). Subclasses call :meth:`_generate_rows` with the
    reference batch whose prompts are to be answered and :meth:`_collate` to make a training batch of rows.
    """

    samples_student = True
    params = {
        "temperature": Field((float,), 1.0, gt=0, help="sampling temperature of student samples"),
        "top_k": Field((int,), 0, ge=0, help="top-k filter when sampling (0 = none)"),
        "top_p": Field((float,), 1.0, gt=0, le=1, help="nucleus filter when sampling (1 = none)"),
    }

    def __init__(self, ctx: ModeContext, *, temperature: float, top_k: int, top_p: float, **params):
        super().__init__(ctx, temperature=temperature, top_k=top_k, top_p=top_p, **params)
        if ctx.student is None or ctx.tokenizer is None or ctx.pad_id is None:
            raise ValueError(f"{self.name}: sampling needs ctx.student, ctx.tokenizer and ctx.pad_id")
        eos = getattr(ctx.tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(f"{self.name}: the tokenizer has no eos token")
        if temperature <= 0:
            raise ValueError(f"{self.name}: sampling temperature must be > 0, got {temperature}")
        self.eos_id, self.pad_id = int(eos), int(ctx.pad_id)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.sampled = {"samples": 0, "tokens": 0, "ended_with_eos": 0}

    def _generate_rows(self, batch: dict, i: int) -> list[dict]:
        ids, plen = batch["input_ids"], batch["prompt_len"]
        prompts = [ids[b, : int(plen[b])].tolist() for b in range(ids.shape[0])]
        start = time.perf_counter()
        rows = sample_rows(self.ctx.student, prompts, eos_id=self.eos_id, pad_id=self.pad_id,
                           temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                           max_new_tokens=self.ctx.max_new_tokens, max_length=self.ctx.max_length,
                           seed=torch_seed(self.ctx.seed, i, STREAM_GENERATE))
        self._time("generation_s", time.perf_counter() - start)
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
