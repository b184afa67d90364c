"""Per-position divergences: the pure mathematics of each objective.

Every function here has the same signature, the one a user's own objective must have::

    fn(log_q: Tensor[N, V], log_p: Tensor[N, V], **params) -> Tensor[N]

- ``log_q`` is the student's ``log_softmax(z_s / τ)``, ``log_p`` the teacher's ``log_softmax(z_t / τ)``,
  both float32 (float64 in tests), rows are positions.
- ``-inf`` entries (padded vocabulary rows) have already been clamped to the dtype's most negative finite
  value by the wrapper (:mod:`harness.objectives.wrapper`), so ``exp`` gives exactly 0 and differences of
  two padded entries are exactly 0: they contribute nothing and their gradient is 0, never NaN.
- The return value is the loss ℓ at each position (a true divergence: 0 when p = q). Masking, temperature,
  reduction, dtype and chunking are the wrapper's job, never repeated here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ a (log a − log b) per row; rows where a = 0 contribute 0."""
    a = log_a.exp()
    return (a * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b) computed stably in the log domain, for 0 < w < 1."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def fkl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Forward KL, KL(p ‖ q) = Σ p (log p − log q): mode-covering (Hinton et al.)."""
    return _kl(log_p, log_q)


def rkl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Reverse KL, KL(q ‖ p) = Σ q (log q − log p): mode-seeking (MiniLLM, GKD β = 1)."""
    return _kl(log_q, log_p)


def jsd(log_q: Tensor, log_p: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen–Shannon (GKD): m = β p + (1−β) q; β·KL(p ‖ m) + (1−β)·KL(q ‖ m).

    β scales the two terms; it does not pick a direction: β → 0 and β → 1 both tend to 0 (and are exactly 0
    at the endpoints). β = 0.5 is the symmetric JSD, bounded by log 2.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must lie in [0, 1], got {beta}")
    if beta in (0.0, 1.0):
        return (log_q * 0.0).sum(-1)  # exactly 0, still attached to the graph
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def tvd(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Total variation distance ½ Σ |p − q|, in [0, 1]."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def skl(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew KL (DistiLLM): KL(p ‖ α p + (1−α) q). α = 0 is forward KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skl: alpha must lie in [0, 1), got {alpha}")
    if alpha == 0.0:
        return fkl(log_q, log_p)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def srkl(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ (1−α) p + α q). α = 0 is reverse KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"srkl: alpha must lie in [0, 1), got {alpha}")
    if alpha == 0.0:
        return rkl(log_q, log_p)
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


def akl(log_q: Tensor, log_p: Tensor, mu: float = 0.5) -> Tensor:
    """Adaptive KL (Wu et al. 2024): w·KL(p ‖ q) + (1−w)·KL(q ‖ p).

    The head H is the smallest set of the teacher's most probable tokens with Σ_H p ≥ μ; the weight
    w = Σ_H |p − q| / Σ_V |p − q| is computed without gradient (w = ½ where p = q exactly).
    """
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"akl: mu must lie in (0, 1], got {mu}")
    with torch.no_grad():
        p, q = log_p.exp(), log_q.exp()
        p_sorted, order = p.sort(dim=-1, descending=True)
        before = p_sorted.cumsum(-1) - p_sorted  # mass of strictly more probable tokens
        in_head_sorted = before < mu
        in_head = torch.zeros_like(in_head_sorted).scatter(-1, order, in_head_sorted)
        gap = (p - q).abs()
        total = gap.sum(-1)
        head = (gap * in_head).sum(-1)
        w = torch.where(total > 0, head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return w * fkl(log_q, log_p) + (1.0 - w) * rkl(log_q, log_p)
