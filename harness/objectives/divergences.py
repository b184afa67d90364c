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
- Parameters are validated by the registry (:func:`harness.objectives.get`) from each function's signature
  and its ``param_ranges`` attribute (a mapping ``name -> harness.schema.Field`` holding the accepted range
  and a one-line help); the functions themselves do not re-check them.

Released code read for each method (values are pinned against it in ``tests/test_objectives_reference.py``):

- DistiLLM: ``jongwooko/distillm@d47e77ff9d27721783b32213be38c1204230cc0a distillm/losses.py``
- AKL, BD-KD, AB: ``ghwang-s/abkd@df813185e69d21d1e99510272cd94e49be7250c0
  distillation_llm/distillm/losses.py`` (``get_ratio``/``AKL``, ``bdkd``, ``ab_div``)
- ToDi: ``jungseongryong/ToDi@45f1f8bf89dbda709d18c2f736c6683a4df6d498
  code/criterions/various_divergence.py`` (``compute_ToDi``)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..schema import Field


def _ranges(**fields: Field):
    """Attach ``param_ranges`` (accepted range and help of each parameter) to a divergence function."""

    def deco(fn):
        fn.param_ranges = fields
        return fn

    return deco


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ a (log a − log b) per row; rows where a = 0 contribute 0."""
    a = log_a.exp()
    return (a * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b) computed stably in the log domain, for 0 < w < 1."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _padded(log_x: Tensor) -> Tensor:
    """Entries that were ``-inf`` (probability exactly 0): the wrapper clamps them to the finite minimum."""
    return log_x <= torch.finfo(log_x.dtype).min


def sort_desc(x: Tensor) -> Tensor:
    """``x`` [..., V] sorted decreasing along the last axis: values only, no gradient.

    On CPU, float32/float64 rows are sorted by NumPy (its SIMD sort: ≈ 15× faster than ``torch.sort`` on
    [1536, 600] float32 rows, one thread); elsewhere ``torch.sort``. The values are the same either way
    (a sort only permutes them); NaN rows are not supported.
    """
    x = x.detach()
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.negative(np.sort(np.negative(x.numpy()), axis=-1)))
    return x.sort(dim=-1, descending=True).values


def argsort_desc(x: Tensor) -> Tensor:
    """Indices [..., V] (int64) that sort ``x`` decreasing along the last axis; the order among equal values is
    unspecified (as ``torch.sort``'s). NumPy's SIMD argsort on CPU float32/float64, ``torch.argsort`` elsewhere."""
    x = x.detach()
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.argsort(np.negative(x.numpy()), axis=-1).astype(np.int64, copy=False))
    return x.argsort(dim=-1, descending=True)


def _entropy(log_x: Tensor) -> Tensor:
    """H(x) = −Σ x log x per row (padded entries: 0 · finite = 0)."""
    return -(log_x.exp() * log_x).sum(-1)


def fkl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Forward KL, KL(p ‖ q) = Σ p (log p − log q): mode-covering (Hinton et al.)."""
    return _kl(log_p, log_q)


def rkl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Reverse KL, KL(q ‖ p) = Σ q (log q − log p): mode-seeking (MiniLLM, GKD β = 1)."""
    return _kl(log_q, log_p)


@_ranges(beta=Field((float,), gt=0, lt=1, help=(
    "weight of the teacher in the mixture m = beta*p + (1-beta)*q; beta = 0 and beta = 1 make the loss "
    "identically 0: for forward KL use objective 'fkl' (TRL's beta = 0), for reverse KL 'rkl' (TRL's beta = 1)")))
def jsd(log_q: Tensor, log_p: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen–Shannon (GKD): m = β p + (1−β) q; β·KL(p ‖ m) + (1−β)·KL(q ‖ m).

    β scales the two terms; it does not pick a direction: β → 0 and β → 1 both tend to 0 (the formula is
    exactly 0 at the endpoints, with zero gradient). β = 0.5 is the symmetric JSD, bounded by log 2.
    TRL's ``generalized_jsd_loss`` special-cases the endpoints (β = 0 → KL(p‖q), β = 1 → KL(q‖p)); a recipe
    with β ∈ {0, 1} would silently train nothing here, so the registry refuses the endpoints and names
    ``fkl`` / ``rkl`` instead (a choice, documented: a name says which direction is trained).
    """
    if beta in (0.0, 1.0):  # direct callers only: the registry refuses the endpoints
        return (log_q * 0.0).sum(-1)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def tvd(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Total variation distance ½ Σ |p − q|, in [0, 1]."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


_SKEW = Field((float,), ge=0, lt=1, help=(
    "weight of the distribution itself in the skewed mixture; alpha = 1 makes the loss identically 0"))


@_ranges(alpha=_SKEW)
def skl(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew KL (DistiLLM): KL(p ‖ α p + (1−α) q). α = 0 is forward KL.

    DistiLLM's ``skewed_forward_kl`` returns the cross-entropy −Σ p log(α p + (1−α) q), which exceeds this
    value by the teacher entropy H(p): same gradient, different value.
    """
    if alpha == 0.0:
        return _kl(log_p, log_q)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


@_ranges(alpha=_SKEW)
def srkl(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ (1−α) p + α q). α = 0 is reverse KL.

    DistiLLM's ``skewed_reverse_kl`` subtracts the student's Σ q log q, so it returns this very value.
    """
    if alpha == 0.0:
        return _kl(log_q, log_p)
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


@_ranges(mu=Field((float,), gt=0, le=1, help="teacher mass that defines the head (top tokens)"))
def akl(log_q: Tensor, log_p: Tensor, mu: float = 0.5) -> Tensor:
    """Adaptive KL (Wu et al. 2024, COLING 2025): w·KL(p ‖ q) + (1−w)·KL(q ‖ p).

    As in the released ``get_ratio`` (ghwang-s/abkd ``distillation_llm/distillm/losses.py``): sort the
    teacher's probabilities in decreasing order; a token is in the *tail* when the inclusive cumulative
    teacher mass up to and including it exceeds μ, except the most probable token, which is always in the
    *head* (so the token that crosses μ is in the tail). The gap is |p − q| per token and
    w = Σ_head |p − q| / Σ_V |p − q|, computed without gradient (the student's probabilities are detached);
    w = ½ where p = q exactly (both KLs are 0 there; the released code divides 0 by 0).
    Differences from the released code: τ comes from the recipe (the released AKL uses τ = 1 by having none),
    and ``-inf`` logits are probability 0 here, where ``get_ratio`` replaces them by logit 0 before the
    softmax (this only matters for padded vocabularies). Where several tokens share the teacher probability
    at which the cumulative mass crosses μ, the lowest indices among them come first (the released
    ``torch.sort`` orders equal values in an unspecified way; float16-cached teachers have many such ties).
    Computed without sorting the vocabulary itself (see :func:`_akl_weight`), with a closed-form gradient.
    Limits: the value lies between KL(p‖q) and KL(q‖p); μ below the top-1 probability puts only the top-1
    token in the head; μ = 1 puts every token in the head up to round-off of the cumulative sum (w = 1: KL(p‖q)).
    """
    return _AdaptiveKL.apply(log_q, log_p, float(mu))


class _AdaptiveKL(torch.autograd.Function):
    """AKL's value Σ_v d_v (w p_v − (1−w) q_v), d = log p − log q (the two weighted KLs in one sum), with the
    closed-form gradient for a constant w: ∂/∂log q_v = (1−w) q_v (1 − d_v) − w p_v and
    ∂/∂log p_v = w p_v (1 + d_v) − (1−w) q_v. p and q are exponentiated once for w and the value, and three
    [N, V] tensors are kept for the backward pass (autograd through the two KLs kept more and made more passes)."""

    @staticmethod
    def forward(ctx, log_q, log_p, mu):
        p, q = log_p.exp(), log_q.exp()
        w = _akl_weight(p, q, mu).unsqueeze(-1)
        wp, wq = p.mul_(w), q.mul_(1.0 - w)
        d = log_p - log_q
        ctx.save_for_backward(wp, wq, d)
        return (wp - wq).mul_(d).sum(-1)

    @staticmethod
    def backward(ctx, grad_out):
        wp, wq, d = ctx.saved_tensors
        g = grad_out.unsqueeze(-1)
        grad_q = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_q = (wq - wq * d).sub_(wp).mul_(g)
        if ctx.needs_input_grad[1]:
            grad_p = (wp + wp * d).sub_(wq).mul_(g)
        return grad_q, grad_p, None


def _akl_weight(p: Tensor, q: Tensor, mu: float) -> Tensor:
    """AKL's w [N] from the probabilities p, q [N, V] (no gradient), without a permutation: only the teacher's
    sorted *values* are needed.

    The inclusive cumulative sum of the sorted p never decreases, so the head is the first k ranks,
    k = max(1, #{i : cumsum_i ≤ μ}); it holds every token with p > t, t = the k-th largest p, and the first
    (lowest-index) tokens with p = t up to k in all. Σ_head |p − q| and Σ_V |p − q| are then sums over the
    vocabulary in index order (the released code sums in sorted order: float round-off only). Where several
    tokens share the k-th value, the released ``torch.sort`` puts an unspecified one of them first; the lowest
    index here.
    """
    shape = p.shape[:-1]
    p, q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    p_sorted = sort_desc(p)
    # k = #{i : cumsum_i ≤ μ} (a prefix: binary search), at least 1; then #{p > t} likewise in -p_sorted (increasing)
    k = torch.searchsorted(p_sorted.cumsum(-1), torch.full_like(p_sorted[..., :1], mu), right=True).clamp_min_(1)
    t = p_sorted.gather(-1, k - 1)
    neg_sorted = p_sorted.neg()
    room = k - torch.searchsorted(neg_sorted, t.neg())  # how many of the tokens equal to t are in the head (≥ 1)
    tied = bool((torch.searchsorted(neg_sorted, t.neg(), right=True) - k > 0).any())  # more tokens equal t than room
    # 0/1 masks in p's dtype (comparisons written into a float tensor, products instead of masked_fill: a bool
    # mask applied to a float tensor costs ≈ 5× more on CPU)
    head = torch.ge(p, t, out=torch.empty_like(p))
    if tied:  # a tie across the boundary: only the first `room` tokens equal to t (index order) are head
        at_t = torch.eq(p, t, out=torch.empty_like(p))
        wide = torch.float64 if p.dtype == torch.float64 else torch.float32  # counts < 2^24: exact
        first = torch.le(at_t.cumsum(-1, dtype=wide), room.to(wide), out=torch.empty_like(p))
        head = torch.gt(p, t, out=head).addcmul_(at_t, first)
    gap = (p - q).abs_()
    total = gap.sum(-1)
    head_gap = gap.mul_(head).sum(-1)
    w = torch.where(total > 0, head_gap / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return w.reshape(shape)


@_ranges(
    weight_high=Field((float,), gt=0, help="weight of the KL whose 'own' distribution has the larger entropy"),
    weight_low=Field((float,), ge=0, help="weight of each KL otherwise"),
)
def bdkd(log_q: Tensor, log_p: Tensor, weight_high: float = 3.0, weight_low: float = 1.0) -> Tensor:
    """BD-KD (Amara et al. 2022, arXiv 2212.12965), as ported to language models by ABKD's released code.

    ℓ = w_f·KL(p ‖ q) + w_r·KL(q ‖ p) per position, with w_f = ``weight_high`` where H(p) > H(q) (the teacher
    is the more uncertain one), w_r = ``weight_high`` where H(q) > H(p), and ``weight_low`` otherwise (both
    are ``weight_low`` when H(p) = H(q)). The entropies are computed at the objective's temperature, without
    gradient; the gates are piecewise constant, so the gradient is w_f·∇KL(p‖q) + w_r·∇KL(q‖p).
    Limits: ``weight_high = weight_low = 1`` is KL(p‖q) + KL(q‖p) (Jeffreys); ≥ 0, and 0 iff p = q.

    The released ``bdkd`` (ghwang-s/abkd ``distillation_llm/distillm/losses.py``) sums
    ``3·(−Σ p log q)`` (cross-entropy form: KL(p‖q) + H(p)) where H(p) > H(q) and ``3·KL(q‖p)`` where
    H(q) > H(p), weight 1 otherwise, each averaged over tokens; its entropies add 1e-9 inside the log. Our
    value is the true divergence (the H(p) offset removed): same gradient, value lower by w_f·H(p).
    """
    with torch.no_grad():
        h_p, h_q = _entropy(log_p), _entropy(log_q)
        high = torch.full_like(h_p, weight_high)
        low = torch.full_like(h_p, weight_low)
        w_f = torch.where(h_p > h_q, high, low)
        w_r = torch.where(h_q > h_p, high, low)
    return w_f * _kl(log_p, log_q) + w_r * _kl(log_q, log_p)


#: φ(z) = z² Σ_k z^k / (k+2)!: float64 uses k < 8 for |z| < 0.05, float32 k < 10 for |z| ≤ 1
_PHI_SERIES = [1.0 / math.factorial(k + 2) for k in range(10)]


def _phi_series_range(dtype: torch.dtype) -> tuple[float, list[float]]:
    """(c, coefficients): the series is used for |z| < c (float64), |z| ≤ c = 1 (float32)."""
    return (0.05, _PHI_SERIES[:8]) if dtype == torch.float64 else (1.0, _PHI_SERIES)


def _exp_phi(base: Tensor, z: Tensor) -> Tensor:
    """e^base · φ(z) with φ(z) = e^z − 1 − z ≥ 0, accurate to round-off for every z and free of overflow.

    float64: |z| < 0.05: Taylor series through z⁹ (relative truncation error < 3e-17); 0.05 ≤ |z| ≤ 1:
    ``expm1(z) − z`` (relative error ≲ 2 eps / |z|). float32: |z| ≤ 1: Taylor series through z¹¹ (relative
    error against float64 at most 1.7e-7 on [−1, 1], measured on a 2e5-point grid; ``expm1(z) − z``, used
    for 0.5 ≤ |z| ≤ 1 before, reaches 2.0e-7 there), so no third branch and one ``where`` fewer.
    |z| > 1: ``e^(base+z) − e^base·(1+z)`` (no cancellation there, and e^(base+z) stays finite where e^z
    alone would overflow). Inputs of the unused branches are replaced by harmless values, so gradients are
    finite everywhere.
    """
    if not (torch.is_grad_enabled() and (base.requires_grad or z.requires_grad)):
        return _exp_phi_nograd(base, z)
    c, coefs = _phi_series_range(z.dtype)
    a = z.abs()
    small, large = (a < c) if c < 1.0 else (a <= c), a > 1.0
    zs = torch.where(small, z, torch.zeros_like(z))
    poly = torch.full_like(z, coefs[-1])
    for coef in reversed(coefs[:-1]):
        poly = coef + zs * poly
    series = zs * zs * poly
    zm = torch.where(small | large, torch.full_like(z, 0.75), z)
    middle = torch.expm1(zm) - zm
    zl = torch.where(large, z, torch.full_like(z, 2.0))
    far = torch.exp(base + zl) - torch.exp(base) * (1.0 + zl)
    return torch.where(large, far, torch.exp(base) * torch.where(small, series, middle))


def _exp_phi_nograd(base: Tensor, z: Tensor) -> Tensor:
    """:func:`_exp_phi` without a graph (the α-β forward): the same operations on the entries each branch keeps,
    so the same floating-point result, in fewer passes over [N, V] (in-place Horner steps, e^base computed once;
    the unused branches' inputs are clamped, not selected: a ``where`` with a scattered mask costs ≈ 10 passes
    on CPU, and the far branch's overflow elsewhere is discarded by the final ``where``; float32 has no middle
    branch). A branch that no entry takes is skipped (one reduction decides: with float32 and |z| ≤ 1
    everywhere, the usual case when student and teacher are close, no mask is built at all)."""
    c, coefs = _phi_series_range(z.dtype)
    lo, hi = torch.aminmax(z) if z.numel() else (z.new_zeros(()), z.new_zeros(()))
    any_large = bool(lo < -1.0) or bool(hi > 1.0)
    zs = z.clamp(-c, c) if (c < 1.0 or any_large) else z  # = z where small
    poly = zs * coefs[-1]
    poly.add_(coefs[-2])
    for coef in reversed(coefs[:-2]):
        poly.mul_(zs).add_(coef)
    series = (zs * zs).mul_(poly)
    e_base = torch.exp(base)
    if c < 1.0 and (bool(lo <= -c) or bool(hi >= c)):  # some entries in the middle branch (float64)
        zm = z.clamp(-1.0, 1.0)  # = z where neither small nor large
        series = series.where(z.abs() < c, torch.expm1(zm).sub_(zm))
    if not any_large:
        return e_base.mul_(series)
    far = torch.add(base, z).exp_().sub_(e_base * (z + 1.0))
    return far.where(z.abs() > 1.0, e_base.mul_(series))


_AB = "exponent of the {} in the alpha-beta divergence (any finite value; negative values weigh rare tokens heavily)"


@_ranges(alpha=Field((float,), help=_AB.format("teacher p")), beta=Field((float,), help=_AB.format("student q")))
def ab(log_q: Tensor, log_p: Tensor, alpha: float = 0.2, beta: float = 0.7) -> Tensor:
    """α-β divergence (ABKD, Wang et al., ICML 2025, arXiv 2505.04560; Cichocki et al. 2011), p teacher, q student.

    D = −1/(αβ) Σ_v [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)]  for α, β, α+β ≠ 0, and its limits
    (Cichocki, Cruces & Amari 2011), with d = log p − log q:

    - α = 0, β ≠ 0: (1/β²) Σ [q^β log(q^β/p^β) − q^β + p^β]   (β = 1: KL(q‖p))
    - β = 0, α ≠ 0: (1/α²) Σ [p^α log(p^α/q^α) − p^α + q^α]   (α = 1: KL(p‖q))
    - α = −β ≠ 0:  (1/α²) Σ [log(q^α/p^α) + p^α/q^α − 1]
    - α = β = 0:   ½ Σ d²

    Computed as the exactly equivalent Σ_v e^(α log p + β log q)·[φ(β d)/(β(α+β)) + φ(−α d)/(α(α+β))] with
    φ(z) = e^z − 1 − z (each limit is the same expression with the vanishing term dropped), so for α, β > 0
    every summand is ≥ 0 and nothing cancels: the naive formula subtracts three nearly equal sums and divides
    by αβ. Float32 accuracy, measured against float64 on the same inputs (32 positions, V = 32,000, teacher
    logits N(0, 3²), student = teacher + N(0, σ²) noise with σ ∈ {0.03, 0.3} or independent), relative error of
    the token mean: ours ≤ 6e-7 for every (α, β) in {(0.2, 0.7), (0.05, 0.05), (0.01, 0.01), (1e-3, 1e-3),
    (1e-4, 1e-4), (1e-4, 0.7)}; the naive formula in float32 (as the released ``ab_div`` computes it) has
    1.8e-3 at (0.2, 0.7) and σ = 0.03, 4e-2 at (0.01, 0.01), 0.14 at (1e-3, 1e-3), 8.9 at (1e-4, 1e-4).
    For every (α, β) the divergence is ≥ 0, with equality iff p = q (Cichocki et al. 2011).
    The gradient is closed-form (a custom backward, :class:`_ABDivergence`): ∂/∂log q_v =
    e^(α log p + β log q)·expm1(−α d)/α (α = 0: −q^β d), as accurate as the value (float32 vs float64 relative
    error 1e-5 at (0.2, 0.7) and 5e-5 at (1e-3, 1e-3) with σ = 0.03, the floor set by d = log p − log q in
    float32), and only the two inputs are kept for it.

    Tokens where either distribution is exactly 0 (a ``-inf`` logit) contribute 0 with zero gradient, as
    the released ``ab_div``'s ``inf_mask`` does in its general case. Deviation from the released ``ab_div``
    (ghwang-s/abkd): its α = 0, β = 0 and α + β = 0 branches divide by β, α, α where the limit of the general
    formula (and Cichocki's definition) divides by β², α², α²; they coincide at (α, β) = (0, 1) (reverse KL,
    the pair the released GPT-2 script's loop runs), (1, 0) (forward KL) and (0, 0); elsewhere ours is
    continuous in (α, β) and the released value is ours × β (α = 0), × α (β = 0 or α + β = 0). Its α = 0, β = 0
    and α + β = 0 branches also give NaN where both logits are ``-inf`` (0/0 and 0·log 0); ours gives 0.
    """
    return _ABDivergence.apply(log_q, log_p, float(alpha), float(beta))


def _ab_inputs(log_q: Tensor, log_p: Tensor):
    """Padded entries (either side ``-inf``) replaced by 0 on both sides: d = 0 there, so they give 0.
    ``pad`` is None when no entry is padded (the usual case: nothing to replace)."""
    lowest = torch.finfo(log_p.dtype).min
    if log_p.numel() == 0 or not (bool(log_p.amin() <= lowest) or bool(log_q.amin() <= lowest)):
        return None, log_q, log_p  # two reductions: cheaper than the [N, V] masks
    pad = _padded(log_p) | _padded(log_q)
    return pad, torch.where(pad, 0.0, log_q), torch.where(pad, 0.0, log_p)


def _unpad(pad: Tensor | None, x: Tensor) -> Tensor:
    """``x`` with the padded entries set to 0 (nothing to do without padding)."""
    return x if pad is None else torch.where(pad, 0.0, x)


def _ab_terms(lq: Tensor, lp: Tensor, alpha: float, beta: float) -> Tensor:
    """Per-token α-β divergence terms [N, V] in the cancellation-free form of :func:`ab`."""
    d = lp - lq
    s = alpha + beta
    if alpha == 0.0 and beta == 0.0:
        return 0.5 * d * d
    if alpha == 0.0:
        return _exp_phi(beta * lq, beta * d) / (beta * beta)
    if beta == 0.0:
        return _exp_phi(alpha * lp, -alpha * d) / (alpha * alpha)
    if s == 0.0:
        return _exp_phi(torch.zeros_like(d), alpha * d) / (alpha * alpha)
    base = alpha * lp + beta * lq
    if d.dtype == torch.float32 and not torch.is_grad_enabled() and d.numel():
        lo, hi = torch.aminmax(d)
        if max(-float(lo), float(hi)) * max(abs(alpha), abs(beta)) <= 1.0:  # both series branches, everywhere
            return _ab_series(base, d, alpha, beta)
    return _exp_phi(base, beta * d) / (beta * s) + _exp_phi(base, -alpha * d) / (alpha * s)


def _ab_series(base: Tensor, d: Tensor, alpha: float, beta: float) -> Tensor:
    """The general case's two terms in one series where |β d| ≤ 1 and |α d| ≤ 1 (float32; half the Horner steps).

    φ(βd)/(β(α+β)) + φ(−αd)/(α(α+β)) = d² Σ_k c_k d^k with c_k = Σ_{j ≤ k} β^j (−α)^(k−j) / (k+2)! (the two
    float32 series of :func:`_exp_phi`, k < 10, added term by term: the same truncation; the geometric sum is
    (β^(k+1) − (−α)^(k+1)) / (α+β) without dividing by α+β). For α, β > 0 the sum of the terms' absolute values
    is at most ≈ 2× the value on |z| ≤ 1, as for each series alone, so the round-off stays that of :func:`_exp_phi`.
    """
    coefs = [sum(beta**j * (-alpha) ** (k - j) for j in range(k + 1)) * _PHI_SERIES[k] for k in range(len(_PHI_SERIES))]
    poly = d * coefs[-1]
    poly.add_(coefs[-2])
    for coef in reversed(coefs[:-2]):
        poly.mul_(d).add_(coef)
    return poly.mul_(d).mul_(d).mul_(torch.exp(base))


def _ab_grad(lq: Tensor, lp: Tensor, alpha: float, beta: float) -> Tensor:
    """∂(terms)/∂log q_v = e^(α log p + β log q)·expm1(−α d)/α, d = log p − log q (every case, limits included:
    α = 0 gives −q^β d). Written as (e^((α+β) log q) − e^(α log p + β log q))/α where |α d| > 1 (no overflow)."""
    d = lp - lq
    if alpha == 0.0:
        return -torch.exp(beta * lq) * d
    base = alpha * lp + beta * lq
    z = -alpha * d
    e_base = torch.exp(base)
    lo, hi = torch.aminmax(z) if z.numel() else (z.new_zeros(()), z.new_zeros(()))
    if not (bool(lo < -1.0) or bool(hi > 1.0)):  # no entry needs the far form (see _exp_phi_nograd)
        return e_base * torch.expm1(z) / alpha
    near = e_base * torch.expm1(z.clamp(-1.0, 1.0)) / alpha  # = z where not big (no where: see _exp_phi_nograd)
    far = (torch.exp((alpha + beta) * lq) - e_base) / alpha
    return torch.where(z.abs() > 1.0, far, near)


class _ABDivergence(torch.autograd.Function):
    """Σ_v of :func:`_ab_terms` per row, with the closed-form gradient of :func:`_ab_grad`: nothing but the two
    inputs is kept for the backward pass (autograd through the three-branch forward would keep ~20 [N, V]
    temporaries), and the gradient is as accurate as the value. D^(α,β)(p‖q) = D^(β,α)(q‖p) gives ∂/∂log p."""

    @staticmethod
    def forward(ctx, log_q, log_p, alpha, beta):
        pad, lq, lp = _ab_inputs(log_q, log_p)
        ctx.save_for_backward(log_q, log_p)
        ctx.alpha, ctx.beta = alpha, beta
        return _unpad(pad, _ab_terms(lq, lp, alpha, beta)).sum(-1)

    @staticmethod
    def backward(ctx, grad_out):
        log_q, log_p = ctx.saved_tensors
        pad, lq, lp = _ab_inputs(log_q, log_p)
        g = grad_out.unsqueeze(-1)
        grad_q = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_q = g * _unpad(pad, _ab_grad(lq, lp, ctx.alpha, ctx.beta))
        if ctx.needs_input_grad[1]:
            grad_p = g * _unpad(pad, _ab_grad(lp, lq, ctx.beta, ctx.alpha))
        return grad_q, grad_p, None, None


def todi(log_q: Tensor, log_p: Tensor) -> Tensor:
    """ToDi (Jung et al., EMNLP 2025): token-wise mix of forward and reverse KL terms.

    ℓ = Σ_v [w_v·p_v·log(p_v/q_v) + (1 − w_v)·q_v·log(q_v/p_v)] with w_v = sigmoid(log p_v − log q_v) per
    vocabulary entry, not differentiated (the released ``compute_ToDi`` detaches it). Since
    sigmoid(log p − log q) = p/(p+q), the *value* equals the Jeffreys divergence KL(p‖q) + KL(q‖p) =
    Σ (p − q)(log p − log q) ≥ 0 (0 iff p = q); the gradient does not, because w is held constant: it is
    Σ_v [−w_v p_v + (1 − w_v) q_v (1 + log q_v − log p_v)] ∂log q_v. Entries where either distribution has a
    ``-inf`` logit contribute 0 (the released ``inf_mask``). The temperature is the wrapper's (ToDi's
    scripts use τ = 2 for both teacher and student, no τ² factor).
    """
    pad = _padded(log_p) | _padded(log_q)
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    lp = torch.where(pad, zero, log_p)
    lq = torch.where(pad, zero, log_q)
    d = lp - lq
    w = torch.sigmoid(d).detach()
    terms = d * (w * lp.exp() - (1.0 - w) * lq.exp())
    return torch.where(pad, zero, terms).sum(-1)
