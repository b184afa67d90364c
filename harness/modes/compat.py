"""``batch_source``: the pre-registry entry point, kept so callers migrate at their pace (use :func:`build`)."""

from __future__ import annotations

from typing import Callable

from .base import BatchSource, ModeContext
from .registry import build


def batch_source(mode: str, mode_params: dict | None, *, reference: Callable[[int], dict], student=None,
                 tokenizer=None, examples: list[dict] | None = None, pad_id: int | None = None, seed: int = 0,
                 max_steps: int = 1, grad_accum: int = 1, max_length: int = 512,
                 val_loss: Callable[[], float] | None = None, max_new_tokens: int | None = None) -> BatchSource:
    """Deprecated: ``build(mode, mode_params, ModeContext(...))``. A ``max_new_tokens`` left in ``mode_params``
    by an old recipe is taken as the sampling budget (``ctx.max_new_tokens``); ``n_train`` is ``len(examples)``."""
    params = dict(mode_params or {})
    legacy = params.pop("max_new_tokens", None)
    ctx = ModeContext(reference=reference, student=student, tokenizer=tokenizer, pad_id=pad_id, seed=seed,
                      max_steps=max_steps, grad_accum=grad_accum, max_length=max_length,
                      max_new_tokens=max_new_tokens if max_new_tokens is not None else legacy,
                      n_train=len(examples) if examples else None, val_loss=val_loss)
    return build(mode, params, ctx)
