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
  Sampling", ACL 2025), is mode ``sampled``.
- ``sampled`` (Random-Sampling KD, Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
  Distillation in LLMs", ACL 2025, arXiv 2503.16870): ``k`` token ids drawn with replacement from the
  teacher at temperature τ_c (``teacher_cache.temperature``), ``k × 4`` bytes. The target rebuilt from them
  is the empirical distribution of the draws, an unbiased estimate of p; see :func:`sampled_target`
  for the estimator and the proof.

Which objectives each mode serves, and why, is :func:`supported` (checked by :mod:`harness.validate`).

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
from .models import counted_rows
from .cache_schema import CACHE_SCHEMA, DTYPE_NAMES, MODES  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
assert tuple(DTYPES) == DTYPE_NAMES
@dataclass
class TeacherCache:
    mode: str  # "exact" | "sparse" | "sampled"
    vocab_size: int
    offsets: Tensor  # [n_examples] long
    counts: Tensor  # [n_examples] long
    logp: Tensor | None = None  # exact: [P, V]
    top_logp: Tensor | None = None  # sparse: [P, k]
    top_idx: Tensor | None = None  # sparse: [P, k] int32
    rest_logp: Tensor | None = None  # sparse: [P] float32, log of the mass outside the top-k
    meta: dict | None = None
    samples: Tensor | None = None  # sampled: [P, k] int32 token ids drawn from softmax(log p / temperature)
    temperature: float = 1.0  # sampled: the temperature the samples were drawn at

    @property
    def n_positions(self) -> int:
        return int(self.counts.sum())

    def bytes_per_position(self) -> float:
        tensors = [self.logp, self.top_logp, self.top_idx, self.rest_logp, self.samples]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total / max(self.n_positions, 1)

    def rows(self, example_ids: Tensor) -> Tensor:
        """Dense teacher log-probabilities [Σ counts, V] (float32) of the given examples, concatenated.

        ``sampled``: ``τ_c · log p̂`` (``-inf`` for tokens never drawn), so that the objectives' own
        ``log_softmax(rows / τ)`` at τ = τ_c gives ``log p̂``, the empirical distribution of the draws.
        """
        ids = torch.as_tensor(example_ids, dtype=torch.long)
        counts = self.counts[ids]
        # example e's rows offsets[e] .. offsets[e] + counts[e] - 1, the examples one after another (one pass: a
        # per-example arange cost ~0.4 ms per 32-example batch)
        starts = torch.repeat_interleave(self.offsets[ids] - (torch.cumsum(counts, 0) - counts), counts)
        idx = starts + torch.arange(int(counts.sum()))
        if self.mode == "exact":
            return self.logp[idx].float()
        if self.mode == "sampled":
            return self.temperature * sampled_target(self.samples[idx], self.vocab_size).log()
        k = self.top_logp.shape[1]
        rest = self.rest_logp[idx] - math.log(max(self.vocab_size - k, 1))
        dense = rest[:, None].expand(len(idx), self.vocab_size).clone()
        dense.scatter_(1, self.top_idx[idx].long(), self.top_logp[idx].float())
        return dense

    def teacher_rows(self, batch: dict) -> Tensor:
        """``[N, V]`` float32 teacher log-probabilities of a reference batch's N counted positions
        (``loss_mask > 0``), in row-major order of the mask: row b's positions in order, rows in batch order.

        The batch must carry ``example_ids`` (set by :func:`harness.steps.reference_batches`); example b's
        cached positions must be exactly row b's counted ones (else ``ValueError``: rebuild the cache).
        """
        mask = batch["loss_mask"] > 0
        rows = self.rows(torch.as_tensor(batch["example_ids"]).cpu())
        if rows.shape[0] != int(mask.sum()):
            raise ValueError(
                f"teacher cache has {rows.shape[0]} positions for this batch but the batch counts "
                f"{int(mask.sum())}; the cache was built with other max_length/max_prompt_tokens — rebuild it"
            )
        return rows.to(mask.device)

    def teacher_logits(self, batch: dict) -> Tensor:
        """``[B, T, V]`` teacher log-probabilities for a reference batch: :meth:`teacher_rows` scattered to the
        counted positions, 0 outside the loss mask."""
        mask = batch["loss_mask"] > 0
        out = torch.zeros((*mask.shape, self.vocab_size), dtype=torch.float32, device=mask.device)
        out[mask] = self.teacher_rows(batch)
        return out

    def save(self, path: Path) -> None:
        tmp = Path(path).with_suffix(".tmp")
        torch.save(self.__dict__, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "TeacherCache":
        return cls(**torch.load(path, weights_only=False))


_MASK64 = (1 << 64) - 1


def _splitmix64(x):
    """SplitMix64's finaliser on uint64 numpy arrays (wrapping arithmetic): a counter-based hash."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(_MASK64)
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(_MASK64)
        return x ^ (x >> np.uint64(31))


def position_uniforms(seed: int, example: Tensor, position: Tensor, k: int) -> Tensor:
    """``[n, k]`` float64 uniforms on [0, 1), a function of (seed, example index, response position, draw) only.

    Each position has its own stream, so the draws do not depend on batch size, order or device.
    """
    import numpy as np

    ex = example.cpu().numpy().astype(np.uint64)
    pos = position.cpu().numpy().astype(np.uint64)
    key = _splitmix64(_splitmix64(_splitmix64(np.full_like(ex, seed, dtype=np.uint64)) ^ ex) ^ pos)
    j = np.arange(k, dtype=np.uint64)
    bits = _splitmix64(key[:, None] ^ _splitmix64(j)[None, :])
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def draw_samples(logp: Tensor, uniforms: Tensor, temperature: float = 1.0) -> Tensor:
    """Token ids ``[n, k]`` (int32, sorted per row) drawn from ``softmax(logp / temperature)`` by inverse CDF.

    ``logp`` [n, V] are log-probabilities (τ = 1); ``uniforms`` [n, k] on [0, 1). Tokens of probability 0
    (``-inf``) are never drawn.
    """
    r = torch.softmax(logp.double() / temperature, dim=-1)
    cdf = r.cumsum(-1)
    u = uniforms.to(cdf.device) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=logp.shape[-1] - 1)
    return ids.sort(-1).values.to(torch.int32)


def sampled_target(samples: Tensor, vocab_size: int) -> Tensor:
    """The empirical distribution p̂ [n, V] (float32) of ``samples`` [n, k]: p̂_v = c_v / k.

    Estimator (RS-KD with the proposal equal to the target; Anshumann et al. 2025, arXiv 2503.16870):
    the k ids x_1..x_k of a position are i.i.d. draws from r = softmax(z_t / τ_c) and the cached target is
    p̂_v = c_v / k with c_v = #{j : x_j = v}. Every importance weight p_v / r_v is 1 because the objective
    is evaluated at τ = τ_c, where its teacher p_τ is r itself.

    Unbiasedness. c_v ~ Binomial(k, r_v), so E[p̂_v] = r_v = p_τ,v. The forward-KL loss on the target is
    ℓ = Σ_v p̂_v (log p̂_v − log q_v) with q = softmax(z_s / τ); since Σ_v p̂_v = 1 its gradient is
    ∂ℓ/∂z_s = (q − p̂) / τ, linear in p̂, so E[∂ℓ/∂z_s] = (q − p_τ) / τ, the exact forward-KL gradient.
    The same holds after any reduction (a fixed weighted sum over positions) and, by the chain rule, for
    the student's parameters (z_s does not depend on the draws). The value is not unbiased: its
    cross-entropy part E[−Σ p̂ log q] = −Σ p_τ log q is, but the entropy term −H(p̂) is not
    (E[H(p̂)] ≤ H(p_τ), by concavity). Variance: Var[p̂_v] = r_v (1 − r_v) / k, so the expected squared error
    of the per-position gradient is (1 − Σ_v r_v²) / (k τ²): small when the teacher is peaked.

    Only objectives whose gradient is linear in p are served unbiasedly this way (see :func:`supported`).
    """
    n, k = samples.shape
    counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=samples.device)
    counts.scatter_add_(1, samples.long(), torch.ones(n, k, dtype=torch.float32, device=samples.device))
    return counts / k


# Which objectives each mode serves ---------------------------------------------------------------------------
#: objectives a sampled cache serves without bias: forward KL's gradient (q − p)/τ is linear in p.
#: ce needs no teacher. Everything else depends non-linearly on p (rkl and srkl: log p, infinite where a
#: token was not drawn; jsd, skl: log of a mixture; tvd: |p − q|; akl, bdkd: whole-row statistics; ab, todi:
#: powers and ratios of p; sinkhorn: whole-row costs; uld: sorted p), so an empirical p̂ biases it.
SAMPLED_UNBIASED = frozenset({"fkl"})


def supported(mode: str, objective_id: str, temperature: float = 1.0, cache: dict | None = None) -> tuple[bool, str]:
    """Whether a cache of ``mode`` can serve loss term ``objective_id`` at ``temperature``, and why (not).

    - ``exact``: every objective (the cache equals the live teacher up to storage precision).
    - ``sparse`` (top-k + flat tail): objectives that are sums of per-token terms (the registry's
      ``sparse_ok``); they are biased by the flat tail. Whole-row objectives (akl, bdkd, sinkhorn, user
      objectives) are refused: the tail's shape is gone.
    - ``sampled``: only :data:`SAMPLED_UNBIASED` (fkl), and only at the cache's temperature τ_c, where the
      target is an unbiased estimate of p_τ (:func:`sampled_target`); everything else is refused.

    ``cache`` is the suite's validated ``teacher_cache`` section (for ``sampled``: its ``temperature``).
    Objectives that need no teacher (``ce``) are supported by every mode.
    """
    from . import objectives

    if mode not in MODES:
        return False, f"unknown teacher cache mode {mode!r}; accepted: {', '.join(MODES)}"
    spec = objectives.spec(objective_id)
    if not spec.needs_teacher or mode == "exact":
        return True, ""
    if mode == "sparse":
        if spec.sparse_ok:
            return True, "sum of per-token terms: defined on the rebuilt row (biased by the flat tail)"
        return False, (f"objective {objective_id!r} is not defined on a sparse (top-k) teacher: it depends on "
                       "the shape of the whole row, which the cache discards; use mode 'exact'")
    if objective_id not in SAMPLED_UNBIASED:
        return False, (f"objective {objective_id!r} is not linear in the teacher's p, so a sampled cache "
                       f"(RS-KD) would bias it; a sampled cache serves only {', '.join(sorted(SAMPLED_UNBIASED))}"
                       " (and ce); use mode 'exact'")
    tau_c = float((cache or {}).get("temperature", 1.0))
    if abs(float(temperature) - tau_c) > 1e-12:
        return False, (f"objective {objective_id!r} runs at temperature {temperature:g} but the sampled cache "
                       f"draws at teacher_cache.temperature = {tau_c:g}; the target is unbiased only at that "
                       f"temperature: set teacher_cache.temperature to {temperature:g} or use mode 'exact'")
    return True, "unbiased gradient (empirical distribution of teacher samples)"


def build_cache(
    teacher,
    examples: list[dict],
    pad_id: int,
    *,
    mode: str = "exact",
    top_k: int = 64,
    samples: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    dtype: str = "float16",
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    meta: dict | None = None,
) -> TeacherCache:
    """Run the teacher once over ``examples`` (encoded training items) and keep its counted rows.

    ``sampled``: position j of example i (its j-th counted position) draws ``samples`` tokens from
    ``softmax(log p / temperature)`` with the uniforms :func:`position_uniforms` ``(seed, i, j)``.
    """
    if mode not in MODES:
        raise ValueError(f"teacher cache mode {mode!r}; accepted: {', '.join(MODES)}")
    store = DTYPES[dtype]
    chunks: dict[str, list[Tensor]] = {"logp": [], "top_logp": [], "top_idx": [], "rest_logp": [], "samples": []}
    counts = []
    teacher.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc="teacher cache", disable=not progress):
            batch = batching.collate(examples[start : start + batch_size], pad_id)
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            mask = batch["loss_mask"] > 0
            logits = counted_rows(teacher, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            counts.extend(mask.sum(1).tolist())
            logp = torch.log_softmax(logits.float(), dim=-1)
            if mode == "exact":
                chunks["logp"].append(logp.to(store).cpu())
            elif mode == "sampled":
                example = (torch.arange(mask.shape[0], device=mask.device)[:, None] + start).expand_as(mask)[mask]
                position = (mask.long().cumsum(1) - 1)[mask]
                u = position_uniforms(seed, example, position, samples)
                chunks["samples"].append(draw_samples(logp, u, temperature).cpu())
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
    return TeacherCache(mode, vocab, offsets, counts_t, meta=meta or {}, temperature=float(temperature), **cat)


def cached_or_live(cache: TeacherCache, live: Callable[[dict], Tensor] | None) -> Callable[[dict], Tensor]:
    """Serve reference batches from the cache and anything else (student samples) from the live teacher.

    A mixed micro-batch (sampled rows and reference rows, e.g. MiniLLM's) may name its reference rows:
    ``cached_rows`` [n] (row indices) and ``cached_example_ids`` [n] (their examples); those rows — the reference
    encoding of their examples, token for token — are read from the cache and only the others go through the
    live teacher (``live``: a teacher function of :func:`harness.steps.live_teacher`'s form).

    The returned function gives ``[B, T, V]`` (cached rows: log-probabilities, 0 outside the mask; live rows:
    logits); its ``.rows(batch)`` gives the same values at the counted positions only, ``[N, V]`` in row-major
    order of ``loss_mask > 0``, without building ``[B, T, V]`` (:func:`harness.distill.train` reads that form).
    The live teacher's rows come from ``live.rows`` where it has one, else from ``live(batch)[mask > 0]``.
    """

    def live_rows(batch: dict) -> Tensor:
        rows_fn = getattr(live, "rows", None)
        return rows_fn(batch) if rows_fn is not None else live(batch)[batch["loss_mask"] > 0]

    def route(batch: dict):
        """``"cache"``, ``"live"``, or for a mixed batch (cached row indices [n], the other rows' mask [B])."""
        if batch.get("source", "reference") == "reference" and "example_ids" in batch:
            return "cache"
        if live is None:
            raise RuntimeError("a batch of student samples needs the live teacher, which was not loaded")
        rows = batch.get("cached_rows")
        if rows is None or len(rows) == 0:
            return "live"
        rows = torch.as_tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
        others = torch.ones(batch["input_ids"].shape[0], dtype=torch.bool, device=rows.device)
        others[rows] = False
        return rows, others

    def cached_part(batch: dict, rows: Tensor) -> dict:
        return {"loss_mask": batch["loss_mask"][rows], "example_ids": torch.as_tensor(batch["cached_example_ids"])}

    def live_part(batch: dict, others: Tensor) -> dict:
        return {k: batch[k][others] for k in ("input_ids", "attention_mask", "loss_mask", "prompt_len") if k in batch}

    def teacher_logits(batch: dict) -> Tensor:
        how = route(batch)
        if how == "cache":
            return cache.teacher_logits(batch)
        if how == "live":
            return live(batch)
        rows, others = how
        live_out = live(live_part(batch, others))
        out = live_out.new_zeros((batch["input_ids"].shape[0], *live_out.shape[1:]))
        out[others] = live_out
        cached = cache.teacher_logits(cached_part(batch, rows))
        out[rows] = cached.to(out.dtype)[..., : out.shape[-1]]
        return out

    def teacher_rows(batch: dict) -> Tensor:
        how = route(batch)
        if how == "cache":
            return cache.teacher_rows(batch)
        if how == "live":
            return live_rows(batch)
        rows, others = how
        counts = (batch["loss_mask"] > 0).sum(1).tolist()
        live_out = live_rows(live_part(batch, others))
        cached = cache.teacher_rows(cached_part(batch, rows)).to(live_out.dtype)[:, : live_out.shape[-1]]
        # each batch row's block of counted positions, the blocks in batch order: row-major order of the mask
        blocks: list[Tensor | None] = [None] * len(counts)
        live_ids, cached_ids = torch.nonzero(others).flatten().tolist(), rows.tolist()
        for ids, out in ((live_ids, live_out), (cached_ids, cached)):
            for b, block in zip(ids, out.split([counts[b] for b in ids])):
                blocks[b] = block
        return torch.cat(blocks)

    teacher_logits.rows = teacher_rows
    return teacher_logits
