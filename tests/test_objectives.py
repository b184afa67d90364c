"""Tests of harness.objectives against the specification (shared/design/objectives.md).

Expected values are derived by hand (closed forms below) or by an independent float64 NumPy reference
(`_ref_*`), never by calling the implementation's own helpers. Conventions: q = student, p = teacher.
"""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import harness.objectives as O

DIVERGENCES = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl"]  # per-position, need a teacher
ALL_IDS = DIVERGENCES + ["sinkhorn", "ce"]
SMOOTH = ["fkl", "rkl", "jsd", "skl", "srkl"]  # differentiable everywhere (tvd has |·|, akl a stopped weight)

PROP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _logits(*rows, dtype=torch.float64) -> torch.Tensor:
    """Logits log(prob) for probability rows (so softmax gives exactly these rows back)."""
    return torch.tensor(np.log(np.asarray(rows, dtype=np.float64)), dtype=dtype)


def _call(name, s, t, mask=None, **kw):
    """Call objective `name`; for `ce` the labels default to argmax of the teacher (or 0)."""
    obj = O.get(name)
    if name == "ce":
        if "labels" not in kw:
            kw["labels"] = torch.zeros(s.shape[:-1], dtype=torch.long) if t is None else t.argmax(-1)
        return obj(s, None, mask, **kw)
    return obj(s, t, mask, **kw)


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _mix(w, a, b):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


# --- independent NumPy float64 reference of every per-position divergence ---------------------------------
def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_kl(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0).sum(-1)


def _akl_weight(p, q, mu):
    """w per row: head = smallest set of the most probable teacher tokens with mass ≥ μ."""
    w = np.empty(p.shape[0])
    for i in range(p.shape[0]):
        order = np.argsort(-p[i], kind="stable")
        cum = np.cumsum(p[i][order])
        k = int(np.searchsorted(cum, mu))  # first index with cum ≥ μ (up to round-off at the boundary)
        head = order[: k + 1]
        gap = np.abs(p[i] - q[i])
        w[i] = gap[head].sum() / gap.sum() if gap.sum() > 0 else 0.5
    return w


def _ref(name, s, t, temperature=1.0, **params):
    """Per-position loss [N] (rows of s, t are positions) in float64."""
    q, p = _softmax(np.asarray(s) / temperature), _softmax(np.asarray(t) / temperature)
    if name == "fkl":
        return _np_kl(p, q)
    if name == "rkl":
        return _np_kl(q, p)
    if name == "jsd":
        b = params.get("beta", 0.5)
        m = b * p + (1 - b) * q
        return b * _np_kl(p, m) + (1 - b) * _np_kl(q, m)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "skl":
        a = params.get("alpha", 0.1)
        return _np_kl(p, a * p + (1 - a) * q)
    if name == "srkl":
        a = params.get("alpha", 0.1)
        return _np_kl(q, (1 - a) * p + a * q)
    if name == "akl":
        w = _akl_weight(p, q, params.get("mu", 0.5))
        return w * _np_kl(p, q) + (1 - w) * _np_kl(q, p)
    raise KeyError(name)


def _ref_sinkhorn(s, t, temperature=1.0, epsilon=0.1, n_iters=20, debias=True):
    """SinKD in float64 NumPy, probability-domain scaling (u = a / K v, v = b / Kᵀ u), uniform 1/N marginals.

    Mathematically the same iteration as the log-domain potentials f = log u, g = log v starting at g = 0
    (v = 1) with the row update first, as documented in harness/objectives/sinkhorn.py.
    """
    q, p = _softmax(np.asarray(s) / temperature), _softmax(np.asarray(t) / temperature)

    def ot(x, y):
        w = np.abs(x[:, None, :] - y[None, :, :]).sum(-1)
        k = np.exp(-w / epsilon)
        a = np.full(x.shape[0], 1.0 / x.shape[0])
        b = np.full(y.shape[0], 1.0 / y.shape[0])
        v = np.ones(y.shape[0])
        for _ in range(n_iters):
            u = a / (k @ v)
            v = b / (k.T @ u)
        plan = u[:, None] * k * v[None, :]
        return (plan * w).sum()

    value = ot(q, p)
    if debias:
        value = value - 0.5 * ot(q, q) - 0.5 * ot(p, p)
    return value


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
def test_available_lists_every_spec_id():
    assert set(ALL_IDS) <= set(O.available())
    assert O.available() == sorted(O.available())


def test_unknown_id_names_it_and_lists_known():
    with pytest.raises(O.ObjectiveError) as exc:
        O.get("kullback_leibler")
    assert isinstance(exc.value, ValueError)
    msg = str(exc.value)
    assert "kullback_leibler" in msg
    for name in ALL_IDS:
        assert name in msg


@pytest.mark.parametrize(
    "name, bad, accepted",
    [
        ("fkl", "alpha", []),
        ("skl", "beta", ["alpha"]),
        ("jsd", "alpha", ["beta"]),
        ("akl", "beta", ["mu"]),
        ("sinkhorn", "mu", ["epsilon", "n_iters", "max_positions", "debias"]),
    ],
)
def test_unknown_parameter_names_id_parameter_and_accepted(name, bad, accepted):
    s, t = _logits([0.25, 0.75]), _logits([0.5, 0.5])
    with pytest.raises(O.ObjectiveError) as exc:
        O.get(name)(s, t, **{bad: 0.3})
    msg = str(exc.value)
    assert name in msg and bad in msg
    for a in accepted:
        assert a in msg
    with pytest.raises(O.ObjectiveError):  # also when bound at get()
        O.get(name, **{bad: 0.3})


def test_ce_rejects_teacher_params_and_bad_user_paths():
    with pytest.raises(O.ObjectiveError):
        O.get("ce")(_logits([0.5, 0.5]), None, labels=torch.tensor([0]), beta=0.5)
    with pytest.raises(O.ObjectiveError):
        O.get("no_such_module_xyz:fn")
    with pytest.raises(O.ObjectiveError):
        O.get("math:no_such_function_xyz")


def test_shape_errors():
    s, t = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    with pytest.raises(O.ObjectiveError):
        O.get("fkl")(s, t)
    with pytest.raises(O.ObjectiveError):
        O.get("fkl")(s, torch.zeros(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(O.ObjectiveError):
        O.get("fkl")(s, torch.zeros(2, 3, 4), reduction="batchmean")


# ----------------------------------------------------------------------------------------------------------
# exact values, derived by hand
# ----------------------------------------------------------------------------------------------------------
P2, Q2 = [0.5, 0.5], [0.25, 0.75]  # teacher p, student q


def _jsd(b, p, q):
    m = _mix(b, p, q)
    return b * _kl(p, m) + (1 - b) * _kl(q, m)


HAND_V2 = [
    # KL(p‖q) = ½log(0.5/0.25) + ½log(0.5/0.75) = ½ log(4/3)
    ("fkl", {}, 0.5 * math.log(4 / 3)),
    # KL(q‖p) = ¼ log(½) + ¾ log(3/2)
    ("rkl", {}, 0.25 * math.log(0.5) + 0.75 * math.log(1.5)),
    # β=0.5: m = (0.375, 0.625)
    ("jsd", {}, 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
     + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625))),
    # β=0.3: m = 0.3p + 0.7q = (0.325, 0.675)
    ("jsd", {"beta": 0.3}, 0.3 * (0.5 * math.log(0.5 / 0.325) + 0.5 * math.log(0.5 / 0.675))
     + 0.7 * (0.25 * math.log(0.25 / 0.325) + 0.75 * math.log(0.75 / 0.675))),
    # β=0.9: m = (0.475, 0.525)
    ("jsd", {"beta": 0.9}, 0.9 * (0.5 * math.log(0.5 / 0.475) + 0.5 * math.log(0.5 / 0.525))
     + 0.1 * (0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525))),
    # endpoints of the generalized JSD are 0 (β scales, it does not pick a direction)
    ("jsd", {"beta": 0.0}, 0.0),
    ("jsd", {"beta": 1.0}, 0.0),
    # ½(|0.5−0.25| + |0.5−0.75|)
    ("tvd", {}, 0.25),
    # α=0.1: m = 0.1p + 0.9q = (0.275, 0.725); KL(p‖m)
    ("skl", {}, 0.5 * math.log(0.5 / 0.275) + 0.5 * math.log(0.5 / 0.725)),
    # α=0.5: m = (0.375, 0.625)
    ("skl", {"alpha": 0.5}, 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)),
    ("skl", {"alpha": 0.0}, 0.5 * math.log(4 / 3)),
    # α=0.1: m = 0.9p + 0.1q = (0.475, 0.525); KL(q‖m)
    ("srkl", {}, 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525)),
    ("srkl", {"alpha": 0.0}, 0.25 * math.log(0.5) + 0.75 * math.log(1.5)),
]


@pytest.mark.parametrize("name, params, expected", HAND_V2, ids=lambda x: str(x))
def test_hand_values_two_tokens(name, params, expected):
    s, t = _logits(Q2), _logits(P2)
    got = O.get(name)(s, t, **params)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, abs=1e-9)
    # same through [B, T, V] with a padding position that must not count
    s3 = torch.stack([s[0], torch.tensor([3.0, -1.0], dtype=torch.float64)]).reshape(1, 2, 2)
    t3 = torch.stack([t[0], torch.tensor([-2.0, 2.0], dtype=torch.float64)]).reshape(1, 2, 2)
    got3 = O.get(name)(s3, t3, torch.tensor([[1, 0]]), **params)
    assert got3.item() == pytest.approx(expected, abs=1e-9)


def test_hand_values_are_true_divergences_not_cross_entropy():
    # DistiLLM-style −Σ p log q would give fkl + H(p) = ½log(4/3) + log 2; we want the divergence.
    got = O.get("fkl")(_logits(Q2), _logits(P2)).item()
    assert got == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    assert abs(got - (0.5 * math.log(4 / 3) + math.log(2))) > 0.5


# AKL on V = 3: p = (0.6, 0.3, 0.1), q = (0.4, 0.1, 0.5); |p−q| = (0.2, 0.2, 0.4), Σ = 0.8
P3, Q3 = [0.6, 0.3, 0.1], [0.4, 0.1, 0.5]
FKL3 = 0.6 * math.log(0.6 / 0.4) + 0.3 * math.log(0.3 / 0.1) + 0.1 * math.log(0.1 / 0.5)
RKL3 = 0.4 * math.log(0.4 / 0.6) + 0.1 * math.log(0.1 / 0.3) + 0.5 * math.log(0.5 / 0.1)


@pytest.mark.parametrize(
    "mu, w",
    [
        (0.5, 0.25),  # head {0} (0.6 ≥ 0.5): w = 0.2 / 0.8
        (0.3, 0.25),  # head {0}
        (0.7, 0.5),  # head {0, 1} (0.6 < 0.7 ≤ 0.9): w = 0.4 / 0.8 — the token crossing μ is in the head
        (0.95, 1.0),  # head = everything (0.9 < 0.95): w = 1, akl = fkl
    ],
)
def test_akl_hand_values(mu, w):
    assert FKL3 == pytest.approx(_kl(P3, Q3)) and RKL3 == pytest.approx(_kl(Q3, P3))
    got = O.get("akl")(_logits(Q3), _logits(P3), mu=mu).item()
    assert got == pytest.approx(w * FKL3 + (1 - w) * RKL3, abs=1e-9)


def test_akl_default_mu_is_half():
    assert O.get("akl")(_logits(Q3), _logits(P3)).item() == pytest.approx(0.25 * FKL3 + 0.75 * RKL3, abs=1e-9)


def test_ce_hand_values():
    s = _logits(Q2, [0.1, 0.9], [0.8, 0.2]).reshape(1, 3, 2)
    labels = torch.tensor([[1, 0, -100]])
    ce = O.get("ce")
    # −log 0.75 and −log 0.1; the −100 position is ignored
    expected = (-math.log(0.75) - math.log(0.1)) / 2
    assert ce(s, None, labels=labels).item() == pytest.approx(expected, abs=1e-12)
    assert ce(s, s, labels=labels).item() == pytest.approx(expected, abs=1e-12)  # teacher ignored
    # mask and labels combine
    assert ce(s, None, torch.tensor([[0, 1, 1]]), labels=labels).item() == pytest.approx(-math.log(0.1))
    assert ce(s, None, labels=labels, reduction="sum").item() == pytest.approx(2 * expected)
    # agrees with torch's own cross-entropy
    ref = torch.nn.functional.cross_entropy(s.reshape(-1, 2), labels.reshape(-1), ignore_index=-100)
    assert ce(s, None, labels=labels).item() == pytest.approx(ref.item(), abs=1e-12)


def test_sinkhorn_two_positions_against_numpy():
    # 2 positions, V = 2: q rows (0.25, 0.75), (0.6, 0.4); p rows (0.5, 0.5), (0.9, 0.1)
    s = _logits(Q2, [0.6, 0.4])
    t = _logits(P2, [0.9, 0.1])
    for debias in (True, False):
        for eps, iters in ((0.1, 20), (0.5, 3), (0.05, 50)):
            expected = _ref_sinkhorn(s.numpy(), t.numpy(), epsilon=eps, n_iters=iters, debias=debias)
            got = O.get("sinkhorn")(s, t, epsilon=eps, n_iters=iters, debias=debias)
            assert got.dim() == 0
            assert got.item() == pytest.approx(expected, abs=1e-9), (debias, eps, iters)


def test_sinkhorn_defaults_and_hand_limits():
    s = _logits(Q2, [0.6, 0.4])
    t = _logits(P2, [0.9, 0.1])
    # defaults: ε = 0.1, 20 iterations, debias = True (documented in harness/objectives/sinkhorn.py)
    assert O.get("sinkhorn")(s, t).item() == pytest.approx(_ref_sinkhorn(s.numpy(), t.numpy()), abs=1e-9)
    # one position: the plan is the single cell, value = W = ‖q − p‖₁ = 0.5 (self terms W = 0)
    assert O.get("sinkhorn")(s[:1], t[:1]).item() == pytest.approx(0.5, abs=1e-12)
    # Sinkhorn divergence at p = q is 0; the plain entropic cost is not (entropic blur), but is ≤ max W
    assert O.get("sinkhorn")(s, s).item() == pytest.approx(0.0, abs=1e-12)
    plain = O.get("sinkhorn")(s, s, debias=False).item()
    assert 0 < plain <= 2


def test_sinkhorn_temperature_and_recipe_default_tau2():
    s = _logits(Q2, [0.6, 0.4], [0.3, 0.7])
    t = _logits(P2, [0.9, 0.1], [0.2, 0.8])
    expected = _ref_sinkhorn(s.numpy(), t.numpy(), temperature=2.0)
    assert O.get("sinkhorn")(s, t, temperature=2.0).item() == pytest.approx(expected, abs=1e-9)


def test_sinkhorn_position_cap_uses_strided_subset():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    capped = O.get("sinkhorn")(s, t, max_positions=3)
    keep = [0, 2, 4]  # evenly strided, deterministic (documented)
    assert capped.item() == pytest.approx(_ref_sinkhorn(s[keep].numpy(), t[keep].numpy()), abs=1e-9)
    assert O.get("sinkhorn")(s, t, max_positions=5).item() == pytest.approx(
        _ref_sinkhorn(s.numpy(), t.numpy()), abs=1e-9
    )


# ----------------------------------------------------------------------------------------------------------
# properties (hypothesis, float64)
# ----------------------------------------------------------------------------------------------------------
@st.composite
def logit_pairs(draw, max_n=4, max_v=6):
    n = draw(st.integers(1, max_n))
    v = draw(st.integers(2, max_v))
    el = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False)
    s = draw(hnp.arrays(np.float64, (n, v), elements=el))
    t = draw(hnp.arrays(np.float64, (n, v), elements=el))
    return torch.from_numpy(s), torch.from_numpy(t)


def _none(name, s, t, **params):
    return O.get(name)(s, t, reduction="none", **params)


@PROP
@given(logit_pairs())
def test_per_position_values_match_numpy_reference(pair):
    s, t = pair
    for name in DIVERGENCES:
        got = _none(name, s, t).numpy()
        ref = _ref(name, s.numpy(), t.numpy())
        if name == "akl":  # the head boundary is a measure-zero tie; compare away from it
            p = _softmax(t.numpy())
            ps = np.sort(p, -1)[:, ::-1].cumsum(-1)
            ok = np.abs(ps - 0.5).min(-1) > 1e-9
            got, ref = got[ok], ref[ok]
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12, err_msg=name)


@PROP
@given(logit_pairs())
def test_nonnegative_and_zero_iff_equal(pair):
    s, t = pair
    tv = _ref("tvd", s.numpy(), t.numpy())
    for name in DIVERGENCES:
        val = _none(name, s, t)
        assert (val >= -1e-12).all(), name
        assert (val[torch.from_numpy(tv) > 1e-3] > 0).all(), name
        assert _none(name, s, s).abs().max().item() <= 1e-12, name
        # p = q with different logits (shift by a constant per row)
        assert _none(name, s, s + 3.0).abs().max().item() <= 1e-12, name
    # batch-wise Sinkhorn divergence: ≥ 0 up to round-off, 0 at p = q
    assert O.get("sinkhorn")(s, t).item() >= -1e-9
    assert abs(O.get("sinkhorn")(s, s).item()) <= 1e-12
    assert O.get("ce")(s, None, labels=t.argmax(-1)).item() >= 0


@PROP
@given(logit_pairs())
def test_skew_limits(pair):
    s, t = pair
    torch.testing.assert_close(_none("skl", s, t, alpha=0.0), _none("fkl", s, t), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_none("srkl", s, t, alpha=0.0), _none("rkl", s, t), rtol=1e-12, atol=1e-14)
    # α → 0 is continuous, not only special-cased at 0
    torch.testing.assert_close(_none("skl", s, t, alpha=1e-9), _none("fkl", s, t), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(_none("srkl", s, t, alpha=1e-9), _none("rkl", s, t), rtol=1e-5, atol=1e-9)


@PROP
@given(logit_pairs())
def test_jsd_limits_symmetry_and_bound(pair):
    s, t = pair
    fkl, rkl = _none("fkl", s, t), _none("rkl", s, t)
    half = _none("jsd", s, t, beta=0.5)
    # β → 0: jsd = β·KL(p‖q) + O(β²); β → 1: jsd = (1−β)·KL(q‖p) + O((1−β)²) — both tend to 0
    for b, lead in ((1e-6, fkl), (1 - 1e-6, rkl)):
        small = _none("jsd", s, t, beta=b)
        assert (small <= 2e-6 * lead + 1e-12).all()
        assert (small <= half + 1e-12).all() or (half <= 1e-12).all()
    torch.testing.assert_close(half, _none("jsd", t, s, beta=0.5), rtol=1e-10, atol=1e-13)
    assert (half <= math.log(2) + 1e-12).all()


@PROP
@given(logit_pairs())
def test_tvd_range_and_akl_between(pair):
    s, t = pair
    tv = _none("tvd", s, t)
    assert ((tv >= 0) & (tv <= 1)).all()
    fkl, rkl = _none("fkl", s, t), _none("rkl", s, t)
    for mu in (0.1, 0.5, 0.9):
        a = _none("akl", s, t, mu=mu)
        assert (a >= torch.minimum(fkl, rkl) - 1e-12).all() and (a <= torch.maximum(fkl, rkl) + 1e-12).all()


def test_tvd_reaches_one_on_disjoint_supports():
    s = torch.tensor([[30.0, -30.0]], dtype=torch.float64)
    assert O.get("tvd")(s, -s).item() == pytest.approx(1.0, abs=1e-12)
    assert O.get("jsd")(s, -s).item() == pytest.approx(math.log(2), abs=1e-9)


# ----------------------------------------------------------------------------------------------------------
# reductions and masking
# ----------------------------------------------------------------------------------------------------------
def _tvd_batch():
    """[2, 3, 2] logits whose per-position tvd is ℓ = [[.1, .2, .3], [.4, .05, .15]] (p = (½, ½), q = (½−ℓ, ½+ℓ))."""
    ell = np.array([[0.1, 0.2, 0.3], [0.4, 0.05, 0.15]])
    q = np.stack([0.5 - ell, 0.5 + ell], -1)
    s = torch.tensor(np.log(q), dtype=torch.float64, requires_grad=True)
    t = torch.zeros(2, 3, 2, dtype=torch.float64)
    return s, t, torch.tensor(ell)


MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    "reduction, kw, expected",
    [
        ("mean", {}, (0.1 + 0.2 + 0.4) / 3),
        ("sum", {}, 0.7),
        ("per_sequence_mean", {}, ((0.1 + 0.2) / 2 + 0.4 / 1) / 2),
        ("mean", {"normalizer": 10.0}, 0.07),  # global token count under gradient accumulation
    ],
)
def test_reductions_by_hand(reduction, kw, expected):
    s, t, _ = _tvd_batch()
    got = O.get("tvd")(s, t, MASK, reduction=reduction, **kw)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_per_sequence_mean_ignores_sequences_without_counted_tokens():
    s, t, _ = _tvd_batch()
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    got = O.get("tvd")(s, t, mask, reduction="per_sequence_mean")
    assert got.item() == pytest.approx((0.1 + 0.2) / 2, abs=1e-12)


def test_reduction_none_by_hand():
    s, t, ell = _tvd_batch()
    got = O.get("tvd")(s, t, MASK, reduction="none")
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, ell * MASK, rtol=0, atol=1e-12)
    assert (got[MASK == 0] == 0).all()


def test_default_mask_counts_everything_and_bool_mask_equals_int_mask():
    s, t, ell = _tvd_batch()
    assert O.get("tvd")(s, t).item() == pytest.approx(ell.mean().item(), abs=1e-12)
    a = O.get("tvd")(s, t, MASK.bool())
    b = O.get("tvd")(s, t, MASK.double())
    assert a.item() == pytest.approx(b.item(), abs=0)


def test_flat_inputs_n_by_v():
    s, t, ell = _tvd_batch()
    flat_mask = MASK.reshape(-1)
    got = O.get("tvd")(s.reshape(6, 2), t.reshape(6, 2), flat_mask)
    assert got.item() == pytest.approx(0.7 / 3, abs=1e-12)
    assert O.get("tvd")(s.reshape(6, 2), t.reshape(6, 2), flat_mask, reduction="none").shape == (6,)


def _rand(shape, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


@pytest.mark.parametrize("name", ALL_IDS)
def test_masked_positions_change_nothing_and_get_zero_grad(name):
    s, t = _rand((2, 4, 5), 1), _rand((2, 4, 5), 2)
    labels = t.argmax(-1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]])
    reductions = ["mean"] if name == "sinkhorn" else ["mean", "sum", "per_sequence_mean", "none"]
    for reduction in reductions:
        s1 = s.clone().requires_grad_(True)
        v1 = _call(name, s1, t, mask, labels=labels, reduction=reduction)
        s2 = s.clone()
        t2 = t.clone()
        s2[mask == 0] = _rand((int((mask == 0).sum()), 5), 3, scale=50.0)
        t2[mask == 0] = _rand((int((mask == 0).sum()), 5), 4, scale=50.0)
        labels2 = labels.clone()
        labels2[mask == 0] = 4
        s2.requires_grad_(True)
        v2 = _call(name, s2, t2, mask, labels=labels2, reduction=reduction)
        torch.testing.assert_close(v1, v2, rtol=0, atol=0)
        (g,) = torch.autograd.grad(v2.sum(), s2)
        assert (g[mask == 0] == 0).all()
        assert (g[mask == 1] != 0).any()


@pytest.mark.parametrize("name", ALL_IDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize(
    "reduction", ["mean", "sum", "per_sequence_mean", "none"]
)
def test_no_counted_token_gives_zero_with_zero_grad(name, chunk_size, reduction):
    if name == "sinkhorn" and reduction != "mean":
        pytest.skip("sinkhorn is batch-wise: only reduction='mean' is defined")
    if True:  # noqa: SIM108 - kept as a block beside the ce case below
        s = _rand((2, 3, 4), 5, dtype=torch.float32).requires_grad_(True)
        t = _rand((2, 3, 4), 6, dtype=torch.float32)
        mask = torch.zeros(2, 3)
        out = _call(name, s, t, mask, reduction=reduction, chunk_size=chunk_size)
        assert torch.isfinite(out).all() and (out == 0).all(), (name, reduction)
        (g,) = torch.autograd.grad(out.sum(), s)
        assert torch.isfinite(g).all() and (g == 0).all()
    # ce: every label ignored
    if name == "ce":
        s = _rand((2, 3, 4), 5, dtype=torch.float32).requires_grad_(True)
        out = O.get("ce")(s, None, labels=torch.full((2, 3), -100), chunk_size=chunk_size)
        (g,) = torch.autograd.grad(out, s)
        assert out.item() == 0 and (g == 0).all()


@pytest.mark.parametrize("name", ALL_IDS)
def test_teacher_gets_no_gradient(name):
    s = _rand((2, 3, 4), 7).requires_grad_(True)
    t = _rand((2, 3, 4), 8).requires_grad_(True)
    out = _call(name, s, t, labels=t.detach().argmax(-1))
    gs, gt = torch.autograd.grad(out, [s, t], allow_unused=True)
    assert gs is not None and torch.isfinite(gs).all()
    assert gt is None or (gt == 0).all()


# ----------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------
GRAD_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("name, params", [(n, {}) for n in SMOOTH + ["tvd"]]
                         + [("jsd", {"beta": 0.2}), ("skl", {"alpha": 0.4}), ("srkl", {"alpha": 0.4})])
@pytest.mark.parametrize("reduction", ["mean", "per_sequence_mean"])
def test_gradcheck_per_position(name, params, reduction):
    s = _rand((2, 3, 5), 11).requires_grad_(True)
    t = _rand((2, 3, 5), 12)
    assert torch.autograd.gradcheck(lambda x: O.get(name)(x, t, GRAD_MASK, reduction=reduction, **params), (s,))
    assert torch.autograd.gradcheck(lambda x: O.get(name)(x, t, GRAD_MASK, temperature=1.7, **params), (s,))


def test_gradcheck_ce():
    s = _rand((2, 3, 5), 13).requires_grad_(True)
    labels = torch.tensor([[0, 4, -100], [2, 2, 1]])
    assert torch.autograd.gradcheck(lambda x: O.get("ce")(x, None, GRAD_MASK, labels=labels), (s,))


def test_akl_gradient_treats_weight_as_constant():
    """akl's weight w is not differentiated: ∇akl = w·∇fkl + (1−w)·∇rkl with w from the hand formula."""
    s = _rand((2, 3, 5), 14).requires_grad_(True)
    t = _rand((2, 3, 5), 15)
    mu = 0.5
    w = _akl_weight(_softmax(t.numpy()).reshape(6, 5), _softmax(s.detach().numpy()).reshape(6, 5), mu)
    w = torch.from_numpy(w).reshape(2, 3)
    ga = torch.autograd.grad(O.get("akl")(s, t, GRAD_MASK, mu=mu), s)[0]
    fk = O.get("fkl")(s, t, GRAD_MASK, reduction="none")
    rk = O.get("rkl")(s, t, GRAD_MASK, reduction="none")
    ref = (w * fk + (1 - w) * rk).sum() / GRAD_MASK.sum()
    gr = torch.autograd.grad(ref, s)[0]
    torch.testing.assert_close(ga, gr, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("debias", [True, False])
def test_gradcheck_sinkhorn(debias):
    s = _rand((4, 5), 16, scale=1.0).requires_grad_(True)
    t = _rand((4, 5), 17, scale=1.0)
    mask = torch.tensor([1, 1, 0, 1])
    assert torch.autograd.gradcheck(
        lambda x: O.get("sinkhorn")(x, t, mask, epsilon=0.5, n_iters=10, debias=debias), (s,)
    )
    assert torch.autograd.gradcheck(lambda x: O.get("sinkhorn")(x, t, mask, temperature=2.0, debias=debias), (s,))


# ----------------------------------------------------------------------------------------------------------
# -inf padded vocabulary, dtypes, temperature, chunking
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_IDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_neg_inf_padded_vocabulary(name, chunk_size, dtype):
    s, t = _rand((2, 3, 4), 21, dtype=dtype), _rand((2, 3, 4), 22, dtype=dtype)
    pad = torch.full((2, 3, 3), float("-inf"), dtype=dtype)
    sp = torch.cat([s, pad], -1).requires_grad_(True)
    tp = torch.cat([t, pad], -1)
    s = s.clone().requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    labels = t.argmax(-1)
    kw = dict(labels=labels, chunk_size=chunk_size)
    v = _call(name, s, t, mask, **kw)
    vp = _call(name, sp, tp, mask, **kw)
    assert torch.isfinite(vp)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert vp.item() == pytest.approx(v.item(), abs=tol, rel=tol)
    (g,) = torch.autograd.grad(v, s)
    (gp,) = torch.autograd.grad(vp, sp)
    assert torch.isfinite(gp).all()
    assert (gp[..., 4:] == 0).all()
    torch.testing.assert_close(gp[..., :4], g, rtol=tol, atol=tol)


def test_neg_inf_on_some_real_tokens_of_both():
    """-inf at different columns per row (e.g. a banned token in both), teacher and student alike."""
    s, t = _rand((3, 5), 23), _rand((3, 5), 24)
    s[0, 1] = t[0, 1] = float("-inf")
    s[2, 4] = t[2, 4] = float("-inf")
    s.requires_grad_(True)
    for name in DIVERGENCES + ["sinkhorn"]:
        v = O.get(name)(s, t)
        (g,) = torch.autograd.grad(v, s)
        assert torch.isfinite(v) and torch.isfinite(g).all(), name
        assert g[0, 1] == 0 and g[2, 4] == 0


@pytest.mark.parametrize("name", ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_use_float32_math(name, dtype):
    s = _rand((3, 8, 64), 31, dtype=dtype).requires_grad_(True)
    t = _rand((3, 8, 64), 32, dtype=dtype)
    mask = torch.ones(3, 8)
    mask[0, 5:] = 0
    labels = t.argmax(-1)
    out = _call(name, s, t, mask, labels=labels)
    assert out.dtype == torch.float32 and out.dim() == 0
    ref = _call(name, s.detach().double(), t.double(), mask, labels=labels)
    assert out.item() == pytest.approx(ref.item(), rel=2e-5, abs=1e-6)
    (g,) = torch.autograd.grad(out, s)
    assert g.dtype == dtype and torch.isfinite(g).all()
    # per-position values stay float32 too
    if name != "sinkhorn":
        assert _call(name, s, t, mask, labels=labels, reduction="none").dtype == torch.float32


@pytest.mark.parametrize("name", DIVERGENCES + ["sinkhorn"])
@pytest.mark.parametrize("tau", [0.5, 2.0, 3.7])
def test_temperature_equals_scaled_logits(name, tau):
    s, t = _rand((2, 3, 6), 41), _rand((2, 3, 6), 42)
    s1 = s.clone().requires_grad_(True)
    s2 = (s / tau).requires_grad_(True)
    v1 = O.get(name)(s1, t, temperature=tau)
    v2 = O.get(name)(s2, t / tau, temperature=1.0)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-10, abs=1e-13)
    (g1,) = torch.autograd.grad(v1, s1)
    (g2,) = torch.autograd.grad(v2, s2)
    torch.testing.assert_close(g1, g2 / tau, rtol=1e-8, atol=1e-12)
    # and against the NumPy reference at that temperature
    if name != "sinkhorn":
        ref = _ref(name, s.reshape(6, 6).numpy(), t.reshape(6, 6).numpy(), temperature=tau).mean()
    else:
        ref = _ref_sinkhorn(s.reshape(6, 6).numpy(), t.reshape(6, 6).numpy(), temperature=tau)
    assert v1.item() == pytest.approx(ref, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("name", ALL_IDS)
@pytest.mark.parametrize("reduction, kw", [("mean", {}), ("sum", {}), ("per_sequence_mean", {}),
                                           ("mean", {"normalizer": 7.0})])
def test_chunked_equals_dense(name, reduction, kw):
    if name == "sinkhorn" and (reduction != "mean" or kw):
        pytest.skip("sinkhorn is batch-wise: only reduction='mean' is defined")
    s, t = _rand((3, 5, 7), 51), _rand((3, 5, 7), 52)
    mask = (torch.arange(15).reshape(3, 5) % 4 != 1).long()  # 11 counted of 15
    mask[2, :] = torch.tensor([0, 0, 1, 0, 0])
    labels = t.argmax(-1)
    labels[0, 0] = -100
    sd = s.clone().requires_grad_(True)
    dense = _call(name, sd, t, mask, labels=labels, reduction=reduction, **kw)
    (gd,) = torch.autograd.grad(dense, sd)
    for k in (1, 2, 3, 4, 7, 11, 15, 64):
        sc = s.clone().requires_grad_(True)
        chunked = _call(name, sc, t, mask, labels=labels, reduction=reduction, chunk_size=k, **kw)
        assert chunked.dtype == dense.dtype and chunked.dim() == 0
        assert chunked.item() == pytest.approx(dense.item(), rel=1e-12, abs=1e-14), k
        (gc,) = torch.autograd.grad(chunked, sc)
        torch.testing.assert_close(gc, gd, rtol=1e-10, atol=1e-14)


def test_chunked_float32_and_grad_through_upstream_graph():
    """A chunked loss is an ordinary graph node: gradients reach parameters upstream of the logits."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 6, 8, generator=g)
    w = torch.randn(8, 11, generator=g, requires_grad=True)
    t = torch.randn(2, 6, 11, generator=g)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    for name in DIVERGENCES + ["ce"]:
        dense = _call(name, h @ w, t, mask)
        (gd,) = torch.autograd.grad(dense, w)
        chunked = _call(name, h @ w, t, mask, chunk_size=3)
        (gc,) = torch.autograd.grad(2.5 * chunked, w)  # a scale after the loss must propagate
        assert chunked.dtype == torch.float32
        assert chunked.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(gc, 2.5 * gd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES + ["ce"])
def test_chunked_non_contiguous_and_bf16(name):
    """Shifted logits (logits[:, :-1], a non-contiguous view) and bf16 inputs: chunked == dense."""
    for dtype in (torch.float64, torch.bfloat16):
        full = _rand((2, 6, 9), 61, dtype=dtype)
        t = _rand((2, 5, 9), 62, dtype=dtype)
        mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
        f1 = full.clone().requires_grad_(True)
        dense = _call(name, f1[:, :-1], t, mask)
        (gd,) = torch.autograd.grad(dense, f1)
        f2 = full.clone().requires_grad_(True)
        chunked = _call(name, f2[:, :-1], t, mask, chunk_size=3)
        (gc,) = torch.autograd.grad(chunked, f2)
        assert chunked.dtype == dense.dtype
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert chunked.item() == pytest.approx(dense.item(), rel=tol, abs=tol)
        assert gc.dtype == dtype and (gc[:, -1] == 0).all()
        torch.testing.assert_close(gc.double(), gd.double(), rtol=tol, atol=tol if dtype == torch.float64 else 1e-3)


def test_chunked_rejects_bad_chunk_size():
    s, t = _rand((2, 3, 4), 1), _rand((2, 3, 4), 2)
    with pytest.raises(ValueError):
        O.get("fkl")(s, t, chunk_size=0)


def test_no_grad_and_detached_inputs():
    s, t = _rand((2, 3, 4), 1), _rand((2, 3, 4), 2)
    with torch.no_grad():
        a = O.get("jsd")(s.requires_grad_(True), t, chunk_size=2)
    assert not a.requires_grad
    b = O.get("jsd")(s.detach(), t)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# extension: a user objective from outside the package, registration, recipes
# ----------------------------------------------------------------------------------------------------------
HELLINGER_SRC = textwrap.dedent(
    '''
    """A user's objective, written outside the harness."""
    import torch


    def hellinger(log_q, log_p, scale: float = 1.0):
        """Squared Hellinger distance H² = 1 − Σ √(p q), per position."""
        return scale * (1.0 - torch.exp(0.5 * (log_q + log_p)).sum(-1))
    '''
)
# p = (½, ½), q = (¼, ¾): Σ √(pq) = √(1/8) + √(3/8) = (√2 + √6)/4 = cos 15°
HELLINGER_HAND = 1.0 - (math.sqrt(2) + math.sqrt(6)) / 4


def _write_user_module(tmp_path, monkeypatch, module):
    (tmp_path / f"{module}.py").write_text(HELLINGER_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_user_objective_by_import_path(tmp_path, monkeypatch):
    _write_user_module(tmp_path, monkeypatch, "my_obj")
    obj = O.get("my_obj:hellinger")
    s, t = _logits(Q2), _logits(P2)
    assert obj(s, t).item() == pytest.approx(HELLINGER_HAND, abs=1e-12)
    assert obj(s, t, scale=2.0).item() == pytest.approx(2 * HELLINGER_HAND, abs=1e-12)
    # the same wrapper: masking, reduction, temperature, chunking
    s3 = torch.stack([s[0], torch.tensor([9.0, -9.0], dtype=torch.float64)]).reshape(1, 2, 2)
    t3 = torch.stack([t[0], torch.tensor([-9.0, 9.0], dtype=torch.float64)]).reshape(1, 2, 2)
    m = torch.tensor([[1, 0]])
    assert obj(s3, t3, m).item() == pytest.approx(HELLINGER_HAND, abs=1e-12)
    assert obj(s3, t3, m, chunk_size=1).item() == pytest.approx(HELLINGER_HAND, abs=1e-12)
    assert obj(s3, t3, m, reduction="none")[0, 1].item() == 0
    assert obj(2 * s3, 2 * t3, m, temperature=2.0).item() == pytest.approx(HELLINGER_HAND, abs=1e-12)
    with pytest.raises(O.ObjectiveError) as exc:
        obj(s, t, alpha=0.1)
    assert "alpha" in str(exc.value) and "scale" in str(exc.value)
    with pytest.raises(O.ObjectiveError):
        O.get("my_obj:no_such_fn")


def test_user_objective_from_recipe(tmp_path, monkeypatch):
    recipes = pytest.importorskip("harness.recipes")
    module = "my_recipe_obj"
    (tmp_path / f"{module}.py").write_text(HELLINGER_SRC)
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_recipe puts the recipe's directory on sys.path
    recipe_path = tmp_path / "hellinger.yaml"
    recipe_path.write_text(
        f"description: squared Hellinger distance, a user's objective\n"
        f"objective: {module}:hellinger\n"
        f"params: {{scale: 2.0}}\n"
        f"temperature: 1.0\n"
        f"kd_weight: 0.5\n"
        f"mode: off_policy\n"
    )
    recipe = recipes.load_recipe(recipe_path)
    assert recipe.name == "hellinger" and recipe.kd_weight == 0.5
    obj = recipe.build_objective()
    got = obj(_logits(Q2), _logits(P2), temperature=recipe.temperature)
    assert got.item() == pytest.approx(2 * HELLINGER_HAND, abs=1e-12)


def test_recipe_with_unknown_parameter_is_rejected(tmp_path, monkeypatch):
    recipes = pytest.importorskip("harness.recipes")
    path = tmp_path / "bad.yaml"
    path.write_text("objective: fkl\nparams: {alpha: 0.3}\n")
    with pytest.raises(ValueError) as exc:
        recipes.load_recipe(path)
    assert "fkl" in str(exc.value) and "alpha" in str(exc.value)


def test_register_decorator(monkeypatch):
    name = "test_only_hellinger"
    monkeypatch.setattr(O, "_REGISTRY", dict(O._REGISTRY))  # keep the global registry clean

    @O.register(name)
    def hellinger(log_q, log_p):
        return 1.0 - torch.exp(0.5 * (log_q + log_p)).sum(-1)

    assert name in O.available()
    assert O.get(name)(_logits(Q2), _logits(P2)).item() == pytest.approx(HELLINGER_HAND, abs=1e-12)
    with pytest.raises(O.ObjectiveError):
        O.register(name)(hellinger)
    with pytest.raises(O.ObjectiveError):
        O.register("fkl")(hellinger)


def test_bench_objectives_smoke(tmp_path):
    from harness import bench

    out = tmp_path / "bench.md"
    bench.main(["objectives", "--vocab", "64", "--positions", "16", "--ids", "fkl", "ce", "sinkhorn",
                "--no-trl", "--repeats", "1", "--chunk-size", "4", "--out", str(out)])
    text = out.read_text()
    assert "| fkl | 4 |" in text and "| fkl | - |" in text and "cross_entropy (torch)" in text
    assert "sinkhorn" in text and "torch " + torch.__version__ in text
