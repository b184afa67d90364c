"""Tests of MiniLLM: the ``minillm`` objective, the ``minillm`` training mode (teacher-mixed sampling) and the
recipe end to end.

The loss and its gradient are written out below in NumPy float64 from microsoft/LMOps@
4f2a9deb5f08e459fd44c2e4792344d78ca89fc3 ``minillm/minillm/losses.py`` (``_get_advantages_and_returns``: returns
summed backwards from t with γ, divided by the remaining length, whitened with the unbiased variance + 1e-8;
``_pg_loss``: max(−A·ratio, −A·clip(ratio, 1 ± ε)) with ratio = exp(log q − log q_old)·w, token mean;
``_reg_loss``: Σ_v q (log q − log p), token mean; ``pt_loss``: (1 − kd)·CE + kd·(−Σ p log q)) and ``sampler.py``
(rewards log p(y) − log q(y), divided by reward_scaling, clipped; w = q(y) / ((1 − α) q(y) + α p(y))).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from harness import objectives
from harness.distill import TrainConfig, train
from harness.modes import build, needs_student_samples
from harness.objectives.composite import Term, WeightedLoss
from harness.objectives.minillm import minillm

BS, MAX_LEN, MAX_PROMPT, NEW = 4, 48, 32, 6
DEFAULTS = dict(gamma=0.95, cliprange=0.2, reward_scaling=0.5, cliprange_reward=100.0, lm_coef=1.0, kd_ratio=0.5)


# ------------------------------------------------------------------------- the released formula, in NumPy
def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def released_minillm(s, t, labels, mask, role, w, *, gamma, cliprange, reward_scaling, cliprange_reward, lm_coef,
                     kd_ratio, single_step=True, include_current_step=True, old=None):
    """MiniLLM's loss and its gradient with respect to the student logits, float64, position by position.

    ``old`` [B, T]: the stored log q_old(y) (sampler.py ``logprobs``); rewards log p − log q_old and ratio
    exp(log q − log q_old)·w (losses.py ``_pg_loss``). ``None``: log q_old = the current log q (ratio w)."""
    lq, lp = _log_softmax(s), _log_softmax(t)
    q, p = np.exp(lq), np.exp(lp)
    B, T, V = s.shape
    samp = [(b, k) for b in range(B) for k in range(T) if mask[b, k] and role[b] == 1]
    refp = [(b, k) for b in range(B) for k in range(T) if mask[b, k] and role[b] == 0]
    grad = np.zeros_like(s)
    loss = 0.0
    if samp:
        ret = {}
        for b in range(B):
            ks = [k for k in range(T) if mask[b, k] and role[b] == 1]
            r = [np.clip((lp[b, k, labels[b, k]] - (lq[b, k, labels[b, k]] if old is None else old[b, k]))
                         / reward_scaling,
                         -cliprange_reward, cliprange_reward) for k in ks]
            for j, k in enumerate(ks):
                first = j if include_current_step else j + 1
                total = sum(gamma ** (i - j) * r[i] for i in range(first, len(ks)))
                ret[(b, k)] = total / (len(ks) - j)
        R = np.array([ret[x] for x in samp])
        A = (R - R.mean()) / np.sqrt(R.var(ddof=1) + 1e-8) if len(R) > 1 else R - R.mean()
        n = len(samp)
        for a, (b, k) in zip(A, samp):
            ratio = w[b, k] * (1.0 if old is None else math.exp(lq[b, k, labels[b, k]] - old[b, k]))
            clipped = min(max(ratio, 1 - cliprange), 1 + cliprange)
            loss += max(-a * ratio, -a * clipped) / n
            if -a * ratio >= -a * clipped:  # the unclipped branch carries the gradient
                onehot = np.eye(V)[labels[b, k]]
                grad[b, k] += -a * ratio * (onehot - q[b, k]) / n
            if single_step:
                kl = (q[b, k] * (lq[b, k] - lp[b, k])).sum()
                loss += kl / n
                grad[b, k] += q[b, k] * (lq[b, k] - lp[b, k] - kl) / n
    if refp and lm_coef:
        n = len(refp)
        for b, k in refp:
            onehot = np.eye(V)[labels[b, k]]
            ce = -lq[b, k, labels[b, k]]
            soft = -(p[b, k] * lq[b, k]).sum()
            loss += lm_coef * ((1 - kd_ratio) * ce + kd_ratio * soft) / n
            grad[b, k] += lm_coef * ((1 - kd_ratio) * (q[b, k] - onehot) + kd_ratio * (q[b, k] - p[b, k])) / n
    return loss, grad


def fixed_inputs(seed=0, B=3, T=6, V=7, scale=2.0):
    """3 sampled rows (different lengths, a prompt position) and 2 reference rows."""
    rng = np.random.default_rng(seed)
    R = B + 2
    s = rng.normal(size=(R, T, V)) * scale
    t = rng.normal(size=(R, T, V)) * scale
    labels = rng.integers(0, V, size=(R, T))
    mask = np.ones((R, T), dtype=bool)
    mask[:, 0] = False
    mask[1, -2:] = False
    mask[2, -3:] = False
    mask[4, -1:] = False
    labels[~mask] = -100
    role = np.array([1] * B + [0] * 2)
    w = np.where(mask & (role[:, None] == 1), rng.uniform(0.6, 1.4, size=(R, T)), 1.0)
    return s, t, labels, mask, role, w


def torch_batch(labels, mask, role, w, old=None):
    out = {"labels": torch.tensor(labels), "loss_mask": torch.tensor(mask, dtype=torch.float64),
           "minillm_role": torch.tensor(role), "mix_weight": torch.tensor(w)}
    if old is not None:
        out["old_logprobs"] = torch.tensor(old)
    return out


def shifted_old_logprobs(s, labels, mask, role, seed=3, spread=0.4):
    """log q_old = the current log q(y) shifted by U(−spread, spread) at the sampled positions (0 elsewhere): the
    student after some PPO updates, so the ratio exp(log q − log q_old) is not 1 (some beyond 1 ± 0.2)."""
    lq = _log_softmax(s)
    rng = np.random.default_rng(seed)
    old = np.zeros(labels.shape)
    for b, k in zip(*np.nonzero(mask)):
        if role[b] == 1:
            old[b, k] = lq[b, k, labels[b, k]] + rng.uniform(-spread, spread)
    return old


@pytest.mark.parametrize("include_current_step", [True, False])
@pytest.mark.parametrize("single_step", [True, False])
@pytest.mark.parametrize("params", [DEFAULTS, dict(DEFAULTS, gamma=1.0, reward_scaling=1.0, cliprange_reward=0.5,
                                                   kd_ratio=0.0, lm_coef=0.3)])
def test_minillm_loss_and_gradient_equal_the_released_formula(include_current_step, single_step, params):
    s, t, labels, mask, role, w = fixed_inputs()
    want, want_grad = released_minillm(s, t, labels, mask, role, w, single_step=single_step,
                                       include_current_step=include_current_step, **params)
    st = torch.tensor(s, requires_grad=True)
    got = minillm(st, torch.tensor(t), torch_batch(labels, mask, role, w), single_step=single_step,
                  include_current_step=include_current_step, **params)
    got.backward()
    assert float(got.detach()) == pytest.approx(want, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(st.grad.numpy(), want_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("include_current_step", [True, False])
@pytest.mark.parametrize("params", [DEFAULTS, dict(DEFAULTS, gamma=1.0, reward_scaling=1.0, cliprange_reward=0.5,
                                                   kd_ratio=0.0, lm_coef=0.3)])
def test_minillm_with_old_logprobs_equals_the_released_ppo_formula(include_current_step, params):
    """Later PPO epochs: the ratio exp(log q − log q_old)·w differs from w and the rewards use the stored log q_old
    (losses.py ``_pg_loss``, sampler.py rewards); loss and gradient against the NumPy formula."""
    s, t, labels, mask, role, w = fixed_inputs()
    old = shifted_old_logprobs(s, labels, mask, role)
    ratios = [math.exp(_log_softmax(s)[b, k, labels[b, k]] - old[b, k]) * w[b, k]
              for b, k in zip(*np.nonzero(mask)) if role[b] == 1]
    assert min(ratios) < 0.8 and max(ratios) > 1.2 and any(0.8 < x < 1.2 for x in ratios)  # both branches
    want, want_grad = released_minillm(s, t, labels, mask, role, w, old=old,
                                       include_current_step=include_current_step, **params)
    st = torch.tensor(s, requires_grad=True)
    got = minillm(st, torch.tensor(t), torch_batch(labels, mask, role, w, old),
                  include_current_step=include_current_step, **params)
    got.backward()
    assert float(got.detach()) == pytest.approx(want, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(st.grad.numpy(), want_grad, rtol=1e-8, atol=1e-12)
    # the stored log q_old matters: without it (ratio w, rewards from the current student) the value differs
    plain = float(minillm(torch.tensor(s), torch.tensor(t), torch_batch(labels, mask, role, w),
                          include_current_step=include_current_step, **params))
    assert abs(plain - want) > 1e-3
    # and old = the current log q reproduces the per-batch loss exactly
    same = shifted_old_logprobs(s, labels, mask, role, spread=0.0)
    assert float(minillm(torch.tensor(s), torch.tensor(t), torch_batch(labels, mask, role, w, same),
                         include_current_step=include_current_step, **params)) == pytest.approx(plain, rel=1e-12)


def test_minillm_normalizer_weights_by_tokens_and_weighted_loss_passes_the_batch():
    s, t, labels, mask, role, w = fixed_inputs()
    base = float(minillm(torch.tensor(s), torch.tensor(t), torch_batch(labels, mask, role, w)))
    scaled = float(minillm(torch.tensor(s), torch.tensor(t), torch_batch(labels, mask, role, w),
                           normalizer=2.0 * mask.sum()))
    assert scaled == pytest.approx(base / 2)
    loss = WeightedLoss([Term(objectives.get("minillm"), 0.5)])
    total, parts = loss(torch.tensor(s), torch.tensor(t), torch.tensor(mask, dtype=torch.float64),
                        labels=torch.tensor(labels), normalizer=float(mask.sum()),
                        batch=torch_batch(labels, mask, role, w))
    assert float(total) == pytest.approx(0.5 * base) and parts["minillm"] == pytest.approx(0.5 * base)


def test_minillm_is_zero_with_zero_gradient_when_student_equals_teacher():
    s, _, labels, mask, role, w = fixed_inputs()
    st = torch.tensor(s, requires_grad=True)
    # the per-step reverse KL and the rewards vanish; the whitened advantages are 0
    value = minillm(st, torch.tensor(s), torch_batch(labels, mask, role, w), lm_coef=0.0)
    value.backward()
    assert abs(float(value.detach())) < 1e-12
    assert float(st.grad.abs().max()) < 1e-12
    # the per-step term alone is the exact reverse KL: positive when they differ
    _, t, *_ = fixed_inputs(seed=1)
    reg_only = minillm(torch.tensor(s), torch.tensor(t), torch_batch(labels, mask, role, np.ones_like(w)),
                       lm_coef=0.0, whiten=True, cliprange=0.0)
    assert float(reg_only) > 0


def test_policy_gradient_raises_the_tokens_the_teacher_prefers():
    """Two sampled one-token rows: the teacher likes row 0's token, not row 1's. One descent step on the student
    logits raises log q of row 0's token and lowers row 1's (per-step term off, LM term off, weights 1)."""
    V = 5
    s = np.zeros((2, 2, V))
    t = np.zeros((2, 2, V))
    labels = np.full((2, 2), -100)
    labels[:, 1] = [2, 3]
    t[0, 1, 2], t[1, 1, 3] = 4.0, -4.0
    mask = labels != -100
    role, w = np.array([1, 1]), np.ones((2, 2))
    st = torch.tensor(s, requires_grad=True)
    minillm(st, torch.tensor(t), torch_batch(labels, mask, role, w), single_step=False, lm_coef=0.0).backward()
    after = torch.log_softmax(st.detach() - 0.5 * st.grad, -1)
    assert float(after[0, 1, 2]) > math.log(1 / V) > float(after[1, 1, 3])


def test_clipped_importance_weight_stops_the_gradient_only_on_the_clipped_side():
    V = 4
    s = np.zeros((2, 2, V))
    t = np.zeros((2, 2, V))
    labels = np.full((2, 2), -100)
    labels[:, 1] = [1, 1]
    t[0, 1, 1], t[1, 1, 1] = 3.0, -3.0   # advantages +1 (row 0) and -1 (row 1) after whitening
    mask = labels != -100
    role = np.array([1, 1])
    for weight, row0_moves, row1_moves in ((1.5, False, True), (0.5, True, False), (1.1, True, True)):
        w = np.ones((2, 2))
        w[:, 1] = weight
        st = torch.tensor(s, requires_grad=True)
        minillm(st, torch.tensor(t), torch_batch(labels, mask, role, w), single_step=False, lm_coef=0.0).backward()
        g = st.grad[:, 1].abs().amax(-1)
        assert (float(g[0]) > 0) == row0_moves and (float(g[1]) > 0) == row1_moves, weight


def test_minillm_refuses_the_per_position_path_and_batches_without_the_mode():
    s, t, labels, mask, role, w = fixed_inputs()
    with pytest.raises(objectives.ObjectiveError, match="sequence-level"):
        minillm(torch.tensor(s), torch.tensor(t), None)
    with pytest.raises(ValueError, match="training mode 'minillm'"):
        minillm(torch.tensor(s), torch.tensor(t), {"labels": torch.tensor(labels), "loss_mask": torch.tensor(mask)})
    with pytest.raises(objectives.ObjectiveError):
        objectives.get("minillm", kd_ratio=1.5)


# ------------------------------------------------------------------------------------------- the mode
# the tiny data, models and mode context of the sequence-level tests (same sizes: BS, MAX_LEN, MAX_PROMPT, NEW)
from .test_sequence_level import STUDENT_TOKEN, TEACHER_TOKEN, ctx, model, tiny  # noqa: E402,F401 (tiny: a fixture)


def responses(batch, rows):
    return [batch["input_ids"][b, int(batch["prompt_len"][b]):int(batch["lengths"][b])].tolist() for b in rows]


def test_mode_weights_are_the_mixture_importance_weights(tiny):
    student, teacher = model(tiny, 1), model(tiny, 2, layers=2, width=48)
    assert needs_student_samples("minillm")
    src = build("minillm", {}, ctx(tiny, student=student, teacher=teacher))
    batch = src(0)
    reference = ctx(tiny, student=student, teacher=teacher).reference(0)
    assert batch["input_ids"].shape[0] == 2 * BS and batch["minillm_role"].tolist() == [1] * BS + [0] * BS
    # the reference rows are the micro-batch's reference rows, unchanged
    assert responses(batch, range(BS, 2 * BS)) == responses(reference, range(BS))
    # w = q(y) / (0.8 q(y) + 0.2 p(y)), from full float64 forwards of both models on the finished rows
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        lq = torch.log_softmax(student.eval()(**inputs).logits.double(), -1).numpy()
        lp = torch.log_softmax(teacher.eval()(**inputs).logits.double(), -1).numpy()
    labels, m, w = batch["labels"].numpy(), batch["loss_mask"].numpy() > 0, batch["mix_weight"].numpy()
    old = batch["old_logprobs"].numpy()
    checked = 0
    for b in range(2 * BS):
        for k in range(labels.shape[1]):
            if m[b, k] and b < BS:
                q, p = math.exp(lq[b, k, labels[b, k]]), math.exp(lp[b, k, labels[b, k]])
                assert w[b, k] == pytest.approx(q / (0.8 * q + 0.2 * p), rel=1e-4)
                # the student is unchanged since sampling: log q_old is its log q (KV-cache pass vs full forward)
                assert old[b, k] == pytest.approx(lq[b, k, labels[b, k]], abs=1e-4)
                checked += 1
            else:
                assert w[b, k] == 1.0 and old[b, k] == 0.0
    assert checked == sum(src.store[j]["sample_len"] for j in src.store_rows(0)) > 0
    # the whole first collection (num_rollouts = 256 responses) was sampled for micro-batch 0
    assert src.sampled["samples"] == 256 and src.sampled["tokens"] == sum(r["sample_len"] for r in src.store)
    stats = src.stats
    assert stats["generation"]["student_generated_tokens"] == src.sampled["tokens"]
    assert stats["generation"]["student_tokens_per_s"] > 0
    assert src.timings["generation_s"] > src.timings["teacher_generation_s"] > 0


def test_mode_samples_the_mixture(tiny):
    """Forced models: the student always says STUDENT_TOKEN, the teacher TEACHER_TOKEN. A mixed sample takes the
    teacher's token with probability α; its weight is q/(α p) = 0, the student's token's 1/(1 − α)."""
    student, teacher = model(tiny, 1, STUDENT_TOKEN), model(tiny, 2, TEACHER_TOKEN)
    src = build("minillm", {"mix_alpha": 0.2, "reference_rows": False}, ctx(tiny, student=student, teacher=teacher))
    toks, weights = [], []
    for i in range(6):
        batch = src(i)
        assert batch["input_ids"].shape[0] == BS and batch["minillm_role"].tolist() == [1] * BS
        for b in range(BS):
            start = int(batch["prompt_len"][b]) - 1
            toks += responses(batch, [b])[0]
            weights += batch["mix_weight"][b, start:start + NEW].tolist()
    assert len(toks) == 6 * BS * NEW and set(toks) == {STUDENT_TOKEN, TEACHER_TOKEN}
    share = toks.count(TEACHER_TOKEN) / len(toks)
    assert 0.1 < share < 0.32  # 144 draws at 0.2: ±3 standard deviations is (0.10, 0.30)
    for tok, w in zip(toks, weights):
        assert w == pytest.approx(1.25 if tok == STUDENT_TOKEN else 0.0, abs=1e-6)
    only_student = build("minillm", {"mix_alpha": 0.0}, ctx(tiny, student=student, teacher=teacher))
    batch = only_student(0)
    assert all(r == [STUDENT_TOKEN] * NEW for r in responses(batch, range(BS)))
    assert torch.all(batch["mix_weight"] == 1.0)


def test_mode_is_deterministic_under_a_seed_and_needs_the_teacher(tiny):
    student, teacher = model(tiny, 1), model(tiny, 2)
    a = build("minillm", {}, ctx(tiny, student=student, teacher=teacher, seed=5))(3)
    b = build("minillm", {}, ctx(tiny, student=student, teacher=teacher, seed=5))(3)
    c = build("minillm", {}, ctx(tiny, student=student, teacher=teacher, seed=6))(3)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["mix_weight"], b["mix_weight"])
    assert not torch.equal(a["input_ids"][:BS], c["input_ids"][:BS])
    rng_before = torch.random.get_rng_state()
    build("minillm", {}, ctx(tiny, student=student, teacher=teacher))(0)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the global RNG is left alone
    with pytest.raises(ValueError, match="ctx.teacher"):
        build("minillm", {}, ctx(tiny, student=student, teacher=None))
    from harness.schema import ConfigError
    with pytest.raises(ConfigError, match="top_k"):
        build("minillm", {"top_p": 0.9}, ctx(tiny, student=student, teacher=teacher))


def test_mode_and_loss_train_and_resume(tiny):
    student, teacher = model(tiny, 1), model(tiny, 2, layers=2, width=48).eval()
    src = build("minillm", {}, ctx(tiny, student=student, teacher=teacher, steps=3))
    before = [p.detach().clone() for p in student.parameters()]

    def teacher_logits(batch):
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    cfg = TrainConfig(max_steps=3, per_device_train_batch_size=BS, learning_rate=3e-3, max_length=MAX_LEN,
                      max_prompt_tokens=MAX_PROMPT, log_every=1)
    result = train(student, src, cfg, seed=0, loss=WeightedLoss([Term(objectives.get("minillm"), 1.0)]),
                   teacher_logits=teacher_logits, progress=False)
    assert result.steps == 3 and all(math.isfinite(v) for _, v in result.curve)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    again = build("minillm", {}, ctx(tiny, student=student, teacher=teacher, steps=3))
    again.load_state_dict(src.state_dict())
    assert again.stats == src.stats


# ------------------------------------------------------------------- the PPO structure of the rollout store
# released (microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3 minillm/minillm/trainer.py ``train``): for each
# collection of num_rollouts rollouts, ppo_epochs shuffled passes over the store, one step per mini-batch, the LM
# batch from its own iterator; ``post_epoch_callback`` collects the next store.
PPO = {"num_rollouts": 2 * BS, "ppo_epochs": 3}   # N = 2 micro-batches per pass, C = 6 per collection


def _prompts(batch, rows):
    return [batch["input_ids"][b, : int(batch["prompt_len"][b])].tolist() for b in rows]


def _sampled(batch):
    """(prompt, response) of every sampled row of a micro-batch."""
    rows = [b for b in range(batch["input_ids"].shape[0]) if int(batch["minillm_role"][b]) == 1]
    return list(zip(map(tuple, _prompts(batch, rows)), map(tuple, responses(batch, rows))))


def _permutations(seed, c, epochs):
    """The shuffles the mode documents: draws in order from SeedSequence([seed, c, 6]) with NumPy's PCG64."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, c, 6])))
    return [rng.permutation(PPO["num_rollouts"]) for _ in range(epochs)]


def test_rollout_store_is_served_ppo_epochs_times_in_shuffled_micro_batches(tiny):
    from harness.modes.base import torch_seed
    from harness.modes.minillm import mixed_sample_rows

    student, teacher = model(tiny, 1), model(tiny, 2, layers=2, width=48)
    context = ctx(tiny, student=student, teacher=teacher, seed=3)
    src = build("minillm", PPO, context)
    N, C = PPO["num_rollouts"] // BS, PPO["num_rollouts"] // BS * PPO["ppo_epochs"]
    for c in range(2):
        # the store: the prompts of reference(c·N + m), m = 0..N-1, each batch sampled with its own seed
        store = []
        for m in range(N):
            ref = context.reference(c * N + m)
            rows = mixed_sample_rows(student, teacher, _prompts(ref, range(BS)), mix_alpha=0.2,
                                     eos_id=tiny["tok"].eos_token_id, pad_id=tiny["tok"].pad_token_id,
                                     temperature=1.0, max_new_tokens=NEW, max_length=MAX_LEN,
                                     seed=torch_seed(3, c * N + m, 2))
            store += [(tuple(r["input_ids"][: r["prompt_len"]]), tuple(r["input_ids"][r["prompt_len"]:]), r)
                      for r in rows]
        perms = _permutations(3, c, PPO["ppo_epochs"])
        for e in range(PPO["ppo_epochs"]):
            seen = []
            for k in range(N):
                i = c * C + e * N + k
                batch = src(i)
                assert src.sampled["samples"] == (c + 1) * PPO["num_rollouts"]  # one collection per C batches
                want = sorted(int(x) for x in perms[e][k * BS:(k + 1) * BS])
                assert _sampled(batch) == [store[j][:2] for j in want]
                seen += want
                # the LM rows are reference(i), the separate iterator of the released trainer
                assert responses(batch, range(BS, 2 * BS)) == responses(context.reference(i), range(BS))
                # old log q and w at the sampled tokens' label positions, as sampled
                for b, j in enumerate(want):
                    row, start = store[j][2], int(batch["prompt_len"][b]) - 1
                    got_old = batch["old_logprobs"][b].tolist()
                    assert got_old[start:start + row["sample_len"]] == pytest.approx(row["student_logprobs"],
                                                                                    abs=1e-12)
                    assert sum(abs(x) for x in got_old) == pytest.approx(sum(abs(x) for x in
                                                                             row["student_logprobs"]), abs=1e-9)
                    assert batch["mix_weight"][b, start:start + row["sample_len"]].tolist() == pytest.approx(
                        row["mix_weight"], rel=1e-6)
            assert sorted(seen) == list(range(PPO["num_rollouts"]))  # every rollout once per PPO epoch
        assert perms[0].tolist() != perms[1].tolist()  # the epochs are shuffled anew


def test_one_micro_batch_one_epoch_reproduces_per_batch_sampling(tiny):
    """num_rollouts = B, ppo_epochs = 1: micro-batch i is the responses to reference(i)'s prompts sampled with
    torch_seed(seed, i, STREAM_GENERATE), then reference(i): the batches of the mode before the rollout store."""
    from harness.data.batching import collate
    from harness.modes.base import torch_seed
    from harness.modes.minillm import mixed_sample_rows

    student, teacher = model(tiny, 1), model(tiny, 2, layers=2, width=48)
    context = ctx(tiny, student=student, teacher=teacher, seed=4)
    src = build("minillm", {"num_rollouts": BS, "ppo_epochs": 1}, context)
    pad = tiny["tok"].pad_token_id
    for i in range(3):
        ref = context.reference(i)
        rows = mixed_sample_rows(student, teacher, _prompts(ref, range(BS)), mix_alpha=0.2,
                                 eos_id=tiny["tok"].eos_token_id, pad_id=pad, temperature=1.0,
                                 max_new_tokens=NEW, max_length=MAX_LEN, seed=torch_seed(4, i, 2))
        lengths = ref["lengths"].tolist()
        want = collate(rows + [{"input_ids": ref["input_ids"][b, : lengths[b]].tolist(),
                                "prompt_len": int(ref["prompt_len"][b])} for b in range(BS)], pad)
        weight = torch.ones(want["labels"].shape, dtype=torch.float32)
        for b, row in enumerate(rows):
            weight[b, row["prompt_len"] - 1: row["prompt_len"] - 1 + row["sample_len"]] = torch.tensor(
                row["mix_weight"], dtype=torch.float32)
        got = src(i)
        for key in ("input_ids", "attention_mask", "labels", "loss_mask", "prompt_len", "lengths"):
            assert torch.equal(got[key], want[key]), key
        assert torch.equal(got["mix_weight"], weight)
        assert got["minillm_role"].tolist() == [1] * BS + [0] * BS
        assert got["prompt_example_ids"].tolist() == ref["example_ids"].tolist() * 2
        assert src.sampled["samples"] == (i + 1) * BS


def test_resuming_inside_a_collection_serves_the_stored_rollouts(tiny):
    import io

    student, teacher = model(tiny, 1), model(tiny, 2, layers=2, width=48)
    whole = build("minillm", PPO, ctx(tiny, student=student, teacher=teacher, seed=2))
    want = [whole(i) for i in range(8)]  # collection 0 (C = 6) and the start of collection 1
    first = build("minillm", PPO, ctx(tiny, student=student, teacher=teacher, seed=2))
    for i in range(5):
        first(i)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # tensors and plain values only
    assert state["collection"] == 0 and state["store"]["tokens"].dtype == torch.int32
    # a student that moved since: a resumed run must not resample the current collection
    moved = model(tiny, 9)
    resumed = build("minillm", PPO, ctx(tiny, student=moved, teacher=teacher, seed=2))
    resumed.load_state_dict(state)
    got = resumed(5)
    assert resumed.sampled["samples"] == first.sampled["samples"] == PPO["num_rollouts"]
    for key in ("input_ids", "labels", "loss_mask", "mix_weight", "old_logprobs", "minillm_role"):
        assert torch.equal(got[key], want[5][key]), key
    # with the same student, every later micro-batch equals the uninterrupted run's, across the next collection
    again = build("minillm", PPO, ctx(tiny, student=student, teacher=teacher, seed=2))
    again.load_state_dict(state)
    for i in range(5, 8):
        got = again(i)
        for key in ("input_ids", "attention_mask", "labels", "loss_mask", "mix_weight", "old_logprobs",
                    "minillm_role", "prompt_example_ids"):
            assert torch.equal(got[key], want[i][key]), (i, key)
    assert again.collection == whole.collection == 1 and again.sampled == whole.sampled
    for key in ("mix_weight", "ppo"):
        assert again.stats[key] == whole.stats[key], key


def test_num_rollouts_must_be_a_multiple_of_the_micro_batch(tiny):
    from harness.schema import ConfigError

    student, teacher = model(tiny, 1), model(tiny, 2)
    with pytest.raises(ConfigError, match=rf"mode_params.num_rollouts 6 is not a positive multiple of the micro-batch "
                                          rf"size {BS}; set it to a multiple of {BS} \(e.g. 4\)") as info:
        build("minillm", {"num_rollouts": 6}, ctx(tiny, student=student, teacher=teacher))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="ppo_epochs"):
        build("minillm", {"ppo_epochs": 0}, ctx(tiny, student=student, teacher=teacher))


# ------------------------------------------------------------------------------- the recipe, end to end
def test_minillm_recipe_runs_through_distill_on_the_smoke_suite(tmp_path):
    from harness import steps
    from harness.suite import load_suite
    from tests.conftest import REPO

    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    cfg.pop("tuning", None)  # a single distill run at the suite's learning rate
    cfg.update(workdir=str(tmp_path / "work"), results=str(tmp_path / "results"), recipes=["minillm"], seeds=[1])
    cfg["training"].update(max_steps=3, log_every=1)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(cfg))
    suite = load_suite(path)
    steps.prepare_data(suite)
    steps.prepare_tokenizer(suite)
    steps.prepare_teacher(suite, progress=False)
    steps.build_teacher_cache(suite, progress=False)
    steps.init_student(suite, 1)
    recipe = suite.recipes()["minillm"]
    assert recipe.mode == "minillm" and recipe.dropout == "disable"
    out = steps.distill(suite, recipe, 1, progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "ok", run.get("error")
    assert len(run["curve"]) == 3 and all(math.isfinite(v) for _, v in run["curve"])
    gen = run["mode_stats"]["generation"]
    assert gen["student_generated_tokens"] > 0 and gen["student_tokens_per_s"] > 0
    assert run["costs"]["generation_s"] > 0
