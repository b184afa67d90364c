"""The hand-written backward of the Sinkhorn objective (harness/objectives/sinkhorn.py) against plain autograd.

The reference here is written independently of the implementation: the L1 cost as ``|x_i − y_j|`` summed by
broadcasting, the log-domain iterations unrolled under autograd (what SinKD's released code differentiates).
The implementation must give the same value and the gradient of the *unrolled* iterations, in both of its forms
(scaling and log domain), for every parameter of the objective.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness import objectives as O
from harness.objectives import sinkhorn as SK


# ----------------------------------------------------------------------------------------------------------
# the independent reference: autograd through the unrolled log-domain loop
# ----------------------------------------------------------------------------------------------------------
def _ref_cost(x, y):
    return (x[:, None, :] - y[None, :, :]).abs().sum(-1)


def _ref_ot(w, epsilon, n_iters):
    n, m = w.shape
    log_k = -w / epsilon
    f, g = w.new_zeros(n), w.new_zeros(m)
    for _ in range(n_iters):
        f = -math.log(n) - torch.logsumexp(log_k + g[None, :], dim=1)
        g = -math.log(m) - torch.logsumexp(log_k + f[:, None], dim=0)
    plan = torch.exp(f[:, None] + log_k + g[None, :])
    return (plan * w).sum()


def _ref_objective(s, t, mask=None, temperature=1.0, epsilon=0.1, n_iters=20, debias=True, mass="unit",
                   max_positions=256):
    """The objective on logits [..., V] (counted rows of ``mask``), by plain autograd."""
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1) > 0
        s, t = s[keep], t[keep]
    n = s.shape[0]
    if n == 0:
        return s.sum() * 0.0
    if n > max_positions:
        idx = torch.linspace(0, n - 1, max_positions).round().long()
        s, t = s[idx], t[idx]
    q, p = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    value = _ref_ot(_ref_cost(q, p), epsilon, n_iters)
    if debias:
        value = value - 0.5 * _ref_ot(_ref_cost(q, q), epsilon, n_iters) - 0.5 * _ref_ot(_ref_cost(p, p), epsilon,
                                                                                        n_iters)
    return value * n if mass == "positions" else value


def _value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def _logits(shape, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=dtype)


def _prob_cost(n, m, v, seed, dtype=torch.float64):
    q = torch.softmax(_logits((n, v), seed, dtype=dtype), -1)
    p = torch.softmax(_logits((m, v), seed + 1, dtype=dtype), -1)
    return _ref_cost(q, p)


# ----------------------------------------------------------------------------------------------------------
# the OT value as a function of the cost: both forms, against autograd through the loop
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, m, v", [(1, 1, 4), (1, 5, 6), (6, 1, 3), (5, 7, 11), (12, 12, 9), (40, 33, 20)])
@pytest.mark.parametrize("epsilon, n_iters", [(0.1, 1), (0.1, 2), (0.1, 20), (0.05, 7), (0.5, 3), (2.0, 20)])
@pytest.mark.parametrize("domain", ["scaling", "log", "auto"])
def test_ot_value_and_gradient_match_unrolled_autograd_float64(n, m, v, epsilon, n_iters, domain):
    w = _prob_cost(n, m, v, seed=n * 97 + m)
    ref, g_ref = _value_and_grad(lambda c: _ref_ot(c, epsilon, n_iters), w)
    got, g_got = _value_and_grad(lambda c: SK._entropic_ot(c, epsilon, n_iters, domain), w)
    assert abs(got.item() - ref.item()) <= 1e-13
    assert (g_got - g_ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("epsilon, n_iters", [(0.01, 5), (0.003, 3)])
def test_ot_small_epsilon_float64_log_domain(epsilon, n_iters):
    w = _prob_cost(9, 8, 10, seed=3)
    ref, g_ref = _value_and_grad(lambda c: _ref_ot(c, epsilon, n_iters), w)
    got, g_got = _value_and_grad(lambda c: SK._entropic_ot(c, epsilon, n_iters), w)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-13)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("epsilon, n_iters", [(0.1, 1), (0.1, 20), (0.3, 20), (0.05, 10), (0.02, 5)])
@pytest.mark.parametrize("domain", ["auto", "log"])
def test_ot_float32_as_accurate_as_autograd(epsilon, n_iters, domain):
    """float32: value and gradient within float32 round-off of the float64 truth, no further from it than
    autograd's own float32 result (plus a few ulps)."""
    w64 = _prob_cost(30, 25, 40, seed=5)
    w32 = w64.float()
    ref64, g64 = _value_and_grad(lambda c: _ref_ot(c, epsilon, n_iters), w64)
    ref32, g32 = _value_and_grad(lambda c: _ref_ot(c, epsilon, n_iters), w32)
    got, g_got = _value_and_grad(lambda c: SK._entropic_ot(c, epsilon, n_iters, domain), w32)
    scale = g64.abs().max().item()
    assert abs(got.item() - ref64.item()) <= 2 * abs(ref32.item() - ref64.item()) + 1e-6 * abs(ref64.item())
    err, err_autograd = (g_got.double() - g64).abs().max().item(), (g32.double() - g64).abs().max().item()
    assert err <= 3 * err_autograd + 1e-6 * scale
    assert err <= 1e-5 * scale * max(1.0, 0.1 / epsilon)  # round-off of W grows by 1 / ε through K = e^(−W/ε)


def test_scaling_form_refused_outside_float_range_and_auto_falls_back_to_log():
    w = _prob_cost(8, 8, 10, seed=7).float()
    with pytest.raises(ValueError, match="float range"):
        SK._entropic_ot(w, 0.01, 5, "scaling")  # K down to e^-200: below float32's smallest normal
    auto, g_auto = _value_and_grad(lambda c: SK._entropic_ot(c, 0.01, 5), w)
    log, g_log = _value_and_grad(lambda c: SK._entropic_ot(c, 0.01, 5, "log"), w)
    assert torch.equal(auto, log) and torch.equal(g_auto, g_log)
    with pytest.raises(ValueError, match="domain"):
        SK._entropic_ot(w, 0.1, 5, "probability")


def test_log_domain_forward_is_the_previous_loop_bit_for_bit():
    """The log form runs the same operations as the loop autograd used to differentiate: identical values."""
    for dtype in (torch.float32, torch.float64):
        w = _prob_cost(11, 9, 13, seed=8, dtype=dtype)
        assert torch.equal(SK._entropic_ot(w, 0.1, 20, "log"), _ref_ot(w, 0.1, 20))


@pytest.mark.parametrize("n_iters", [1, 2, 3])
def test_gradient_is_the_unrolled_one_not_the_envelope_theorem_one(n_iters):
    """After few iterations the gradient of the unrolled loop differs clearly from the implicit / envelope-theorem
    gradient (the plan P itself, exact only at convergence); ours is the unrolled one."""
    w = _prob_cost(10, 10, 8, seed=9)
    _, g_unrolled = _value_and_grad(lambda c: _ref_ot(c, 0.1, n_iters), w)
    with torch.no_grad():  # the envelope gradient: ∂/∂W of Σ P W with the plan P held fixed
        log_k, f, g = -w / 0.1, w.new_zeros(10), w.new_zeros(10)
        for _ in range(n_iters):
            f = -math.log(10) - torch.logsumexp(log_k + g[None, :], dim=1)
            g = -math.log(10) - torch.logsumexp(log_k + f[:, None], dim=0)
        g_envelope = torch.exp(f[:, None] + log_k + g[None, :])
    assert (g_unrolled - g_envelope).abs().max().item() > 1e-3 * g_unrolled.abs().max().item()
    for domain in ("scaling", "log"):
        _, g_got = _value_and_grad(lambda c: SK._entropic_ot(c, 0.1, n_iters, domain), w)
        assert (g_got - g_unrolled).abs().max().item() <= 1e-12
        assert (g_got - g_envelope).abs().max().item() > 1e-3 * g_unrolled.abs().max().item()


def test_ot_gradient_scales_with_upstream_gradient():
    w = _prob_cost(6, 7, 5, seed=10).requires_grad_(True)
    for domain in ("scaling", "log"):
        (g1,) = torch.autograd.grad(SK._entropic_ot(w, 0.1, 4, domain), w)
        (g3,) = torch.autograd.grad(-2.5 * SK._entropic_ot(w, 0.1, 4, domain), w)
        torch.testing.assert_close(g3, -2.5 * g1, rtol=1e-14, atol=1e-16)


# ----------------------------------------------------------------------------------------------------------
# the L1 cost
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [None, 64, 7, 1])
@pytest.mark.parametrize("n, m, v", [(1, 1, 3), (5, 9, 7), (17, 4, 12), (23, 23, 601)])
def test_l1_cost_blocks_equal_cdist_and_self_cost_equals_cross_cost_bit_for_bit(monkeypatch, block, n, m, v):
    if block is not None:  # small blocks: several row and column blocks, partial last ones
        monkeypatch.setattr(SK, "_BLOCK_ELEMENTS", block * v)
    for dtype in (torch.float64, torch.float32):
        x = torch.softmax(_logits((n, v), 11, dtype=dtype), -1)
        y = torch.softmax(_logits((m, v), 12, dtype=dtype), -1)
        w = SK._l1_cost(x, y)  # against float64 cdist: float32 cdist's running sum is itself off by up to 2e-6 here
        truth = torch.cdist(x.double(), y.double(), p=1)
        torch.testing.assert_close(w.double(), truth, rtol=0, atol=1e-13 if dtype == torch.float64 else 5e-7)
        assert torch.equal(SK._l1_self_cost(x), SK._l1_cost(x, x))
        assert torch.equal(SK._l1_self_cost(x), SK._l1_self_cost(x).T)
        assert (torch.diagonal(SK._l1_self_cost(x)) == 0).all()


def test_l1_cost_gradients_are_cdists():
    x, y = torch.rand(7, 9, dtype=torch.float64), torch.rand(5, 9, dtype=torch.float64)
    y[2, 3] = x[1, 3]  # a tie: sign 0, as cdist's backward
    grad = torch.randn(7, 5, dtype=torch.float64)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    gx_ref, gy_ref = torch.autograd.grad(torch.cdist(xr, yr, p=1), (xr, yr), grad)
    gx, gy = torch.autograd.grad(SK._l1_cost(xr, yr), (xr, yr), grad)
    assert torch.equal(gx, gx_ref) and torch.equal(gy, gy_ref)
    g2 = torch.randn(7, 7, dtype=torch.float64)
    (gs_ref,) = torch.autograd.grad(torch.cdist(xr, xr, p=1), xr, g2)
    (gs,) = torch.autograd.grad(SK._l1_self_cost(xr), xr, g2)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# the whole objective against the reference
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, v", [(2, 3), (9, 7), (31, 16)])
@pytest.mark.parametrize("epsilon, n_iters", [(0.1, 1), (0.1, 20), (0.5, 3), (0.02, 6)])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("mass, temperature", [("unit", 1.0), ("positions", 2.0)])
def test_objective_value_and_gradient_match_unrolled_autograd(n, v, epsilon, n_iters, debias, mass, temperature):
    s, t = _logits((n, v), 20 + n), _logits((n, v), 40 + n)
    params = dict(epsilon=epsilon, n_iters=n_iters, debias=debias, mass=mass)
    ref, g_ref = _value_and_grad(lambda x: _ref_objective(x, t, temperature=temperature, **params), s)
    got, g_got = _value_and_grad(lambda x: O.get("sinkhorn", **params)(x, t, temperature=temperature), s)
    assert abs(got.item() - ref.item()) <= 1e-13 * max(1.0, n if mass == "positions" else 1.0)
    assert (g_got - g_ref).abs().max().item() <= 1e-12 * max(1.0, n if mass == "positions" else 1.0)


@pytest.mark.parametrize("debias", [True, False])
def test_objective_with_mask_subsampling_and_batch_shape(debias):
    s, t = _logits((3, 7, 10), 50), _logits((3, 7, 10), 51)
    mask = (torch.arange(21).reshape(3, 7) % 3 != 0).long()  # 14 counted positions
    params = dict(epsilon=0.1, n_iters=20, debias=debias, mass="positions", max_positions=5)
    ref, g_ref = _value_and_grad(lambda x: _ref_objective(x, t, mask, temperature=2.0, **params), s)
    got, g_got = _value_and_grad(lambda x: O.get("sinkhorn", **params)(x, t, mask, temperature=2.0), s)
    assert got.item() == pytest.approx(ref.item(), rel=1e-13)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-12)
    assert (g_got.reshape(21, 10)[mask.reshape(-1) == 0] == 0).all()


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("mass", ["unit", "positions"])
def test_objective_with_zero_and_one_counted_position(debias, mass):
    s, t = _logits((2, 3, 6), 60), _logits((2, 3, 6), 61)
    fn = O.get("sinkhorn", debias=debias, mass=mass)
    none = torch.zeros(2, 3, dtype=torch.long)
    got, g_got = _value_and_grad(lambda x: fn(x, t, none), s)
    assert got.item() == 0.0 and (g_got == 0).all()
    one = none.clone()
    one[1, 2] = 1
    ref, g_ref = _value_and_grad(lambda x: _ref_objective(x, t, one, debias=debias, mass=mass), s)
    got, g_got = _value_and_grad(lambda x: fn(x, t, one), s)
    assert got.item() == pytest.approx(ref.item(), rel=1e-13) and torch.isfinite(g_got).all()
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("debias", [True, False])
def test_objective_float32_close_to_float64(debias):
    """The training dtype: the float32 objective's value and gradient within float32 round-off of the float64
    reference (N = 40, V = 600 as in the training suite, ε = 0.1, 20 iterations: the scaling form). Through the
    L1 cost's and the softmax's backward, round-off of the OT gradient grows to ~4e-6 of the largest entry, in
    autograd's float32 result too (1.5e-6 to 3.5e-6 on these rows; ours 1 to 3 times that) on an AVX2 machine; on an
    AVX-512 one torch's float32 kernels round differently (autograd 2.4e-9 of the largest entry, ours 3.6e-5): the
    bound is 5× autograd's error or 5e-5 of the largest entry, whichever is larger."""
    s, t = _logits((40, 600), 70, scale=2.0), _logits((40, 600), 71, scale=2.0)
    ref, g_ref = _value_and_grad(lambda x: _ref_objective(x, t, debias=debias), s)
    _, g_ref32 = _value_and_grad(lambda x: _ref_objective(x, t.float(), debias=debias), s.float())
    got, g_got = _value_and_grad(lambda x: O.get("sinkhorn", debias=debias)(x, t.float()), s.float())
    assert got.item() == pytest.approx(ref.item(), abs=2e-6)
    err, err_autograd = (g_got.double() - g_ref).abs().max().item(), (g_ref32.double() - g_ref).abs().max().item()
    assert err <= max(5 * err_autograd, 5e-5 * g_ref.abs().max().item())
