"""Tests for harness.modes: off-policy, on-policy (GKD) and DistiLLM's adaptive off-policy (SGO)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import objectives
from harness.data.batching import collate, encode
from harness.data.tiny import generate_tiny
from harness.data.tokenizer import item_texts, train_tokenizer
from harness.distill import TrainConfig, batch_order, train
from harness.models import build_tiny
from harness.modes import (
    AdaptiveThreshold,
    ReplayBuffer,
    batch_source,
    choose_source,
    sample_rows,
    validation_loss,
)
from harness.recipes import load_recipe

REPO = Path(__file__).resolve().parents[1]
BS, MAX_LEN, MAX_PROMPT, STEPS = 4, 48, 32, 6


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():
    data = generate_tiny(seed=0, n_train=200, n_valid=10, n_test=10, prompt_style="short")
    tok = train_tokenizer(item_texts(data["train"]), 300)
    examples = [encode(tok, it, MAX_PROMPT, MAX_LEN) for it in data["train"]]
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    teacher = build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 48, "n_head": 2}, len(tok), seed=100,
                         max_positions=64, special_ids=special).eval()
    return {"data": data, "tok": tok, "examples": examples, "special": special, "teacher": teacher}


def make_student(tiny, eos_bias: float = 0.0):
    model = build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}, len(tiny["tok"]), seed=7,
                       max_positions=64, special_ids=tiny["special"])
    if eos_bias:  # make eos likely enough that some samples stop early and some hit the budget
        bias = torch.zeros(len(tiny["tok"]))
        bias[tiny["tok"].eos_token_id] = eos_bias
        model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    return model


def reference(tiny, seed: int = 0):
    examples, pad = tiny["examples"], tiny["tok"].pad_token_id

    def next_batch(i: int) -> dict:
        idx = batch_order(len(examples), BS, seed, i)
        batch = collate([examples[j] for j in idx], pad)
        batch["example_ids"] = torch.tensor(idx)
        return batch

    return next_batch


def source(tiny, mode, params=None, *, student, seed=0, val_loss=None, steps=STEPS, accum=1):
    return batch_source(mode, params or {}, reference=reference(tiny, seed), student=student, tokenizer=tiny["tok"],
                        examples=tiny["examples"], pad_id=tiny["tok"].pad_token_id, seed=seed, max_steps=steps,
                        grad_accum=accum, max_length=MAX_LEN, val_loss=val_loss)


def run(tiny, src, student, *, seed=0, steps=STEPS, accum=1, teacher_seen=None):
    teacher = tiny["teacher"]

    def teacher_logits(batch):
        if teacher_seen is not None:
            teacher_seen.append(batch["input_ids"].clone())
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    cfg = TrainConfig(max_steps=steps, per_device_train_batch_size=BS, gradient_accumulation_steps=accum,
                      learning_rate=3e-3, max_length=MAX_LEN, max_prompt_tokens=MAX_PROMPT, log_every=1)
    return train(student, src, cfg, seed=seed, objective=objectives.get("fkl"), teacher_logits=teacher_logits,
                 progress=False)


def off_policy_curve(tiny, seed=0, steps=STEPS, accum=1):
    student = make_student(tiny)
    return run(tiny, source(tiny, "off_policy", student=student, seed=seed, steps=steps, accum=accum), student,
               seed=seed, steps=steps, accum=accum).curve


class Recorder:
    """Wraps a batch source and keeps what it returned."""

    def __init__(self, src):
        self.src, self.batches = src, []

    def __call__(self, i):
        batch = self.src(i)
        self.batches.append(batch)
        return batch


# ----------------------------------------------------------------------------------------------- pieces
def test_replay_buffer_capacity_eviction_and_sampling():
    buf = ReplayBuffer(3)
    buf.push([{"input_ids": [k], "prompt_len": 0} for k in range(5)])
    assert len(buf) == 3
    assert [r["input_ids"][0] for r in buf.rows()] == [2, 3, 4]  # FIFO: the oldest two evicted
    draw = buf.sample(2, np.random.default_rng(0))
    assert len(draw) == 2 and len({r["input_ids"][0] for r in draw}) == 2  # without replacement
    assert draw == buf.sample(2, np.random.default_rng(0))  # seeded
    with pytest.raises(ValueError):
        buf.sample(4, np.random.default_rng(0))
    with pytest.raises(ValueError):
        ReplayBuffer(0)
    rng = np.random.default_rng(1)
    counts = np.bincount([buf.sample(1, rng)[0]["input_ids"][0] for _ in range(3000)], minlength=5)
    assert counts[:2].sum() == 0 and all(900 < c < 1100 for c in counts[2:])  # uniform over the buffer


def test_threshold_rises_only_on_a_rise_of_at_least_the_margin():
    th = AdaptiveThreshold(step=0.1, margin=0.1)
    assert th.alpha == 0.0
    assert th.update(2.0) is False  # first check: the reference only
    assert th.update(1.5) is False and th.alpha == 0.0  # a fall
    assert th.update(1.55) is False and th.alpha == 0.0  # a rise smaller than the margin
    assert th.update(1.65) is True and th.alpha == pytest.approx(0.1)  # exactly the margin (float round-off)
    assert th.update(1.9) is True and th.alpha == pytest.approx(0.2)
    assert th.update(1.9) is False and th.alpha == pytest.approx(0.2)  # flat
    assert th.update(float("nan")) is False and th.update(2.0) is True  # a NaN check is ignored
    assert [h["rose"] for h in th.history] == [False, False, False, True, True, False, False, True]
    capped = AdaptiveThreshold(step=0.6, margin=0.1)
    for loss in (1.0, 2.0, 3.0):
        capped.update(loss)
    assert capped.alpha == 1.0
    # DistiLLM's finetune.py compares with the loss at the last rise, not the last check
    distillm = AdaptiveThreshold(step=0.1, margin=0.1, compare_to="last_rise")
    assert [distillm.update(x) for x in (2.0, 1.5, 1.65, 2.1)] == [False, False, False, True]


@pytest.mark.parametrize("r, alpha, step, max_steps, expected", [
    (0.0, 0.0, 0, 100, "reference"),  # alpha = 0: always the reference
    (0.999, 0.0, 50, 100, "reference"),
    (0.3, 0.5, 0, 100, "generated"),  # s = 0.5
    (0.5, 0.5, 0, 100, "reference"),  # r = alpha is not below alpha
    (0.2, 0.5, 50, 100, "generated"),  # s = 0.25
    (0.3, 0.5, 50, 100, "replay"),  # s <= r < alpha
    (0.01, 0.5, 100, 100, "replay"),  # s = 0 at the last step: no fresh generation
    (0.99, 1.0, 0, 100, "generated"),
    (0.6, 0.5, 10, 100, "reference"),
])
def test_choose_source_table(r, alpha, step, max_steps, expected):
    assert choose_source(r, alpha, step, max_steps) == expected


def test_sample_rows_respects_max_length_and_restores_mode(tiny):
    student = make_student(tiny).train()
    prompts = [e["input_ids"][: e["prompt_len"]] for e in tiny["examples"][:4]]
    modes = []
    orig = student.generate

    def spy(*a, **kw):
        modes.append(student.training)
        return orig(*a, **kw)

    student.generate = spy
    before = torch.get_rng_state()
    limit = max(len(p) for p in prompts) + 3
    rows = sample_rows(student, prompts, eos_id=tiny["tok"].eos_token_id, pad_id=tiny["tok"].pad_token_id,
                       temperature=1.0, max_new_tokens=8, max_length=limit, seed=5)
    assert modes == [False] and student.training  # eval while sampling, train mode restored
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is untouched
    assert all(len(r["input_ids"]) <= limit and 1 <= r["sample_len"] <= 3 for r in rows)
    assert [r["input_ids"][: r["prompt_len"]] for r in rows] == prompts
    again = sample_rows(student, prompts, eos_id=tiny["tok"].eos_token_id, pad_id=tiny["tok"].pad_token_id,
                        temperature=1.0, max_new_tokens=8, max_length=limit, seed=5)
    assert again == rows  # seeded


def test_batch_source_rejects_bad_configuration(tiny):
    student = make_student(tiny)
    with pytest.raises(ValueError, match="unknown training mode"):
        source(tiny, "mixed", student=student)
    with pytest.raises(ValueError, match="unknown mode parameter"):
        source(tiny, "on_policy", {"lambda": 0.5}, student=student)
    with pytest.raises(ValueError, match="val_loss"):
        source(tiny, "adaptive_off_policy", student=student)
    with pytest.raises(ValueError, match="lmbda"):
        source(tiny, "on_policy", {"lmbda": 1.5}, student=student)


def test_validation_loss_is_the_student_ce_without_grad(tiny):
    student = make_student(tiny).train()
    val = validation_loss(student, tiny["tok"], tiny["data"]["valid"], pad_id=tiny["tok"].pad_token_id,
                          max_prompt_tokens=MAX_PROMPT, max_length=MAX_LEN, batch_size=4)
    loss = val()
    assert math.isfinite(loss) and abs(loss - math.log(len(tiny["tok"]))) < 1.0  # ~ uniform at init
    assert student.training and all(p.grad is None for p in student.parameters())
    assert val() == loss


# ----------------------------------------------------------------------------------------------- modes in train()
def test_off_policy_is_the_identity(tiny):
    student = make_student(tiny)
    src = source(tiny, "off_policy", student=student)
    ref = reference(tiny)
    for i in range(3):
        a, b = src(i), ref(i)
        assert a.pop("source") == "reference"
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert src.timings["generation_s"] == 0.0


def test_adaptive_with_threshold_at_zero_equals_off_policy(tiny):
    calls = []

    def flat_val_loss():  # never rises: alpha stays 0
        calls.append(1)
        return 1.0

    student = make_student(tiny)
    src = source(tiny, "adaptive_off_policy", {"check_every": 2}, student=student, val_loss=flat_val_loss)
    result = run(tiny, src, student)
    assert result.curve == off_policy_curve(tiny)
    assert src.stats["batches"] == {"reference": STEPS, "generated": 0, "replay": 0}
    assert src.stats["threshold"] == 0.0 and len(calls) == 3  # before steps 0, 2, 4
    assert src.timings["generation_s"] == 0.0


def test_on_policy_lmbda_zero_equals_off_policy(tiny):
    student = make_student(tiny)
    src = source(tiny, "on_policy", {"lmbda": 0.0}, student=student)
    assert run(tiny, src, student).curve == off_policy_curve(tiny)
    assert src.stats["batches"]["generated"] == 0


def test_on_policy_lmbda_one_trains_on_samples_only(tiny):
    student = make_student(tiny, eos_bias=3.3)
    generated = []
    orig = student.generate

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        generated.append((kwargs["input_ids"].shape[1], out.clone()))
        return out

    student.generate = spy
    src = Recorder(source(tiny, "on_policy", {"lmbda": 1.0, "max_new_tokens": 8}, student=student))
    run(tiny, src, student)
    eos = tiny["tok"].eos_token_id
    assert len(src.batches) == len(generated) == STEPS
    assert all(b["source"] == "generated" and "example_ids" not in b for b in src.batches)
    ended = []
    for i, (batch, (width, out)) in enumerate(zip(src.batches, generated)):
        ref = reference(tiny)(i)
        for b in range(BS):
            plen = int(ref["prompt_len"][b])
            sample = out[b, width:].tolist()
            sample = sample[: sample.index(eos) + 1] if eos in sample else sample
            ended.append(sample[-1] == eos)
            n = plen + len(sample)
            assert batch["input_ids"][b, :n].tolist() == ref["input_ids"][b, :plen].tolist() + sample
            assert int(batch["lengths"][b]) == n and int(batch["prompt_len"][b]) == plen
            # the loss covers exactly the sampled tokens (incl. the eos that stopped it), with them as targets
            mask = batch["loss_mask"][b]
            assert int(mask.sum()) == len(sample) and bool(mask[plen - 1 : n - 1].all())
            assert batch["labels"][b, plen - 1 : n - 1].tolist() == sample
        assert torch.equal(batch["prompt_example_ids"], ref["example_ids"])
    assert any(ended) and not all(ended)  # both stopped-at-eos and budget-truncated samples were checked
    assert src.src.stats["batches"] == {"reference": 0, "generated": STEPS, "replay": 0}
    assert src.src.timings["generation_s"] > 0 and student.training is False  # train() leaves eval mode


def test_generated_batches_are_scored_by_the_teacher(tiny):
    student = make_student(tiny)
    seen = []
    src = Recorder(source(tiny, "on_policy", {"lmbda": 0.5, "max_new_tokens": 4}, student=student))
    run(tiny, src, student, teacher_seen=seen)
    kinds = [b["source"] for b in src.batches]
    assert "generated" in kinds and "reference" in kinds
    assert len(seen) == len(src.batches)
    assert all(torch.equal(t, b["input_ids"]) for t, b in zip(seen, src.batches))


def rising_val_loss():
    losses = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    return lambda: next(losses)


def test_adaptive_generates_replays_and_is_deterministic(tiny):
    params = {"check_every": 1, "threshold_step": 0.5, "loss_margin": 0.1, "buffer_capacity": 6,
              "max_new_tokens": 4}
    runs = []
    for _ in range(2):
        student = make_student(tiny)
        src = Recorder(source(tiny, "adaptive_off_policy", params, student=student, val_loss=rising_val_loss(),
                              steps=8))
        result = run(tiny, src, student, steps=8)
        runs.append((result.curve, src.src.stats, [b["source"] for b in src.batches]))
    (curve_a, stats_a, kinds_a), (curve_b, stats_b, kinds_b) = runs
    assert curve_a == curve_b and stats_a == stats_b and kinds_a == kinds_b
    assert stats_a["batches"]["generated"] > 0 and stats_a["batches"]["replay"] > 0
    assert stats_a["buffer_size"] <= 6 and stats_a["threshold"] == 1.0
    assert [h["alpha"] for h in stats_a["threshold_history"]][:3] == [0.0, 0.5, 1.0]


def test_on_policy_seeded_run_is_deterministic_and_leaves_global_rng_alone(tiny):
    curves = []
    for _ in range(2):
        student = make_student(tiny)
        src = source(tiny, "on_policy", {"lmbda": 0.5, "max_new_tokens": 4}, student=student, seed=3)
        curves.append((run(tiny, src, student, seed=3).curve, src.stats))
    assert curves[0] == curves[1]
    student = make_student(tiny)
    src = source(tiny, "on_policy", {"lmbda": 1.0, "max_new_tokens": 4}, student=student)
    state = torch.get_rng_state()
    src(0)
    assert torch.equal(state, torch.get_rng_state())


def test_adaptive_state_round_trip_continues_identically(tiny, tmp_path):
    """A source restored from ``state_dict`` (buffer, threshold, counts) serves the same batches as one that never
    stopped (what a resumed run needs; the student is held fixed here)."""
    params = {"check_every": 1, "threshold_step": 0.5, "buffer_capacity": 8, "max_new_tokens": 3}
    student = make_student(tiny)
    whole = source(tiny, "adaptive_off_policy", params, student=student, val_loss=rising_val_loss(), steps=8)
    expected = [whole(i) for i in range(8)]
    first = source(tiny, "adaptive_off_policy", params, student=student, val_loss=rising_val_loss(), steps=8)
    for i in range(4):
        first(i)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    losses = rising_val_loss()
    for _ in range(4):  # the validation losses already seen
        losses()
    second = source(tiny, "adaptive_off_policy", params, student=student, val_loss=losses, steps=8)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    got = [second(i) for i in range(4, 8)]
    assert {b["source"] for b in got} >= {"generated", "replay"}
    for a, b in zip(expected[4:], got):
        assert a["source"] == b["source"] and torch.equal(a["input_ids"], b["input_ids"])
    assert second.stats == whole.stats


def test_val_loss_checked_every_check_every_optimizer_steps_under_accumulation(tiny):
    calls = []

    def val_loss():
        calls.append(1)
        return 1.0

    student = make_student(tiny)
    src = Recorder(source(tiny, "adaptive_off_policy", {"check_every": 1}, student=student, val_loss=val_loss,
                          steps=3, accum=2))
    run(tiny, src, student, steps=3, accum=2)
    assert len(src.batches) == 6 and len(calls) == 3  # micro-batches 0, 2, 4
    assert [h["step"] for h in src.src.stats["threshold_history"]] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name, objective, mode, params", [
    ("distillm", "srkl", "adaptive_off_policy", {"buffer_capacity": 1000, "threshold_step": 0.1, "loss_margin": 0.1,
                                                  "temperature": 1.0}),
    ("gkd", "jsd", "on_policy", {"lmbda": 0.5, "temperature": 0.9}),
    ("imitkd", "fkl", "on_policy", {"lmbda": 1.0, "temperature": 1.0}),
])
def test_recipes(name, objective, mode, params):
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.objective == objective and recipe.mode == mode and recipe.uses_teacher
    assert {k: recipe.mode_params[k] for k in params} == params
    assert recipe.mode_params["max_new_tokens"] == 8
