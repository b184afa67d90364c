"""Tests of the sequence-level methods: the ``seq_kd`` mode (TRL GKDTrainer seq_kd=True), the ``distillm2`` mode
and the ``distillm2`` objective (DistiLLM-2's contrastive loss).

The DistiLLM-2 formulas are written out below in NumPy float64 from jongwooko/distillm-2@
fe4cf9bfbb4f83219dd1d69219800164b59685fa ``src/distillm_trainer.py`` (get_batch_logps l.1102-1242: skew KL with
mixture α₁ p + (1−α₁) q on the chosen rows, skew reverse KL with mixture (1−α₂) p + α₂ sg(q) on the rejected rows,
per-sentence α = clip(1 − (1−α)·anchor/(gap + 1e-5), 1e-2, α), per-sentence token means; kd_loss l.1073-1078:
mean over pairs of (2−β)·KL + β·RKL with β = 1 + 0.5·min(1, 2t/T)); TRL's seq_kd branch from
huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8 ``trl/experimental/gkd/gkd_trainer.py`` l.491-535.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness import objectives
from harness.data.batching import collate, encode
from harness.data.tiny import generate_tiny
from harness.data.tokenizer import item_texts, train_tokenizer
from harness.distill import TrainConfig, batch_order, train
from harness.models import build_tiny
from harness.modes import ModeContext, build, needs_student_samples
from harness.objectives.composite import Term, WeightedLoss
from harness.objectives.sequence import beta_schedule, distillm2

BS, MAX_LEN, MAX_PROMPT, NEW = 4, 48, 32, 6


# ------------------------------------------------------------------------- the released formula, in NumPy
def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def released_distillm2(s, t, labels, mask, role, progress, anchor=None, base=0.1, s_frozen=None):
    """DistiLLM-2's loss in float64. ``s_frozen``: the student logits inside the reverse mixture (sg(q))."""
    lq, lp = _log_softmax(s), _log_softmax(t)
    lq_frozen = _log_softmax(s if s_frozen is None else s_frozen)
    q, p, q_frozen = np.exp(lq), np.exp(lp), np.exp(lq_frozen)
    B, T = labels.shape
    m = mask.astype(np.float64)
    n = m.sum(-1)
    tok_q = np.array([[lq[b, k, max(labels[b, k], 0)] for k in range(T)] for b in range(B)])
    tok_p = np.array([[lp[b, k, max(labels[b, k], 0)] for k in range(T)] for b in range(B)])
    s_q, s_p = np.exp((tok_q * m).sum(-1) / n), np.exp((tok_p * m).sum(-1) / n)
    if anchor is None:
        a1 = a2 = np.full(B, base)
    else:
        a1 = np.clip(1 - (1 - base) * anchor[0] / (s_p - s_q + 1e-5), 1e-2, base)
        a2 = np.clip(1 - (1 - base) * anchor[1] / (s_q - s_p + 1e-5), 1e-2, base)
    kl = np.zeros((B, T))
    rkl = np.zeros((B, T))
    for b in range(B):
        for k in range(T):
            mix1 = a1[b] * p[b, k] + (1 - a1[b]) * q[b, k]
            kl[b, k] = (p[b, k] * (np.log(p[b, k]) - np.log(mix1))).sum()
            mix2 = (1 - a2[b]) * p[b, k] + a2[b] * q_frozen[b, k]
            rkl[b, k] = (q[b, k] * (np.log(q[b, k]) - np.log(mix2))).sum()
    kl_row, rkl_row = (kl * m).sum(-1) / n, (rkl * m).sum(-1) / n
    beta = 1.0 + 0.5 * min(1.0, 2 * progress)
    chosen, rejected = kl_row[role == 0], rkl_row[role == 1]
    return float(np.mean((2 - beta) * chosen + beta * rejected))


def fixed_inputs(seed=0, B=2, T=5, V=7, scale=2.0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(2 * B, T, V)) * scale
    t = rng.normal(size=(2 * B, T, V)) * scale
    labels = rng.integers(0, V, size=(2 * B, T))
    mask = np.ones((2 * B, T), dtype=bool)
    mask[:, 0] = False            # a prompt position
    mask[1, -2:] = False          # a shorter response
    mask[3, -1:] = False
    labels[~mask] = -100
    role = np.array([0] * B + [1] * B)
    return s, t, labels, mask, role


def torch_batch(labels, mask, role, progress, anchor=None):
    batch = {"labels": torch.tensor(labels), "loss_mask": torch.tensor(mask, dtype=torch.float64),
             "pair_role": torch.tensor(role), "progress": torch.tensor(progress, dtype=torch.float64)}
    if anchor is not None:
        batch["alpha_anchor"] = torch.tensor(anchor, dtype=torch.float64)
    return batch


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.25, 0.5, 0.9])
# anchors chosen so that fixed_inputs() has per-sentence alphas inside (0.01, 0.1), at 0.01 and at 0.1
@pytest.mark.parametrize("anchor", [None, (-0.021, 0.22), (-0.015, 0.1), (0.02, -0.01), (0.3, 0.3)])
def test_distillm2_loss_equals_released_formula(progress, anchor):
    s, t, labels, mask, role = fixed_inputs()
    want = released_distillm2(s, t, labels, mask, role, progress, None if anchor is None else np.array(anchor))
    got = distillm2(torch.tensor(s), torch.tensor(t), torch_batch(labels, mask, role, progress, anchor))
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_distillm2_adaptive_alpha_is_active_and_clipped():
    # the anchors above must actually move alpha somewhere (else the adaptive test is vacuous)
    s, t, labels, mask, role = fixed_inputs()
    fixed = released_distillm2(s, t, labels, mask, role, 0.3)
    for anchor in [(-0.021, 0.22), (-0.015, 0.1)]:
        got = float(distillm2(torch.tensor(s), torch.tensor(t), torch_batch(labels, mask, role, 0.3, anchor)))
        assert abs(got - fixed) > 1e-6


def test_distillm2_gradient_detaches_the_student_in_the_reverse_mixture_only():
    s, t, labels, mask, role = fixed_inputs(seed=3)
    for anchor in [None, (-0.021, 0.22)]:
        z = torch.tensor(s, requires_grad=True)
        distillm2(z, torch.tensor(t), torch_batch(labels, mask, role, 0.4, anchor)).backward()
        a = None if anchor is None else np.array(anchor)
        h = 1e-6
        for idx in [(0, 1, 2), (1, 3, 0), (2, 2, 5), (3, 1, 1), (3, 4, 6)]:
            up, down = s.copy(), s.copy()
            up[idx] += h
            down[idx] -= h
            # the mixture's q stays at the base point (sg), alpha and every other q move
            fd = (released_distillm2(up, t, labels, mask, role, 0.4, a, s_frozen=s)
                  - released_distillm2(down, t, labels, mask, role, 0.4, a, s_frozen=s)) / (2 * h)
            assert float(z.grad[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-8)
        # and NOT the gradient with q live in the mixture (the detach matters)
        up, down = s.copy(), s.copy()
        up[(3, 1, 1)] += h
        down[(3, 1, 1)] -= h
        live = (released_distillm2(up, t, labels, mask, role, 0.4, a, s_frozen=up)
                - released_distillm2(down, t, labels, mask, role, 0.4, a, s_frozen=down)) / (2 * h)
        assert abs(float(z.grad[(3, 1, 1)]) - live) > 1e-6


def test_distillm2_zero_at_equality_and_nonnegative():
    s, t, labels, mask, role = fixed_inputs(seed=5)
    zero = distillm2(torch.tensor(t), torch.tensor(t), torch_batch(labels, mask, role, 0.7))
    assert abs(float(zero)) < 1e-12
    assert float(distillm2(torch.tensor(s), torch.tensor(t), torch_batch(labels, mask, role, 0.7))) > 0


def test_beta_schedule_is_the_released_ramp():
    for t_over_T in [0.0, 0.1, 0.2, 0.25, 0.49, 0.5, 0.75, 1.0]:
        assert beta_schedule(t_over_T) == pytest.approx(1.0 + 0.5 * min(1.0, 2 * t_over_T), abs=1e-15)
    assert beta_schedule(0.3, 1.0, 1.0) == 1.0


def test_distillm2_normalizer_weights_by_tokens_and_weighted_loss_passes_the_batch():
    s, t, labels, mask, role = fixed_inputs()
    batch = torch_batch(labels, mask, role, 0.2)
    plain = float(distillm2(torch.tensor(s), torch.tensor(t), batch))
    n = float(mask.sum())
    assert float(distillm2(torch.tensor(s), torch.tensor(t), batch, normalizer=2 * n)) == pytest.approx(plain / 2)
    loss = WeightedLoss([Term(objectives.get("distillm2"), 0.5)])
    value, parts = loss(torch.tensor(s), torch.tensor(t), batch["loss_mask"], labels=batch["labels"],
                        normalizer=n, batch=batch)
    assert float(value) == pytest.approx(0.5 * plain, rel=1e-12)
    with pytest.raises(ValueError, match="needs batch"):
        loss(torch.tensor(s), torch.tensor(t), batch["loss_mask"], labels=batch["labels"], normalizer=n)


def test_distillm2_refuses_the_per_position_path():
    s, t, labels, mask, role = fixed_inputs()
    with pytest.raises(objectives.ObjectiveError, match="sequence-level"):
        objectives.get("distillm2")(torch.tensor(s), torch.tensor(t), torch.tensor(mask))


def test_distillm2_objective_parameters_are_checked():
    with pytest.raises(objectives.ObjectiveError, match="alpha"):
        objectives.get("distillm2", alpha=1.5)
    with pytest.raises(objectives.ObjectiveError, match="does not accept"):
        objectives.get("distillm2", gamma=1.0)


# ------------------------------------------------------------------------------------------- the modes
@pytest.fixture(scope="module")
def tiny():
    data = generate_tiny(seed=0, n_train=64, n_valid=10, n_test=10, prompt_style="short")
    tok = train_tokenizer(item_texts(data["train"]), 300)
    examples = [encode(tok, it, MAX_PROMPT, MAX_LEN) for it in data["train"]]
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return {"tok": tok, "examples": examples, "special": special}


def model(tiny, seed, force_token=None, layers=1, width=32):
    """A tiny GPT-2; ``force_token``: a logit bias that makes that token (nearly) every sample."""
    m = build_tiny({"arch": "gpt2", "n_layer": layers, "n_embd": width, "n_head": 2}, len(tiny["tok"]), seed=seed,
                   max_positions=64, special_ids=tiny["special"])
    if force_token is not None:
        bias = torch.zeros(len(tiny["tok"]))
        bias[force_token] = 60.0
        m.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    return m


TEACHER_TOKEN, STUDENT_TOKEN = 11, 12


def ctx(tiny, *, student, teacher, seed=0, steps=4):
    examples, pad = tiny["examples"], tiny["tok"].pad_token_id

    def reference(i):
        idx = batch_order(len(examples), BS, seed, i)
        batch = collate([examples[j] for j in idx], pad)
        batch["example_ids"] = torch.tensor(idx)
        return batch

    return ModeContext(reference=reference, student=student, tokenizer=tiny["tok"], pad_id=pad, seed=seed,
                       max_steps=steps, batch_size=BS, n_train=len(examples), max_length=MAX_LEN,
                       max_new_tokens=NEW, teacher=teacher)


def responses(batch):
    return [batch["input_ids"][b, int(batch["prompt_len"][b]):int(batch["lengths"][b])].tolist()
            for b in range(batch["input_ids"].shape[0])]


def test_seq_kd_trains_on_teacher_samples_and_student_samples_for_lambda(tiny):
    student, teacher = model(tiny, 1, STUDENT_TOKEN), model(tiny, 2, TEACHER_TOKEN)
    assert needs_student_samples("seq_kd")
    src = build("seq_kd", {"lmbda": 0.0}, ctx(tiny, student=student, teacher=teacher))
    for i in range(3):
        batch = src(i)
        assert batch["source"] == "generated"
        assert all(r == [TEACHER_TOKEN] * NEW for r in responses(batch))
        assert batch["loss_mask"].sum() == BS * NEW
    assert src.counts["teacher_generated"] == 3 and src.counts["generated"] == 0
    src = build("seq_kd", {"lmbda": 0.5}, ctx(tiny, student=student, teacher=teacher, seed=3))
    for i in range(8):
        r = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, i, 1]))).random()
        want = STUDENT_TOKEN if r < 0.5 else TEACHER_TOKEN
        assert all(x == [want] * NEW for x in responses(src(i)))
    stats = src.stats
    assert stats["batches"]["generated"] + stats["batches"]["teacher_generated"] == 8
    gen = stats["generation"]
    assert gen["teacher_generated_tokens"] == stats["batches"]["teacher_generated"] * BS * NEW
    assert gen["student_generated_tokens"] == stats["batches"]["generated"] * BS * NEW
    assert src.timings["generation_s"] >= src.timings["teacher_generation_s"] > 0
    assert gen["teacher_tokens_per_s"] > 0


def test_teacher_sampling_modes_need_the_teacher(tiny):
    student = model(tiny, 1)
    for mode in ("seq_kd", "distillm2"):
        with pytest.raises(ValueError, match="ctx.teacher"):
            build(mode, {}, ctx(tiny, student=student, teacher=None))


def test_distillm2_mode_pairs_teacher_and_student_samples_and_measures_anchors(tiny):
    student, teacher = model(tiny, 1, STUDENT_TOKEN), model(tiny, 2, TEACHER_TOKEN)
    src = build("distillm2", {"anchor_batches": 1, "top_p": 1.0}, ctx(tiny, student=student, teacher=teacher,
                                                                       steps=4))
    first = src(0)
    assert first["input_ids"].shape[0] == 2 * BS
    assert first["pair_role"].tolist() == [0] * BS + [1] * BS
    got = responses(first)
    assert got[:BS] == [[TEACHER_TOKEN] * NEW] * BS and got[BS:] == [[STUDENT_TOKEN] * NEW] * BS
    assert torch.isnan(first["alpha_anchor"]).all() and float(first["progress"]) == 0.0
    # the anchors, written out from the two models' logits on the first batch
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
                               .double(), -1).numpy()
        lq = torch.log_softmax(student(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
                               .double(), -1).numpy()
    labels, m = first["labels"].numpy(), first["loss_mask"].numpy() > 0
    sp = np.array([np.exp(np.mean([lp[b, k, labels[b, k]] for k in range(labels.shape[1]) if m[b, k]]))
                   for b in range(2 * BS)])
    sq = np.array([np.exp(np.mean([lq[b, k, labels[b, k]] for k in range(labels.shape[1]) if m[b, k]]))
                   for b in range(2 * BS)])
    want = [np.mean((sp - sq)[:BS]), np.mean((sq - sp)[BS:])]
    second = src(1)
    np.testing.assert_allclose(second["alpha_anchor"].numpy(), want, rtol=1e-5, atol=1e-7)
    assert src(3)["progress"] == pytest.approx(3 / 4)
    fixed = build("distillm2", {"anchor_batches": 0}, ctx(tiny, student=student, teacher=teacher))
    assert all(torch.isnan(fixed(i)["alpha_anchor"]).all() for i in range(2))



def switchable(tiny, seed, token):
    """A tiny GPT-2 whose samples are (nearly) all ``token``; ``m.force[0] = other`` switches the token."""
    m = model(tiny, seed)
    m.force = [token]

    def hook(mod, inp, out):
        bias = torch.zeros(out.shape[-1])
        bias[m.force[0]] = 60.0
        return out + bias

    m.lm_head.register_forward_hook(hook)
    return m


def test_distillm2_samples_once_from_the_initial_student_and_reuses_pairs_across_epochs(tiny):
    student, teacher = switchable(tiny, 1, STUDENT_TOKEN), model(tiny, 2, TEACHER_TOKEN)
    steps = 20  # 20 x 4 rows > 64 examples: the run's second epoch meets every prompt again
    src = build("distillm2", {"anchor_batches": 0}, ctx(tiny, student=student, teacher=teacher, steps=steps))
    assert src.sampling == "once"  # the released pipeline's default
    first = src(0)
    student.force[0] = 13  # the student changes after the pairs were drawn (as training changes it)
    later = [src(i) for i in range(1, steps)]
    for batch in [first] + later:
        got = responses(batch)
        assert got[:BS] == [[TEACHER_TOKEN] * NEW] * BS and got[BS:] == [[STUDENT_TOKEN] * NEW] * BS
    # every prompt of the run was sampled, once, before the first batch came back
    seen = {j for i in range(steps) for j in ctx(tiny, student=student, teacher=teacher).reference(i)
            ["example_ids"].tolist()}
    assert set(src.pairs["teacher"]) == set(src.pairs["student"]) == seen and len(seen) == len(tiny["examples"])
    assert src.sampled["samples"] == src.teacher_sampled["samples"] == len(seen)
    # a prompt met in two epochs trains on the same pair; each row's prompt is its example's prompt
    rows, reference = {}, ctx(tiny, student=student, teacher=teacher).reference
    for i, batch in enumerate([first] + later):
        for b, j in enumerate(reference(i)["example_ids"].tolist()):
            pair = [batch["input_ids"][r, : int(batch["lengths"][r])].tolist() for r in (b, BS + b)]
            assert rows.setdefault(j, pair) == pair
            example = tiny["examples"][j]
            assert all(row[: example["prompt_len"]] == example["input_ids"][: example["prompt_len"]] for row in pair)
    # per_batch: fresh samples of the CURRENT student
    fresh = build("distillm2", {"anchor_batches": 0, "sampling": "per_batch"},
                  ctx(tiny, student=student, teacher=teacher, steps=steps))
    assert responses(fresh(0))[BS:] == [[13] * NEW] * BS and fresh.pairs is None


def test_distillm2_pairs_resume_from_the_state_without_sampling_again(tiny):
    student, teacher = switchable(tiny, 1, STUDENT_TOKEN), model(tiny, 2, TEACHER_TOKEN)
    src = build("distillm2", {"anchor_batches": 1}, ctx(tiny, student=student, teacher=teacher, steps=6))
    want = [src(i) for i in range(6)]
    state = src.state_dict()
    assert state["pairs"]["student"]["tokens"].dtype == torch.int32  # flat tensors, not a list per row
    student.force[0] = 13  # a resumed run's student is not the initial one: the pairs must come from the state
    again = build("distillm2", {"anchor_batches": 1}, ctx(tiny, student=student, teacher=teacher, steps=6))
    again.load_state_dict(state)
    spent = again.timings["generation_s"]
    for i in range(3, 6):
        got, ref = again(i), want[i]
        for key in ("input_ids", "labels", "loss_mask", "pair_role", "alpha_anchor"):
            assert torch.equal(got[key], ref[key]), key
    assert again.timings["generation_s"] == spent and again.pairs == src.pairs


def test_distillm2_sampling_once_is_seeded_by_the_run_seed(tiny):
    student, teacher = model(tiny, 1), model(tiny, 2)
    a = build("distillm2", {}, ctx(tiny, student=student, teacher=teacher, seed=5))
    b = build("distillm2", {}, ctx(tiny, student=student, teacher=teacher, seed=5))
    c = build("distillm2", {}, ctx(tiny, student=student, teacher=teacher, seed=6))
    assert torch.equal(a(0)["input_ids"], b(0)["input_ids"]) and a.pairs == b.pairs
    c(0)
    assert c.pairs["student"] != a.pairs["student"]


def test_distillm2_sampling_once_needs_example_ids(tiny):
    student, teacher = model(tiny, 1), model(tiny, 2)
    base = ctx(tiny, student=student, teacher=teacher)
    plain = ModeContext(reference=lambda i: {k: v for k, v in base.reference(i).items() if k != "example_ids"},
                        student=student, tokenizer=tiny["tok"], pad_id=base.pad_id, max_steps=2, batch_size=BS,
                        max_length=MAX_LEN, max_new_tokens=NEW, teacher=teacher)
    with pytest.raises(ValueError, match="example_ids.*per_batch"):
        build("distillm2", {}, plain)(0)
    assert build("distillm2", {"sampling": "per_batch"}, plain)(0)["input_ids"].shape[0] == 2 * BS

def test_modes_train_end_to_end_and_record_generation(tiny):
    for mode, term in (("seq_kd", objectives.get("jsd", beta=0.5)), ("distillm2", objectives.get("distillm2"))):
        student, teacher = model(tiny, 1), model(tiny, 2, layers=2, width=48).eval()
        src = build(mode, {}, ctx(tiny, student=student, teacher=teacher, steps=4))
        before = [p.detach().clone() for p in student.parameters()]

        def teacher_logits(batch):
            return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        cfg = TrainConfig(max_steps=4, per_device_train_batch_size=BS, learning_rate=3e-3, max_length=MAX_LEN,
                          max_prompt_tokens=MAX_PROMPT, log_every=1)
        result = train(student, src, cfg, seed=0, loss=WeightedLoss([Term(term, 1.0)]),
                       teacher_logits=teacher_logits, progress=False)
        assert result.steps == 4 and all(math.isfinite(v) for _, v in result.curve)
        assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
        gen = src.stats["generation"]
        assert gen["teacher_generated_tokens"] > 0 and src.timings["teacher_generation_s"] > 0
        # resumable: the state round-trips
        again = build(mode, {}, ctx(tiny, student=student, teacher=teacher, steps=4))
        again.load_state_dict(src.state_dict())
        assert again.stats == src.stats


def test_distillm2_padded_vocabulary_rows_contribute_nothing():
    from harness.models import align_vocab

    s, t, labels, mask, role = fixed_inputs(seed=7, V=7)
    teacher = np.concatenate([t, np.random.default_rng(1).normal(size=t.shape[:-1] + (3,))], -1)  # 3 extra rows
    z_s, z_t = align_vocab(torch.tensor(s), torch.tensor(teacher), n_tokens=7)
    z_s = z_s.clone().requires_grad_()
    for anchor in (None, (-0.021, 0.22)):
        batch = torch_batch(labels, mask, role, 0.6, anchor)
        padded = distillm2(z_s, z_t, batch)
        plain = distillm2(torch.tensor(s), torch.tensor(t), batch)
        assert torch.isfinite(padded) and float(padded.detach()) == pytest.approx(float(plain.detach()), rel=1e-10)
        z_s.grad = None
        padded.backward()
        assert torch.isfinite(z_s.grad).all() and torch.all(z_s.grad[..., 7:] == 0)
