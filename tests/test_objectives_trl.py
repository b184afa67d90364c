"""Cross-check fkl, rkl and jsd against TRL's ``GKDTrainer.generalized_jsd_loss``.

Mapping (read from trl/experimental/gkd/gkd_trainer.py, TRL 1.16; older TRL: trl/trainer/gkd_trainer.py):

- Argument order is the same: ``generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
  temperature=1.0, reduction="batchmean", num_items_in_batch=None)``.
- Mixture: TRL builds ``log m = logsumexp(log q + log(1−β), log p + log β)``, i.e. m = β p + (1−β) q, and
  returns ``β·KL(p‖m) + (1−β)·KL(q‖m)`` — the same generalized JSD as our ``jsd(beta=β)``
  (``F.kl_div(input=log m, target=log p)`` is KL(p‖m): torch's kl_div puts the target first).
- Endpoints are special-cased and do NOT follow the formula (whose limit is 0 at both ends):
  TRL β = 0 → ``kl_div(log q, log p)`` = KL(p‖q) = our ``fkl``;
  TRL β = 1 → ``kl_div(log p, log q)`` = KL(q‖p) = our ``rkl``.
  Our ``jsd`` formula is 0 at β = 0 or 1 (objectives.md: β scales the loss, it does not pick a direction), so
  the registry refuses those values and names ``fkl`` / ``rkl`` (TRL's endpoints, checked below).
- Temperature: both divide student and teacher logits by τ before the softmax; neither multiplies by τ².
- Masking: TRL keeps positions with ``labels != -100``; ours is ``mask = (labels != -100)``.
- Reduction: TRL ``"batchmean"`` with labels = Σ over kept positions and the vocabulary / #kept positions
  = our token mean (``"mean"``); ``"sum"`` = our ``"sum"``; ``"mean"`` divides by #kept × V (an element
  mean), i.e. our mean / V; ``"batchmean"`` *without* labels divides by ``size(0)`` = B (a per-sequence sum),
  i.e. our ``"sum"`` / B; ``num_items_in_batch=n`` = our ``normalizer=n``.
- Precision: TRL computes in the input dtype; the comparison below is in float64.
"""

from __future__ import annotations

import os

import pytest
import torch

import harness.objectives as O

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _trl_loss():
    for mod in ("trl.experimental.gkd.gkd_trainer", "trl.trainer.gkd_trainer", "trl"):
        try:
            module = __import__(mod, fromlist=["GKDTrainer"])
            return module.GKDTrainer.generalized_jsd_loss
        except (ImportError, AttributeError):
            continue
    pytest.skip("trl has no GKDTrainer.generalized_jsd_loss")


@pytest.fixture(scope="module")
def trl_jsd():
    return _trl_loss()


def _batch(seed, b=3, t=5, v=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = 2.0 * torch.randn(b, t, v, generator=g, dtype=dtype)
    te = 2.0 * torch.randn(b, t, v, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100  # prompt
    labels[2, 3:] = -100  # padding
    return s, te, labels


def _ours(beta):
    """Our objective equal to TRL at this β."""
    if beta == 0:
        return O.get("fkl")
    if beta == 1:
        return O.get("rkl")
    return O.get("jsd", beta=beta)


BETAS = [0.0, 1.0, 0.5, 0.3, 0.9]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_mean_matches_trl_batchmean(trl_jsd, beta, temperature):
    s, t, labels = _batch(1)
    mask = labels != -100
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    ref = trl_jsd(s1, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
    got = _ours(beta)(s2, t, mask, temperature=temperature)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-13)
    (g_ref,) = torch.autograd.grad(ref, s1)
    (g_got,) = torch.autograd.grad(got, s2)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-12)
    # chunked gives the same
    got_c = _ours(beta)(s, t, mask, temperature=temperature, chunk_size=4)
    assert got_c.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("beta", BETAS)
def test_other_reductions_map_to_ours(trl_jsd, beta):
    s, t, labels = _batch(2)
    mask = labels != -100
    ours = _ours(beta)
    v = s.shape[-1]
    assert ours(s, t, mask, reduction="sum").item() == pytest.approx(
        trl_jsd(s, t, labels=labels, beta=beta, reduction="sum").item(), rel=1e-10
    )
    assert ours(s, t, mask).item() / v == pytest.approx(
        trl_jsd(s, t, labels=labels, beta=beta, reduction="mean").item(), rel=1e-10
    )
    # no labels: TRL batchmean divides the full sum by the batch size B
    assert ours(s, t, reduction="sum").item() / s.shape[0] == pytest.approx(
        trl_jsd(s, t, beta=beta, reduction="batchmean").item(), rel=1e-10
    )
    # num_items_in_batch (gradient accumulation) = our normalizer
    assert ours(s, t, mask, normalizer=40.0).item() == pytest.approx(
        trl_jsd(s, t, labels=labels, beta=beta, num_items_in_batch=40).item(), rel=1e-10
    )


def test_trl_endpoints_are_directional_ours_are_refused(trl_jsd):
    """TRL special-cases β ∈ {0, 1} to the KLs; our jsd refuses them (the formula is 0 there) and names fkl/rkl,
    which equal TRL's endpoints (test_token_mean_matches_trl_batchmean)."""
    s, t, labels = _batch(3)
    mask = labels != -100
    for beta in (0.0, 1.0):
        assert trl_jsd(s, t, labels=labels, beta=beta).item() > 0.1
        with pytest.raises(O.ObjectiveError, match="'fkl'.*'rkl'"):
            O.get("jsd")(s, t, mask, beta=beta)
    # near the endpoints TRL's own formula branch agrees with ours and tends to 0
    for beta in (1e-4, 1 - 1e-4):
        ref = trl_jsd(s, t, labels=labels, beta=beta).item()
        assert O.get("jsd")(s, t, mask, beta=beta).item() == pytest.approx(ref, rel=1e-8)
        assert ref < 1e-3


def test_bf16_inputs_ours_is_closer_to_float64_than_trl(trl_jsd):
    """Our float32 math on bf16 inputs vs TRL computing in bf16, both against float64 on the same values."""
    s, t, labels = _batch(4, b=4, t=16, v=512, dtype=torch.bfloat16)
    mask = labels != -100
    exact = O.get("jsd")(s.double(), t.double(), mask).item()
    ours = O.get("jsd")(s, t, mask)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(exact, rel=1e-5)
    trl = trl_jsd(s, t, labels=labels, beta=0.5).float().item()
    assert abs(ours.item() - exact) <= abs(trl - exact)
