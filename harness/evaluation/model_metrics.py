"""Model-side metrics on held-out responses (teacher forcing, no grad).

Batch convention (the training collate's): ``input_ids [B, T]``, ``attention_mask [B, T]``,
``labels [B, T]`` already shifted so ``labels[b, t]`` is the target of ``logits[b, t]`` (``-100`` on
prompt and padding), optionally ``loss_mask [B, T]`` (float, ``labels != -100``). Only positions with
``labels != -100`` ("response tokens") count. All metrics are token means pooled over every response
token of every batch (not means of batch means).

* ECE: top-1 next-token confidence vs. accuracy, ``n_bins`` equal-width bins over (0, 1], each bin
  weighted by its token count: ``ECE = Σ_b (n_b / N) |acc_b − conf_b|`` — a fraction in [0, 1].
* Teacher agreement: ``top1_agreement`` = fraction of response tokens where argmax student == argmax
  teacher; ``kl_to_teacher`` = mean over tokens of KL(p_teacher ‖ q_student) in nats, computed in
  float32 from ``log_softmax``. When the two vocabularies differ in size (padded embeddings, e.g.
  Qwen2.5-7B vs 1.5B) both are cut to the shared prefix before normalising.
* Symmetric teacher fit (p = teacher, q = student, temperature 1, same tokens and vocabulary cut):
  ``jsd_to_teacher`` = mean over tokens of JSD(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = ½(p + q), in nats
  (in [0, ln 2]; the ``jsd`` objective at β = 0.5, i.e. the training loss of the jsd and gkd recipes);
  ``tvd_to_teacher`` = mean over tokens of ½ Σ_v |p_v − q_v| (in [0, 1]; the ``tvd`` objective's loss).
  ``kl_to_teacher`` is the ``fkl`` objective's loss; no teacher-fit metric is neutral, so the report
  names, for each, the recipes that train on it.
* ``response_nll`` = mean cross-entropy (nats/token) of the reference tokens; ``response_ppl`` = exp.

The ``*_from_logits`` / ``*_stats`` helpers are pure tensor functions; the model functions just run
forwards and pool their statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "ece_bin_stats",
    "ece_from_bin_stats",
    "ece_from_logits",
    "agreement_stats",
    "teacher_fit_stats",
    "nll_stats",
    "calibration_ece",
    "teacher_agreement",
    "response_nll",
    "model_metrics",
    "teacher_response_logits",
]


def _response_mask(labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[B, T]``: ``labels != -100`` (and ``mask > 0`` when given)."""
    keep = labels != -100
    if mask is not None:
        keep = keep & (mask > 0)
    return keep


def ece_bin_stats(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, n_bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin ``(count, sum of confidences, number correct)``, each ``[n_bins]`` float64.

    ``logits [B, T, V]``; ``labels [B, T]`` (-100 ignored); ``mask [B, T]`` or None (or response rows only:
    ``logits [N, V]``, ``labels [N]``). Confidence is the
    top-1 softmax probability (float32); bin ``b`` holds confidences in ``(b/n, (b+1)/n]`` (bin 0 also
    takes 0). Summable across batches.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    keep = _response_mask(labels, mask)
    probs = torch.softmax(logits[keep].float(), dim=-1)  # [N, V]
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels[keep]).double()
    conf = conf.double()
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins.cpu(), torch.ones_like(conf).cpu())
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins.cpu(), conf.cpu())
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins.cpu(), correct.cpu())
    return count, conf_sum, correct_sum


def ece_from_bin_stats(count: torch.Tensor, conf_sum: torch.Tensor, correct_sum: torch.Tensor) -> float:
    """``Σ_b (n_b/N) |acc_b − conf_b| = Σ_b |correct_b − conf_sum_b| / N``; 0.0 when ``N = 0``."""
    total = float(count.sum())
    if total == 0:
        return 0.0
    return float((correct_sum - conf_sum).abs().sum() / total)


def ece_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, n_bins: int = 15
) -> float:
    """Expected calibration error of top-1 predictions at the response positions (see module doc)."""
    return ece_from_bin_stats(*ece_bin_stats(logits, labels, mask, n_bins))


FIT_CHUNK_ROWS = 1024  # response tokens per chunk: bounds the [N, V] float32 temporaries


def teacher_fit_stats(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Sums over response tokens of the teacher-fit quantities; logits ``[B, T, V_s]``, ``[B, T, V_t]`` (or the
    response rows only, ``[N, V_s]``, ``[N, V_t]`` with ``labels [N]``).

    ``log p = log_softmax(teacher)``, ``log q = log_softmax(student)`` in float32 over the shared vocabulary
    prefix ``min(V_s, V_t)``; per token: ``agree`` = [argmax q = argmax p], ``kl`` = Σ p (log p − log q),
    ``jsd`` = ½ Σ p (log p − log m) + ½ Σ q (log q − log m) with ``log m = logaddexp(log p, log q) − ln 2``,
    ``tvd`` = ½ Σ |p − q|. Returns ``{"agree", "kl", "jsd", "tvd"}`` (float64 sums) and ``"n"`` (token
    count). Summable across batches; divide by ``n`` for token means.
    """
    keep = _response_mask(labels, mask)
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s_all = student_logits[keep][:, :vocab]
    t_all = teacher_logits[keep][:, :vocab]
    out = {"agree": 0.0, "kl": 0.0, "jsd": 0.0, "tvd": 0.0, "n": int(keep.sum().item())}
    for start in range(0, s_all.shape[0], FIT_CHUNK_ROWS):
        s = F.log_softmax(s_all[start:start + FIT_CHUNK_ROWS].float(), dim=-1)  # [n, V] log q
        t = F.log_softmax(t_all[start:start + FIT_CHUNK_ROWS].float().to(s.device), dim=-1)  # log p
        p, q = t.exp(), s.exp()
        log_m = torch.logaddexp(t, s) - math.log(2.0)
        out["agree"] += float((s.argmax(-1) == t.argmax(-1)).sum().item())
        out["kl"] += float((p * (t - s)).sum(-1).double().sum().item())
        jsd = 0.5 * (p * (t - log_m)).sum(-1) + 0.5 * (q * (s - log_m)).sum(-1)
        out["jsd"] += float(jsd.double().sum().item())
        out["tvd"] += float((0.5 * (p - q).abs().sum(-1)).double().sum().item())
    return out


def agreement_stats(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, float, int]:
    """``(n_top1_agree, kl_sum, n_tokens)`` over response tokens; logits ``[B, T, V_s]``, ``[B, T, V_t]``.

    KL(p_teacher ‖ q_student) = Σ_v p_t (log p_t − log q_s), float32 log_softmax over the shared
    vocabulary prefix ``min(V_s, V_t)`` (see :func:`teacher_fit_stats`).
    """
    st = teacher_fit_stats(student_logits, teacher_logits, labels, mask)
    return st["agree"], st["kl"], st["n"]


def nll_stats(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """``(sum of −log p(label), n_tokens)`` over response tokens, float32 log_softmax."""
    keep = _response_mask(labels, mask)
    logp = F.log_softmax(logits[keep].float(), dim=-1)
    nll = -logp.gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
    return float(nll.double().sum().item()), int(keep.sum().item())


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _response_rows(model, batch: Mapping[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The model's logits at the response positions ``keep`` (bool ``[B, T]``) only, ``[N, V]`` in row-major
    order: a plain causal LM computes its head on those rows only (:func:`harness.models.counted_rows`)."""
    from ..models import counted_rows

    device = _device(model)
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device) if "attention_mask" in batch else torch.ones_like(input_ids)
    return counted_rows(model, input_ids, attention_mask, keep.to(device))


def _keep(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return _response_mask(batch["labels"], batch.get("loss_mask"))


@torch.no_grad()
def teacher_response_logits(teacher, batches: Iterable[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The teacher's logits at each batch's response positions, ``[N_i, V_t]`` per batch (eval mode, no grad):
    what :func:`model_metrics` compares every student with, computed once for all the students scored against
    the same teacher on the same batches (pass them as ``teacher_logits``)."""
    was = teacher.training
    teacher.eval()
    try:
        return [_response_rows(teacher, batch, _keep(batch)) for batch in batches]
    finally:
        teacher.train(was)


@torch.no_grad()
def model_metrics(
    model, batches: Iterable[Mapping[str, torch.Tensor]], *, teacher=None,
    teacher_logits: list[torch.Tensor] | None = None, n_bins: int = 15
) -> dict[str, float]:
    """One pass over ``batches``: ``ece``, ``response_nll``, ``response_ppl``, ``n_response_tokens``
    and, with a ``teacher`` (or its :func:`teacher_response_logits` on these batches, ``teacher_logits``),
    ``top1_agreement``, ``kl_to_teacher``, ``jsd_to_teacher`` and ``tvd_to_teacher`` (token means). Only the
    response positions' logits are computed. Models are put in eval mode for the call and restored afterwards."""
    batches = list(batches)
    if teacher_logits is None and teacher is not None:
        teacher_logits = teacher_response_logits(teacher, batches)
    if teacher_logits is not None and len(teacher_logits) != len(batches):
        raise ValueError(f"teacher_logits holds {len(teacher_logits)} batches' rows for {len(batches)} batches")
    was = model.training
    model.eval()
    bins = [torch.zeros(n_bins, dtype=torch.float64) for _ in range(3)]
    nll_sum, n_tok = 0.0, 0
    fit = {"agree": 0.0, "kl": 0.0, "jsd": 0.0, "tvd": 0.0}
    try:
        for i, batch in enumerate(batches):
            keep = _keep(batch)
            logits = _response_rows(model, batch, keep)  # [N, V]
            labels = batch["labels"][keep].to(logits.device)  # [N]
            for acc, part in zip(bins, ece_bin_stats(logits, labels, None, n_bins)):
                acc += part
            s, n = nll_stats(logits, labels)
            nll_sum += s
            n_tok += n
            if teacher_logits is not None:
                for key, value in teacher_fit_stats(logits, teacher_logits[i].to(logits.device), labels).items():
                    if key in fit:
                        fit[key] += value
    finally:
        model.train(was)
    nll = nll_sum / n_tok if n_tok else float("nan")
    out = {
        "ece": ece_from_bin_stats(*bins),
        "response_nll": nll,
        "response_ppl": math.exp(nll) if n_tok else float("nan"),
        "n_response_tokens": float(n_tok),
    }
    if teacher_logits is not None:
        for key, name in (("agree", "top1_agreement"), ("kl", "kl_to_teacher"), ("jsd", "jsd_to_teacher"),
                          ("tvd", "tvd_to_teacher")):
            out[name] = fit[key] / n_tok if n_tok else float("nan")
    return out


def calibration_ece(model, batches: Iterable[Mapping[str, torch.Tensor]], n_bins: int = 15) -> float:
    """Expected calibration error (fraction in [0, 1]) of the model's top-1 next-token predictions on
    the response tokens of ``batches``, ``n_bins`` equal-width bins weighted by count."""
    return model_metrics(model, batches, n_bins=n_bins)["ece"]


def teacher_agreement(student, teacher, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """``{"top1_agreement": fraction, "kl_to_teacher", "jsd_to_teacher": nats/token, "tvd_to_teacher"}``
    — token means over response tokens (p = teacher, q = student; see the module doc)."""
    out = model_metrics(student, batches, teacher=teacher)
    return {k: out[k] for k in ("top1_agreement", "kl_to_teacher", "jsd_to_teacher", "tvd_to_teacher")}


def response_nll(model, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """``{"response_nll": nats/token, "response_ppl": exp(nll)}`` of the reference response tokens."""
    out = model_metrics(model, batches)
    return {"response_nll": out["response_nll"], "response_ppl": out["response_ppl"]}
