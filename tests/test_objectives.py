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

DIVERGENCES = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "bdkd", "ab", "todi"]  # per-position, teacher
ALL_IDS = DIVERGENCES + ["sinkhorn", "ce"]
# differentiable everywhere (tvd has |·|, akl/todi a stopped weight, bdkd a piecewise-constant gate)
SMOOTH = ["fkl", "rkl", "jsd", "skl", "srkl", "ab"]

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
    """w per row, as AKL's released get_ratio: sort p decreasingly; a token is in the tail when the inclusive
    cumulative teacher mass up to it exceeds μ, the top-1 token always in the head; w = Σ_head|p−q| / Σ|p−q|."""
    w = np.empty(p.shape[0])
    for i in range(p.shape[0]):
        order = np.argsort(-p[i], kind="stable")
        cum = np.cumsum(p[i][order])
        head = [order[0]] + [order[j] for j in range(1, len(order)) if cum[j] <= mu]
        gap = np.abs(p[i] - q[i])
        w[i] = gap[head].sum() / gap.sum() if gap.sum() > 0 else 0.5
    return w


def _np_entropy(a):
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(a > 0, a * np.log(a), 0.0).sum(-1)


def _np_ab(p, q, a, b):
    """Cichocki's α-β divergence per row, written from its definition (float64; p, q > 0)."""
    if a == 0 and b == 0:
        return 0.5 * ((np.log(p) - np.log(q)) ** 2).sum(-1)
    if a == 0:
        return (q**b * np.log(q**b / p**b) - q**b + p**b).sum(-1) / b**2
    if b == 0:
        return (p**a * np.log(p**a / q**a) - p**a + q**a).sum(-1) / a**2
    if a + b == 0:
        return (np.log(q**a / p**a) + p**a / q**a - 1).sum(-1) / a**2
    return -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)


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
    if name == "bdkd":
        hi, lo = params.get("weight_high", 3.0), params.get("weight_low", 1.0)
        hp, hq = _np_entropy(p), _np_entropy(q)
        return np.where(hp > hq, hi, lo) * _np_kl(p, q) + np.where(hq > hp, hi, lo) * _np_kl(q, p)
    if name == "ab":
        return _np_ab(p, q, params.get("alpha", 0.2), params.get("beta", 0.7))
    if name == "todi":
        w = 1.0 / (1.0 + np.exp(-(np.log(p) - np.log(q))))
        return (w * p * np.log(p / q) + (1 - w) * q * np.log(q / p)).sum(-1)
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
        ("sinkhorn", "mu", ["epsilon", "n_iters", "max_positions", "debias", "mass"]),
        ("ab", "mu", ["alpha", "beta"]),
        ("bdkd", "alpha", ["weight_high", "weight_low"]),
        ("todi", "beta", []),
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
    # H(p) = log 2 > H(q): weight 3 on KL(p‖q), 1 on KL(q‖p)
    ("bdkd", {}, 3 * 0.5 * math.log(4 / 3) + (0.25 * math.log(0.5) + 0.75 * math.log(1.5))),
    ("bdkd", {"weight_high": 2.0, "weight_low": 0.5}, 2 * 0.5 * math.log(4 / 3)
     + 0.5 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5))),
    # ToDi's value is Σ (p − q)(log p − log q) = (½−¼)log 2 + (½−¾)log(2/3)
    ("todi", {}, 0.25 * math.log(2) - 0.25 * math.log(2 / 3)),
    # α = β = ½: −4 Σ [√(pq) − ½p − ½q] = 4 − 4 Σ √(pq) = 4 − (√2 + √6)   (4 × squared Hellinger)
    ("ab", {"alpha": 0.5, "beta": 0.5}, 4 - (math.sqrt(2) + math.sqrt(6))),
    # α = 1, β = 1: −Σ [pq − ½p² − ½q²] = ½ Σ (p − q)² = ½ (1/16 + 1/16)
    ("ab", {"alpha": 1.0, "beta": 1.0}, 1 / 16),
    # α = 1, β = 0 is KL(p‖q); α = 0, β = 1 is KL(q‖p); α = β = 0: ½ Σ log²(p/q) = ½ (log² 2 + log²(2/3))
    ("ab", {"alpha": 1.0, "beta": 0.0}, 0.5 * math.log(4 / 3)),
    ("ab", {"alpha": 0.0, "beta": 1.0}, 0.25 * math.log(0.5) + 0.75 * math.log(1.5)),
    ("ab", {"alpha": 0.0, "beta": 0.0}, 0.5 * (math.log(2) ** 2 + math.log(2 / 3) ** 2)),
    # α = 1, β = −1: Σ [log(q/p) + p/q − 1] = log ½ + 2 − 1 + log(3/2) + 2/3 − 1
    ("ab", {"alpha": 1.0, "beta": -1.0}, math.log(0.5) + 1 + math.log(1.5) - 1 / 3),
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


# AKL on V = 4 with dyadic probabilities (no ties): p = (1/2, 1/4, 3/16, 1/16), inclusive cumulative teacher mass
# (1/2, 3/4, 15/16, 1); q = (1/4, 1/8, 1/2, 1/8); |p − q| = (1/4, 1/8, 5/16, 1/16), Σ = 3/4.
P4, Q4 = [0.5, 0.25, 0.1875, 0.0625], [0.25, 0.125, 0.5, 0.125]
FKL4 = sum(x * math.log(x / y) for x, y in zip(P4, Q4))
RKL4 = sum(y * math.log(y / x) for x, y in zip(P4, Q4))


@pytest.mark.parametrize(
    "mu, w",
    [
        (0.3, 1 / 3),  # head {0}: the top-1 token is always in the head, even when p_1 > μ: w = (1/4) / (3/4)
        (0.5, 1 / 3),  # head {0}
        (0.7, 1 / 3),  # head {0}: token 1 crosses μ (cum 3/4 > 0.7) and goes to the tail (released get_ratio)
        (0.75 - 1e-9, 1 / 3),  # still {0}
        (0.75 + 1e-9, 0.5),  # head {0, 1}: cum 3/4 ≤ μ; w = (1/4 + 1/8) / (3/4)
        (0.9, 0.5),  # head {0, 1}: token 2 crosses μ (15/16 > 0.9), tail
        (0.95, 11 / 12),  # head {0, 1, 2}: w = (1/4 + 1/8 + 5/16) / (3/4)
    ],
)
def test_akl_hand_values(mu, w):
    got = O.get("akl")(_logits(Q4), _logits(P4), mu=mu).item()
    assert got == pytest.approx(w * FKL4 + (1 - w) * RKL4, abs=1e-12)


def test_akl_default_mu_is_half():
    assert O.get("akl")(_logits(Q4), _logits(P4)).item() == pytest.approx(FKL4 / 3 + 2 * RKL4 / 3, abs=1e-12)


def test_akl_weight_is_one_half_when_p_equals_q_and_released_nan_is_avoided():
    s = _logits([0.7, 0.2, 0.1])
    out = O.get("akl")(s.clone().requires_grad_(True), s, reduction="none")
    assert out.item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# parameter validation
# ----------------------------------------------------------------------------------------------------------
BAD_PARAMS = [
    ("skl", "alpha", 1), ("skl", "alpha", 2), ("skl", "alpha", -0.5), ("skl", "alpha", float("nan")),
    ("skl", "alpha", "0.1"), ("skl", "alpha", [0.2]), ("skl", "alpha", True), ("skl", "alpha", float("inf")),
    ("srkl", "alpha", 1), ("srkl", "alpha", 2), ("srkl", "alpha", -0.5), ("srkl", "alpha", float("nan")),
    ("srkl", "alpha", "0.1"), ("srkl", "alpha", [0.2]),
    ("jsd", "beta", 0), ("jsd", "beta", 1), ("jsd", "beta", 0.0), ("jsd", "beta", 1.0), ("jsd", "beta", -0.1),
    ("jsd", "beta", 1.5), ("jsd", "beta", None),
    ("sinkhorn", "epsilon", 0), ("sinkhorn", "epsilon", -1.0), ("sinkhorn", "n_iters", 0),
    ("sinkhorn", "n_iters", 2.0), ("sinkhorn", "n_iters", True), ("sinkhorn", "max_positions", 0),
    ("sinkhorn", "debias", 1), ("sinkhorn", "debias", "false"), ("sinkhorn", "mass", "n"),
    ("akl", "mu", 0), ("akl", "mu", 1.5), ("bdkd", "weight_high", 0), ("bdkd", "weight_low", -1),
    ("ab", "alpha", float("nan")), ("ab", "beta", "0.7"),
]


@pytest.mark.parametrize("name, key, value", BAD_PARAMS, ids=lambda x: repr(x))
def test_bad_parameter_values_are_refused_with_a_one_line_fix(name, key, value):
    s, t = _logits(Q2), _logits(P2)
    for call in (lambda: O.get(name, **{key: value}), lambda: O.get(name)(s, t, **{key: value})):
        with pytest.raises(O.ObjectiveError) as exc:
            call()
        msg = str(exc.value)
        assert "\n" not in msg
        assert repr(name) in msg and repr(key) in msg and repr(value) in msg
        assert f"set {key} to " in msg  # the fix


def test_validation_messages_name_the_range_and_type():
    with pytest.raises(O.ObjectiveError, match=r"'alpha' must lie in \[0, 1\), got 1 .*set alpha to a number in \[0, 1\)"):
        O.get("skl", alpha=1)
    with pytest.raises(O.ObjectiveError, match=r"'alpha' must be a number, got str '0.1'"):
        O.get("srkl", alpha="0.1")
    with pytest.raises(O.ObjectiveError, match=r"'alpha' must be a finite number, got nan"):
        O.get("skl", alpha=float("nan"))
    with pytest.raises(O.ObjectiveError, match=r"'n_iters' must be an integer, got float 20.0"):
        O.get("sinkhorn", n_iters=20.0)
    with pytest.raises(O.ObjectiveError, match=r"'epsilon' must be > 0, got 0.*set epsilon to a number > 0"):
        O.get("sinkhorn", epsilon=0)
    with pytest.raises(O.ObjectiveError, match=r"set mass to one of 'unit', 'positions'"):
        O.get("sinkhorn", mass="N")


@pytest.mark.parametrize("beta, other", [(0, "fkl"), (1, "rkl"), (0.0, "fkl"), (1.0, "rkl")])
def test_jsd_endpoints_are_refused_naming_fkl_and_rkl(beta, other):
    with pytest.raises(O.ObjectiveError) as exc:
        O.get("jsd", beta=beta)
    msg = str(exc.value)
    assert "'fkl'" in msg and "'rkl'" in msg and "(0, 1)" in msg
    # the formula itself is 0 there (direct call of the pure function): nothing would be trained
    s, t = _logits(Q2), _logits(P2)
    from harness.objectives import divergences

    assert divergences.jsd(torch.log_softmax(s, -1), torch.log_softmax(t, -1), beta=float(beta)).item() == 0.0


def test_valid_parameters_are_accepted_ints_become_floats():
    assert O.get("skl", alpha=0).params == {"alpha": 0.0}
    assert isinstance(O.get("skl", alpha=0).params["alpha"], float)
    assert O.get("sinkhorn", epsilon=1, n_iters=3).params["epsilon"] == 1.0
    assert isinstance(O.get("sinkhorn", n_iters=3).params["n_iters"], int)
    assert O.get("jsd", beta=0.999).params == {"beta": 0.999}
    assert O.get("ab", alpha=0, beta=-1).params == {"alpha": 0.0, "beta": -1.0}


def test_describe_lists_types_defaults_ranges_and_help():
    rows = {r["id"]: r for r in O.describe()}
    assert set(rows) == set(O.available())
    alpha = {p["name"]: p for p in rows["skl"]["params"]}["alpha"]
    assert alpha == {"name": "alpha", "type": "number", "default": 0.1, "range": "[0, 1)", "help": alpha["help"]}
    assert alpha["help"]
    sk = {p["name"]: p for p in rows["sinkhorn"]["params"]}
    assert sk["n_iters"]["type"] == "integer" and sk["n_iters"]["range"] == ">= 1" and sk["n_iters"]["default"] == 20
    assert sk["debias"]["type"] == "true/false" and sk["mass"]["range"] == "one of unit, positions"
    assert {p["name"]: p["range"] for p in rows["jsd"]["params"]} == {"beta": "(0, 1)"}
    assert rows["ce"]["params"] == [] and rows["akl"]["sparse_ok"] is False and rows["todi"]["sparse_ok"] is True
    for row in rows.values():
        for p in row["params"]:
            assert p["help"], (row["id"], p["name"])


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
        if name == "bdkd":  # likewise the entropy tie H(p) = H(q) (e.g. permuted rows)
            ok = np.abs(_np_entropy(_softmax(t.numpy())) - _np_entropy(_softmax(s.numpy()))) > 1e-9
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
    fkl = torch.from_numpy(_ref("fkl", s.numpy(), t.numpy()))  # independent NumPy KLs, not our fkl/rkl
    rkl = torch.from_numpy(_ref("rkl", s.numpy(), t.numpy()))
    torch.testing.assert_close(_none("skl", s, t, alpha=0.0), fkl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_none("srkl", s, t, alpha=0.0), rkl, rtol=1e-9, atol=1e-12)
    # α → 0 is continuous, not only special-cased at 0
    torch.testing.assert_close(_none("skl", s, t, alpha=1e-9), fkl, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(_none("srkl", s, t, alpha=1e-9), rkl, rtol=1e-5, atol=1e-9)


@PROP
@given(logit_pairs())
def test_jsd_limits_symmetry_and_bound(pair):
    s, t = pair
    fkl = torch.from_numpy(_ref("fkl", s.numpy(), t.numpy()))
    rkl = torch.from_numpy(_ref("rkl", s.numpy(), t.numpy()))
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
def test_tvd_range_akl_bdkd_between_todi_jeffreys(pair):
    s, t = pair
    tv = _none("tvd", s, t)
    assert ((tv >= 0) & (tv <= 1)).all()
    fkl = torch.from_numpy(_ref("fkl", s.numpy(), t.numpy()))
    rkl = torch.from_numpy(_ref("rkl", s.numpy(), t.numpy()))
    for mu in (0.1, 0.5, 0.9):
        a = _none("akl", s, t, mu=mu)
        assert (a >= torch.minimum(fkl, rkl) - 1e-12).all() and (a <= torch.maximum(fkl, rkl) + 1e-12).all()
    # bdkd lies between weight_low and weight_high times Jeffreys; with equal weights it is w·Jeffreys
    jeffreys = fkl + rkl
    b = _none("bdkd", s, t)
    assert (b >= jeffreys - 1e-12).all() and (b <= 3 * jeffreys + 1e-12).all()
    torch.testing.assert_close(_none("bdkd", s, t, weight_high=2.0, weight_low=2.0), 2 * jeffreys,
                               rtol=1e-9, atol=1e-12)
    # todi's value is Jeffreys' (its weight p/(p+q) is only stopped for the gradient)
    torch.testing.assert_close(_none("todi", s, t), jeffreys, rtol=1e-9, atol=1e-12)


@PROP
@given(logit_pairs())
def test_ab_limits_are_continuous(pair):
    s, t = pair
    fkl = torch.from_numpy(_ref("fkl", s.numpy(), t.numpy()))
    rkl = torch.from_numpy(_ref("rkl", s.numpy(), t.numpy()))
    torch.testing.assert_close(_none("ab", s, t, alpha=1.0, beta=0.0), fkl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_none("ab", s, t, alpha=0.0, beta=1.0), rkl, rtol=1e-9, atol=1e-12)
    # each special case is the limit of the general formula (α, β, α + β → 0)
    for exact, near in [((0.0, 0.7), (1e-7, 0.7)), ((0.3, 0.0), (0.3, 1e-7)), ((0.0, 0.0), (1e-7, 2e-7)),
                        ((0.4, -0.4), (0.4, -0.4 + 1e-7)), ((1.0, 0.0), (1.0, 1e-7))]:
        a = _none("ab", s, t, alpha=exact[0], beta=exact[1])
        b = _none("ab", s, t, alpha=near[0], beta=near[1])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


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
                         + [("jsd", {"beta": 0.2}), ("skl", {"alpha": 0.4}), ("srkl", {"alpha": 0.4}),
                            ("bdkd", {}), ("bdkd", {"weight_high": 2.0, "weight_low": 0.5}),
                            ("ab", {"alpha": 0.05, "beta": 0.05}), ("ab", {"alpha": 0.0, "beta": 0.5}),
                            ("ab", {"alpha": 0.3, "beta": 0.0}), ("ab", {"alpha": 0.0, "beta": 0.0}),
                            ("ab", {"alpha": 0.5, "beta": -0.5}), ("ab", {"alpha": 1e-3, "beta": 0.7}),
                            ("ab", {"alpha": 1.5, "beta": 2.0})])
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


def test_todi_gradient_holds_the_weight_constant():
    """∂ℓ/∂log q_v = −w_v p_v + (1 − w_v) q_v (1 + log q_v − log p_v) with w = p/(p+q) held constant, then
    through log_softmax: ∂ℓ/∂z = g − q Σ g (NumPy, float64). Not Jeffreys' gradient (which varies w too)."""
    s = _rand((2, 3, 5), 18).requires_grad_(True)
    t = _rand((2, 3, 5), 19)
    got = torch.autograd.grad(O.get("todi")(s, t, GRAD_MASK, reduction="sum"), s)[0].numpy()
    q, p = _softmax(s.detach().numpy()), _softmax(t.numpy())
    w = p / (p + q)
    g = -w * p + (1 - w) * q * (1 + np.log(q) - np.log(p))
    expected = (g - q * g.sum(-1, keepdims=True)) * GRAD_MASK.numpy()[..., None]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)
    jeffreys = torch.autograd.grad(O.get("fkl")(s, t, GRAD_MASK, reduction="sum")
                                   + O.get("rkl")(s, t, GRAD_MASK, reduction="sum"), s)[0].numpy()
    assert np.abs(got - jeffreys).max() > 1e-3


def test_bdkd_gradient_treats_the_gates_as_constant():
    s = _rand((2, 3, 5), 20).requires_grad_(True)
    t = _rand((2, 3, 5), 21)
    q, p = _softmax(s.detach().numpy()), _softmax(t.numpy())
    hp, hq = _np_entropy(p), _np_entropy(q)
    wf = torch.from_numpy(np.where(hp > hq, 3.0, 1.0))
    wr = torch.from_numpy(np.where(hq > hp, 3.0, 1.0))
    assert (wf == 3).any() and (wr == 3).any()  # both cases occur in this batch
    ga = torch.autograd.grad(O.get("bdkd")(s, t, GRAD_MASK), s)[0]
    fk = O.get("fkl")(s, t, GRAD_MASK, reduction="none")
    rk = O.get("rkl")(s, t, GRAD_MASK, reduction="none")
    gr = torch.autograd.grad((wf * fk + wr * rk).sum() / GRAD_MASK.sum(), s)[0]
    torch.testing.assert_close(ga, gr, rtol=1e-10, atol=1e-13)


def test_sinkhorn_mass_positions_is_n_times_unit():
    s, t = _rand((2, 3, 5), 22), _rand((2, 3, 5), 23)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for debias in (True, False):
        unit = O.get("sinkhorn")(s, t, mask, debias=debias)
        total = O.get("sinkhorn")(s, t, mask, debias=debias, mass="positions")
        assert total.item() == pytest.approx(5 * unit.item(), rel=1e-12)
    # N counts every counted position even when the plan uses a strided subset of them
    sub = O.get("sinkhorn")(s, t, mask, max_positions=3, mass="positions", debias=False)
    assert sub.item() == pytest.approx(5 * O.get("sinkhorn")(s, t, mask, max_positions=3, debias=False).item())


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


def test_user_objective_declares_ranges_and_types_come_from_its_signature(tmp_path, monkeypatch):
    module = "my_ranged_obj"
    (tmp_path / f"{module}.py").write_text(HELLINGER_SRC + textwrap.dedent(
        '''
        hellinger.param_ranges = {"scale": {"gt": 0, "help": "multiplies the loss"}}


        def typed(log_q, log_p, k: int = 2, mode: str = "a", flag=False):
            return (log_q * 0).sum(-1)


        def bad_range(log_q, log_p, scale: float = 1.0):
            return (log_q * 0).sum(-1)


        bad_range.param_ranges = {"scael": {"gt": 0}}
        '''
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    assert O.get(f"{module}:hellinger", scale=2).params == {"scale": 2.0}
    with pytest.raises(O.ObjectiveError, match=r"'scale' must be > 0, got -1 \(multiplies the loss\); set scale to a number > 0"):
        O.get(f"{module}:hellinger", scale=-1)
    assert O.get(f"{module}:typed", k=3, mode="b", flag=True).params == {"k": 3, "mode": "b", "flag": True}
    for bad in ({"k": 2.5}, {"k": True}, {"mode": 1}, {"flag": 0}):
        with pytest.raises(O.ObjectiveError):
            O.get(f"{module}:typed", **bad)
    with pytest.raises(O.ObjectiveError, match="scael"):
        O.get(f"{module}:bad_range")
    rows = O.describe([f"{module}:hellinger"])
    assert rows[0]["params"] == [{"name": "scale", "type": "number", "default": 1.0, "range": "> 0",
                                  "help": "multiplies the loss"}]


@pytest.mark.parametrize("alpha, beta", [(0.2, 0.7), (0.0, 0.5), (0.3, 0.0), (0.0, 0.0), (0.5, -0.5), (2.0, 1.5),
                                         (-0.4, 0.9), (1e-3, 1e-3)])
def test_ab_closed_form_gradient_in_both_arguments(alpha, beta):
    """ab's custom backward (∂/∂log q and, by symmetry, ∂/∂log p) against finite differences, with a padded
    column (both -inf, clamped as the wrapper does) that must get exactly zero gradient."""
    from harness.objectives import divergences as D

    g = torch.Generator().manual_seed(31)
    lq = torch.log_softmax(2 * torch.randn(3, 6, generator=g, dtype=torch.float64), -1)
    lp = torch.log_softmax(2 * torch.randn(3, 6, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda a, b: D.ab(a, b, alpha, beta),
                                    (lq.clone().requires_grad_(True), lp.clone().requires_grad_(True)))
    low = torch.finfo(torch.float64).min
    lqp = torch.cat([lq, torch.full((3, 1), low, dtype=torch.float64)], -1).requires_grad_(True)
    lpp = torch.cat([lp, torch.full((3, 1), low, dtype=torch.float64)], -1).requires_grad_(True)
    gq, gp = torch.autograd.grad(D.ab(lqp, lpp, alpha, beta).sum(), (lqp, lpp))
    assert (gq[:, -1] == 0).all() and (gp[:, -1] == 0).all() and torch.isfinite(gq).all() and torch.isfinite(gp).all()
