"""Tests for harness.modes: the registry, off-policy, on-policy (GKD, TRL) and DistiLLM's adaptive off-policy schedule.

DistiLLM's rules are pinned to jongwooko/distillm@d47e77ff9d27721783b32213be38c1204230cc0a ``finetune.py``
(l.265-267 initial evaluation, l.291-298 s, l.301-325 the branch, l.411-417 the threshold update); the expected
values below are written out from those lines, not computed by the harness.
"""

from __future__ import annotations

import textwrap
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
    BatchSource,
    ModeContext,
    ReplayBuffer,
    available,
    batch_source,
    build,
    card,
    check_params,
    choose_source,
    needs_student_samples,
    needs_val_loss,
    params,
    register_mode,
    sample_rows,
    sgo_threshold,
    validation_loss,
)
from harness.schema import ConfigError, Field, read_yaml

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
    if eos_bias:  # shift eos: likely (some samples stop early, some hit the budget) or impossible (never stop)
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


def context(tiny, *, student, seed=0, val_loss=None, steps=STEPS, accum=1, world=1, max_new_tokens=8,
            n_train=None):
    return ModeContext(reference=reference(tiny, seed), student=student, tokenizer=tiny["tok"],
                       pad_id=tiny["tok"].pad_token_id, seed=seed, max_steps=steps, grad_accum=accum,
                       world_size=world, batch_size=BS, n_train=n_train or len(tiny["examples"]),
                       max_length=MAX_LEN, max_new_tokens=max_new_tokens, val_loss=val_loss)


def source(tiny, mode, mode_params=None, **kw):
    return build(mode, mode_params or {}, context(tiny, **kw))


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


def r_draw(seed: int, i: int) -> float:
    """The adaptive mode's documented draw for micro-batch i: U(0,1) from SeedSequence([seed, i, 3])."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i, 3]))).random()


class Recorder:
    """Wraps a batch source and keeps what it returned."""

    def __init__(self, src):
        self.src, self.batches = src, []

    def __call__(self, i):
        batch = self.src(i)
        self.batches.append(batch)
        return batch


def scripted(*losses):
    it = iter(losses)
    return lambda: next(it)


# ----------------------------------------------------------------------------------------------- registry
def test_registry_lists_modes_and_their_parameters():
    assert {"off_policy", "on_policy", "adaptive_off_policy"} <= set(available())
    assert params("off_policy") == {}
    assert set(params("on_policy")) == {"lmbda", "temperature", "top_k", "top_p", "replay_capacity"}
    assert set(params("adaptive_off_policy")) == {
        "buffer_capacity", "init_threshold", "threshold_step", "loss_margin", "check_every", "compare_to",
        "replay_ratio", "temperature", "top_k", "top_p"}
    assert all(isinstance(f, Field) for m in available() for f in params(m).values())
    # budgets are the suite's: no mode takes max_new_tokens
    assert not any("max_new_tokens" in params(m) for m in available())
    # TRL GKDConfig defaults; DistiLLM's released defaults
    assert {k: f.default for k, f in params("on_policy").items()} == {
        "lmbda": 0.5, "temperature": 0.9, "top_k": 0, "top_p": 1.0, "replay_capacity": 0}
    assert {k: f.default for k, f in params("adaptive_off_policy").items()} == {
        "buffer_capacity": 1000, "init_threshold": 0.0, "threshold_step": 0.1, "loss_margin": 0.1,
        "check_every": "epoch", "compare_to": "last_rise", "replay_ratio": "decreasing", "temperature": 1.0,
        "top_k": 0, "top_p": 1.0}
    assert (needs_student_samples("off_policy"), needs_student_samples("on_policy"),
            needs_student_samples("adaptive_off_policy")) == (False, True, True)
    assert (needs_val_loss("on_policy"), needs_val_loss("adaptive_off_policy")) == (False, True)
    assert "lmbda = 0.5" in card("on_policy") and "GKD" in card("on_policy")


def test_unknown_mode_lists_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        params("on_polcy")
    msg = str(err.value)
    assert "unknown training mode 'on_polcy'" in msg and "did you mean 'on_policy'" in msg
    assert all(m in msg for m in ("adaptive_off_policy", "off_policy", "on_policy"))
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        params("no_such_module_xyz:Mode")


@pytest.mark.parametrize("mode, bad, message", [
    ("on_policy", {"lambda": 0.5}, "unknown key 'mode_params.lambda'"),
    ("on_policy", {"max_new_tokens": 8}, "unknown key 'mode_params.max_new_tokens'"),
    ("on_policy", {"lmbda": 1.5}, "'mode_params.lmbda' must lie in [0, 1]"),
    ("on_policy", {"temperature": 0.0}, "'mode_params.temperature' must be > 0"),
    ("on_policy", {"replay_capacity": -1}, "'mode_params.replay_capacity' must be >= 0"),
    ("adaptive_off_policy", {"check_every": "weekly"}, "'mode_params.check_every' must be a number of optimizer"),
    ("adaptive_off_policy", {"check_every": 0}, "'mode_params.check_every' must be >= 1"),
    ("adaptive_off_policy", {"compare_to": "previous"}, "accepted values: last_rise, last_check"),
    ("adaptive_off_policy", {"replay_ratio": "random"}, "accepted values: decreasing, constant, increasing"),
    ("adaptive_off_policy", {"buffer_capacity": True}, "'mode_params.buffer_capacity' must be integer"),
])
def test_check_params_refuses_bad_values_in_one_line(mode, bad, message):
    with pytest.raises(ConfigError) as err:
        check_params(mode, bad, "recipes/x.yaml")
    assert str(err.value).startswith("recipes/x.yaml: ") and message in str(err.value) and "\n" not in str(err.value)


def test_check_params_fills_defaults():
    assert check_params("on_policy", {"lmbda": 1}, "r.yaml") == {
        "lmbda": 1.0, "temperature": 0.9, "top_k": 0, "top_p": 1.0, "replay_capacity": 0}
    assert check_params("adaptive_off_policy", {"check_every": 20}, "r.yaml")["check_every"] == 20


@register_mode("test_every_other")
class EveryOther(BatchSource):
    """A user's mode registered from the test module: reference batch 2i + offset."""

    params = {"offset": Field((int,), 0, ge=0, help="added to 2i")}

    def __init__(self, ctx, *, offset):
        super().__init__(ctx, offset=offset)
        self.offset = offset

    def __call__(self, i):
        return self._reference(2 * i + self.offset)


def test_a_user_registered_mode_is_built_and_validated(tiny):
    assert "test_every_other" in available() and EveryOther.name == "test_every_other"
    src = build("test_every_other", {"offset": 1}, context(tiny, student=None))
    assert torch.equal(src(3)["input_ids"], reference(tiny)(7)["input_ids"])
    assert src.stats == {"mode": "test_every_other", "batches": {"reference": 1, "generated": 0, "replay": 0}}
    with pytest.raises(ConfigError, match="'mode_params.offset' must be >= 0"):
        check_params("test_every_other", {"offset": -1}, "r.yaml")
    with pytest.raises(ValueError, match="already registered"):
        register_mode("on_policy")(EveryOther)
    with pytest.raises(TypeError, match="not a subclass"):
        register_mode("not_a_source")(object)


def test_a_mode_in_the_users_own_file(tiny, tmp_path):
    (tmp_path / "my_modes.py").write_text(textwrap.dedent('''
        from harness.modes import BatchSource
        from harness.schema import Field

        class Shifted(BatchSource):
            """Reference batch i + shift."""
            params = {"shift": Field((int,), 5, ge=0)}

            def __init__(self, ctx, *, shift):
                super().__init__(ctx, shift=shift)
                self.shift = shift

            def __call__(self, i):
                return self._reference(i + self.shift)
    '''))
    name = "my_modes.py:Shifted"
    assert check_params(name, {}, "r.yaml", base_dir=tmp_path) == {"shift": 5}
    src = build(name, {"shift": 2}, context(tiny, student=None), base_dir=tmp_path)
    assert torch.equal(src(0)["input_ids"], reference(tiny)(2)["input_ids"])
    assert not needs_student_samples(name, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="has no attribute 'Missing'"):
        params("my_modes.py:Missing", base_dir=tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        params("other.py:Shifted", base_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- pieces
def test_replay_buffer_capacity_eviction_and_sampling():
    buf = ReplayBuffer(3)
    buf.push([{"input_ids": [k], "prompt_len": 0} for k in range(2)])
    assert not buf.full
    buf.push([{"input_ids": [k], "prompt_len": 0} for k in range(2, 5)])
    assert len(buf) == 3 and buf.full
    assert [r["input_ids"][0] for r in buf.rows()] == [2, 3, 4]  # FIFO: the oldest two evicted
    draw = buf.sample(2, np.random.default_rng(0))
    assert len(draw) == 2 and len({r["input_ids"][0] for r in draw}) == 2  # without replacement
    assert draw == buf.sample(2, np.random.default_rng(0))  # seeded
    with pytest.raises(ValueError):
        buf.sample(4, np.random.default_rng(0))
    with pytest.raises(ValueError):
        ReplayBuffer(0)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(4).load_state_dict(buf.state_dict())
    rng = np.random.default_rng(1)
    counts = np.bincount([buf.sample(1, rng)[0]["input_ids"][0] for _ in range(3000)], minlength=5)
    assert counts[:2].sum() == 0 and all(900 < c < 1100 for c in counts[2:])  # uniform over the buffer


# A scripted validation-loss sequence: falls well below the initial loss, drifts up slowly, then rises.
LOSSES = [3.0, 2.0, 2.06, 2.12, 3.05, 3.17, 3.2, 3.31, 3.32]


def test_threshold_distillm_compares_with_the_loss_at_the_last_rise():
    """finetune.py l.414-417: ``if curr >= prev + eps: thr = min(thr + 0.1, 1.0); prev = curr``; ``prev`` is the
    loss before training (l.266) until the first rise."""
    th = AdaptiveThreshold()  # the defaults are DistiLLM's
    assert th.compare_to == "last_rise" and th.alpha == 0.0
    rose = [th.update(x) for x in LOSSES]
    # prev stays 3.0 through the fall (2.0 .. 2.12 and 3.05 < 3.1); 3.17 >= 3.1 rises, prev = 3.17;
    # 3.2 < 3.27; 3.31 >= 3.27 rises, prev = 3.31; 3.32 < 3.41
    assert rose == [False, False, False, False, False, True, False, True, False]
    assert [h["reference"] for h in th.history] == [3.0] * 5 + [3.17, 3.17, 3.31, 3.31]
    assert th.alpha == 0.1 + 0.1
    # a slow drift accumulates until it reaches the margin
    drift = AdaptiveThreshold()
    assert [drift.update(x) for x in (1.0, 1.04, 1.08, 1.12)] == [False, False, False, True]


def test_threshold_compared_with_the_last_check_on_request():
    th = AdaptiveThreshold(compare_to="last_check")
    rose = [th.update(x) for x in LOSSES]
    # 3.05 >= 2.12 + 0.1; 3.17 >= 3.15; 3.2 < 3.27; 3.31 >= 3.30; 3.32 < 3.41
    assert rose == [False, False, False, False, True, True, False, True, False]
    assert th.alpha == pytest.approx(0.3)
    drift = AdaptiveThreshold(compare_to="last_check")
    assert [drift.update(x) for x in (1.0, 1.04, 1.08, 1.12)] == [False] * 4


def test_threshold_uses_the_released_float_comparison_start_cap_and_nan():
    # the released expression, evaluated here by Python: 1.65 >= 1.55 + 0.1 is False in float64
    assert (1.65 >= 1.55 + 0.1) is False
    th = AdaptiveThreshold()
    assert [th.update(1.55), th.update(1.65)] == [False, False]
    exact = AdaptiveThreshold(margin=0.25)
    assert [exact.update(1.0), exact.update(1.25)] == [False, True]  # equal to the margin counts (>=)
    start = AdaptiveThreshold(start=0.2, step=0.5)
    for x in (1.0, 2.0, 3.0):
        start.update(x)
    assert start.alpha == 1.0  # 0.2 + 0.5 = 0.7, then min(1.2, 1.0)
    nan = AdaptiveThreshold()
    assert [nan.update(x) for x in (1.0, float("nan"), 1.1000001)] == [False, False, True]
    assert nan.history[1]["reference"] == 1.0


@pytest.mark.parametrize("r, alpha, s, full, expected", [
    (0.0, 0.0, 0.0, False, "reference"),  # alpha_a = 0: always the reference
    (0.999, 0.0, 0.0, True, "reference"),
    (0.3, 0.5, 0.4, True, "generated"),  # r < s
    (0.3, 0.5, 0.4, False, "generated"),
    (0.45, 0.5, 0.4, True, "replay"),  # s <= r < alpha_a, buffer full
    (0.45, 0.5, 0.4, False, "generated"),  # s <= r < alpha_a, buffer not yet full: fresh samples (l.311)
    (0.5, 0.5, 0.4, False, "reference"),  # r = alpha_a is not below it
    (0.9, 1.0, 0.0, True, "replay"),  # s = 0 at the last step
    (0.9, 1.0, 0.0, False, "generated"),
    (0.6, 0.5, 0.25, True, "reference"),
])
def test_choose_source_is_the_released_branch(r, alpha, s, full, expected):
    assert choose_source(r, alpha, s, full) == expected


def test_sgo_threshold_schedules():
    # l.291-298 with global_step t 1-based and T = total_iters
    assert sgo_threshold(0.5, 1, 100) == 0.5 * (1 - 1 / 100)
    assert sgo_threshold(0.5, 100, 100) == 0.0
    assert sgo_threshold(0.5, 30, 100, "constant") == 0.25
    assert sgo_threshold(0.5, 30, 100, "increasing") == 0.5 * 30 / 100
    with pytest.raises(ValueError):
        sgo_threshold(0.5, 1, 10, "random")


def test_sample_rows_respects_max_length_and_restores_mode(tiny, monkeypatch):
    from harness import gpt2_fast

    student = make_student(tiny).train()
    prompts = [e["input_ids"][: e["prompt_len"]] for e in tiny["examples"][:4]]
    modes = []
    orig, orig_decode = student.generate, gpt2_fast.decode

    def spy(*a, **kw):
        modes.append(student.training)
        return orig(*a, **kw)

    def spy_decode(*a, **kw):  # the plain-GPT-2 path (harness.gpt2_fast) decodes without generate()
        modes.append(student.training)
        return orig_decode(*a, **kw)

    student.generate = spy
    monkeypatch.setattr(gpt2_fast, "decode", spy_decode)
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


def test_sample_rows_ignores_the_models_own_generation_defaults(tiny):
    """A Hub model's generation_config (its top-k, repetition penalty, n-gram blocking) must not change how the
    student is sampled: the mode's temperature/top-k/top-p are the whole sampling rule."""
    prompts = [e["input_ids"][: e["prompt_len"]] for e in tiny["examples"][:8]]
    kw = dict(eos_id=tiny["tok"].eos_token_id, pad_id=tiny["tok"].pad_token_id, temperature=1.0, max_new_tokens=8,
              max_length=MAX_LEN, seed=11)
    clean = sample_rows(make_student(tiny), prompts, **kw)
    odd = make_student(tiny)
    odd.generation_config.top_k = 1
    odd.generation_config.repetition_penalty = 5.0
    odd.generation_config.no_repeat_ngram_size = 1
    assert sample_rows(odd, prompts, **kw) == clean
    greedy = sample_rows(make_student(tiny), prompts, **kw, top_k=1)
    assert greedy != clean  # and top_k does reach generate


def test_validation_loss_is_distillms_mean_of_batch_means(tiny):
    student = make_student(tiny).train()
    items, pad = tiny["data"]["valid"], tiny["tok"].pad_token_id
    val = validation_loss(student, tiny["tok"], items, pad_id=pad, max_prompt_tokens=MAX_PROMPT, max_length=MAX_LEN,
                          batch_size=4)
    loss = val()
    # independent float64 computation: per batch of 4 items, the token mean of -log softmax at the targets
    rows = [encode(tiny["tok"], it, MAX_PROMPT, MAX_LEN) for it in items]
    means, total, count = [], 0.0, 0
    student.eval()
    for k in range(0, len(rows), 4):
        chunk = rows[k: k + 4]
        sums, n = 0.0, 0
        for row in chunk:
            ids = torch.tensor([row["input_ids"]])
            logp = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1).detach().numpy()
            for t in range(row["prompt_len"] - 1, len(row["input_ids"]) - 1):
                sums -= logp[t, row["input_ids"][t + 1]]
                n += 1
        means.append(sums / n)
        total, count = total + sums, count + n
    student.train()
    assert loss == pytest.approx(np.mean(means), rel=1e-5)
    token = validation_loss(student, tiny["tok"], items, pad_id=pad, max_prompt_tokens=MAX_PROMPT,
                            max_length=MAX_LEN, batch_size=4, reduction="token_mean")()
    assert token == pytest.approx(total / count, rel=1e-5) and abs(token - loss) > 1e-6
    assert student.training and all(p.grad is None for p in student.parameters())
    assert val() == loss


# ----------------------------------------------------------------------------------------------- modes
def test_off_policy_is_the_identity(tiny):
    src = source(tiny, "off_policy", student=None)
    ref = reference(tiny)
    for i in range(3):
        a, b = src(i), ref(i)
        assert a.pop("source") == "reference"
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert src.timings["generation_s"] == 0.0


def test_sampling_modes_need_a_student_and_the_adaptive_one_a_val_loss(tiny):
    with pytest.raises(ValueError, match="needs ctx.student"):
        source(tiny, "on_policy", student=None)
    with pytest.raises(ConfigError, match="ctx.val_loss"):
        source(tiny, "adaptive_off_policy", student=make_student(tiny))
    with pytest.raises(ConfigError, match="at least the micro-batch size"):
        source(tiny, "adaptive_off_policy", {"buffer_capacity": BS - 1}, student=make_student(tiny),
               val_loss=lambda: 1.0)
    with pytest.raises(ConfigError, match="at least the micro-batch size"):
        source(tiny, "on_policy", {"replay_capacity": BS - 1}, student=make_student(tiny))


def test_adaptive_with_threshold_at_zero_equals_off_policy(tiny):
    calls = []

    def flat_val_loss():  # never rises: alpha_a stays 0
        calls.append(1)
        return 1.0

    student = make_student(tiny)
    src = source(tiny, "adaptive_off_policy", {"check_every": 2}, student=student, val_loss=flat_val_loss)
    result = run(tiny, src, student)
    assert result.curve == off_policy_curve(tiny)
    assert src.stats["batches"] == {"reference": STEPS, "generated": 0, "replay": 0}
    assert src.stats["threshold"] == 0.0 and len(calls) == 3  # before steps 0, 2, 4
    assert src.timings["generation_s"] == 0.0


def test_adaptive_generates_fresh_samples_whenever_r_below_alpha_until_the_buffer_is_full(tiny):
    """l.311: ``r < s or (r < alpha and len(buffer) < capacity)`` generates. With alpha_a = 1 (init_threshold) and
    s = alpha_a/2 (replay_ratio constant), every micro-batch generates until the buffer (3 batches) is full, then
    r < 0.5 generates and r >= 0.5 replays; the reference batch is never used."""
    student = make_student(tiny)
    src = source(tiny, "adaptive_off_policy", {"init_threshold": 1.0, "replay_ratio": "constant",
                                               "buffer_capacity": 3 * BS, "check_every": 1},
                 student=student, val_loss=lambda: 1.0, steps=12, max_new_tokens=3)
    kinds = [src(i)["source"] for i in range(12)]
    expected = ["generated"] * 3 + ["generated" if r_draw(0, i) < 0.5 else "replay" for i in range(3, 12)]
    assert kinds == expected
    assert {"generated", "replay"} <= set(kinds[3:])  # both branches exercised by this seed
    assert src.stats["buffer_size"] == 3 * BS and src.stats["batches"]["reference"] == 0


def released_branch(alphas, T, capacity, seed=0):
    """finetune.py l.291-323 written out: per micro-batch i (accumulation 1), t = i + 1, s = alpha (1 - t/T);
    generate if r < s or (r < alpha and the buffer is not full), else replay if r < alpha, else reference."""
    buffered, out = 0, []
    for i, alpha in enumerate(alphas):
        r, s = r_draw(seed, i), alpha * (1 - (i + 1) / T)
        kind = "generated" if r < s or (r < alpha and buffered < capacity) else "replay" if r < alpha else "reference"
        buffered = min(buffered + BS, capacity) if kind == "generated" else buffered
        out.append(kind)
    return out


def test_adaptive_decreasing_schedule_matches_the_released_rule(tiny):
    """alpha_a = 1 from the start (init_threshold), s = 1 - t/T, a buffer of 2 batches."""
    student = make_student(tiny)
    T = 8
    src = Recorder(source(tiny, "adaptive_off_policy", {"init_threshold": 1.0, "buffer_capacity": 2 * BS,
                                                        "check_every": 1},
                          student=student, val_loss=lambda: 1.0, steps=T, max_new_tokens=3))
    run(tiny, src, student, steps=T)
    expected = released_branch([1.0] * T, T, 2 * BS)
    assert [b["source"] for b in src.batches] == expected
    assert expected[:2] == ["generated", "generated"] and expected[-1] == "replay"  # s = 0 at the last step
    for b in src.batches:  # replayed rows are whole sampled rows: prompt + sample, loss on the sample only
        assert int(b["loss_mask"].sum()) == sum(int(n) - int(p) for n, p in zip(b["lengths"], b["prompt_len"]))


def test_adaptive_threshold_from_scripted_val_losses_drives_the_sources(tiny):
    """check_every 1 with a scripted validation loss: alpha_a follows the last-rise rule step by step and the
    sources follow the released branch with that alpha_a."""
    student = make_student(tiny)
    losses = [3.0, 2.0, 3.05, 3.2, 3.2, 3.4, 3.4, 3.4]
    src = Recorder(source(tiny, "adaptive_off_policy", {"check_every": 1, "threshold_step": 0.5,
                                                        "buffer_capacity": 2 * BS},
                          student=student, val_loss=scripted(*losses), steps=8, max_new_tokens=3))
    run(tiny, src, student, steps=8)
    history = src.src.stats["threshold_history"]
    # prev 3.0; 2.0 no; 3.05 no (< 3.1); 3.2 rises (alpha .5, prev 3.2); 3.2 no; 3.4 rises (alpha 1.0); no, no
    alphas = [0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert [h["alpha"] for h in history] == alphas and [h["step"] for h in history] == list(range(8))
    kinds = [b["source"] for b in src.batches]
    assert kinds == released_branch(alphas, 8, 2 * BS)
    assert kinds[:3] == ["reference"] * 3 and "generated" in kinds


def test_check_every_epoch_uses_steps_per_epoch_and_accumulation(tiny):
    calls = []

    def val_loss():
        calls.append(1)
        return 1.0

    student = make_student(tiny)
    # 16 training examples, micro-batch 4, accumulation 2: 2 optimizer steps per epoch
    src = Recorder(source(tiny, "adaptive_off_policy", {}, student=student, val_loss=val_loss, steps=5, accum=2,
                          n_train=16))
    assert src.src.check_every == 2
    run(tiny, src, student, steps=5, accum=2)
    assert len(src.batches) == 10 and len(calls) == 3  # before steps 0, 2, 4 (micro-batches 0, 4, 8)
    assert [h["step"] for h in src.src.stats["threshold_history"]] == [0, 2, 4]


def test_two_processes_check_at_the_same_optimizer_steps(tiny):
    """Under N processes train() passes global micro-batch indices (step·accum + k)·N + rank; each process's
    source must map them to the same optimizer steps and check at the same ones."""
    steps_seen = []
    for rank in range(2):
        src = source(tiny, "adaptive_off_policy", {"check_every": 2}, student=make_student(tiny),
                     val_loss=lambda: 1.0, steps=6, accum=3, world=2)
        for step in range(6):
            for k in range(3):
                src((step * 3 + k) * 2 + rank)
        steps_seen.append([h["step"] for h in src.stats["threshold_history"]])
    assert steps_seen == [[0, 2, 4], [0, 2, 4]]


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
    src = Recorder(source(tiny, "on_policy", {"lmbda": 1.0}, student=student, max_new_tokens=8))
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


@pytest.mark.parametrize("budget", [2, 5, None])
def test_the_suites_max_new_tokens_is_the_sampling_budget(tiny, budget):
    student = make_student(tiny, eos_bias=-1e4)  # never stops: every sample runs to the budget
    src = source(tiny, "on_policy", {"lmbda": 1.0}, student=student, max_new_tokens=budget)
    for i in range(3):
        batch, ref = src(i), reference(tiny)(i)
        width = int(ref["prompt_len"].max())
        sample_lens = (batch["lengths"] - batch["prompt_len"]).tolist()
        assert sample_lens == [MAX_LEN - width if budget is None else budget] * BS
    assert src.stats["sampled"]["ended_with_eos"] == 0


def test_on_policy_with_replay_is_distillms_mixed_branch(tiny):
    """finetune.py l.303-309: generate, push to the buffer, train on ``replay_buffer.sample()`` (a batch drawn
    uniformly without replacement from the buffer)."""
    student = make_student(tiny)
    src = source(tiny, "on_policy", {"lmbda": 1.0, "replay_capacity": 2 * BS}, student=student, max_new_tokens=3)
    pushed = []
    orig = src._generate_rows

    def spy(batch, i):
        rows = orig(batch, i)
        pushed.append([tuple(r["input_ids"]) for r in rows])
        return rows

    src._generate_rows = spy
    batches = [src(i) for i in range(5)]
    assert all(b["source"] == "replay" for b in batches)
    for k, b in enumerate(batches):
        got = {tuple(row[: int(n)].tolist()) for row, n in zip(b["input_ids"], b["lengths"])}
        window = {row for rows in pushed[max(0, k - 1): k + 1] for row in rows}  # the buffer: the last 2 batches
        assert got <= window and len(got) == BS
    assert {tuple(r[: int(n)].tolist()) for r, n in zip(batches[0]["input_ids"], batches[0]["lengths"])} == set(
        pushed[0])  # the first draw is the only batch in the buffer
    assert src.stats["buffer_size"] == 2 * BS and src.stats["sampled"]["samples"] == 5 * BS


def test_generated_batches_are_scored_by_the_teacher(tiny):
    student = make_student(tiny)
    seen = []
    src = Recorder(source(tiny, "on_policy", {"lmbda": 0.5}, student=student, max_new_tokens=4))
    run(tiny, src, student, teacher_seen=seen)
    kinds = [b["source"] for b in src.batches]
    assert "generated" in kinds and "reference" in kinds
    assert len(seen) == len(src.batches)
    assert all(torch.equal(t, b["input_ids"]) for t, b in zip(seen, src.batches))


# ----------------------------------------------------------------------------------------------- determinism, resume
def rising():
    return scripted(*[float(k) for k in range(1, 20)])


ADAPTIVE = {"check_every": 1, "threshold_step": 0.5, "buffer_capacity": 2 * BS}


def test_adaptive_seeded_run_is_deterministic_and_leaves_global_rng_alone(tiny):
    runs = []
    for _ in range(2):
        student = make_student(tiny)
        src = Recorder(source(tiny, "adaptive_off_policy", ADAPTIVE, student=student, val_loss=rising(), steps=8,
                              max_new_tokens=4))
        result = run(tiny, src, student, steps=8)
        runs.append((result.curve, src.src.stats, [b["source"] for b in src.batches]))
    assert runs[0] == runs[1]
    stats = runs[0][1]
    assert stats["batches"]["generated"] > 0 and stats["batches"]["replay"] > 0
    assert stats["buffer_size"] == 2 * BS and stats["threshold"] == 1.0
    student = make_student(tiny)
    src = source(tiny, "adaptive_off_policy", {**ADAPTIVE, "init_threshold": 1.0}, student=student,
                 val_loss=rising(), max_new_tokens=4)
    state = torch.get_rng_state()
    assert src(0)["source"] == "generated"
    assert torch.equal(state, torch.get_rng_state())


def test_on_policy_seeded_run_is_deterministic_and_leaves_global_rng_alone(tiny):
    curves = []
    for _ in range(2):
        student = make_student(tiny)
        src = source(tiny, "on_policy", {"lmbda": 0.5}, student=student, seed=3, max_new_tokens=4)
        curves.append((run(tiny, src, student, seed=3).curve, src.stats))
    assert curves[0] == curves[1]
    student = make_student(tiny)
    src = source(tiny, "on_policy", {"lmbda": 1.0}, student=student, max_new_tokens=4)
    state = torch.get_rng_state()
    src(0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("mode, mode_params", [
    ("adaptive_off_policy", ADAPTIVE),
    ("on_policy", {"lmbda": 0.7, "replay_capacity": 2 * BS}),
])
def test_state_round_trip_continues_identically(tiny, tmp_path, mode, mode_params):
    """A source restored from ``state_dict`` (counts, timings, sampled counts, buffer rows, threshold with its
    reference loss and history, last check) serves the same batches as one that never stopped (the student is
    held fixed here; train() restores it)."""
    student = make_student(tiny)
    kw = dict(student=student, steps=8, max_new_tokens=3)
    whole = source(tiny, mode, mode_params, val_loss=rising(), **kw)
    expected = [whole(i) for i in range(8)]
    first = source(tiny, mode, mode_params, val_loss=rising(), **kw)
    for i in range(4):
        first(i)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    losses = rising()
    for _ in range(4):  # the validation losses already seen
        losses()
    second = source(tiny, mode, mode_params, val_loss=losses, **kw)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    got = [second(i) for i in range(4, 8)]
    assert {b["source"] for b in got} >= {"replay"}
    for a, b in zip(expected[4:], got):
        assert a["source"] == b["source"] and torch.equal(a["input_ids"], b["input_ids"])
    assert second.stats == whole.stats
    if mode == "adaptive_off_policy":
        assert second.threshold.reference == whole.threshold.reference and second._last_check_step == 7


def test_batch_source_compat_takes_a_legacy_max_new_tokens(tiny):
    student = make_student(tiny, eos_bias=-1e4)
    src = batch_source("on_policy", {"lmbda": 1.0, "max_new_tokens": 2}, reference=reference(tiny),
                       student=student, tokenizer=tiny["tok"], pad_id=tiny["tok"].pad_token_id, max_length=MAX_LEN)
    batch = src(0)
    assert (batch["lengths"] - batch["prompt_len"]).tolist() == [2] * BS


# ----------------------------------------------------------------------------------------------- recipes
COMMIT = "d47e77ff9d27721783b32213be38c1204230cc0a"


@pytest.mark.parametrize("name, loss, mode, mode_params, dropout, code", [
    ("distillm", [{"objective": "srkl", "weight": 1.0, "temperature": 1.0, "params": {"alpha": 0.1}}],
     "adaptive_off_policy",
     {"buffer_capacity": 1000, "init_threshold": 0.0, "threshold_step": 0.1, "loss_margin": 0.1,
      "check_every": "epoch", "compare_to": "last_rise", "replay_ratio": "decreasing", "temperature": 1.0,
      "top_k": 0, "top_p": 1.0}, "keep", f"jongwooko/distillm@{COMMIT}"),
    ("gkd", [{"objective": "jsd", "weight": 1.0, "temperature": 1.0, "params": {"beta": 0.5}}], "on_policy",
     {"lmbda": 0.5, "temperature": 0.9, "top_k": 0, "top_p": 1.0, "replay_capacity": 0}, "disable",
     "huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8"),
    ("imitkd", [{"objective": "fkl", "weight": 1.0, "temperature": 1.0}], "on_policy",
     {"lmbda": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "replay_capacity": 1000}, "keep",
     f"jongwooko/distillm@{COMMIT}"),
])
def test_recipes_follow_the_released_code(name, loss, mode, mode_params, dropout, code):
    raw = read_yaml(REPO / "recipes" / f"{name}.yaml")
    assert raw["loss"] == loss and raw["mode"] == mode and raw["dropout"] == dropout
    assert raw["mode_params"] == mode_params  # every value spelled out, pinned to the released defaults
    assert check_params(mode, raw["mode_params"], name) == mode_params  # and valid
    if name == "distillm":  # DistiLLM's released behaviour is the mode's default
        assert {k: f.default for k, f in params(mode).items()} == mode_params
    card_ = raw["reference"]
    assert card_["code"].startswith(code) and card_["paper"] and card_["deviations"]
    assert all(isinstance(d, str) and d for d in card_["deviations"])


def test_adaptive_schedule_uses_the_one_based_step(tiny, monkeypatch):
    """s is computed with DistiLLM's global_step, which is 1 at the first step (finetune.py l.262, l.291)."""
    import harness.modes.adaptive as adaptive

    calls = []
    real = adaptive.sgo_threshold
    monkeypatch.setattr(adaptive, "sgo_threshold", lambda *a: calls.append(a) or real(*a))
    src = source(tiny, "adaptive_off_policy", {"check_every": 1}, student=make_student(tiny), val_loss=lambda: 1.0,
                 steps=3, accum=2)
    for i in range(6):
        src(i)
    assert calls == [(0.0, t, 3, "decreasing") for t in (1, 1, 2, 2, 3, 3)]
