"""ULD (Boizard et al. 2024, arXiv 2402.12030) against formulas written here in numpy float64.

The convention (sort decreasing, zero-pad to the larger vocabulary, L1 between the sorted vectors, per
sequence Σ/n then mean over sequences) is TRL's GOLD trainer's, read at
huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8 trl/experimental/gold/gold_trainer.py
(ULDLoss._compute_distillation_loss, non-hybrid branch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness import objectives
from harness.objectives.uld import uld, uld_sequences


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_uld(q, p):
    """Σ_i |q_(i) − p_(i)|, both sorted decreasing, the narrower padded with zeros (rows of q, p)."""
    w = max(q.shape[-1], p.shape[-1])
    qs = np.zeros((q.shape[0], w))
    ps = np.zeros((p.shape[0], w))
    qs[:, : q.shape[1]] = -np.sort(-q, axis=-1)
    ps[:, : p.shape[1]] = -np.sort(-p, axis=-1)
    return np.abs(qs - ps).sum(-1)


def test_a_value_by_hand():
    q = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    p = torch.tensor([[0.4, 0.6]], dtype=torch.float64).log()
    # sorted: q = (.5, .3, .2), p = (.6, .4, 0): |−.1| + |−.1| + |.2|
    assert uld(q, p).item() == pytest.approx(0.4, abs=1e-15)
    assert uld(p, q).item() == pytest.approx(0.4, abs=1e-15)  # symmetric


@pytest.mark.parametrize("vs,vt", [(7, 7), (5, 9), (11, 4)])
def test_values_against_numpy_with_different_vocabularies(vs, vt):
    rng = np.random.default_rng(vs * 100 + vt)
    zs, zt = 2 * rng.standard_normal((6, vs)), 2 * rng.standard_normal((6, vt))
    got = uld(torch.log_softmax(torch.from_numpy(zs), -1), torch.log_softmax(torch.from_numpy(zt), -1))
    np.testing.assert_allclose(got.numpy(), _np_uld(_softmax(zs), _softmax(zt)), rtol=1e-12, atol=1e-15)


def test_properties():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 9, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(z, -1)
    perm = torch.randperm(9, generator=g)
    assert torch.allclose(uld(lp[:, perm], lp), torch.zeros(5, dtype=torch.float64), atol=1e-15)  # relabelling: 0
    far = torch.log_softmax(torch.tensor([[50.0, 0, 0], [0, 0, 0]], dtype=torch.float64), -1)
    val = uld(far, torch.log_softmax(torch.tensor([[0.0, 0, 0], [0, 0, 0]], dtype=torch.float64), -1))
    assert 0 < val[0] <= 2 and val[0] == pytest.approx(2 * (1 - 1 / 3), abs=1e-12) and val[1] == 0


def test_registered_objective_reductions_and_gradient_against_numpy():
    """Token mean and per-sequence mean (GOLD's) of the wrapper, and ∂ℓ/∂z_s against the closed form.

    With distinct sorted values, ∂ℓ/∂q_v = sign(q_v − p_(rank of v in q)), and through the softmax
    ∂ℓ/∂z_v = q_v (g_v − Σ_u q_u g_u) (τ = 1).
    """
    rng = np.random.default_rng(3)
    zs, zt = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4, 8))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=np.float64)
    q, p = _softmax(zs), _softmax(zt)
    ell = _np_uld(q.reshape(-1, 8), p.reshape(-1, 8)).reshape(2, 4)
    s = torch.from_numpy(zs).requires_grad_(True)
    obj = objectives.get("uld")
    tok_mean = obj(s, torch.from_numpy(zt), torch.from_numpy(mask))
    assert tok_mean.item() == pytest.approx((ell * mask).sum() / mask.sum(), rel=1e-12)
    per_seq = obj(s.detach(), torch.from_numpy(zt), torch.from_numpy(mask), reduction="per_sequence_mean")
    assert per_seq.item() == pytest.approx(np.mean([(ell[b] * mask[b]).sum() / mask[b].sum() for b in range(2)]),
                                           rel=1e-12)
    tok_mean.backward()
    expected = np.zeros_like(zs)
    for b in range(2):
        for t in range(4):
            if not mask[b, t]:
                continue
            qv, pv = q[b, t], p[b, t]
            rank = np.argsort(np.argsort(-qv))  # position of each token in q's decreasing order
            g = np.sign(qv - np.sort(pv)[::-1][rank])
            expected[b, t] = qv * (g - (qv * g).sum()) / mask.sum()
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_cross_tokenizer_sequences_follow_gold_positional_alignment():
    """Different lengths and vocabularies: the first min(n_s, n_t) response positions paired, Σ/n, mean over b."""
    rng = np.random.default_rng(5)
    zs, zt = rng.standard_normal((3, 6, 10)), 3 * rng.standard_normal((3, 9, 14))
    ms = np.array([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    mt = np.array([[0, 0, 1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0]])
    per_seq = []
    for b in range(3):
        si, ti = np.nonzero(ms[b])[0], np.nonzero(mt[b])[0]
        n = min(len(si), len(ti))
        if n:
            per_seq.append(_np_uld(_softmax(zs[b, si[:n]]), _softmax(zt[b, ti[:n]])).sum() / n)
    got = uld_sequences(torch.from_numpy(zs), torch.from_numpy(zt), torch.from_numpy(ms), torch.from_numpy(mt))
    assert got.item() == pytest.approx(np.mean(per_seq), rel=1e-12)
    empty = torch.zeros(1, 3, 5, requires_grad=True)
    out = uld_sequences(empty, torch.zeros(1, 3, 7), torch.zeros(1, 3), torch.ones(1, 3))
    out.backward()
    assert out.item() == 0 and torch.equal(empty.grad, torch.zeros_like(empty))


def test_caches_that_lose_the_row_shape_are_refused_for_uld():
    from harness.teacher_cache import supported

    assert supported("exact", "uld")[0]
    assert not supported("sparse", "uld")[0] and not supported("sampled", "uld")[0]


# alignment through the text (GOLD's extended ULD, "observed" merge) -----------------------------------------
def test_alignment_groups_tokens_at_shared_boundaries():
    from harness.objectives.uld import align_by_offsets

    # text "unhappiness!": student "un|happi|ness|!" ends (2, 7, 11, 12); teacher "unhap|pi|ness!" (5, 7, 12)
    s, t = align_by_offsets([2, 7, 11, 12], [5, 7, 12])
    assert s == [[0, 1], [2, 3]] and t == [[0, 1], [2]]
    assert align_by_offsets([1, 2, 3], [1, 2, 3]) == ([[0], [1], [2]], [[0], [1], [2]])  # same tokenizer: 1:1
    # texts of different lengths (e.g. a truncated side): the rest forms one final group
    assert align_by_offsets([3, 6, 9], [3, 5]) == ([[0], [1, 2]], [[0], [1]])
    assert align_by_offsets([], [2]) == ([[]], [[0]])


def test_text_aligned_uld_against_numpy():
    """Merged rows: p[g0] · Π p[g_m, token_m]; ℓ of each group pair; Σ / #groups; empty-sided groups dropped."""
    from harness.objectives.uld import uld_text_aligned

    rng = np.random.default_rng(11)
    zs, zt = rng.standard_normal((4, 9)), 2 * rng.standard_normal((4, 13))
    s_ids, t_ids = [3, 1, 4, 1], [5, 9, 2, 6]
    s_ends, t_ends = [2, 7, 11, 12], [5, 7, 9, 14]  # groups: s [0,1]|[2,3], t [0,1]|[2,3]
    q, p = _softmax(zs), _softmax(zt)
    q_rows = np.stack([q[0] * q[1, s_ids[1]], q[2] * q[3, s_ids[3]]])
    p_rows = np.stack([p[0] * p[1, t_ids[1]], p[2] * p[3, t_ids[3]]])
    expected = _np_uld(q_rows, p_rows).sum() / 2
    s = torch.from_numpy(zs).requires_grad_(True)
    got = uld_text_aligned(s, torch.from_numpy(zt), s_ends, t_ends, s_ids, t_ids)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # same tokenizer and offsets: equals the per-position loss averaged over positions
    same = uld_text_aligned(torch.from_numpy(zs), torch.from_numpy(zt[:, :9]), [1, 2, 3, 4], [1, 2, 3, 4],
                            s_ids, s_ids)
    assert same.item() == pytest.approx(_np_uld(q, _softmax(zt[:, :9])).mean(), rel=1e-12)
