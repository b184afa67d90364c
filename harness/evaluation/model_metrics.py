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
    "nll_stats",
    "calibration_ece",
    "teacher_agreement",
    "response_nll",
    "model_metrics",
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

    ``logits [B, T, V]``; ``labels [B, T]`` (-100 ignored); ``mask [B, T]`` or None. Confidence is the
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


def agreement_stats(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, float, int]:
    """``(n_top1_agree, kl_sum, n_tokens)`` over response tokens; logits ``[B, T, V_s]``, ``[B, T, V_t]``.

    KL(p_teacher ‖ q_student) = Σ_v p_t (log p_t − log q_s), float32 log_softmax over the shared
    vocabulary prefix ``min(V_s, V_t)``.
    """
    keep = _response_mask(labels, mask)
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = F.log_softmax(student_logits[keep][:, :vocab].float(), dim=-1)  # [N, V]
    t = F.log_softmax(teacher_logits[keep][:, :vocab].float().to(s.device), dim=-1)
    agree = (s.argmax(-1) == t.argmax(-1)).sum().item()
    kl = (t.exp() * (t - s)).sum(-1)
    return float(agree), float(kl.double().sum().item()), int(keep.sum().item())


def nll_stats(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """``(sum of −log p(label), n_tokens)`` over response tokens, float32 log_softmax."""
    keep = _response_mask(labels, mask)
    logp = F.log_softmax(logits[keep].float(), dim=-1)
    nll = -logp.gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
    return float(nll.double().sum().item()), int(keep.sum().item())


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _forward_logits(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    device = _device(model)
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device) if "attention_mask" in batch else None,
    )
    return out.logits


@torch.no_grad()
def model_metrics(
    model, batches: Iterable[Mapping[str, torch.Tensor]], *, teacher=None, n_bins: int = 15
) -> dict[str, float]:
    """One pass over ``batches``: ``ece``, ``response_nll``, ``response_ppl``, ``n_response_tokens``
    and, with a ``teacher``, ``top1_agreement`` and ``kl_to_teacher``. Models are put in eval mode for
    the call and restored afterwards."""
    models = [m for m in (model, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    bins = [torch.zeros(n_bins, dtype=torch.float64) for _ in range(3)]
    nll_sum, n_tok, agree_sum, kl_sum = 0.0, 0, 0.0, 0.0
    try:
        for batch in batches:
            labels = batch["labels"]
            logits = _forward_logits(model, batch)
            labels_d = labels.to(logits.device)
            mask = batch.get("loss_mask")
            mask_d = mask.to(logits.device) if mask is not None else None
            for acc, part in zip(bins, ece_bin_stats(logits, labels_d, mask_d, n_bins)):
                acc += part
            s, n = nll_stats(logits, labels_d, mask_d)
            nll_sum += s
            n_tok += n
            if teacher is not None:
                t_logits = _forward_logits(teacher, batch).to(logits.device)
                a, k, _ = agreement_stats(logits, t_logits, labels_d, mask_d)
                agree_sum += a
                kl_sum += k
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    nll = nll_sum / n_tok if n_tok else float("nan")
    out = {
        "ece": ece_from_bin_stats(*bins),
        "response_nll": nll,
        "response_ppl": math.exp(nll) if n_tok else float("nan"),
        "n_response_tokens": float(n_tok),
    }
    if teacher is not None:
        out["top1_agreement"] = agree_sum / n_tok if n_tok else float("nan")
        out["kl_to_teacher"] = kl_sum / n_tok if n_tok else float("nan")
    return out


def calibration_ece(model, batches: Iterable[Mapping[str, torch.Tensor]], n_bins: int = 15) -> float:
    """Expected calibration error (fraction in [0, 1]) of the model's top-1 next-token predictions on
    the response tokens of ``batches``, ``n_bins`` equal-width bins weighted by count."""
    return model_metrics(model, batches, n_bins=n_bins)["ece"]


def teacher_agreement(student, teacher, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """``{"top1_agreement": fraction, "kl_to_teacher": nats/token}`` — token means over response tokens,
    KL(p_teacher ‖ q_student)."""
    out = model_metrics(student, batches, teacher=teacher)
    return {"top1_agreement": out["top1_agreement"], "kl_to_teacher": out["kl_to_teacher"]}


def response_nll(model, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """``{"response_nll": nats/token, "response_ppl": exp(nll)}`` of the reference response tokens."""
    out = model_metrics(model, batches)
    return {"response_nll": out["response_nll"], "response_ppl": out["response_ppl"]}
