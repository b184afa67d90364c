"""Sinkhorn distillation (SinKD, Cui et al.), batch-wise, stable for any ε.

SinKD does not compare p and q position by position. For the N counted positions of a batch, with student
rows q_i and teacher rows p_j, it builds the cost ``W_ij = ‖q_i − p_j‖₁`` (N × N), the Gibbs kernel
``K = exp(−W / ε)``, alternates row and column normalisations toward uniform marginals, and the loss is
``Σ_ij P_ij W_ij`` with the resulting transport plan P.

Conventions of this implementation (differences from the original code are deliberate and stated):

- **Log domain where needed.** The iterations are those of the potentials f, g updated with ``logsumexp``
  (stable for any ε; the original normalises ``K`` in the probability domain, which underflows for small ε).
  Same update order as SinKD (rows first, starting from g = 0), so after the same number of iterations the plan
  is the same. They run in the scaling form u = e^f, v = e^g (matrix-vector products, as SinKD) when every
  kernel entry and iterate is checked to stay well inside the float range (ε = 0.1 on probability rows:
  K ≥ e^-20), in the log domain otherwise; the two differ by float round-off only (:class:`_EntropicOT`).
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
  ``W`` is built block by block (a few rows × columns × V differences at a time, 4 MiB of float32), never the
  N × N × V difference tensor; its gradient likewise (signs × G, block by block). Memory is O(N² + N·V).
- **Gradient.** Exactly that of the unrolled iterations (what autograd through SinKD's loop gives, not the
  envelope-theorem gradient γ P of a converged plan), computed by a hand-written reverse pass
  (:class:`_EntropicOT`) instead of autograd through the loop.
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
from torch.autograd.function import once_differentiable

from ..schema import Field


#: most elements of one block of differences ``x_i − y_j`` (rows × columns × V) while building an L1 cost: 4 MiB of
#: float32, the only temporary besides the N × M result
_BLOCK_ELEMENTS = 1 << 20


def _block_shape(n: int, m: int, v: int) -> tuple[int, int]:
    """(rows, columns) of one block of differences, rows × columns × v ≤ :data:`_BLOCK_ELEMENTS` (≥ 1 × 1)."""
    cols = min(m, max(1, _BLOCK_ELEMENTS // max(v, 1)))
    return max(1, min(n, _BLOCK_ELEMENTS // (cols * max(v, 1)))), cols


def _l1_block(out: Tensor, x: Tensor, y: Tensor, buf: Tensor) -> None:
    """``out[i, j] = Σ_k |x_ik − y_jk|`` for the rows of ``x`` [n, V] and ``y`` [m, V], ``buf`` [≥ n, ≥ m, V]: one
    subtraction, |·| in place and a sum over V (cheaper than ``torch.cdist(p=1)``'s forward, whose pair loop
    took 3× as long at N = 98, V = 600)."""
    d = buf[: x.shape[0], : y.shape[0]]
    torch.sub(x[:, None, :], y[None, :, :], out=d)
    d.abs_()
    torch.sum(d, dim=-1, out=out)


def _l1_cost_forward(x: Tensor, y: Tensor) -> Tensor:
    """W_ij = ‖x_i − y_j‖₁ [N, M], block by block (never the N × M × V difference tensor)."""
    n, m = x.shape[0], y.shape[0]
    out = x.new_empty((n, m))
    rows, cols = _block_shape(n, m, x.shape[1])
    buf = x.new_empty((rows, cols, x.shape[1]))
    for j0 in range(0, m, cols):
        for i0 in range(0, n, rows):
            _l1_block(out[i0 : i0 + rows, j0 : j0 + cols], x[i0 : i0 + rows], y[j0 : j0 + cols], buf)
    return out


def _l1_self_cost_forward(x: Tensor) -> Tensor:
    """W_ij = ‖x_i − x_j‖₁ [N, N], symmetric: each row block against the columns from its own start only, the
    rest filled by transposition (about half the pairs; the same values as :func:`_l1_cost_forward` (x, x), bit for
    bit: |a − b| = |b − a|, summed in the same order)."""
    n = x.shape[0]
    out = x.new_empty((n, n))
    rows, cols = _block_shape(n, n, x.shape[1])
    buf = x.new_empty((rows, cols, x.shape[1]))
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        for j0 in range(i0, n, cols):
            _l1_block(out[i0:i1, j0 : j0 + cols], x[i0:i1], x[j0 : j0 + cols], buf)
        out[i1:, i0:i1] = out[i0:i1, i1:].T
    return out


def _l1_grad(grad: Tensor, x: Tensor, y: Tensor, cost: Tensor) -> Tensor:
    """∂/∂x_i of Σ_ij G_ij ‖x_i − y_j‖₁ = Σ_j G_ij sign(x_i − y_j) [N, V], block by block (a few rows × all
    columns × V signs at a time, then one batched matrix product per block). ``cost`` is unused (the signature
    of ``cdist``'s backward, whose private op is ~15 % faster at N ≈ 100, V = 600 but not a public API)."""
    n, m, v = x.shape[0], y.shape[0], x.shape[1]
    out = x.new_empty((n, v))
    rows = max(1, min(n, _BLOCK_ELEMENTS // max(m * v, 1)))
    buf = x.new_empty((rows, m, v))
    for i0 in range(0, n, rows):
        d = buf[: min(rows, n - i0)]
        torch.sub(x[i0 : i0 + rows, None, :], y[None, :, :], out=d)
        d.sign_()
        torch.bmm(grad[i0 : i0 + rows, None, :], d, out=out[i0 : i0 + rows, None, :])
    return out


class _L1Cost(torch.autograd.Function):
    """W = ‖x_i − y_j‖₁ [N, M] and its backward (the gradient ``torch.cdist(p=1)`` has), both block by block."""

    @staticmethod
    def forward(ctx, x, y):
        cost = _l1_cost_forward(x, y)
        ctx.save_for_backward(x, y, cost)
        return cost

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, cost = ctx.saved_tensors
        gx = _l1_grad(grad, x, y, cost) if ctx.needs_input_grad[0] else None
        gy = _l1_grad(grad.T, y, x, cost.T) if ctx.needs_input_grad[1] else None
        return gx, gy


class _L1SelfCost(torch.autograd.Function):
    """W = ‖x_i − x_j‖₁ [N, N]; x enters both sides, so its gradient is that of the cross cost with G + Gᵀ."""

    @staticmethod
    def forward(ctx, x):
        cost = _l1_self_cost_forward(x)
        ctx.save_for_backward(x, cost)
        return cost

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, cost = ctx.saved_tensors
        return _l1_grad(grad + grad.T, x, x, cost)


def _l1_cost(x: Tensor, y: Tensor) -> Tensor:
    """W_ij = ‖x_i − y_j‖₁ [N, M] of x [N, V] and y [M, V], differentiable in both."""
    return _L1Cost.apply(x, y)


def _l1_self_cost(x: Tensor) -> Tensor:
    """W_ij = ‖x_i − x_j‖₁ [N, N] of x [N, V], differentiable; about half the pairs of :func:`_l1_cost` (x, x)."""
    return _L1SelfCost.apply(x)


#: the scaling form runs only while every entry of K and every u, v stays this far inside the dtype's exponent
#: range (a fraction of −log(smallest normal): 87 for float32, 708 for float64), see :func:`_scaling_iterations`
_KERNEL_RANGE, _SCALING_RANGE = 0.4, 0.25


def _scaling_iterations(cost: Tensor, epsilon: float, n_iters: int):
    """The Sinkhorn iterations in the scaling form, or None where that form could leave the normal float range.

    u_t = a / (K v_(t−1)), v_t = b / (Kᵀ u_t), v_0 = 1: the log-domain iterates are f_t = log u_t, g_t = log v_t.
    Returns ``(value, k, kc, ka, kb_t, us [T, N], vs [T + 1, M])`` with ka = K / a, kb_t = (K / b)ᵀ, kc = K ⊙ W.
    Every product K_ij v_j, K_ij u_i is then a normal float (no underflow, no overflow), so each step is as
    accurate as the log domain's ``logsumexp``; outside that range the caller uses the log domain.
    """
    n, m = cost.shape
    span = -math.log(torch.finfo(cost.dtype).tiny)
    lo, hi = torch.aminmax(cost)
    if not (float(hi) / epsilon <= _KERNEL_RANGE * span and float(lo) / epsilon >= -_KERNEL_RANGE * span):
        return None
    k = torch.div(cost, -epsilon).exp_()
    ka = k * n
    kb_t = (k * m).T.contiguous()  # a contiguous Kᵀ: its matrix-vector product is faster than the transposed view's
    us = cost.new_empty((n_iters, n))
    vs = cost.new_empty((n_iters + 1, m))
    vs[0] = 1.0
    u_rows, v_rows = us.unbind(0), vs.unbind(0)  # views made once (indexing in the loop costs more than the mv)
    for t in range(n_iters):
        torch.mv(ka, v_rows[t], out=u_rows[t]).reciprocal_()
        torch.mv(kb_t, u_rows[t], out=v_rows[t + 1]).reciprocal_()
    bound = math.exp(_SCALING_RANGE * span)
    (ulo, uhi), (vlo, vhi) = torch.aminmax(us), torch.aminmax(vs)
    if not (float(torch.minimum(ulo, vlo)) * bound >= 1.0 and float(torch.maximum(uhi, vhi)) <= bound):
        return None  # NaN fails too
    kc = k * cost
    value = torch.dot(us[-1], torch.mv(kc, vs[-1]))
    return value, k, kc, ka, kb_t, us, vs


def _scaling_backward(grad_out, epsilon, k, kc, ka, kb_t, us, vs):
    """∂ value / ∂W of the unrolled scaling iterations (see :class:`_EntropicOT`)."""
    n_iters, n = us.shape
    m = vs.shape[1]
    u_last, v_last = us[-1], vs[-1]
    # x [2T + 1, N], y [2T + 1, M]: Σ_t u_t ⊗ β_t + α_t ⊗ v_(t−1) + ε u_T ⊗ v_T = xᵀ y
    x, y = us.new_empty((2 * n_iters + 1, n)), vs.new_empty((2 * n_iters + 1, m))
    x[:n_iters] = us
    x[-1] = u_last * epsilon
    y[n_iters:-1] = vs[:-1]
    y[-1] = v_last
    alpha, beta = x[n_iters:-1], y[:n_iters]
    cu, cv = us.square().neg_(), vs[:-1].square().neg_()  # −u_t², −v_(t−1)²
    torch.mv(kc.T, u_last, out=beta[-1]).mul_(v_last.square() * m)
    torch.mv(kc, v_last, out=alpha[-1]).mul_(n).sub_(torch.mv(ka, beta[-1])).mul_(u_last.square())
    alphas, betas, cus, cvs = alpha.unbind(0), beta.unbind(0), cu.unbind(0), cv.unbind(0)
    for t in range(n_iters - 1, -1, -1):  # row t holds iteration t + 1
        if t < n_iters - 1:
            torch.mv(ka, betas[t], out=alphas[t]).mul_(cus[t])
        if t > 0:
            torch.mv(kb_t, alphas[t], out=betas[t - 1]).mul_(cvs[t])
    grad = torch.mm(x.T, y).mul_(k)
    grad.addcmul_(kc, torch.outer(u_last, v_last), value=-1.0)
    return grad.mul_(grad_out / epsilon)


def _log_iterations(cost: Tensor, epsilon: float, n_iters: int):
    """The Sinkhorn iterations in the log domain (``logsumexp``, stable for any ε): ``(value, log_k, plan,
    fs [T, N], gs [T + 1, M])`` with f_t = fs[t − 1], g_t = gs[t], g_0 = 0."""
    log_k = -cost / epsilon
    n, m = cost.shape
    log_a = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((m,), -math.log(m), dtype=cost.dtype, device=cost.device)
    fs = cost.new_empty((n_iters, n))
    gs = cost.new_zeros((n_iters + 1, m))
    f, g = log_a, gs[0]
    for t in range(n_iters):
        f = log_a - torch.logsumexp(log_k + g[None, :], dim=1)
        g = log_b - torch.logsumexp(log_k + f[:, None], dim=0)
        fs[t], gs[t + 1] = f, g
    plan = torch.exp(f[:, None] + log_k + g[None, :])
    return (plan * cost).sum(), log_k, plan, fs, gs


def _log_backward(grad_out, epsilon, cost, log_k, plan, fs, gs):
    """∂ value / ∂W of the unrolled log-domain iterations (see :class:`_EntropicOT`)."""
    n_iters, n = fs.shape
    m = gs.shape[1]
    pc = plan * cost
    lbar = pc.clone()
    fbar_last, gbar = pc.sum(1), pc.sum(0)
    for t in range(n_iters, 0, -1):
        f = fs[t - 1]
        # S^g_t = exp(f_t ⊕ L ⊕ g_t) / b (softmax over i), S^f_t = exp(f_t ⊕ L ⊕ g_(t−1)) / a (softmax over j)
        sg = plan * m if t == n_iters else torch.exp((log_k + (gs[t] + math.log(m))[None, :]).add_(f[:, None]))
        fbar = torch.mv(sg, gbar).neg_()
        if t == n_iters:
            fbar += fbar_last
        lbar.addcmul_(sg, gbar[None, :], value=-1.0)
        sf = torch.exp((log_k + (gs[t - 1] + math.log(n))[None, :]).add_(f[:, None]))
        lbar.addcmul_(sf, fbar[:, None], value=-1.0)
        if t > 1:
            gbar = torch.mv(sf.T, fbar).neg_()
    return (plan - lbar / epsilon).mul_(grad_out)


class _EntropicOT(torch.autograd.Function):
    """Σ P_ij W_ij of the plan after T Sinkhorn iterations, as a function of W, with the exact gradient of the
    unrolled iterations written by hand (what autograd through the loop gives, at a fraction of its cost).

    Forward: f_t = log a − LSE_j(L_ij + g_(t−1),j), g_t = log b − LSE_i(L_ij + f_t,i) (g_0 = 0, L = −W/ε),
    P = exp(f_T ⊕ L ⊕ g_T), value = Σ P ⊙ W. The iterates f_t, g_t (T × N and T × M) are kept.

    Backward (reverse of the loop, upstream γ): start with f̄_T = Σ_j (P⊙W)_ij, ḡ_T = Σ_i (P⊙W)_ij,
    L̄ = P ⊙ W; the backward of a logsumexp is its softmax, so for t = T … 1
        g_t's update: S^g = exp(f_t ⊕ L ⊕ g_t) / b (columns sum to 1):  f̄_t −= S^g ḡ_t,  L̄ −= S^g ⊙ ḡ_tᵀ,
        f_t's update: S^f = exp(f_t ⊕ L ⊕ g_(t−1)) / a (rows sum to 1):  ḡ_(t−1) = −S^fᵀ f̄_t,  L̄ −= S^f ⊙ f̄_t,
    and ∂value/∂W = γ (P − L̄ / ε). This is the gradient of the finitely many iterations, not the envelope-theorem
    one (γ P, exact only at convergence).

    Two forms of the same iterations, chosen per call:

    - **scaling** (u = e^f, v = e^g: u_t = a / K v_(t−1), v_t = b / Kᵀ u_t with K = e^L): one matrix-vector
      product per half-step, and S^g = diag(u_t) K diag(1 / r_t) (r_t = Kᵀ u_t), S^f = diag(1 / s_t) K
      diag(v_(t−1)) (s_t = K v_(t−1)), so with α_t = f̄_t / s_t and β_t = ḡ_t / r_t the reverse pass is
      α_t = −(u_t² / a) ⊙ K β_t, β_(t−1) = −(v_(t−1)² / b) ⊙ Kᵀ α_t, and the T rank-one terms of L̄ add up in
      one matrix product: L̄ = P ⊙ W − K ⊙ Σ_t (u_t β_tᵀ + α_t v_(t−1)ᵀ). Used when K's entries and every
      u_t, v_t stay well inside the float range (checked; e.g. ε = 0.1 on probability rows, W ≤ 2, K ≥ e^-20);
    - **log**, as written above (N·M exponentials per half-step, forward and backward), for every other case.

    Both agree with autograd through the log-domain loop to float round-off (tests/test_sinkhorn_backward.py).
    """

    @staticmethod
    def forward(ctx, cost, epsilon, n_iters, domain):
        out = _scaling_iterations(cost, epsilon, n_iters) if domain != "log" else None
        if out is None and domain == "scaling":
            raise ValueError("the scaling form of the Sinkhorn iterations would leave the float range here")
        ctx.epsilon, ctx.scaling = epsilon, out is not None
        if out is None:
            out = _log_iterations(cost, epsilon, n_iters)
            ctx.save_for_backward(cost, *out[1:])
        else:
            ctx.save_for_backward(*out[1:])
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.scaling:
            return _scaling_backward(grad_out, ctx.epsilon, *ctx.saved_tensors), None, None, None
        return _log_backward(grad_out, ctx.epsilon, *ctx.saved_tensors), None, None, None


def _entropic_ot(cost: Tensor, epsilon: float, n_iters: int,
                 domain: Literal["auto", "scaling", "log"] = "auto") -> Tensor:
    """Expected cost Σ P_ij W_ij of the entropic plan for the cost W [N, M] between uniform marginals, after
    ``n_iters`` iterations; differentiable in W (:class:`_EntropicOT`). ``domain`` forces a form (tests)."""
    if domain not in ("auto", "scaling", "log"):
        raise ValueError(f"domain must be 'auto', 'scaling' or 'log', got {domain!r}")
    return _EntropicOT.apply(cost, epsilon, n_iters, domain)


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
