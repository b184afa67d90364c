"""Pure text metrics over generated samples (no model, no I/O).

Scales
------
* ``rouge_l``, ``exact_match``, ``valid_rate``: percentages in [0, 100];
* ``coverage``, ``distinct_n``: fractions in [0, 1].

Answer matching uses :func:`normalize_answer`: lower-case, punctuation (``string.punctuation``) removed,
whitespace runs collapsed to one space, stripped. A sample is *valid* for an item when its normalised
form equals the normalised form of one of the item's acceptable answers (``item["answers"]``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from harness.evaluation.metrics.rouge_l.rouge_core import rouge_l, rouge_l_item, rouge_l_per_item

__all__ = [
    "minillm_response",
    "normalize_answer",
    "is_valid",
    "exact_match",
    "valid_rate",
    "coverage",
    "distinct_n",
    "rouge_l",
    "rouge_l_item",
    "rouge_l_per_item",
]

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_WS = re.compile(r"\s+")


def minillm_response(text: str) -> str:
    """A generated response as MiniLLM scores it: the literal ``"<n>"`` read as a newline, then stripped.

    MiniLLM (microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3 minillm/evaluate_main.py,
    ``evaluate_main``) applies ``r.replace("<n>", "\\n").strip()`` to every decoded response before
    ``compute_metrics``. It matters for ROUGE-L: the scorer's tokenizer keeps ``n`` of ``"<n>"`` as a word.
    Apply it to every sample before any text metric.
    """
    return text.replace("<n>", "\n").strip()


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace, strip: ``" The  Cat!"`` → ``"the cat"``."""
    return _WS.sub(" ", text.lower().translate(_PUNCT_TABLE)).strip()


def is_valid(sample: str, answers: Sequence[str]) -> bool:
    """True when the normalised sample equals one of the normalised acceptable answers."""
    norm = normalize_answer(sample)
    return any(norm == normalize_answer(a) for a in answers)


def _check_lengths(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} {what} but {len(b)} answer lists")


def exact_match(preds: Sequence[str], answers_lists: Sequence[Sequence[str]]) -> float:
    """Exact match × 100: mean over items of 1[pred is one of the item's acceptable answers].

    Args:
        preds: one prediction per item, ``[N]``.
        answers_lists: acceptable answers per item, ``[N][A_i]``.
    Returns:
        Percentage in [0, 100]; 0.0 for an empty corpus.
    """
    _check_lengths(preds, answers_lists, "predictions")
    if not preds:
        return 0.0
    return 100.0 * sum(is_valid(p, a) for p, a in zip(preds, answers_lists)) / len(preds)


def valid_rate(samples_per_item: Sequence[Sequence[str]], answers_lists: Sequence[Sequence[str]]) -> float:
    """Fraction (× 100) of ALL samples that are an acceptable answer of their item.

    Exact match pooled over several samples per item (``[N][S_i]`` samples): with one sample per item it
    equals :func:`exact_match`. Items with more samples weigh more. 0.0 when there are no samples.
    """
    _check_lengths(samples_per_item, answers_lists, "sample lists")
    n_valid = n_total = 0
    for samples, answers in zip(samples_per_item, answers_lists):
        n_valid += sum(is_valid(s, answers) for s in samples)
        n_total += len(samples)
    return 100.0 * n_valid / n_total if n_total else 0.0


def coverage(
    samples_per_item: Sequence[Sequence[str]], answers_lists: Sequence[Sequence[str]]
) -> float | None:
    """Mean over several-answer items of |distinct valid answers produced| / |acceptable answers|.

    Only items with at least two distinct (normalised) acceptable answers count — coverage of a
    one-answer item is just exact match. Answers and samples are compared normalised; duplicates in
    the answer list count once.

    Args:
        samples_per_item: samples per item, ``[N][S_i]`` (e.g. one per evaluation seed).
        answers_lists: acceptable answers per item, ``[N][A_i]``.
    Returns:
        A fraction in [0, 1], or ``None`` when no item has ≥ 2 distinct answers.
    """
    _check_lengths(samples_per_item, answers_lists, "sample lists")
    fractions = []
    for samples, answers in zip(samples_per_item, answers_lists):
        acceptable = {normalize_answer(a) for a in answers}
        if len(acceptable) < 2:
            continue
        produced = {normalize_answer(s) for s in samples}
        fractions.append(len(acceptable & produced) / len(acceptable))
    return sum(fractions) / len(fractions) if fractions else None


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: number of unique n-grams / total number of n-grams, pooled over all texts.

    Tokens are whitespace-separated words, case kept; a text shorter than ``n`` words contributes no
    n-gram. Returns a fraction in [0, 1], 0.0 when there is no n-gram at all.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = text.split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0
