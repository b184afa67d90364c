"""The sort-free paths of akl (head from the sorted teacher values) and uld (NumPy sort), against float64 NumPy.

The reference here is the released rule written out directly (ghwang-s/abkd@df813185e69d21d1e99510272cd94e49be7250c0
``distillation_llm/distillm/losses.py``, ``get_ratio``): sort p decreasing (a *stable* sort, so equal
probabilities keep index order), tail = inclusive cumulative mass > μ except the top-1 token,
w = Σ_head |p − q| / Σ |p − q|. Ties across the μ boundary are where an order among equal values matters;
ours puts the lowest index first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.objectives import divergences as D
from harness.objectives.uld import uld


def _np_akl_weight(p: np.ndarray, q: np.ndarray, mu: float) -> np.ndarray:
    order = np.argsort(-p, axis=-1, kind="stable")
    ps = np.take_along_axis(p, order, -1)
    gap = np.abs(ps - np.take_along_axis(q, order, -1))
    tail = np.cumsum(ps, -1) > mu
    tail[:, 0] = False
    total = gap.sum(-1)
    return np.where(total > 0, (gap * ~tail).sum(-1) / np.where(total > 0, total, 1.0), 0.5)


def _np_akl(p: np.ndarray, q: np.ndarray, mu: float) -> np.ndarray:
    w = _np_akl_weight(p, q, mu)
    fkl = (p * (np.log(p) - np.log(q))).sum(-1)
    rkl = (q * (np.log(q) - np.log(p))).sum(-1)
    return w * fkl + (1 - w) * rkl


def test_akl_tie_across_mu_keeps_the_lowest_index_in_the_head():
    # p sorted: 0.3 (token 1), 0.3 (token 3), 0.2, 0.2; cum 0.3, 0.6 > 0.5: only one of the tied tokens is head
    p = np.array([[0.2, 0.3, 0.2, 0.3]])
    q = np.array([[0.25, 0.1, 0.25, 0.4]])
    w = _np_akl_weight(p, q, 0.5)
    assert w[0] == pytest.approx(0.2 / 0.4)  # head {token 1}: |0.3 − 0.1| / (0.05 + 0.2 + 0.05 + 0.1); token 3: 1/4
    got = D.akl(torch.from_numpy(np.log(q)), torch.from_numpy(np.log(p)), mu=0.5)
    np.testing.assert_allclose(got.numpy(), _np_akl(p, q, 0.5), rtol=1e-13)


@pytest.mark.parametrize("mu", [0.0501, 0.3001, 0.5001, 0.9001, 0.999])  # off the grid k / Σ: no cumsum equals μ
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_akl_with_many_ties_matches_the_stable_released_rule(mu, dtype):
    """Teacher probabilities on a coarse grid (as float16-cached logits make them): ties at μ in many rows."""
    rng = np.random.default_rng(3)
    p = rng.integers(1, 6, size=(64, 40)).astype(np.float64)
    p /= p.sum(-1, keepdims=True)
    q = rng.dirichlet(np.ones(40), size=64)
    got = D.akl(torch.from_numpy(np.log(q)).to(dtype), torch.from_numpy(np.log(p)).to(dtype), mu=mu)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(got.double().numpy(), _np_akl(p, q, mu), rtol=tol, atol=tol)


def test_akl_gradient_in_both_arguments_holds_w_constant():
    """Both gradients equal autograd's through w·KL(p‖q) + (1−w)·KL(q‖p) written here with w from NumPy."""
    rng = np.random.default_rng(4)
    lq = torch.log_softmax(torch.from_numpy(rng.normal(size=(6, 9)) * 2), -1).requires_grad_(True)
    lp = torch.log_softmax(torch.from_numpy(rng.normal(size=(6, 9)) * 2), -1).requires_grad_(True)
    g = torch.from_numpy(rng.normal(size=6))
    got = torch.autograd.grad((D.akl(lq, lp, mu=0.4) * g).sum(), (lq, lp))
    w = torch.from_numpy(_np_akl_weight(lp.detach().exp().numpy(), lq.detach().exp().numpy(), 0.4))
    p, q = lp.exp(), lq.exp()
    ref = w * (p * (lp - lq)).sum(-1) + (1 - w) * (q * (lq - lp)).sum(-1)
    want = torch.autograd.grad((ref * g).sum(), (lq, lp))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_uld_numpy_sort_path_float32_and_gradient():
    """Value: L1 between the decreasing-sorted rows (NumPy float64); gradient: sign at each token's rank × q."""
    rng = np.random.default_rng(5)
    zs, zt = rng.normal(size=(16, 50)) * 2, rng.normal(size=(16, 30)) * 2
    q = np.exp(zs) / np.exp(zs).sum(-1, keepdims=True)
    p = np.exp(zt) / np.exp(zt).sum(-1, keepdims=True)
    qs = -np.sort(-q, -1)
    ps = np.zeros_like(qs)
    ps[:, :30] = -np.sort(-p, -1)
    lq = torch.log_softmax(torch.from_numpy(zs).float(), -1).requires_grad_(True)
    val = uld(lq, torch.log_softmax(torch.from_numpy(zt).float(), -1))
    np.testing.assert_allclose(val.detach().double().numpy(), np.abs(qs - ps).sum(-1), rtol=2e-6)
    (grad,) = torch.autograd.grad(val.sum(), lq)
    rank = np.argsort(np.argsort(-q, -1), -1)
    want = np.sign(np.take_along_axis(qs - ps, rank, -1)) * q
    np.testing.assert_allclose(grad.double().numpy(), want, rtol=1e-5, atol=1e-7)


def test_uld_gradcheck_both_sides_and_widths():
    """float64 gradcheck of the closed-form backward, student and teacher, equal and different widths."""
    rng = np.random.default_rng(6)
    for vs, vt in ((7, 7), (9, 5), (4, 8)):
        lq = torch.log_softmax(torch.from_numpy(rng.normal(size=(3, vs)) * 2), -1).requires_grad_(True)
        lp = torch.log_softmax(torch.from_numpy(rng.normal(size=(3, vt)) * 2), -1).requires_grad_(True)
        assert torch.autograd.gradcheck(uld, (lq, lp))


@pytest.mark.parametrize("alpha, beta", [(0.2, 0.7), (1e-3, 1e-3), (1.5, -0.3), (0.7, -0.69)])
def test_ab_float32_one_series_region_against_float64_formula(alpha, beta):
    """Where |α d|, |β d| ≤ 1 everywhere (ab's single-series float32 path): the per-position value against the
    defining formula −1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)] in NumPy float64."""
    rng = np.random.default_rng(7)
    zt = rng.normal(size=(32, 300)) * 2
    zs = zt + rng.normal(size=zt.shape) * 0.15
    lq = torch.log_softmax(torch.from_numpy(zs).float(), -1)
    lp = torch.log_softmax(torch.from_numpy(zt).float(), -1)
    d = (lp - lq).double().numpy()
    assert np.abs(d).max() * max(abs(alpha), abs(beta)) <= 1.0  # the region this test is about
    p, q = np.exp(lp.double().numpy()), np.exp(lq.double().numpy())
    s = alpha + beta
    want = -(p**alpha * q**beta - alpha / s * p**s - beta / s * q**s).sum(-1) / (alpha * beta)
    got = D.ab(lq, lp, alpha, beta).double().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-6)
