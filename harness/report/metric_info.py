"""What each metric is: readable label, better direction, meaning, and the training objective it equals.

One registry, :data:`METRICS`, covers every metric :func:`harness.evaluation.evaluate_model` writes into a
run record (``tests/test_evaluation.py`` checks this against a real evaluation). Directions:

* ``+1`` — higher is better (ROUGE-L, exact match, coverage, top-1 agreement, lm-eval accuracy);
* ``-1`` — lower is better (ECE, response NLL/perplexity, divergences to the teacher); labels carry ``↓``;
* ``0`` — no better direction (distinct-n rises with noise: the untrained student scores highest; the
  per-seed ROUGE-L spread). Such metrics are never ranked nor coloured as better/worse; labels carry ``·``.

A metric that is some recipe's training loss favours that recipe by construction. ``objective`` names the
divergence a metric computes (with the parameters it is computed at, always temperature 1); the report
lists, from the run records' recipe configurations, which recipes train on it (:func:`recipes_training_on`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "METRICS",
    "MetricInfo",
    "direction",
    "is_higher_better",
    "loss_terms",
    "metric_info",
    "metric_label",
    "ordered_metrics",
    "recipes_training_on",
]


@dataclass(frozen=True)
class MetricInfo:
    """``label``: readable name; ``direction``: +1 / -1 / 0 (see the module doc); ``meaning``: one line;
    ``objective``: ``(objective name, params)`` of the training loss this metric equals, or ``None``."""

    label: str
    direction: int
    meaning: str
    objective: tuple[str, tuple[tuple[str, Any], ...]] | None = None


_LM_EVAL = re.compile(r"^lm_eval/(?P<task>[^/]+)/(?P<metric>[^/]+)$")
#: lm-eval metric leaf names (``lm_eval/<task>/<leaf>``) and their directions.
LM_EVAL_DIRECTIONS = {"acc": 1, "acc_norm": 1, "exact_match": 1, "f1": 1, "bleu": 1, "perplexity": -1,
                      "word_perplexity": -1, "byte_perplexity": -1, "bits_per_byte": -1}

METRICS: dict[str, MetricInfo] = {
    "rougeL": MetricInfo("ROUGE-L", 1, "ROUGE-L F × 100 of sampled responses, max over an item's references, "
                         "mean over items and evaluation seeds (MiniLLM)"),
    "exact_match": MetricInfo("Exact match", 1, "% of sampled responses equal to an acceptable answer "
                              "(normalised), mean over evaluation seeds"),
    "valid_rate": MetricInfo("Valid rate", 1, "% of all drawn samples (seeds + extra coverage samples) that "
                             "are acceptable"),
    "coverage": MetricInfo("Coverage", 1, "fraction of a several-answer item's acceptable answers among its "
                           "samples, mean over such items"),
    "distinct_1": MetricInfo("Distinct-1", 0, "distinct unigrams / all unigrams over the samples; noise "
                             "raises it (no better direction: compare with the teacher's value)"),
    "distinct_2": MetricInfo("Distinct-2", 0, "distinct bigrams / all bigrams over the samples; no better "
                             "direction"),
    "distinct_3": MetricInfo("Distinct-3", 0, "distinct trigrams / all trigrams over the samples; no better "
                             "direction"),
    "ece": MetricInfo("ECE", -1, "expected calibration error of top-1 next-token predictions on held-out "
                      "reference responses (15 bins)"),
    "response_nll": MetricInfo("Response NLL", -1, "teacher-forced cross-entropy of the held-out reference "
                               "responses, nats/token", ("ce", ())),
    "response_ppl": MetricInfo("Response perplexity", -1, "exp(response NLL)", ("ce", ())),
    "top1_agreement": MetricInfo("Top-1 agreement", 1, "fraction of held-out response tokens where the "
                                 "student's and the teacher's argmax agree"),
    "kl_to_teacher": MetricInfo("KL to teacher", -1, "forward KL(p_teacher ‖ q_student), nats/token, "
                                "token mean on held-out reference responses", ("fkl", ())),
    "jsd_to_teacher": MetricInfo("JSD to teacher", -1, "Jensen–Shannon divergence (β = 0.5, symmetric, ≤ ln 2) "
                                 "between teacher and student, nats/token, token mean on held-out reference "
                                 "responses", ("jsd", (("beta", 0.5),))),
    "tvd_to_teacher": MetricInfo("TVD to teacher", -1, "total variation distance ½Σ|p_teacher − q_student| "
                                 "(symmetric, in [0, 1]), token mean on held-out reference responses",
                                 ("tvd", ())),
    "rougeL_seed_std": MetricInfo("ROUGE-L s.d. over eval seeds", 0, "sample s.d. of ROUGE-L over the "
                                  "evaluation seeds of one run"),
}
#: Preferred display order; others follow alphabetically.
METRIC_ORDER = list(METRICS)


def metric_info(metric: str) -> MetricInfo | None:
    """The registry entry of ``metric`` (``lm_eval/<task>/<leaf>`` by its leaf), or ``None`` if unknown."""
    if metric in METRICS:
        return METRICS[metric]
    m = _LM_EVAL.match(metric)
    if m:
        leaf = m["metric"]
        base = re.sub(r"_(none|strict.*|flexible.*|remove_whitespace)$", "", leaf)
        d = LM_EVAL_DIRECTIONS.get(leaf, LM_EVAL_DIRECTIONS.get(base))
        if d is not None:
            return MetricInfo(f"lm-eval {m['task']} {leaf}", d, f"lm-evaluation-harness task {m['task']}: {leaf}")
    return None


def direction(metric: str, overrides: Mapping[str, bool] | None = None) -> int:
    """+1, -1 or 0. ``overrides`` (metric -> higher is better) win; unknown metrics are 0 (not ranked)."""
    if overrides and metric in overrides:
        return 1 if overrides[metric] else -1
    info = metric_info(metric)
    return 0 if info is None else info.direction


def is_higher_better(metric: str, overrides: Mapping[str, bool] | None = None) -> bool:
    """True unless the metric's direction is lower-is-better (neutral metrics count as higher)."""
    return direction(metric, overrides) >= 0


def metric_label(metric: str, overrides: Mapping[str, bool] | None = None) -> str:
    """Readable name with ``↓`` when lower is better and ``·`` when there is no better direction."""
    info = metric_info(metric)
    label = info.label if info else metric
    d = direction(metric, overrides)
    return label if d > 0 else (f"{label} ↓" if d < 0 else f"{label} ·")


def ordered_metrics(names: Iterable[str]) -> list[str]:
    """Registry order first, then the rest alphabetically."""
    names = list(names)
    known = [m for m in METRIC_ORDER if m in names]
    return known + sorted(m for m in names if m not in METRIC_ORDER)


def loss_terms(recipe_config: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The weighted loss terms of a recipe configuration as ``[{objective, weight, temperature, params}]``.

    Accepts the term list form (``loss: [{objective, weight, temperature, params}]``) and the short form
    (``objective``, ``params``, ``temperature``, ``kd_weight`` meaning ``(1 − kd)·CE + kd·D``). Terms with
    weight 0 are dropped. ``None`` or an unrecognised dict gives ``[]``.
    """
    if not isinstance(recipe_config, Mapping):
        return []
    terms: list[dict[str, Any]] = []
    if isinstance(recipe_config.get("loss"), list):
        for t in recipe_config["loss"]:
            if isinstance(t, Mapping) and t.get("objective"):
                terms.append({"objective": str(t["objective"]), "weight": float(t.get("weight", 1.0)),
                              "temperature": float(t.get("temperature", 1.0) or 1.0),
                              "params": dict(t.get("params") or {})})
    elif recipe_config.get("objective"):
        kd = float(recipe_config.get("kd_weight", 1.0))
        obj = str(recipe_config["objective"])
        temp = float(recipe_config.get("temperature", 1.0) or 1.0)
        params = dict(recipe_config.get("params") or {})
        if obj == "ce":
            terms.append({"objective": "ce", "weight": 1.0, "temperature": 1.0, "params": {}})
        else:
            terms.append({"objective": obj, "weight": kd, "temperature": temp, "params": params})
            if kd < 1.0:
                terms.append({"objective": "ce", "weight": 1.0 - kd, "temperature": 1.0, "params": {}})
    return [t for t in terms if t["weight"] != 0.0]


def _params_match(wanted: tuple[tuple[str, Any], ...], have: Mapping[str, Any]) -> bool:
    return all(k in have and float(have[k]) == float(v) for k, v in wanted)


def recipes_training_on(metric: str, recipe_configs: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """Recipes (sorted) whose loss has a term computing ``metric``'s quantity (same objective and
    parameters; a temperature other than 1 is appended as ``"name (τ=2)"``). ``[]`` for metrics that are
    no objective's loss."""
    info = metric_info(metric)
    if info is None or info.objective is None:
        return []
    name, wanted = info.objective
    out = []
    for recipe, cfg in sorted(recipe_configs.items()):
        for t in loss_terms(cfg):
            if t["objective"] == name and _params_match(wanted, t["params"]):
                out.append(recipe if t["temperature"] == 1.0 else f"{recipe} (τ={t['temperature']:g})")
                break
    return out
