"""Evaluation: ROUGE-L (MiniLLM), generation, text / model metrics, lm-eval bridge, per-run driver.

Heavy imports (``lm_eval``) happen only inside :func:`run_lm_eval`.
"""

from harness.evaluation.evaluate_run import evaluate_model, item_answers
from harness.evaluation.generation import EVAL_SEEDS, generate
from harness.evaluation.lm_eval_bridge import run_lm_eval, write_task_configs
from harness.evaluation.metrics import ROUGE_L_METRIC_DIR, load_rouge_metric
from harness.evaluation.model_metrics import (
    calibration_ece,
    ece_from_logits,
    model_metrics,
    response_nll,
    teacher_agreement,
)
from harness.evaluation.text_metrics import (
    coverage,
    distinct_n,
    exact_match,
    normalize_answer,
    rouge_l,
    valid_rate,
)

__all__ = [
    "EVAL_SEEDS",
    "ROUGE_L_METRIC_DIR",
    "calibration_ece",
    "coverage",
    "distinct_n",
    "ece_from_logits",
    "evaluate_model",
    "exact_match",
    "generate",
    "item_answers",
    "load_rouge_metric",
    "model_metrics",
    "normalize_answer",
    "response_nll",
    "rouge_l",
    "run_lm_eval",
    "teacher_agreement",
    "valid_rate",
    "write_task_configs",
]
