"""Local `evaluate` metric modules, loaded from disk with ``evaluate.load(<dir>)`` (never the Hub)."""

from __future__ import annotations

from pathlib import Path

ROUGE_L_METRIC_DIR = Path(__file__).resolve().parent / "rouge_l"

__all__ = ["ROUGE_L_METRIC_DIR", "load_rouge_metric"]


def load_rouge_metric(**kwargs):
    """``evaluate.load`` of the in-repo ROUGE-L module (MiniLLM convention, ``{"rougeL": 0..100}``).

    Works offline: the module is read from ``ROUGE_L_METRIC_DIR`` and copied into the `evaluate`
    modules cache; ``kwargs`` go to ``evaluate.load`` (e.g. ``experiment_id``)."""
    import evaluate

    return evaluate.load(str(ROUGE_L_METRIC_DIR), **kwargs)
