"""`evaluate` metric module: ROUGE-L exactly as MiniLLM reports it.

Load it from disk (works offline, nothing comes from the Hub)::

    import evaluate
    metric = evaluate.load("harness/evaluation/metrics/rouge_l")   # or harness.evaluation.load_rouge_metric()
    metric.compute(predictions=["the cat sat on the mat"],
                   references=[["the cat is on the mat", "a dog"]])
    # {'rougeL': 83.33...}

Inputs: ``predictions`` — one string per item; ``references`` — a list of strings per item (all
acceptable references). Output: ``{"rougeL": float}``, the mean over items of the maximum (over the
item's references) ROUGE-L F-measure (``RougeScorer(["rougeL"], use_stemmer=True)``), × 100.
The computation is ``rouge_core.rouge_l``, shared with the harness.
"""

import datasets
import evaluate

from .rouge_core import rouge_l

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    pages = "74--81",
}
@inproceedings{gu2024minillm,
    title = "MiniLLM: Knowledge Distillation of Large Language Models",
    author = "Gu, Yuxian and Dong, Li and Wei, Furu and Huang, Minlie",
    booktitle = "ICLR",
    year = "2024",
}
"""

_DESCRIPTION = """\
ROUGE-L F-measure (Porter stemming), maximum over an item's references, x100, averaged over items --
the instruction-following score of MiniLLM / DistiLLM.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings, one per item.
    references: list of lists of reference strings (every acceptable answer of the item).
Returns:
    rougeL: mean over items of max_r ROUGE-L-F(prediction, r) x 100, in [0, 100].
Examples:
    >>> metric = evaluate.load("harness/evaluation/metrics/rouge_l")
    >>> metric.compute(predictions=["the cat sat on the mat"], references=[["the cat is on the mat"]])
    {'rougeL': 83.33333333333334}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    """ROUGE-L (MiniLLM convention) as an `evaluate.Metric`."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references):
        return {"rougeL": rouge_l(list(predictions), [list(r) for r in references])}
