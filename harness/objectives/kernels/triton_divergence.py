"""Triton kernels: each per-token divergence and its gradient w.r.t. the student logits, a row at a time.

Imported only when a Triton kernel is selected (``harness.objectives.kernels``); importing it needs ``triton``.
With ``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run on CPU tensors
(Triton's interpreter), which is how the tests exercise them.

Conventions (those of :mod:`harness.objectives.divergences`)
-------------------------------------------------------------
- Row ``i`` of ``S`` (student logits) and ``T`` (teacher logits) is one position; ``a = S / τ``,
  ``b = T / τ``, both loaded in their dtype (bf16, fp16, fp32) and converted to float32; all arithmetic is
  float32. ``A = logsumexp(a)``, ``B = logsumexp(b)`` by an online log-sum-exp (running max, rescaled sum);
  ``log q = a − A``, ``log p = b − B``; q is the student, p the teacher.
- ``-inf`` logits (padded vocabulary, and the columns past ``V`` of the last block) are clamped to
  ``NEG = −1e30`` after the scaling. A column that is ``-inf`` on both sides then has ``log q = log p = NEG``
  exactly (``NEG − A`` rounds back to ``NEG``), ``q = p = 0``, every term it enters is ``0 · finite = 0`` and
  its gradient is exactly 0: never NaN. (A column padded on one side only has an infinite true divergence; it
  gives a huge finite number here, as the clamped PyTorch path does.)
- ``W[i]`` is the weight of row ``i`` in the reduced loss (``Σ_i W_i ℓ_i``). A row with ``W[i] = 0`` (not
  counted) does no work: its loss is 0 and its gradient row is written as zeros. The per-row loss ``L[i] = ℓ_i``
  is written unweighted, in float32; the gradient row ``G[i] = W_i ∂ℓ_i/∂S_i`` in ``G``'s dtype. ``G`` may be
  ``S`` itself (the gradient overwrites the logits in place): every block is read before it is written, and it
  is written only in the last pass over the row.

Gradient
--------
With ``h_j = q_j ∂ℓ/∂q_j`` (q treated as a free vector), the softmax Jacobian gives
``∂ℓ/∂S_j = (h_j − q_j Σ_k h_k) / τ``. Which sums a formula needs before the gradient can be written decides
its number of passes over the row (each pass reads the row's student and teacher logits once; the last writes
the gradient):

====================  ======  =====================================================================
kind                  passes  what the passes compute
====================  ======  =====================================================================
fkl, ce               2       A, B | loss, gradient (``q − p``; ``q − onehot``)
rkl, bdkd, ab         2       A, B and online sums giving RKL, H(p), H(q), Σ p^α q^β, Σ q^(α+β) | loss, grad
jsd, tvd, skl, srkl,  3       A, B | loss and ``Σ_k h_k`` (needs both normalised rows) | gradient
todi
akl                   3 + 7   A, B | 7 passes over the teacher row only: the head threshold (32-way search
                              over the bits of p) | head weight, FKL, RKL | gradient
====================  ======  =====================================================================
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

#: kernel ids and their compile-time codes
KIND = {"fkl": 0, "rkl": 1, "ce": 2, "bdkd": 3, "ab": 4, "jsd": 5, "tvd": 6, "skl": 7, "srkl": 8, "todi": 9}
#: number of passes over the vocabulary for each id (documentation and benchmark notes)
PASSES = {"fkl": 2, "ce": 2, "rkl": 2, "bdkd": 2, "ab": 2, "jsd": 3, "tvd": 3, "skl": 3, "srkl": 3, "todi": 3,
          "akl": 10}

#: the largest vocabulary block one loop step loads (a power of two; tests lower it to exercise many blocks)
BLOCK_CAP = 4096
#: programs launched: None = one per row; an integer k = at most k persistent programs, each looping over rows
#: (fewer rows in flight, so that a row's second and third passes can hit L2 instead of DRAM: a GPU tuning knob)
PROGRAMS: int | None = None
#: the AKL head search: its block (one step holds a [SEARCH_BLOCK, SEARCH_K] tile), SEARCH_K candidate
#: thresholds per pass, SEARCH_PASSES passes (33^7 > 2^31 keys)
SEARCH_BLOCK = 256
SEARCH_K = 32
SEARCH_PASSES = 7


@triton.jit
def _load_scaled(row_ptr, cols, V, inv_tau):
    """Logits of one block in float32, divided by τ, ``-inf`` (and columns ≥ V) clamped to −1e30."""
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    return tl.maximum(x * inv_tau, -1.0e30)


@triton.jit
def _log_mix(u, v):
    """log(e^u + e^v), stable (u, v are log-probabilities plus log-weights)."""
    mx = tl.maximum(u, v)
    return mx + tl.log(tl.exp(u - mx) + tl.exp(v - mx))


@triton.jit
def _three_pass_terms(lq, lp, q, p, c1, KIND: tl.constexpr):
    """Loss term ℓ_j and h_j = q_j ∂ℓ/∂q_j of the three-pass kinds (constants in h that sum with q drop out)."""
    if KIND == 5:  # jsd(β = c1): m = β p + (1−β) q
        lm = _log_mix(lp + tl.log(c1), lq + tl.log(1.0 - c1))
        ell = c1 * p * (lp - lm) + (1.0 - c1) * q * (lq - lm)
        h = (1.0 - c1) * q * (lq - lm)
    elif KIND == 6:  # tvd: ½ Σ |p − q|; ∂/∂q_j = ½ sign(q_j − p_j)
        ell = 0.5 * tl.abs(p - q)
        sgn = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
        h = 0.5 * q * sgn
    elif KIND == 7:  # skl(α = c1): KL(p ‖ α p + (1−α) q); ∂/∂q_j = −(1−α) p_j / m_j
        lm = _log_mix(lp + tl.log(c1), lq + tl.log(1.0 - c1))
        ell = p * (lp - lm)
        h = -(1.0 - c1) * p * tl.exp(lq - lm)
    elif KIND == 8:  # srkl(α = c1): KL(q ‖ (1−α) p + α q); ∂/∂q_j = log q_j − log m_j + 1 − α q_j / m_j
        lm = _log_mix(lq + tl.log(c1), lp + tl.log(1.0 - c1))
        ell = q * (lq - lm)
        h = q * (lq - lm - c1 * tl.exp(lq - lm))
    else:  # todi: w = sigmoid(log p − log q) constant; ℓ = w p log(p/q) + (1−w) q log(q/p)
        w = tl.sigmoid(lp - lq)
        ell = w * p * (lp - lq) + (1.0 - w) * q * (lq - lp)
        h = -w * p + (1.0 - w) * q * (lq - lp + 1.0)
    return ell, h


@triton.jit
def _divergence_kernel(
    S, T, Y, G, W, L,
    n_rows, stride_s, stride_t, stride_g, V, inv_tau, c1, c2,
    KIND: tl.constexpr, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """Per-position loss ``L[row]`` and gradient row ``G[row]`` of rows ``program_id, +num_programs, ...``.

    ``c1``, ``c2``: the objective's parameters (jsd β; skl/srkl α; bdkd weight_high (weight_low 1); ab α, β). ``Y``: the labels
    (``ce`` only; any pointer otherwise). ``T`` is unused for ``ce``.
    """
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):  # 1 row per program, or more
        wt = tl.load(W + row)
        s_row = S + row * stride_s
        t_row = T + row * stride_t
        g_row = G + row * stride_g
        offs = tl.arange(0, BLOCK)
        if wt == 0.0:
            if WRITE_GRAD:
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    tl.store(g_row + cols, tl.zeros([BLOCK], dtype=tl.float32).to(G.dtype.element_ty), mask=cols < V)
            tl.store(L + row, 0.0)
        else:
            gscale = wt * inv_tau
            # ---- pass 1: online log-sum-exp of both rows, plus the online sums some kinds need -----------------
            m_a = -1.0e30
            s_a = 0.0
            m_b = -1.0e30
            s_b = 0.0
            m_c = -1.0e30
            s_c = 0.0
            s_k = 0.0
            acc_d = 0.0  # Σ e_a (a − b)      → Σ q (a − b)   (rkl, bdkd)
            acc_e = 0.0  # Σ e_b (b − a)      → Σ p (b − a)   (bdkd)
            t_a = 0.0  # Σ e_a (a − m_a)    → entropy of q  (bdkd)
            t_b = 0.0  # Σ e_b (b − m_b)    → entropy of p  (bdkd)
            k_ab = c1 + c2
            for start in range(0, V, BLOCK):
                cols = start + offs
                a = _load_scaled(s_row, cols, V, inv_tau)
                ma_new = tl.maximum(m_a, tl.max(a, 0))
                ra = tl.exp(m_a - ma_new)
                ea = tl.exp(a - ma_new)
                if KIND == 3:
                    t_a = ra * (t_a + (m_a - ma_new) * s_a) + tl.sum(ea * (a - ma_new), 0)
                if KIND == 4:
                    s_k = s_k * tl.exp(k_ab * (m_a - ma_new)) + tl.sum(tl.exp(k_ab * (a - ma_new)), 0)
                if KIND != 2:
                    b = _load_scaled(t_row, cols, V, inv_tau)
                    mb_new = tl.maximum(m_b, tl.max(b, 0))
                    rb = tl.exp(m_b - mb_new)
                    eb = tl.exp(b - mb_new)
                    if KIND == 1 or KIND == 3:
                        acc_d = acc_d * ra + tl.sum(ea * (a - b), 0)
                    if KIND == 3:
                        acc_e = acc_e * rb + tl.sum(eb * (b - a), 0)
                        t_b = rb * (t_b + (m_b - mb_new) * s_b) + tl.sum(eb * (b - mb_new), 0)
                    if KIND == 4:
                        c = c1 * b + c2 * a
                        mc_new = tl.maximum(m_c, tl.max(c, 0))
                        s_c = s_c * tl.exp(m_c - mc_new) + tl.sum(tl.exp(c - mc_new), 0)
                        m_c = mc_new
                    s_b = s_b * rb + tl.sum(eb, 0)
                    m_b = mb_new
                s_a = s_a * ra + tl.sum(ea, 0)
                m_a = ma_new
            lse_a = m_a + tl.log(s_a)
            lse_b = 0.0
            if KIND != 2:
                lse_b = m_b + tl.log(s_b)
            # per-row constants of the two-pass kinds
            rkl_on = 0.0
            if KIND == 1 or KIND == 3:
                rkl_on = acc_d / s_a - (lse_a - lse_b)  # KL(q ‖ p)
            w_f = 1.0
            w_r = 1.0
            if KIND == 3:  # bdkd: w_big on the KL whose first argument has the larger entropy
                fkl_on = acc_e / s_b - (lse_b - lse_a)  # KL(p ‖ q)
                h_q = tl.log(s_a) - t_a / s_a
                h_p = tl.log(s_b) - t_b / s_b
                w_f = tl.where(h_p > h_q, c1, 1.0)
                w_r = tl.where(h_q > h_p, c1, 1.0)
            hsum = 0.0
            if KIND == 4:  # ab: Σ h = −(1/α) (Σ p^α q^β − Σ q^(α+β))
                x_ab = tl.exp(m_c - c1 * lse_b - c2 * lse_a) * s_c
                y_ab = tl.exp(-k_ab * tl.log(s_a)) * s_k
                hsum = -(x_ab - y_ab) / c1
            # ---- pass 2: the loss; the gradient of the two-pass kinds; Σ h of the three-pass kinds -------------
            loss = 0.0
            if KIND == 2:
                y = tl.load(Y + row)
                a_y = tl.maximum(tl.load(s_row + y).to(tl.float32) * inv_tau, -1.0e30)
                loss = lse_a - a_y
            if KIND == 3:
                loss = w_f * fkl_on + w_r * rkl_on
            for start in range(0, V, BLOCK):
                cols = start + offs
                a = _load_scaled(s_row, cols, V, inv_tau)
                lq = a - lse_a
                q = tl.exp(lq)
                if KIND == 2:
                    g = q - tl.where(cols == y, 1.0, 0.0)
                else:
                    b = _load_scaled(t_row, cols, V, inv_tau)
                    lp = b - lse_b
                    p = tl.exp(lp)
                    if KIND == 0:
                        loss += tl.sum(p * (lp - lq), 0)
                        g = q - p
                    elif KIND == 1:
                        loss += tl.sum(q * (lq - lp), 0)
                        g = q * (lq - lp - rkl_on)
                    elif KIND == 3:
                        g = w_f * (q - p) + w_r * q * (lq - lp - rkl_on)
                    elif KIND == 4:
                        pa_qb = tl.exp(c1 * lp + c2 * lq)
                        q_k = tl.exp(k_ab * lq)
                        p_k = tl.exp(k_ab * lp)
                        loss += tl.sum(pa_qb - (c1 / k_ab) * p_k - (c2 / k_ab) * q_k, 0)
                        g = -(pa_qb - q_k) / c1 - q * hsum
                    else:
                        ell, h = _three_pass_terms(lq, lp, q, p, c1, KIND)
                        loss += tl.sum(ell, 0)
                        hsum += tl.sum(h, 0)
                if WRITE_GRAD:
                    if KIND <= 4:
                        tl.store(g_row + cols, (g * gscale).to(G.dtype.element_ty), mask=cols < V)
            if KIND == 4:
                loss = -loss / (c1 * c2)
            # ---- pass 3 (three-pass kinds): the gradient ----------------------------------------------------------
            if WRITE_GRAD:
                if KIND >= 5:
                    for start in range(0, V, BLOCK):
                        cols = start + offs
                        a = _load_scaled(s_row, cols, V, inv_tau)
                        b = _load_scaled(t_row, cols, V, inv_tau)
                        lq = a - lse_a
                        lp = b - lse_b
                        q = tl.exp(lq)
                        p = tl.exp(lp)
                        ell, h = _three_pass_terms(lq, lp, q, p, c1, KIND)
                        tl.store(g_row + cols, ((h - q * hsum) * gscale).to(G.dtype.element_ty), mask=cols < V)
            tl.store(L + row, loss)


@triton.jit
def _akl_kernel(
    S, T, G, W, L,
    n_rows, stride_s, stride_t, stride_g, V, inv_tau, mu,
    BLOCK: tl.constexpr, SBLOCK: tl.constexpr, K: tl.constexpr, NPASS: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """Adaptive KL (ABKD's head): ℓ = w KL(p‖q) + (1−w) KL(q‖p), w = Σ_head |p−q| / Σ |p−q| (no gradient).

    The tail is every token whose inclusive cumulative teacher mass (tokens sorted by p, descending) exceeds
    μ; the top-1 token is always in the head. Without sorting: with ``F(c) = Σ_{key(p_j) ≥ c} p_j`` (``key``:
    the bits of the float32 p, monotone in p), the head is ``{j : key(p_j) ≥ c*}`` for the smallest ``c*``
    with ``F(c*) ≤ μ`` (ties at the boundary fall in the tail together), then ``c* ← min(c*, key(p_max))``;
    μ ≥ 1 puts every token in the head (a float cumulative sum can exceed 1 by round-off).
    ``c*`` is found by a K-way search over the integer keys: each pass over the teacher row evaluates F at K
    candidates, shrinking the interval K+1-fold; NPASS passes cover the 2^30 keys of [0, 1].
    """
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):  # 1 row per program, or more
        wt = tl.load(W + row)
        s_row = S + row * stride_s
        t_row = T + row * stride_t
        g_row = G + row * stride_g
        offs = tl.arange(0, BLOCK)
        if wt == 0.0:
            if WRITE_GRAD:
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    tl.store(g_row + cols, tl.zeros([BLOCK], dtype=tl.float32).to(G.dtype.element_ty), mask=cols < V)
            tl.store(L + row, 0.0)
        else:
            # ---- pass 1: log-sum-exp of both rows ----------------------------------------------------------------
            m_a = -1.0e30
            s_a = 0.0
            m_b = -1.0e30
            s_b = 0.0
            for start in range(0, V, BLOCK):
                cols = start + offs
                a = _load_scaled(s_row, cols, V, inv_tau)
                b = _load_scaled(t_row, cols, V, inv_tau)
                ma_new = tl.maximum(m_a, tl.max(a, 0))
                mb_new = tl.maximum(m_b, tl.max(b, 0))
                s_a = s_a * tl.exp(m_a - ma_new) + tl.sum(tl.exp(a - ma_new), 0)
                s_b = s_b * tl.exp(m_b - mb_new) + tl.sum(tl.exp(b - mb_new), 0)
                m_a = ma_new
                m_b = mb_new
            lse_a = m_a + tl.log(s_a)
            lse_b = m_b + tl.log(s_b)
            key_max = tl.exp(m_b - lse_b).to(tl.int32, bitcast=True).to(tl.int64)
            # ---- search passes (teacher row only): smallest key c with F(c) ≤ μ, in (lo, hi] ---------------------
            lo = tl.full([], -1, tl.int64)
            hi = key_max + 1
            ks = tl.arange(0, K).to(tl.int64)
            soffs = tl.arange(0, SBLOCK)
            for _ in range(NPASS):
                cand = lo + ((hi - lo) * (ks + 1)) // (K + 1)  # [K], in (lo, hi]
                mass = tl.zeros([K], dtype=tl.float32)
                for start in range(0, V, SBLOCK):
                    cols = start + soffs
                    b = _load_scaled(t_row, cols, V, inv_tau)
                    p = tl.exp(b - lse_b)
                    key = p.to(tl.int32, bitcast=True).to(tl.int64)
                    above = key[:, None] >= cand[None, :]
                    mass += tl.sum(tl.where(above, p[:, None], 0.0), 0)
                ok = mass <= mu
                hi = tl.minimum(hi, tl.min(tl.where(ok, cand, hi), 0))
                lo = tl.maximum(lo, tl.max(tl.where(ok, lo, cand), 0))
            key_cut = tl.minimum(hi, key_max)
            key_cut = tl.where(mu >= 1.0, 0, key_cut)  # μ = 1: every token is in the head, whatever the round-off
            # ---- pass: head weight, FKL, RKL ------------------------------------------------------------------------
            gap_head = 0.0
            gap_all = 0.0
            fkl = 0.0
            rkl = 0.0
            for start in range(0, V, BLOCK):
                cols = start + offs
                a = _load_scaled(s_row, cols, V, inv_tau)
                b = _load_scaled(t_row, cols, V, inv_tau)
                lq = a - lse_a
                lp = b - lse_b
                q = tl.exp(lq)
                p = tl.exp(lp)
                gap = tl.abs(p - q)
                in_head = p.to(tl.int32, bitcast=True).to(tl.int64) >= key_cut
                gap_head += tl.sum(tl.where(in_head, gap, 0.0), 0)
                gap_all += tl.sum(gap, 0)
                fkl += tl.sum(p * (lp - lq), 0)
                rkl += tl.sum(q * (lq - lp), 0)
            w = tl.where(gap_all > 0.0, gap_head / tl.maximum(gap_all, 1.0e-38), 0.5)
            # ---- last pass: the gradient ------------------------------------------------------------------------------
            if WRITE_GRAD:
                gscale = wt * inv_tau
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    a = _load_scaled(s_row, cols, V, inv_tau)
                    b = _load_scaled(t_row, cols, V, inv_tau)
                    lq = a - lse_a
                    lp = b - lse_b
                    q = tl.exp(lq)
                    p = tl.exp(lp)
                    g = w * (q - p) + (1.0 - w) * q * (lq - lp - rkl)
                    tl.store(g_row + cols, (g * gscale).to(G.dtype.element_ty), mask=cols < V)
            tl.store(L + row, w * fkl + (1.0 - w) * rkl)


# ----------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------
def _block(V: int, block: int | None, cap: int) -> int:
    if block is not None:
        if block < 16 or block & (block - 1):
            raise ValueError(f"kernel block must be a power of two ≥ 16, got {block}")
        return block
    return max(16, min(cap, triton.next_power_of_2(V)))


def constants(name: str, params: dict) -> tuple[float, float]:
    """The kernel's (c1, c2) for objective ``name`` with parameters ``params`` (already validated)."""
    if name == "jsd":
        return float(params.get("beta", 0.5)), 0.0
    if name in ("skl", "srkl"):
        return float(params.get("alpha", 0.1)), 0.0
    if name == "bdkd":
        return float(params.get("weight_high", 3.0)), 0.0
    if name == "ab":
        return float(params.get("alpha", 0.2)), float(params.get("beta", 0.7))
    if name == "akl":
        return float(params.get("mu", 0.5)), 0.0
    return 0.0, 0.0


def launch(
    name: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    params: dict,
    temperature: float,
    grad: torch.Tensor | None,
    *,
    block: int | None = None,
    num_warps: int | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """Run kernel ``name`` over every row; returns ℓ [N] float32 and fills ``grad`` [N, V] (if given).

    ``student`` [N, V] (last stride 1); ``teacher`` [N, V] logits, or [N] long labels for ``ce``;
    ``weights`` [N] float32 (0: row not counted); ``grad`` [N, V] with last stride 1, any float dtype, may be
    ``student`` itself (in place). ``block``/``num_warps``/``programs`` override the launch configuration
    (:data:`BLOCK_CAP`, :data:`PROGRAMS`; tuning, tests).
    """
    n, vocab = student.shape
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    if n == 0:
        return loss
    write_grad = grad is not None
    g = grad if write_grad else student  # never written when WRITE_GRAD is off
    inv_tau = 1.0 / float(temperature)
    c1, c2 = constants(name, params)
    blk = _block(vocab, block, BLOCK_CAP)
    warps = num_warps or (16 if blk >= 4096 else 8 if blk >= 1024 else 4)
    grid = (min(n, programs or PROGRAMS or n),)
    if name == "akl":
        _akl_kernel[grid](
            student, teacher, g, weights, loss,
            n, student.stride(0), teacher.stride(0), g.stride(0), vocab, inv_tau, c1,
            BLOCK=blk, SBLOCK=min(blk, SEARCH_BLOCK), K=SEARCH_K, NPASS=SEARCH_PASSES, WRITE_GRAD=write_grad,
            num_warps=warps,
        )
        return loss
    if name == "ce":
        labels, t_ptr, t_stride = teacher, student, 0
    else:
        labels, t_ptr, t_stride = weights, teacher, teacher.stride(0)
    _divergence_kernel[grid](
        student, t_ptr, labels, g, weights, loss,
        n, student.stride(0), t_stride, g.stride(0), vocab, inv_tau, c1, c2,
        KIND=KIND[name], BLOCK=blk, WRITE_GRAD=write_grad, num_warps=warps,
    )
    return loss


assert SEARCH_PASSES >= math.ceil(31 / math.log2(SEARCH_K + 1))
