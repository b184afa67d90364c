"""A frozen teacher's prompts, computed once: the keys and values of every prompt token but the last, at every
block, kept for the rest of the process.

The modes that score samples with the live teacher (on-policy GKD, ImitKD, sequence-level KD, MiniLLM,
DistiLLM-2) show it the same training prompts again and again — each prompt about 1.6 times in a 200-step run of
the tiny suite, and a job trains 5 seeds (or the search's 3 learning rates) in one process — and a prompt is
most of a row (~30 of ~37 positions in the tiny suite). With its prefix cached, the teacher's forward over a row
runs on the last prompt token and the response only (:func:`harness.gpt2_fast.counted_hidden_states` with
``past``), and its sampling skips the prefill but for the last prompt token (:class:`harness.gpt2_fast.Decoder`).

Exactness: the same math (a position's keys and values depend on the positions up to it only); the values equal
those of the full forward up to float round-off. The training prompts are computed when the cache is made, in
their order and in fixed batches, and any other prompt alone on first use, so a prompt's values never depend on
which rows the process scored before: a run gives the same bits alone, after other runs in the same process, or
resumed. Filling costs about one teacher forward over every training prompt, once per process (~1.5 s for the
tiny suite's 4,000 prompts): a job of several runs gains, a lone run of a mode that scores few samples may not.

Memory: float32, ``n_layer × 2 × n_embd × 4`` bytes per prompt token (3 KB for the tiny teacher, 72 KB for
GPT-2 124M). The cache is used only when every training prompt fits the budget (``training.teacher_prefix_mb``,
default 1024; 0 turns it off) — decided from the training set before any work, so whether a row's prefix is cached
never depends on the order of the work — and only for a plain GPT-2 teacher (:func:`harness.gpt2_fast.eligible`).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from . import gpt2_fast

__all__ = ["PrefixCache", "for_teacher", "estimate_bytes"]

#: caches alive in this process, by the teacher's weights and the prompts they were filled with (a job reloads the
#: same teacher for each of its runs)
_CACHES: dict[tuple[str, str], "PrefixCache"] = {}


def _bytes_per_token(model) -> int:
    config = model.config
    return config.n_layer * 2 * config.n_embd * 4


def estimate_bytes(model, prompt_lengths: Sequence[int]) -> int:
    """The cache's size once it holds every prompt of ``prompt_lengths`` (tokens per prompt)."""
    return sum(max(int(n) - 1, 0) for n in prompt_lengths) * _bytes_per_token(model)


def _weights_digest(model) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _prompts_digest(prompts: Sequence[Sequence[int]]) -> str:
    return hashlib.blake2b(repr([list(p) for p in prompts]).encode(), digest_size=16).hexdigest()


#: prompts per batch when a cache is filled (fixed, so the values are the same bits in every process)
FILL_BATCH = 64


class PrefixCache:
    """The keys and values of a frozen GPT-2's prompt prefixes (a prompt but its last token), by prefix tokens:
    each ``[n_layer, P, 2H]``. ``prompts`` (the training prompts, token lists) are computed at once, in their order,
    in batches of :data:`FILL_BATCH` (:func:`harness.gpt2_fast.keys_values`); any other prefix one at a time on
    first use (:func:`harness.gpt2_fast.prefix_keys_values`). Either way a prefix's values never depend on what
    the process computed before."""

    def __init__(self, model, prompts: Sequence[Sequence[int]] = ()):
        self._model = weakref.ref(model)
        self.store: dict[tuple[int, ...], Tensor] = {}
        self.hits = self.misses = 0
        self._fill(model, prompts)

    def _fill(self, model, prompts: Sequence[Sequence[int]]) -> None:
        prefixes = list(dict.fromkeys(tuple(p[:-1]) for p in prompts if len(p) > 1))  # distinct, in order
        device = model.transformer.wte.weight.device
        for start in range(0, len(prefixes), FILL_BATCH):
            chunk = prefixes[start:start + FILL_BATCH]
            lengths = [len(p) for p in chunk]
            ids = torch.zeros((len(chunk), max(lengths)), dtype=torch.long)
            for b, p in enumerate(chunk):
                ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
            kv = gpt2_fast.keys_values(model, ids.to(device), torch.tensor(lengths))
            self.store.update(zip(chunk, kv.split(lengths, dim=1)))

    def rebind(self, model) -> "PrefixCache":
        """Serve ``model``, a reloaded copy of the same weights (checked by the caller)."""
        self._model = weakref.ref(model)
        return self

    def _kv(self, prefix: tuple[int, ...], device) -> Tensor:
        kv = self.store.get(prefix)
        if kv is None:
            self.misses += 1
            kv = gpt2_fast.prefix_keys_values(self._model(), torch.tensor(prefix, dtype=torch.long, device=device))
            self.store[prefix] = kv
        else:
            self.hits += 1
        return kv

    def for_rows(self, batch: dict, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        """``past`` for :func:`harness.gpt2_fast.counted_hidden_states` over a training batch (``input_ids`` [B, T],
        ``prompt_len`` [B], right-padded rows, prompt first): row ``b``'s first ``prompt_len[b] − 1`` positions,
        fewer when a counted position (``rows`` [B, T] bool) comes earlier; nothing for a row that counts
        nothing. ``None`` when the batch has no ``prompt_len``."""
        if "prompt_len" not in batch:
            return None
        ids = batch["input_ids"]
        T = ids.shape[1]
        position = torch.arange(T, device=rows.device)
        first = torch.where(rows.bool(), position, T).amin(1)  # T: nothing counted
        prefix = torch.minimum(batch["prompt_len"].to(rows.device) - 1, first).clamp_min(0)
        prefix = torch.where(first < T, prefix, 0)
        ids_list, sizes = ids.tolist(), prefix.tolist()
        kv = [self._kv(tuple(ids_list[b][:n]), ids.device) for b, n in enumerate(sizes) if n > 0]
        if not kv:
            return None
        return prefix, torch.cat(kv, dim=1)

    def for_prompts(self, prompts: Sequence[Sequence[int]], device) -> Tensor:
        """``past`` for :class:`harness.gpt2_fast.Decoder` over ``prompts`` (each prompt but its last token)."""
        parts = [self._kv(tuple(p[:-1]), device) for p in prompts if len(p) > 1]
        if not parts:
            model = self._model()
            H = model.config.n_embd
            return model.transformer.wte.weight.new_empty((model.config.n_layer, 0, 2 * H))
        return torch.cat(parts, dim=1)

    @property
    def nbytes(self) -> int:
        return sum(kv.numel() * kv.element_size() for kv in self.store.values())


def for_teacher(model, prompts: Sequence[Sequence[int]], budget_mb: int) -> PrefixCache | None:
    """The process's prefix cache of ``model`` (a frozen teacher), filled with ``prompts`` (the training prompts,
    token lists), or ``None`` when it is not served: budget 0, a model :func:`harness.gpt2_fast` does not compute,
    or prompts whose keys and values would not all fit ``budget_mb`` MiB. The same weights reloaded (the next run
    of a job) with the same prompts get the same cache; other prompts get a cache of their own (a prompt's values
    depend on the batch it was filled in)."""
    if budget_mb <= 0 or not prompts or not gpt2_fast.eligible(model):
        return None
    if estimate_bytes(model, [len(p) for p in prompts]) > budget_mb * 2**20:
        return None
    key = (_weights_digest(model), _prompts_digest(prompts))
    cache = _CACHES.get(key)
    if cache is None:
        cache = _CACHES[key] = PrefixCache(model, prompts)
    return cache.rebind(model)
