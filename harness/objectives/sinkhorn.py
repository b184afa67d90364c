"""Sinkhorn distillation (SinKD, Cui et al.), batch-wise and in the log domain.

SinKD does not compare p and q position by position. For the N counted positions of a batch, with student
rows q_i and teacher rows p_j, it builds the cost ``W_ij = ‖q_i − p_j‖₁`` (N × N), the Gibbs kernel
``K = exp(−W / ε)``, alternates row and column normalisations toward uniform marginals, and the loss is
``Σ_ij P_ij W_ij`` with the resulting transport plan P.

Conventions of this implementation (differences from the original code are deliberate and stated):

- **Log domain.** Potentials f, g are updated with ``logsumexp``; stable for any ε (the original
  normalises ``K`` in the probability domain, which underflows for small ε). Same update order as SinKD
  (rows first, starting from g = 0), so after the same number of iterations the plan is the same.
- **Scale** (``mass``). ``mass="unit"`` (default): uniform marginals a_i = b_j = 1/N, total mass 1, the
  loss is the *expected* transport cost, in [0, 2]. ``mass="positions"``: SinKD's convention, rows and
  columns normalised to sum 1, total mass N: the value (and gradient) is N × the unit-mass one, N being the
  number of counted positions of the batch (before any subsampling, so the subsample estimates the cost per
  unit mass and the total keeps SinKD's size). SinKD also multiplies by a constant (0.001 in its GLUE
  ``loss.py``, 0.0008 in ``T0/lossd.py`` and ``GPT-Neo/lossd.py``): that constant is the recipe's weight.
  Under ``mass="positions"`` the term's weight relative to per-token terms (CE, KL: token means) grows with
  the number of positions, as in SinKD.
- **Debiasing.** With ``debias=True`` (default) the value is the Sinkhorn divergence
  ``OT_ε(q, p) − ½ OT_ε(q, q) − ½ OT_ε(p, p)`` (Feydy et al. 2019), which is exactly 0 when q = p, like
  every other objective here. ``debias=False`` gives SinKD's plain entropic OT cost (positive even at q = p,
  by the entropic blur). The Laplace kernel exp(−‖·‖₁/ε) is positive definite, so the divergence is ≥ 0
  at convergence; after finitely many iterations it can be negative by round-off-sized amounts.
  SinKD does not debias; its recipe sets ``debias: false``.
- **Bounding the N × N matrix.** At most ``max_positions`` counted positions enter the plan (default 256):
  when a batch has more, an evenly strided, deterministic subset of them is used. SinKD never subsamples.
  ``W`` is built with ``torch.cdist(p=1)``, which never materialises the N × N × V difference tensor;
  memory is O(N² + N·V).
- The temperature (SinKD uses τ = 2, set by the recipe) is applied by the wrapper before the softmax.

Released code read: ``2018cx/SinKD@1ffac9010a4fc462d05e7ea0a0753aca062eca62`` ``loss.py`` (``Sinkhorn``, GLUE,
[B, C] logits) and ``T0/lossd.py`` (``Sinkhorn``, language model). On the 2-D rows of the GLUE code our
``debias=False, mass="positions"`` value × 0.001 equals SinKD's (pinned in tests/test_objectives_reference.py).
The T0 code passes 3-D ``[B, L, V]`` logits to the same 2-D routine: its ``Softmax(dim=1)`` then normalises
over the *positions* of each sequence rather than the vocabulary, ``cdist`` builds one L × L cost per
sequence, and the ``dim=0`` normalisation of ``sinkhorn_normalized`` runs across the *batch* (so with one
sequence per batch every plan entry is 1). We apply the batch-wise form of the GLUE code, whose rows are the
samples of a batch, to the counted positions (each row a distribution over the vocabulary, one plan per
batch) instead; the recipe lists this as a deviation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..schema import Field


def _l1_cost(x: Tensor, y: Tensor) -> Tensor:
    """W_ij = ‖x_i − y_j‖₁ [N, M] by ``torch.cdist(p=1)`` (never the N × M × V difference tensor)."""
    return torch.cdist(x.unsqueeze(0), y.unsqueeze(0), p=1).squeeze(0)


def _l1_self_cost(x: Tensor, blocks: int = 4) -> Tensor:
    """W_ij = ‖x_i − x_j‖₁ [N, N], symmetric, at lower cost than :func:`_l1_cost` (x, x): row blocks against the
    columns from their own start only, the rest filled by transposition (≈ 5/8 of the pairs for 4 blocks; the
    same values: |a − b| = |b − a|, summed in the same order). With a gradient: plain :func:`_l1_cost` (x, x)
    (autograd through the blocks' copies would cost more than it saves)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _l1_cost(x, x)
    n = x.shape[0]
    out = x.new_empty((n, n))
    step = max(1, -(-n // blocks))
    for start in range(0, n, step):
        stop = min(n, start + step)
        w = _l1_cost(x[start:stop], x[start:])
        out[start:stop, start:] = w
        out[stop:, start:stop] = w[:, stop - start :].T
    return out


def _entropic_ot(cost: Tensor, epsilon: float, n_iters: int) -> Tensor:
    """Expected cost Σ P_ij W_ij of the entropic plan for the cost W [N, M] between uniform marginals."""
    log_k = -cost / epsilon
    n, m = cost.shape
    log_a = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((m,), -math.log(m), dtype=cost.dtype, device=cost.device)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(n_iters):
        f = log_a - torch.logsumexp(log_k + g[None, :], dim=1)
        g = log_b - torch.logsumexp(log_k + f[:, None], dim=0)
    plan = torch.exp(f[:, None] + log_k + g[None, :])
    return (plan * cost).sum()


def sinkhorn(
    log_q: Tensor,
    log_p: Tensor,
    epsilon: float = 0.1,
    n_iters: int = 20,
    max_positions: int = 256,
    debias: bool = True,
    mass: Literal["unit", "positions"] = "unit",
) -> Tensor:
    """Batch-wise Sinkhorn loss between student rows ``log_q`` [N, V] and teacher rows ``log_p`` [N, V].

    Both are log-probabilities of the counted positions only (the wrapper selects them); q is the student
    (rows of the plan), p the teacher (columns). Returns a scalar: the entropic OT cost of the plan after
    ``n_iters`` Sinkhorn iterations, with total mass 1 (``mass="unit"``) or N (``"positions"``, SinKD's).
    """
    n = log_q.shape[0]
    if n == 0:
        return (log_q * 0.0).sum()
    if n > max_positions:
        keep = torch.linspace(0, n - 1, max_positions, device=log_q.device).round().long()
        log_q, log_p = log_q[keep], log_p[keep]
    q, p = log_q.exp(), log_p.exp()
    value = _entropic_ot(_l1_cost(q, p), epsilon, n_iters)
    if debias:
        with torch.no_grad():
            teacher_self = _entropic_ot(_l1_self_cost(p), epsilon, n_iters)
        value = value - 0.5 * _entropic_ot(_l1_self_cost(q), epsilon, n_iters) - 0.5 * teacher_self
    return value * n if mass == "positions" else value


sinkhorn.param_ranges = {
    "epsilon": Field((float,), gt=0, help="entropic regularisation: the kernel is exp(-W / epsilon)"),
    "n_iters": Field((int,), ge=1, help="Sinkhorn iterations (one row and one column normalisation each)"),
    "max_positions": Field((int,), ge=1, help="most counted positions in the plan; more are subsampled (strided)"),
    "debias": Field((bool,), help="subtract the self-transport terms (Sinkhorn divergence, 0 at q = p)"),
    "mass": Field((str,), help="total mass of the plan: 'unit' (expected cost) or 'positions' (SinKD: N)"),
}
