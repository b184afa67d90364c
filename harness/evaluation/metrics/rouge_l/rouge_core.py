"""Pure ROUGE-L, exactly as MiniLLM (``minillm/rouge_metric.py``) computes it.

Convention
----------
* scorer: ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` (lower-cases, keeps
  ``[a-z0-9]`` tokens, Porter-stems tokens longer than 3 characters);
* per item: the ROUGE-L **F-measure**, **maximum over the item's references** (S-NI has several);
* corpus score: the per-item values × 100, **averaged over items**.

An empty prediction (or one with no alphanumeric token) scores 0 against any reference.

This file lives next to the `evaluate` module ``rouge_l.py``, which imports it relatively (``evaluate``
copies both into its module cache), so the harness and ``evaluate.load`` run the very same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer


@lru_cache(maxsize=1)
def make_scorer() -> RougeScorer:
    """The MiniLLM scorer: ROUGE-L with Porter stemming (cached; the scorer is stateless).

    ``rouge_score`` is imported here, not at module level: it imports all of ``nltk`` (for the Porter
    stemmer; ~1 s with the scikit-learn and SciPy modules nltk pulls in), which only scoring needs.
    The tokenizer is rouge_score's own stemming ``DefaultTokenizer``, memoised (:class:`_MemoTokenizer`):
    the same references and short answers are tokenised again and again."""
    from rouge_score import rouge_scorer, tokenizers

    stemming = _MemoTokenizer(tokenizers.DefaultTokenizer(use_stemmer=True))
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True, tokenizer=stemming)


class _MemoTokenizer:
    """A rouge_score tokenizer (``tokenize(text) -> list[str]``) whose results are memoised per text.

    Tokenising is a pure function of the text (lower-case, ``[a-z0-9]`` tokens, Porter stemming), so the
    memo changes no score; it saves stemming a text again (stemming is most of the scoring time)."""

    def __init__(self, tokenizer, maxsize: int = 1 << 16):
        self._tokenize = lru_cache(maxsize=maxsize)(lambda text: tuple(tokenizer.tokenize(text)))

    def tokenize(self, text: str) -> list[str]:
        return list(self._tokenize(text))


def rouge_l_item(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure × 100 of one prediction, maximised over its references (≥ 1 required)."""
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    if len(references) == 0:
        raise ValueError("an item needs at least one reference")
    scorer = make_scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def rouge_l_per_item(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-item ROUGE-L (× 100, max over references); ``len(predictions) == len(references)``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    return [rouge_l_item(p, refs) for p, refs in zip(predictions, references)]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus ROUGE-L: mean over items of the per-item ROUGE-L F × 100 (max over references).

    Args:
        predictions: one generated text per item, ``[N]``.
        references: all acceptable references of each item, ``[N][R_i]`` with ``R_i >= 1``.

    Returns:
        A value in [0, 100]; 0.0 for an empty corpus.
    """
    scores = rouge_l_per_item(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0
