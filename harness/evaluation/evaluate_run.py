"""Evaluate one model on every evaluation set: the protocol's metrics, per set, in one place.

Per set (``dict[metric -> value]``):

=====================  ===========================================================================
``rougeL``             ROUGE-L (MiniLLM: F, max over references, × 100), mean over evaluation seeds,
                       each seed one sample per item
``rougeL_seed_std``    sample std of the per-seed ROUGE-L (0 with one seed)
``exact_match``        normalised exact match against any acceptable answer (× 100), mean over seeds
``valid_rate``         % of all drawn samples (seeds + extra coverage samples) that are acceptable
``coverage``           mean over several-answer items of the fraction of their acceptable answers
                       produced among their samples (fraction in [0, 1]); ``None`` without such items
``distinct_1/2``       distinct-n over all seed samples (fraction in [0, 1])
``ece``                expected calibration error of next-token predictions on held-out responses
``response_nll/_ppl``  teacher-forced NLL (nats/token) / perplexity of the references
``top1_agreement``     token-level top-1 agreement with the teacher (fraction) — with a teacher only
``kl_to_teacher``      mean KL(p_teacher ‖ q_student) per response token (nats) — with a teacher only
``lm_eval/<t>/<m>``    lm-eval metrics of the tasks run for this set
``greedy``             1.0 when decoding was greedy (then one pass replaces the seeds: report as greedy)
``n_items``, ``n_eval_seeds``, ``generation_s``, ``model_metrics_s``, ``lm_eval_s``, ``eval_time_s``
=====================  ===========================================================================

``ece``/``response_*`` appear only for sets with held-out batches; ``lm_eval/*`` only for sets with
lm-eval tasks. Items follow the harness schema (``prompt``, ``answers``; ``output`` when ``answers``
is missing).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from harness.evaluation.generation import EVAL_SEEDS, generate
from harness.evaluation.lm_eval_bridge import run_lm_eval
from harness.evaluation.model_metrics import model_metrics
from harness.evaluation.text_metrics import (
    coverage,
    distinct_n,
    exact_match,
    minillm_response,
    normalize_answer,
    rouge_l,
    valid_rate,
)

COVERAGE_SEED_OFFSET = 1000  # extra coverage samples use seed eval_seeds[0] + this

__all__ = ["evaluate_model", "item_answers", "COVERAGE_SEED_OFFSET"]


def item_answers(item: Mapping[str, Any]) -> list[str]:
    """All acceptable answers of an item: ``answers``, else ``[output]`` (a list ``output`` as is)."""
    answers = item.get("answers")
    if answers is None:
        answers = item["output"]
    return [answers] if isinstance(answers, str) else list(answers)


def _model_device(model) -> str:
    return str(next(model.parameters()).device)


def evaluate_model(
    model,
    tokenizer,
    eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    teacher=None,
    teacher_logits: Mapping[str, Sequence[Any]] | None = None,
    batches_for_model_metrics: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    gen_cfg: Mapping[str, Any] | None = None,
    eval_seeds: Sequence[int] = EVAL_SEEDS,
    n_coverage_samples: int | None = None,
    lm_eval_tasks: Mapping[str, Mapping[str, Any]] | None = None,
    lm_eval_kwargs: Mapping[str, Any] | None = None,
    n_bins: int = 15,
) -> dict[str, dict[str, float | None]]:
    """Compute every evaluation metric of ``model`` per evaluation set (see the module table).

    Args:
        model, tokenizer: the HF causal LM under evaluation and its tokenizer.
        eval_sets: set name -> items (``prompt``, ``answers``/``output``).
        teacher: a teacher LM sharing the tokenizer, for ``top1_agreement`` / ``kl_to_teacher``.
        teacher_logits: set name -> the teacher's :func:`teacher_response_logits` on that set's
            ``batches_for_model_metrics`` (computed once for several students; used instead of ``teacher``).
        batches_for_model_metrics: set name -> held-out training-format batches (``input_ids``,
            ``attention_mask``, shifted ``labels``) for ``ece``, ``response_nll`` and agreement.
        gen_cfg: keyword arguments of :func:`generate` (decoding, lengths, ``batch_size``,
            ``progress``) — not ``seed`` nor ``num_return_sequences``, which this function sets.
        eval_seeds: one sample per item per seed; metrics are seed means. Greedy decoding
            (``do_sample=False``) runs once and reports ``greedy = 1``.
        n_coverage_samples: samples per several-answer item for ``coverage``/``valid_rate``; when it
            exceeds ``len(eval_seeds)`` the missing ones are drawn (seed ``eval_seeds[0] + 1000``).
        lm_eval_tasks: set name -> {lm-eval task name -> jsonl path or {"path", "kind"}}.
        lm_eval_kwargs: extra keyword arguments of :func:`run_lm_eval` (``limit``, ``batch_size``,
            ``standard_tasks``, ``device`` — default the model's device).
        n_bins: ECE bins.

    Returns:
        set name -> metric name -> value (``coverage`` may be ``None``).
    """
    gen_cfg = dict(gen_cfg or {})
    for reserved in ("seed", "num_return_sequences"):
        if reserved in gen_cfg:
            raise ValueError(f"gen_cfg must not set {reserved!r}; evaluate_model sets it")
    if not eval_seeds:
        raise ValueError("at least one evaluation seed is needed")
    greedy = not gen_cfg.get("do_sample", True)
    seeds = list(eval_seeds)[:1] if greedy else list(eval_seeds)
    batches_for_model_metrics = batches_for_model_metrics or {}
    lm_eval_tasks = lm_eval_tasks or {}
    lm_kwargs = {"device": _model_device(model), **(lm_eval_kwargs or {})}

    results: dict[str, dict[str, float | None]] = {}
    for set_name in list(eval_sets) + [s for s in lm_eval_tasks if s not in eval_sets]:
        t_set = time.perf_counter()
        items = eval_sets.get(set_name, [])
        metrics: dict[str, float | None] = {"n_items": float(len(items))}
        if items:
            prompts = [it["prompt"] for it in items]
            answers = [item_answers(it) for it in items]

            # --- generation: one sample per item per seed (+ extra samples for coverage)
            t0 = time.perf_counter()
            per_seed = [
                [minillm_response(s[0]) for s in generate(model, tokenizer, prompts, seed=seed, **gen_cfg)]
                for seed in seeds
            ]  # MiniLLM scores a response after reading "<n>" as a newline and stripping it
            samples = [list(item_samples) for item_samples in zip(*per_seed)]  # [N][n_seeds]
            multi = [i for i, a in enumerate(answers) if len({normalize_answer(x) for x in a}) >= 2]
            extra = (n_coverage_samples or 0) - len(seeds)
            if extra > 0 and multi and not greedy:
                more = generate(
                    model, tokenizer, [prompts[i] for i in multi],
                    seed=seeds[0] + COVERAGE_SEED_OFFSET, num_return_sequences=extra, **gen_cfg,
                )
                for i, extra_samples in zip(multi, more):
                    samples[i] = samples[i] + [minillm_response(x) for x in extra_samples]
            metrics["generation_s"] = time.perf_counter() - t0

            # --- text metrics
            rouge_seeds = [rouge_l(preds, answers) for preds in per_seed]
            all_seed_samples = [s for preds in per_seed for s in preds]
            metrics.update(
                rougeL=statistics.fmean(rouge_seeds),
                rougeL_seed_std=statistics.stdev(rouge_seeds) if len(rouge_seeds) > 1 else 0.0,
                exact_match=statistics.fmean(exact_match(preds, answers) for preds in per_seed),
                valid_rate=valid_rate(samples, answers),
                coverage=coverage(samples, answers),
                distinct_1=distinct_n(all_seed_samples, 1),
                distinct_2=distinct_n(all_seed_samples, 2),
                greedy=float(greedy),
                n_eval_seeds=float(len(seeds)),
            )

        # --- teacher-forced metrics on held-out responses
        if batches_for_model_metrics.get(set_name):
            t0 = time.perf_counter()
            metrics.update(model_metrics(model, batches_for_model_metrics[set_name], teacher=teacher,
                                         teacher_logits=(teacher_logits or {}).get(set_name), n_bins=n_bins))
            metrics["model_metrics_s"] = time.perf_counter() - t0

        # --- lm-eval tasks run for this set
        if set_name in lm_eval_tasks and (lm_eval_tasks[set_name] or lm_kwargs.get("standard_tasks")):
            t0 = time.perf_counter()
            metrics.update(run_lm_eval(model, tokenizer, lm_eval_tasks[set_name], **lm_kwargs))
            metrics["lm_eval_s"] = time.perf_counter() - t0

        metrics["eval_time_s"] = time.perf_counter() - t_set
        results[set_name] = metrics
    return results
