"""Drawing tokens: one categorical draw per row from a single uniform (inverse CDF), for every sampler.

``torch.multinomial(probs, 1)`` — what Hugging Face ``generate`` calls — draws an exponential variate for EVERY
vocabulary entry of every row (``probs / Exp(1)``, argmax): 32 rows × 600 tokens cost ~1 ms on one CPU thread,
about a third of a tiny model's whole decoding step. The inverse CDF draws one uniform per row: the token is the
first index whose cumulative probability exceeds ``u · total``; the same distribution (a zero-probability token
is never drawn), ~20× cheaper. The tokens drawn differ from ``multinomial``'s for the same seed (another use of
the random stream), so runs are reproducible from their seed but not token-identical to a ``multinomial`` run.

- :func:`categorical` — the draw, for a caller's own decoding loop (MiniLLM's teacher-mixed sampler).
- :func:`sampling_processors` — for HF ``generate``: its sampling warpers (temperature, top-k, top-p, in
  ``generate``'s own order) followed by :class:`CategoricalDraw`, which draws the token and returns scores
  that are ``0`` at it and ``-inf`` elsewhere. ``generate`` then runs greedy (``do_sample=False``): its argmax
  picks the drawn token, and everything else (KV cache, eos stopping and padding, the other logits processors
  such as ``no_repeat_ngram_size``, applied before the warpers as in sampling mode) is ``generate``'s own.
"""

from __future__ import annotations

import torch
from torch import Tensor


def categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``probs`` [B, V] (non-negative, each row with positive total; need not sum to 1):
    ``[B]`` long, token ``i`` with probability ``probs[b, i] / probs[b].sum()``.

    The cumulative sum is taken in float64; ``u ~ U[0, 1)`` (one per row, from ``generator``) is scaled by the
    row's total and the token is the first index whose cumulative sum exceeds it (``searchsorted(..., right=True)``),
    so a token of probability 0 is never drawn.
    """
    if probs.dim() != 2:
        raise ValueError(f"categorical expects probs [B, V], got shape {tuple(probs.shape)}")
    cdf = probs.to(torch.float64).cumsum(-1)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device, generator=generator)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


class CategoricalDraw:
    """A last logits processor for HF ``generate`` run greedy: draws a token from ``softmax(scores)`` with
    :func:`categorical` and returns scores ``0`` at the drawn token, ``-inf`` elsewhere, ``[B, V]`` float32.
    (A plain callable: ``LogitsProcessorList`` calls ``processor(input_ids, scores)``.)"""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        token = categorical(torch.softmax(scores.float(), dim=-1), self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token[:, None], 0.0)


def sampling_processors(temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> list:
    """The processors that make a greedy ``generate`` call sample: temperature (if ≠ 1), top-k (if > 0) and top-p
    (if < 1) — ``transformers``' own warpers, in the order ``generate`` applies them when sampling — then
    :class:`CategoricalDraw`. Pass them as ``logits_processor=LogitsProcessorList(...)`` with
    ``do_sample=False``."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out: list = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        out.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return out + [CategoricalDraw(generator)]
