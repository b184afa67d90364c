"""Sinkhorn distillation (SinKD, Cui et al.), batch-wise and in the log domain.

SinKD does not compare p and q position by position. For the N counted positions of a batch, with student
rows q_i and teacher rows p_j, it builds the cost ``W_ij = ‖q_i − p_j‖₁`` (N × N), the Gibbs kernel
``K = exp(−W / ε)``, alternates row and column normalisations toward uniform marginals, and the loss is
``Σ_ij P_ij W_ij`` with the resulting transport plan P.

Conventions of this implementation (differences from the original code are deliberate and stated):

- **Log domain.** Potentials f, g are updated with ``logsumexp``; stable for any ε (the original
  normalises ``K`` in the probability domain, which underflows for small ε).
- **Scale.** The marginals are uniform with total mass 1 (a_i = b_j = 1/N), so the loss is the *expected*
  transport cost, in [0, 2]. SinKD's code normalises rows and columns to sum 1, i.e. total mass N: its
  value is N × ours. Gradients differ by the same constant.
- **Debiasing.** With ``debias=True`` (default) the value is the Sinkhorn divergence
  ``OT_ε(q, p) − ½ OT_ε(q, q) − ½ OT_ε(p, p)`` (Feydy et al. 2019), which is exactly 0 when q = p, like
  every other objective here. ``debias=False`` gives SinKD's plain entropic OT cost (positive even at q = p,
  by the entropic blur). The Laplace kernel exp(−‖·‖₁/ε) is positive definite, so the divergence is ≥ 0
  at convergence; after finitely many iterations it can be negative by round-off-sized amounts.
- **Bounding the N × N matrix.** At most ``max_positions`` counted positions enter the plan (default 256):
  when a batch has more, an evenly strided, deterministic subset of them is used. ``W`` is built with
  ``torch.cdist(p=1)``, which never materialises the N × N × V difference tensor; memory is O(N² + N·V).
- The temperature (SinKD uses τ = 2, set by the recipe) is applied by the wrapper before the softmax.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _entropic_ot(x: Tensor, y: Tensor, epsilon: float, n_iters: int) -> Tensor:
    """Expected cost Σ P_ij W_ij of the entropic plan between the rows of x [N, V] and y [M, V]."""
    cost = torch.cdist(x.unsqueeze(0), y.unsqueeze(0), p=1).squeeze(0)  # [N, M]
    log_k = -cost / epsilon
    log_a = torch.full((x.shape[0],), -math.log(x.shape[0]), dtype=x.dtype, device=x.device)
    log_b = torch.full((y.shape[0],), -math.log(y.shape[0]), dtype=x.dtype, device=x.device)
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
) -> Tensor:
    """Batch-wise Sinkhorn loss between student rows ``log_q`` [N, V] and teacher rows ``log_p`` [N, V].

    Both are log-probabilities of the counted positions only (the wrapper selects them). Returns a scalar.
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    if n_iters < 1 or max_positions < 1:
        raise ValueError("sinkhorn: n_iters and max_positions must be ≥ 1")
    n = log_q.shape[0]
    if n == 0:
        return (log_q * 0.0).sum()
    if n > max_positions:
        keep = torch.linspace(0, n - 1, max_positions, device=log_q.device).round().long()
        log_q, log_p = log_q[keep], log_p[keep]
    q, p = log_q.exp(), log_p.exp()
    value = _entropic_ot(q, p, epsilon, n_iters)
    if debias:
        with torch.no_grad():
            teacher_self = _entropic_ot(p, p, epsilon, n_iters)
        value = value - 0.5 * _entropic_ot(q, q, epsilon, n_iters) - 0.5 * teacher_self
    return value
