"""Each objective against the released code of the method it names.

The released formulas are written out again here, independently of the harness (float64 torch, so that their
gradients come from autograd), following the code read at these commits:

- DistiLLM   ``jongwooko/distillm@d47e77ff9d27721783b32213be38c1204230cc0a distillm/losses.py``
- AKL, BD-KD, AB  ``ghwang-s/abkd@df813185e69d21d1e99510272cd94e49be7250c0 distillation_llm/distillm/losses.py``
- ToDi       ``jungseongryong/ToDi@45f1f8bf89dbda709d18c2f736c6683a4df6d498 code/criterions/various_divergence.py``
- SinKD      ``2018cx/SinKD@1ffac9010a4fc462d05e7ea0a0753aca062eca62 loss.py`` and ``T0/lossd.py`` (``Sinkhorn``)

Every released function below takes ``[B, T, V]`` logits and ``labels`` (``-100`` = not counted) and returns
the token mean over counted positions, like our ``reduction="mean"`` (ToDi: the token sum, our ``"sum"``).
Where a released loss is written in cross-entropy form (−Σ p log q = KL(p‖q) + H(p)), our value is the true
divergence: the test adds the teacher entropy back to ours and also compares the gradients, which the
entropy (a constant of the student) does not change.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import harness.objectives as O

B, T, V = 2, 4, 7


def _batch(seed, scale=2.0, pad_vocab=0):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t = scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100  # a prompt position
    labels[1, 3] = -100  # padding
    if pad_vocab:
        pad = torch.full((B, T, pad_vocab), float("-inf"), dtype=torch.float64)
        s, t = torch.cat([s, pad], -1), torch.cat([t, pad], -1)
    return s, t, labels


def _token_mean(x, labels):
    mask = (labels != -100).to(x.dtype)
    return (x * mask).sum() / mask.sum()


def _value_and_grad(fn, s, *args):
    s = s.clone().requires_grad_(True)
    out = fn(s, *args)
    (g,) = torch.autograd.grad(out, s)
    return out.detach(), g


def _ours(name, s, t, labels, **kw):
    return O.get(name)(s, t, labels != -100, **kw)


def _teacher_entropy_mean(t, labels):
    logp = torch.log_softmax(t, -1)
    h = -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
    return _token_mean(h, labels)


# ----------------------------------------------------------------------------------------------------------
# DistiLLM (jongwooko/distillm, distillm/losses.py), temperature 1
# ----------------------------------------------------------------------------------------------------------
def distillm_forward_kl(s, t, labels):
    """−Σ p log q (cross-entropy form), student -inf entries masked to 0."""
    x = torch.masked_fill(F.softmax(t, -1) * F.log_softmax(s, -1), torch.isinf(s), 0).sum(-1)
    return -_token_mean(x, labels)


def distillm_reverse_kl(s, t, labels):
    q, inf = F.softmax(s, -1), torch.isinf(s) | torch.isinf(t)
    x = torch.masked_fill(q * F.log_softmax(t, -1), inf, 0) - torch.masked_fill(q * F.log_softmax(s, -1), inf, 0)
    return -_token_mean(x.sum(-1), labels)


def distillm_skewed_forward_kl(s, t, labels, lam=0.1):
    """−Σ p log(λ p + (1−λ) q) (cross-entropy form)."""
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    x = torch.masked_fill(p * torch.log(lam * p + (1 - lam) * q), torch.isinf(s) | torch.isinf(t), 0).sum(-1)
    return -_token_mean(x, labels)


def distillm_skewed_reverse_kl(s, t, labels, lam=0.1):
    """−Σ [q log((1−λ) p + λ q) − q log q] = KL(q ‖ (1−λ) p + λ q)."""
    p, q, inf = F.softmax(t, -1), F.softmax(s, -1), torch.isinf(s) | torch.isinf(t)
    x = torch.masked_fill(q * torch.log((1 - lam) * p + lam * q), inf, 0)
    x = x - torch.masked_fill(q * F.log_softmax(s, -1), inf, 0)
    return -_token_mean(x.sum(-1), labels)


def distillm_js_distance(s, t, labels, lam=0.9):
    """m = (1−λ) p + λ q; λ·KL(q‖m) + (1−λ)·KL(p‖m), each term as −Σ [x log m − x log x]."""
    p, q, inf = F.softmax(t, -1), F.softmax(s, -1), torch.isinf(s) | torch.isinf(t)
    log_m = torch.log((1 - lam) * p + lam * q)
    xq = torch.masked_fill(q * log_m, inf, 0) - torch.masked_fill(q * F.log_softmax(s, -1), inf, 0)
    xp = torch.masked_fill(p * log_m, inf, 0) - torch.masked_fill(p * F.log_softmax(t, -1), inf, 0)
    return lam * -_token_mean(xq.sum(-1), labels) + (1 - lam) * -_token_mean(xp.sum(-1), labels)


def distillm_tv_distance(s, t, labels):
    x = 0.5 * torch.masked_fill((F.softmax(t, -1) - F.softmax(s, -1)).abs(), torch.isinf(s) | torch.isinf(t), 0)
    return _token_mean(x.sum(-1), labels)


DISTILLM = [
    # (released function, our id, our params, whether the released value is in cross-entropy form)
    (distillm_forward_kl, "fkl", {}, True),
    (distillm_reverse_kl, "rkl", {}, False),
    (distillm_skewed_forward_kl, "skl", {"alpha": 0.1}, True),
    (lambda s, t, y: distillm_skewed_forward_kl(s, t, y, lam=0.3), "skl", {"alpha": 0.3}, True),
    (distillm_skewed_reverse_kl, "srkl", {"alpha": 0.1}, False),
    (lambda s, t, y: distillm_skewed_reverse_kl(s, t, y, lam=0.3), "srkl", {"alpha": 0.3}, False),
    (distillm_js_distance, "jsd", {"beta": 0.1}, False),  # DistiLLM's λ = 0.9 is our β = 1 − λ
    (distillm_tv_distance, "tvd", {}, False),
]


@pytest.mark.parametrize("released, name, params, ce_form", DISTILLM, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("pad_vocab", [0, 3])
def test_distillm_losses(released, name, params, ce_form, pad_vocab):
    s, t, labels = _batch(1, pad_vocab=pad_vocab)
    ref, g_ref = _value_and_grad(released, s, t, labels)
    got, g_got = _value_and_grad(lambda x: _ours(name, x, t, labels, **params), s)
    offset = _teacher_entropy_mean(t, labels).item() if ce_form else 0.0
    assert got.item() + offset == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    if pad_vocab:
        # padded columns must change nothing: compare with the released gradient on the unpadded vocabulary
        # (the released code's own gradient is NaN there for losses that take log of a padded 0: masked_fill
        # hides -inf in the forward pass, not 0·(-inf) in the backward pass)
        _, g_ref = _value_and_grad(released, s[..., :V], t[..., :V], labels)
        assert (g_got[..., V:] == 0).all()
        g_got = g_got[..., :V]
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)
    if ce_form:  # the offset is real: the released value is not a divergence (it is > 0 at p = q)
        assert offset > 0.5


# ----------------------------------------------------------------------------------------------------------
# AKL (ghwang-s/abkd: get_ratio, get_kl, AKL), temperature 1
# ----------------------------------------------------------------------------------------------------------
def abkd_akl(s, t, labels, mu=0.5):
    """get_ratio: sort p decreasingly, tail = inclusive cumsum > μ except the top-1; h = head gap share (no grad).
    AKL = h·Σ p (log p − log q) + (1−h)·Σ q (log q − log p), token means (inf-mask: student -inf)."""
    with torch.no_grad():
        p_t = F.softmax(torch.masked_fill(t, torch.isinf(t), 0), -1)
        p_s = F.softmax(torch.masked_fill(s, torch.isinf(s), 0), -1)
        srt, idx = p_t.sort(-1, descending=True)
        err = (srt - p_s.gather(-1, idx)).abs()
        tail = srt.cumsum(-1) > mu
        tail[..., 0] = False
        s1, s2 = err.masked_fill(tail, 0).sum(-1), err.masked_fill(~tail, 0).sum(-1)
        h, l = s1 / (s1 + s2), s2 / (s1 + s2)
    inf = torch.isinf(s)

    def get_kl(a, b, ratio):  # Σ a (log a − log b), masked, weighted by ratio
        pa, la, lb = F.softmax(a, -1), F.log_softmax(a, -1), F.log_softmax(b, -1)
        x = torch.masked_fill(pa * la, inf, 0).sum(-1) - torch.masked_fill(pa * lb, inf, 0).sum(-1)
        return _token_mean(x * ratio, labels)

    return get_kl(t, s, h) + get_kl(s, t, l)


@pytest.mark.parametrize("seed", [2, 3, 4])
@pytest.mark.parametrize("mu", [0.5, 0.3, 0.8])
def test_akl_matches_released_get_ratio(seed, mu):
    s, t, labels = _batch(seed, scale=1.5)
    ref, g_ref = _value_and_grad(lambda x: abkd_akl(x, t, labels, mu=mu), s)
    got, g_got = _value_and_grad(lambda x: _ours("akl", x, t, labels, mu=mu), s)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)


def test_akl_released_head_differs_from_the_crossing_token_in_head_convention():
    """The convention this replaces (the token that crosses μ in the head) gives another value on most rows."""
    g = torch.Generator().manual_seed(5)
    s, t = 2 * torch.randn(400, 50, generator=g, dtype=torch.float64), 2 * torch.randn(400, 50, generator=g,
                                                                                          dtype=torch.float64)
    labels = torch.zeros(400, dtype=torch.long)
    ours = O.get("akl")(s, t, reduction="none")
    released = torch.stack([abkd_akl(s[i:i + 1, None], t[i:i + 1, None], labels[i:i + 1, None]) for i in range(400)])
    torch.testing.assert_close(ours, released, rtol=1e-10, atol=1e-13)
    p, q = t.softmax(-1), s.softmax(-1)
    srt, idx = p.sort(-1, descending=True)
    gap = (srt - q.gather(-1, idx)).abs()
    crossing_in_head = (srt.cumsum(-1) - srt) < 0.5
    w_old = (gap * crossing_in_head).sum(-1) / gap.sum(-1)
    fkl = (p * (p.log() - q.log())).sum(-1)
    rkl = (q * (q.log() - p.log())).sum(-1)
    old = w_old * fkl + (1 - w_old) * rkl
    assert ((old - ours).abs() > 1e-6).float().mean() > 0.5


# ----------------------------------------------------------------------------------------------------------
# BD-KD (ghwang-s/abkd: bdkd), temperature 1
# ----------------------------------------------------------------------------------------------------------
def abkd_bdkd(s, t, labels):
    def entropy(z):
        pr = F.softmax(z, -1)
        return -(pr * torch.log(pr + 1e-9)).sum(-1)

    h_s, h_t = entropy(s), entropy(t)
    w_s = torch.where(h_s > h_t, 3.0, 1.0)
    w_t = torch.where(h_t > h_s, 3.0, 1.0)
    x1 = torch.masked_fill(F.softmax(t, -1) * F.log_softmax(s, -1), torch.isinf(s), 0).sum(-1)
    loss1 = -_token_mean(x1 * w_t, labels)  # 3·(−Σ p log q) where H(p) > H(q)
    q, inf = F.softmax(s, -1), torch.isinf(t) | torch.isinf(s)
    x2 = torch.masked_fill(q * F.log_softmax(t, -1), inf, 0) - torch.masked_fill(q * F.log_softmax(s, -1), inf, 0)
    loss2 = -_token_mean(x2.sum(-1) * w_s, labels)  # 3·KL(q‖p) where H(q) > H(p)
    return loss1 + loss2


@pytest.mark.parametrize("seed", [6, 7])
def test_bdkd_matches_released_with_the_teacher_entropy_added_back(seed):
    s, t, labels = _batch(seed)
    t[0, 1:] *= 0.3  # flatter teachers at some positions: both gates occur
    ref, g_ref = _value_and_grad(abkd_bdkd, s, t, labels)
    got, g_got = _value_and_grad(lambda x: _ours("bdkd", x, t, labels), s)
    logp, logq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    h_p, h_q = -(logp.exp() * logp).sum(-1), -(logq.exp() * logq).sum(-1)
    assert ((h_p > h_q) & (labels != -100)).any() and ((h_q > h_p) & (labels != -100)).any()
    w_f = torch.where(h_p > h_q, 3.0, 1.0).to(torch.float64)
    offset = _token_mean(w_f * h_p, labels).item()  # the released FKL term is 3·(KL + H(p)) or 1·(KL + H(p))
    assert got.item() + offset == pytest.approx(ref.item(), rel=1e-8)  # the released 1e-9 inside its entropy log
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------
# AB divergence (ghwang-s/abkd: ab_div), temperature 1
# ----------------------------------------------------------------------------------------------------------
def abkd_ab_div(s, t, labels, alpha, beta):
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    inf = torch.isinf(s) | torch.isinf(t)
    if alpha == 0 and beta == 0:
        d = torch.masked_fill(torch.log(q) - torch.log(p), inf, 0)
        div = 0.5 * (d**2).sum(-1)
    elif alpha == 0:
        qb, pb = q**beta, p**beta
        r = qb / pb
        r = torch.masked_fill(r, torch.isnan(r), 0)
        div = (1 / beta) * (qb * torch.log(r) - qb + pb).sum(-1)
    elif beta == 0:
        pa, qa = torch.masked_fill(p**alpha, inf, 0), torch.masked_fill(q**alpha, inf, 0)
        r = pa / qa
        r = torch.masked_fill(r, torch.isnan(r), 0)
        div = (1 / alpha) * (pa * torch.log(r) - pa + qa).sum(-1)
    elif alpha + beta == 0:
        pa, qa = torch.masked_fill(p**alpha, inf, 0), torch.masked_fill(q**alpha, inf, 0)
        div = ((1 / alpha) * (torch.log(qa / pa) + pa / qa - 1)).sum(-1)
    else:
        x = torch.masked_fill(p**alpha * q**beta, inf, 0)
        x = x - torch.masked_fill(alpha / (alpha + beta) * p ** (alpha + beta), inf, 0)
        x = x - torch.masked_fill(beta / (alpha + beta) * q ** (alpha + beta), inf, 0)
        div = -x.sum(-1) / (alpha * beta)
    return _token_mean(div, labels)


@pytest.mark.parametrize(
    "alpha, beta, factor",
    [
        (0.2, 0.7, 1.0), (0.1, 0.8, 1.0), (0.5, 0.5, 1.0), (1.5, 0.3, 1.0), (-0.3, 0.9, 1.0),  # general case
        (0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (0.0, 0.0, 1.0),  # limits where the released branches are continuous
        (0.0, 0.5, 0.5), (0.3, 0.0, 0.3), (0.5, -0.5, 0.5),  # released = ours × β (α = 0), × α (β = 0, α + β = 0)
    ],
)
def test_ab_matches_released_ab_div(alpha, beta, factor):
    s, t, labels = _batch(8)
    ref, g_ref = _value_and_grad(lambda x: abkd_ab_div(x, t, labels, alpha, beta), s)
    got, g_got = _value_and_grad(lambda x: _ours("ab", x, t, labels, alpha=alpha, beta=beta), s)
    assert got.item() * factor == pytest.approx(ref.item(), rel=1e-11)
    torch.testing.assert_close(g_got * factor, g_ref, rtol=1e-8, atol=1e-12)


def test_ab_default_is_the_released_gpt2_pair_and_padding_gives_no_nan():
    assert O.get("ab").params == {"alpha": 0.2, "beta": 0.7}
    s, t, labels = _batch(9, pad_vocab=3)
    got, g = _value_and_grad(lambda x: _ours("ab", x, t, labels), s)
    assert got.item() == pytest.approx(abkd_ab_div(s, t, labels, 0.2, 0.7).item(), rel=1e-11)
    assert torch.isfinite(g).all() and (g[..., V:] == 0).all()
    for alpha, beta in ((0.0, 0.5), (0.3, 0.0), (0.5, -0.5)):  # the released special branches give NaN here
        assert math.isnan(abkd_ab_div(s, t, labels, alpha, beta).item())
        ours, g = _value_and_grad(lambda x: _ours("ab", x, t, labels, alpha=alpha, beta=beta), s)
        unpadded = _ours("ab", s[..., :V], t[..., :V], labels, alpha=alpha, beta=beta)
        assert ours.item() == pytest.approx(unpadded.item(), rel=1e-12) and torch.isfinite(g).all()


# ----------------------------------------------------------------------------------------------------------
# ToDi (jungseongryong/ToDi: compute_ToDi), kd_temp τ applied to both, token *sum*
# ----------------------------------------------------------------------------------------------------------
def todi_compute(s, t, labels, kd_temp=2.0):
    s, t = s / kd_temp, t / kd_temp
    q, p = F.softmax(s, -1), F.softmax(t, -1)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    w_p = torch.sigmoid(lt - ls).detach()
    w_q = torch.sigmoid(ls - lt).detach()
    div = w_p * p * (lt - ls) + w_q * q * (ls - lt)
    div = div.masked_fill(torch.isinf(s) | torch.isinf(t), 0.0).sum(-1)
    return div.masked_fill(labels == -100, 0.0).sum()


@pytest.mark.parametrize("tau", [2.0, 1.0])
@pytest.mark.parametrize("pad_vocab", [0, 3])
def test_todi_matches_released_compute_todi(tau, pad_vocab):
    s, t, labels = _batch(10, pad_vocab=pad_vocab)
    ref, g_ref = _value_and_grad(lambda x: todi_compute(x, t, labels, kd_temp=tau), s)
    got, g_got = _value_and_grad(lambda x: _ours("todi", x, t, labels, temperature=tau, reduction="sum"), s)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    if pad_vocab:  # the released gradient is NaN with padded columns (-inf − -inf); compare on the real ones
        assert torch.isnan(g_ref).all()
        _, g_ref = _value_and_grad(lambda x: todi_compute(x, t[..., :V], labels, kd_temp=tau), s[..., :V])
        assert (g_got[..., V:] == 0).all()
        g_got = g_got[..., :V]
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------
# SinKD (2018cx/SinKD: loss.py Sinkhorn for GLUE, T0/lossd.py Sinkhorn for the language model)
# ----------------------------------------------------------------------------------------------------------
def sinkd_sinkhorn(y_s, y_t, scale):
    """Rows of [N, C] logits: softmax(y/2) over dim 1, W = cdist(p_s, p_t, 1), K = exp(−W/0.1), 20 times
    (rows to sum 1, then columns to sum 1), ``scale · Σ P ⊙ W`` (scale 0.001 in loss.py, 0.0008 in T0/lossd.py)."""
    p_s, p_t = F.softmax(y_s / 2, dim=1), F.softmax(y_t / 2, dim=1)
    w = torch.cdist(p_s, p_t, p=1)
    x = torch.exp(-w / 0.1)
    for _ in range(20):
        x = x / x.sum(dim=1, keepdim=True)
        x = x / x.sum(dim=0, keepdim=True)
    return scale * (x * w).sum()


@pytest.mark.parametrize("n, v, seed", [(2, 3, 11), (6, 5, 12), (16, 40, 13)])
@pytest.mark.parametrize("scale", [0.001, 0.0008])
def test_sinkhorn_matches_sinkd_with_mass_n(n, v, seed, scale):
    """Our debias=False, mass='positions' value times SinKD's constant is SinKD's value (ε = 0.1, 20 iterations,
    τ = 2, float64: the probability-domain iteration is exact there, K ≥ e^-20)."""
    g = torch.Generator().manual_seed(seed)
    s, t = 3 * torch.randn(n, v, generator=g, dtype=torch.float64), 3 * torch.randn(n, v, generator=g,
                                                                                     dtype=torch.float64)
    ref, g_ref = _value_and_grad(lambda x: sinkd_sinkhorn(x, t, scale), s)
    ours = O.get("sinkhorn", epsilon=0.1, n_iters=20, debias=False, mass="positions", max_positions=256)
    got, g_got = _value_and_grad(lambda x: scale * ours(x, t, temperature=2.0), s)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-13)
    # the unit-mass default is SinKD's value / (N · scale): without mass='positions' the weight would be off by N
    unit = O.get("sinkhorn", debias=False)(s, t, temperature=2.0)
    assert unit.item() * n * scale == pytest.approx(ref.item(), rel=1e-10)


# ----------------------------------------------------------------------------------------------------------
# method cards: every term of every recipe passes validation; these recipes name their reference
# ----------------------------------------------------------------------------------------------------------
CARDS = ["ab", "akl", "bdkd", "fkl", "jsd", "rkl", "sft", "sinkhorn", "sinkhorn_only", "skl", "srkl", "todi", "tvd"]


def _recipe(name):
    import yaml
    from pathlib import Path

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", CARDS)
def test_method_cards_name_paper_code_at_a_commit_and_deviations(name):
    r = _recipe(name)
    ref = r["reference"]
    assert ref["paper"] and isinstance(ref["deviations"], list)
    assert "@" in ref["code"] and len(ref["code"].split("@")[1].split()[0]) == 40  # owner/repo@<full sha>
    terms = r.get("loss") or [{"objective": r["objective"], "params": r.get("params") or {}}]
    for term in terms:
        O.get(term["objective"], **(term.get("params") or {}))  # raises on any invalid parameter
    assert r["dropout"] in ("keep", "disable")


def test_sinkhorn_recipe_is_sinkd_language_model_combination():
    terms = {t["objective"]: t for t in _recipe("sinkhorn")["loss"]}
    assert set(terms) == {"ce", "fkl", "sinkhorn"}
    assert terms["ce"]["weight"] == 1.0
    assert terms["fkl"]["weight"] == 0.1 and terms["fkl"]["temperature"] == 1.0
    sk = terms["sinkhorn"]
    assert sk["weight"] == 0.0008 and sk["temperature"] == 2.0
    assert sk["params"] == {"epsilon": 0.1, "n_iters": 20, "debias": False, "mass": "positions", "max_positions": 256}
    assert "ABLATION" in _recipe("sinkhorn_only")["description"]
