"""The student's validation loss, for modes that steer by it (DistiLLM's adaptive schedule)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data.batching import collate, encode
from ..models import counted_rows

REDUCTIONS = ("batch_mean", "token_mean")


def validation_loss(student, tokenizer, items: Sequence[dict], *, pad_id: int, max_prompt_tokens: int,
                    max_length: int, batch_size: int = 32, reduction: str = "batch_mean") -> Callable[[], float]:
    """``val_loss()``: the student's cross-entropy on the reference responses of ``items`` (prompt and padding
    excluded, as in training rows; only those rows are computed), without grad, in eval mode (its mode restored
    after).

    ``reduction="batch_mean"`` (default) is DistiLLM's ``evaluate`` (finetune.py l.463-535 at
    jongwooko/distillm@d47e77ff): the token mean of each batch of ``batch_size`` items, averaged over batches
    (``all_loss / step``); ``"token_mean"`` is the token mean over the whole set. Items are encoded on the first
    call, so building the callable costs nothing when a mode never calls it.
    """
    if not items:
        raise ValueError("validation_loss needs at least one item")
    if reduction not in REDUCTIONS:
        raise ValueError(f"validation_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if batch_size < 1:
        raise ValueError(f"validation_loss: batch_size must be >= 1, got {batch_size}")
    items = list(items)
    batches: list[dict] = []

    def val_loss() -> float:
        if not batches:
            rows = [encode(tokenizer, it, max_prompt_tokens, max_length) for it in items]
            batches.extend(collate(rows[k: k + batch_size], pad_id) for k in range(0, len(rows), batch_size))
        device = next(student.parameters()).device
        was_training = student.training
        student.eval()
        sums, counts = [], []
        try:
            with torch.no_grad():
                for b in batches:
                    mask = b["loss_mask"].to(device)
                    logits = counted_rows(student, b["input_ids"].to(device), b["attention_mask"].to(device),
                                          mask).float()  # [N, V]: the response positions only
                    sums.append(float(torch.nn.functional.cross_entropy(
                        logits, b["labels"].to(device)[mask > 0], reduction="sum")))
                    counts.append(float(b["loss_mask"].sum()))
        finally:
            student.train(was_training)
        if reduction == "token_mean":
            return sum(sums) / max(sum(counts), 1.0)
        means = [s / c for s, c in zip(sums, counts) if c > 0]
        return sum(means) / max(len(means), 1)

    return val_loss
