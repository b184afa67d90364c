"""Sequence-level objectives: losses that need more than the logits of one position (per-row coefficients, rows
of different kinds in one micro-batch, the training progress).

Kind ``"sequence"``. Such a term is called by :class:`harness.objectives.composite.WeightedLoss` as

    fn(student_logits [B, T, V], teacher_logits [B, T, V], batch, *, normalizer, temperature, **params) -> 0-dim

where ``batch`` is the micro-batch dict (``labels`` [B, T], ``loss_mask`` [B, T] and whatever the training mode
attached; :func:`harness.distill.train` passes it). The value returned is this micro-batch's share of the step's
loss: the method's own reduction times ``Σ loss_mask / normalizer`` (as batch-wise terms, so that gradient
accumulation weights micro-batches by their tokens; with one micro-batch per step the factor is 1). A
sequence-level term is not callable through :meth:`Objective.__call__` (it needs the batch): that raises
:class:`ObjectiveError`.

DistiLLM-2 (``distillm2``)
--------------------------
Ko et al., DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs, ICML 2025 (arXiv 2503.07067).
Read from jongwooko/distillm-2@fe4cf9bfbb4f83219dd1d69219800164b59685fa ``src/distillm_trainer.py``:
``get_batch_logps`` l.1102-1242 (skew KL / skew reverse KL, per-sentence α), ``kd_loss`` l.1073-1078 (β),
``concatenated_forward`` l.1244-1318 (rows = [teacher responses; student responses]), ``log`` l.1515-1535 (the
anchors). With p the teacher and q the student (softmax at ``temperature``, released: 1), per position t of row b:

    teacher-response rows:  KL(p ‖ α₁ p + (1−α₁) q)               = Σ_v p (log p − log(α₁ p + (1−α₁) q))
    student-response rows:  KL(q ‖ (1−α₂) p + α₂ sg(q))           = Σ_v q (log q − log((1−α₂) p + α₂ sg(q)))

(sg: stop-gradient; the student inside the reverse term's mixture is detached, l.1196). Each row's value is its
token mean over counted positions (a row without any is left out); the loss is ``(2 − β) · mean_{teacher rows} + β · mean_{student rows}`` with
``β = beta_start + (beta_end − beta_start) · min(1, progress / ramp_fraction)`` (released ``gradual_beta``:
``1 + 0.5 · min(1, 2 t / T)``, ``t`` the optimizer steps done, ``T`` the total).

α per sentence (released ``update_alpha``): with ``s_p(b) = exp(mean_t log p(y_t))`` and ``s_q(b)`` the same for
the student (the geometric-mean token probabilities of row b's response under each model),

    α₁(b) = clip(1 − (1 − α) · A₁ / (s_p(b) − s_q(b) + 1e-5), alpha_min, α)
    α₂(b) = clip(1 − (1 − α) · A₂ / (s_q(b) − s_p(b) + 1e-5), alpha_min, α)

where the anchors ``A₁`` (mean of ``s_p − s_q`` over teacher-response rows) and ``A₂`` (mean of ``s_q − s_p``
over student-response rows) are measured once at the start of training by the mode (``batch["alpha_anchor"]``,
``[A₁, A₂]``); without anchors (or NaN) α₁ = α₂ = α. As released, α(b) is not detached: the gradient flows
through s_q(b) where the clip is inactive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..schema import Field
from . import _REGISTRY, ObjectiveError, ObjectiveSpec
from .wrapper import log_probs


def beta_schedule(progress: float, beta_start: float = 1.0, beta_end: float = 1.5, ramp_fraction: float = 0.5) -> float:
    """DistiLLM-2's β at training progress ``t / T`` (optimizer steps done over total): linear from
    ``beta_start`` to ``beta_end`` over the first ``ramp_fraction`` of training, then constant."""
    return beta_start + (beta_end - beta_start) * min(1.0, float(progress) / ramp_fraction)


def sentence_probs(log_probs_: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """``exp(mean_t log π(y_t))`` per row [B] (the geometric mean of the response's token probabilities) from
    log-probabilities [B, T, V], labels [B, T] (−100 ignored) and the mask [B, T]. A row without counted positions
    gives ``exp(0) = 1``."""
    m = ((mask > 0) & (labels != -100)).to(log_probs_.dtype)
    tok = log_probs_.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return ((tok * m).sum(-1) / m.sum(-1).clamp_min(1.0)).exp()


def adaptive_alpha(gap: Tensor, anchor: float, alpha: float, alpha_min: float = 0.01) -> Tensor:
    """``clip(1 − (1 − α) · anchor / (gap + 1e-5), alpha_min, α)`` per row (released l.1148-1151, 1182-1185)."""
    return torch.clip(1 - (1 - alpha) * anchor / (gap + 1e-5), min=alpha_min, max=alpha)


def _mix(log_a: Tensor, log_b: Tensor, weight_a: Tensor) -> Tensor:
    """``log(w · a + (1 − w) · b)`` from log-probabilities; ``weight_a`` broadcasts ([B, 1, 1] or a scalar)."""
    return torch.logaddexp(torch.log(weight_a) + log_a, torch.log1p(-weight_a) + log_b)


def skew_kl_positions(log_q: Tensor, log_p: Tensor, alpha: Tensor) -> Tensor:
    """``Σ_v p (log p − log(α p + (1 − α) q))`` per position ([..., V] → [...]; teacher-response rows)."""
    return (log_p.exp() * (log_p - _mix(log_p, log_q, alpha))).sum(-1)


def skew_rkl_detached_positions(log_q: Tensor, log_p: Tensor, alpha: Tensor) -> Tensor:
    """``Σ_v q (log q − log((1 − α) p + α sg(q)))`` per position ([..., V] → [...]; student-response rows)."""
    return (log_q.exp() * (log_q - _mix(log_p, log_q.detach(), 1 - alpha))).sum(-1)


def distillm2(student_logits: Tensor, teacher_logits: Tensor, batch: dict | None = None, *, normalizer: float | None = None,
              temperature: float = 1.0, alpha: float = 0.1, alpha_min: float = 0.01, beta_start: float = 1.0,
              beta_end: float = 1.5, ramp_fraction: float = 0.5) -> Tensor:
    """DistiLLM-2's contrastive loss (CALD) on one micro-batch (see the module docstring).

    ``batch`` needs ``labels`` [B, T], ``loss_mask`` [B, T], ``pair_role`` [B] (0: teacher response, 1: student
    response), and optionally ``progress`` (optimizer steps done / total, default 0) and ``alpha_anchor`` [2]."""
    if not isinstance(batch, dict):
        raise ObjectiveError("objective 'distillm2' is sequence-level: WeightedLoss calls it with the micro-batch "
                             "(harness.distill.train passes batch=); it cannot be applied position by position "
                             "through Objective.__call__")
    labels, mask = batch["labels"], batch["loss_mask"]
    if "pair_role" not in batch:
        raise ValueError("objective 'distillm2' needs batch['pair_role'] (0 = teacher response, 1 = student "
                         "response): use it with the training mode 'distillm2'")
    role = torch.as_tensor(batch["pair_role"], device=student_logits.device)
    B = student_logits.shape[0]
    # only counted positions enter (prompt and padding never do): rows b, positions t of the selection
    b, t = torch.nonzero(mask > 0, as_tuple=True)
    log_q = log_probs(student_logits[b, t], temperature)                      # [n, V]
    with torch.no_grad():
        log_p = log_probs(teacher_logits[b, t].detach(), temperature)
    dtype = log_q.dtype
    count = torch.zeros(B, dtype=dtype, device=log_q.device).index_add_(0, b, torch.ones_like(b, dtype=dtype))

    def row_mean(x: Tensor) -> Tensor:  # per-row token mean [B] of per-position values [n]
        return torch.zeros(B, dtype=x.dtype, device=x.device).index_add(0, b, x) / count.clamp_min(1.0)

    a1 = a2 = torch.tensor(alpha, dtype=dtype, device=log_q.device)
    anchor = batch.get("alpha_anchor")
    if anchor is not None:
        anchor = [float(x) for x in torch.as_tensor(anchor).flatten().tolist()]
        if all(math.isfinite(x) for x in anchor):
            y = labels[b, t].clamp_min(0).unsqueeze(-1)
            # s_p − s_q per row: geometric-mean token probabilities of the response (gradient flows through s_q)
            gap = row_mean(log_p.gather(-1, y).squeeze(-1)).exp() - row_mean(log_q.gather(-1, y).squeeze(-1)).exp()
            a1 = adaptive_alpha(gap, anchor[0], alpha, alpha_min)[b].unsqueeze(-1)
            a2 = adaptive_alpha(-gap, anchor[1], alpha, alpha_min)[b].unsqueeze(-1)
    zero = log_q.new_zeros(())
    terms = []
    for kind, a, positions in ((0, a1, skew_kl_positions), (1, a2, skew_rkl_detached_positions)):
        keep = role[b] == kind          # each divergence only on its own rows (the released code computes both)
        rows = (role == kind) & (count > 0)
        if not bool(rows.any()):
            terms.append(zero)
            continue
        a = a[keep] if a.dim() else a
        per_pos = torch.zeros(b.shape[0], dtype=dtype, device=log_q.device)
        per_pos = per_pos.masked_scatter(keep, positions(log_q[keep], log_p[keep], a))
        terms.append(row_mean(per_pos)[rows].mean())
    kl, rkl = terms
    progress = float(torch.as_tensor(batch.get("progress", 0.0)))
    beta = beta_schedule(progress, beta_start, beta_end, ramp_fraction)
    value = (2 - beta) * kl + beta * rkl
    if normalizer is not None:
        value = value * (float(b.shape[0]) / normalizer)
    return value


_REGISTRY["distillm2"] = ObjectiveSpec(
    "distillm2", distillm2, "sequence", False,
    {
        "alpha": Field((float,), 0.1, gt=0, lt=1, help="skew α (the released base_alpha_1 = base_alpha_2 = 0.1); "
                                                      "the per-sentence α is clipped to [alpha_min, alpha]"),
        "alpha_min": Field((float,), 0.01, gt=0, lt=1, help="lower clip of the per-sentence α (released 1e-2)"),
        "beta_start": Field((float,), 1.0, ge=0, le=2, help="β at the start (weights 2 − β on the teacher-response "
                                                           "term, β on the student-response term)"),
        "beta_end": Field((float,), 1.5, ge=0, le=2, help="β after the ramp (released gradual_beta: 1.5)"),
        "ramp_fraction": Field((float,), 0.5, gt=0, le=1, help="share of training over which β ramps linearly"),
    },
    "DistiLLM-2's contrastive loss: skew KL on teacher responses + skew reverse KL on student responses.",
)
