"""The teacher, computed once per comparison: its log-probabilities on the training data, stored on disk.

Every off-policy run of a suite (N recipes × S seeds) sees the same reference sequences, so the teacher's
outputs on them are computed once (Snakemake rule ``teacher_cache``) and shared. Only the positions that
enter a loss are stored (response tokens: where ``labels != -100``), as ``log_softmax(z_t)`` at τ = 1;
an objective's temperature is applied later (``log_softmax(log p / τ) = log_softmax(z_t / τ)``).

Storage modes (per counted position):

- ``exact``: the full row of log-probabilities, ``V × 2`` bytes in float16/bfloat16 (``V × 4`` in float32).
  Training on it equals live-teacher training up to the storage precision (exactly, in float32).
- ``sparse``: the top-k log-probabilities and their token ids plus the log of the remaining mass,
  ``k × (2 + 4) + 4`` bytes. The dense teacher row is rebuilt by spreading the remaining mass uniformly
  over the other ``V − k`` tokens. **Bias**: the tail's shape is lost. With the uniform tail, forward-KL
  gradients on the top-k are exact but the student is pulled toward a flat tail; pure top-k truncation
  (renormalising the head, no tail) is worse, it over-weights the head and makes KL(p‖q) blind to the
  tail entirely. The unbiased alternative, importance-sampled tokens (Anshumann et al., "Sparse Logit
  Sampling", ACL 2025), is not implemented yet: see the README ("Teacher cache").

Positions are indexed by training example: ``offsets[i] : offsets[i] + counts[i]`` are example i's rows,
in the order of its response positions, so any batch of reference examples can be served.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data import batching
from .schema import Field

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MODES = ("exact", "sparse")

#: the suite's ``teacher_cache:`` section
CACHE_SCHEMA = {
    "mode": Field((str,), "exact", choices=MODES, help="exact: full rows; sparse: top-k + a flat tail (biased)"),
    "top_k": Field((int,), 64, ge=1, help="sparse: tokens kept per position"),
    "dtype": Field((str,), "float16", choices=tuple(DTYPES), help="storage dtype of the log-probabilities"),
    "batch_size": Field((int,), 64, ge=1, help="sequences per teacher forward while building the cache"),
}


@dataclass
class TeacherCache:
    mode: str  # "exact" | "sparse"
    vocab_size: int
    offsets: Tensor  # [n_examples] long
    counts: Tensor  # [n_examples] long
    logp: Tensor | None = None  # exact: [P, V]
    top_logp: Tensor | None = None  # sparse: [P, k]
    top_idx: Tensor | None = None  # sparse: [P, k] int32
    rest_logp: Tensor | None = None  # sparse: [P] float32, log of the mass outside the top-k
    meta: dict | None = None

    @property
    def n_positions(self) -> int:
        return int(self.counts.sum())

    def bytes_per_position(self) -> float:
        tensors = [self.logp, self.top_logp, self.top_idx, self.rest_logp]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total / max(self.n_positions, 1)

    def rows(self, example_ids: Tensor) -> Tensor:
        """Dense teacher log-probabilities [Σ counts, V] (float32) of the given examples, concatenated."""
        idx = torch.cat([torch.arange(int(self.offsets[e]), int(self.offsets[e] + self.counts[e]))
                         for e in example_ids.tolist()]) if len(example_ids) else torch.zeros(0, dtype=torch.long)
        if self.mode == "exact":
            return self.logp[idx].float()
        k = self.top_logp.shape[1]
        rest = self.rest_logp[idx] - math.log(max(self.vocab_size - k, 1))
        dense = rest[:, None].expand(len(idx), self.vocab_size).clone()
        dense.scatter_(1, self.top_idx[idx].long(), self.top_logp[idx].float())
        return dense

    def teacher_logits(self, batch: dict) -> Tensor:
        """``[B, T, V]`` teacher log-probabilities for a reference batch (rows outside the loss mask are 0).

        The batch must carry ``example_ids`` (set by :func:`harness.steps.reference_batches`).
        """
        mask = batch["loss_mask"] > 0
        out = torch.zeros((*mask.shape, self.vocab_size), dtype=torch.float32, device=mask.device)
        rows = self.rows(batch["example_ids"].cpu())
        if rows.shape[0] != int(mask.sum()):
            raise ValueError(
                f"teacher cache has {rows.shape[0]} positions for this batch but the batch counts "
                f"{int(mask.sum())}; the cache was built with other max_length/max_prompt_tokens — rebuild it"
            )
        out[mask] = rows.to(out.device)
        return out

    def save(self, path: Path) -> None:
        tmp = Path(path).with_suffix(".tmp")
        torch.save(self.__dict__, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "TeacherCache":
        return cls(**torch.load(path, weights_only=False))


def build_cache(
    teacher,
    examples: list[dict],
    pad_id: int,
    *,
    mode: str = "exact",
    top_k: int = 64,
    dtype: str = "float16",
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    meta: dict | None = None,
) -> TeacherCache:
    """Run the teacher once over ``examples`` (encoded training items) and keep its counted rows."""
    if mode not in ("exact", "sparse"):
        raise ValueError(f"teacher cache mode {mode!r}; accepted: exact, sparse")
    store = DTYPES[dtype]
    chunks: dict[str, list[Tensor]] = {"logp": [], "top_logp": [], "top_idx": [], "rest_logp": []}
    counts = []
    teacher.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc="teacher cache", disable=not progress):
            batch = batching.collate(examples[start : start + batch_size], pad_id)
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask = batch["loss_mask"] > 0
            counts.extend(mask.sum(1).tolist())
            logp = torch.log_softmax(logits[mask].float(), dim=-1)
            if mode == "exact":
                chunks["logp"].append(logp.to(store).cpu())
            else:
                top, idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
                chunks["top_logp"].append(top.to(store).cpu())
                chunks["top_idx"].append(idx.to(torch.int32).cpu())
                chunks["rest_logp"].append(rest.cpu())
    counts_t = torch.tensor(counts, dtype=torch.long)
    offsets = torch.cumsum(counts_t, 0) - counts_t
    cat = {k: (torch.cat(v) if v else None) for k, v in chunks.items()}
    vocab = teacher.get_output_embeddings().weight.shape[0]
    return TeacherCache(mode, vocab, offsets, counts_t, meta=meta or {}, **cat)


def cached_or_live(cache: TeacherCache, live: Callable[[dict], Tensor] | None) -> Callable[[dict], Tensor]:
    """Serve reference batches from the cache and anything else (student samples) from the live teacher."""

    def teacher_logits(batch: dict) -> Tensor:
        if batch.get("source", "reference") == "reference" and "example_ids" in batch:
            return cache.teacher_logits(batch)
        if live is None:
            raise RuntimeError("a batch of student samples needs the live teacher, which was not loaded")
        return live(batch)

    return teacher_logits
