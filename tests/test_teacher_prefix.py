"""harness.teacher_prefix: a frozen teacher's prompts computed once — same logits and samples as without the cache
(float64: no round-off hides a wrong key or position), independent of what the process scored before, served only
within its budget and for the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from harness import gpt2_fast
from harness.data.batching import collate, encode
from harness.modes.minillm import mixed_sample_rows
from harness.modes.sampling import sample_rows
from harness.steps import live_teacher
from harness.teacher_prefix import PrefixCache, estimate_bytes, for_teacher
from tests.conftest import tiny_gpt2
from tests.test_gpt2_fast import _library_keys_values


@pytest.fixture(scope="module")
def setup(tiny_data, tiny_tokenizer):
    tok = tiny_tokenizer
    examples = [encode(tok, item, 24, 40) for item in tiny_data["train"][:48]]
    return tok, examples


def _teacher(tok, dtype=torch.float64, seed=2):
    return tiny_gpt2(tok, n_layer=3, seed=seed).to(dtype)


def _batch(tok, examples, rows):
    batch = collate([examples[i] for i in rows], tok.pad_token_id)
    return batch


def test_for_rows_gives_each_row_its_prompt_but_the_last_token(setup):
    tok, examples = setup
    teacher = _teacher(tok)
    batch = _batch(tok, examples, range(6))
    rows = batch["loss_mask"] > 0
    rows[4] = False  # a row that counts nothing gets no prefix
    prefix, kv = PrefixCache(teacher).for_rows(batch, rows)
    want = [int(n) - 1 if b != 4 else 0 for b, n in enumerate(batch["prompt_len"])]
    assert prefix.tolist() == want
    ids = batch["input_ids"]
    expected = torch.cat([gpt2_fast.prefix_keys_values(teacher, ids[b, :n]) for b, n in enumerate(want)], dim=1)
    assert torch.equal(kv, expected)
    early = rows.clone()
    early[0, int(batch["prompt_len"][0]) - 3] = True  # a counted position inside the prompt caps the prefix
    assert int(PrefixCache(teacher).for_rows(batch, early)[0][0]) == int(batch["prompt_len"][0]) - 3
    assert PrefixCache(teacher).for_rows({"input_ids": ids}, rows) is None


def test_the_live_teacher_from_cached_prompts_equals_the_live_teacher(setup):
    tok, examples = setup
    teacher = _teacher(tok)
    cache = PrefixCache(teacher)
    plain, cached = live_teacher(teacher), live_teacher(teacher, cache)
    with torch.no_grad():
        for rows in (range(8), range(4, 12)):  # the second batch reuses four prompts
            batch = _batch(tok, examples, rows)
            torch.testing.assert_close(cached.rows(batch), plain.rows(batch), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(cached(batch), plain(batch), rtol=1e-10, atol=1e-10)
    assert cache.hits > 0 and cache.misses == 12


def test_a_rows_teacher_logits_do_not_depend_on_what_the_process_scored_before(setup):
    tok, examples = setup
    teacher = _teacher(tok, torch.float32)
    target = _batch(tok, examples, [3, 9, 14, 20, 21])
    with torch.no_grad():
        alone = live_teacher(teacher, PrefixCache(teacher)).rows(target)
        warm = PrefixCache(teacher)
        other = live_teacher(teacher, warm)
        other.rows(_batch(tok, examples, range(0, 16)))  # other batches first, sharing prompts with the target
        other.rows(_batch(tok, examples, range(16, 32)))
        after = other.rows(target)
    assert torch.equal(alone, after)


def test_the_cache_is_served_within_its_budget_and_for_the_same_weights(setup, monkeypatch):
    tok, examples = setup
    teacher = _teacher(tok, torch.float32, seed=11)
    prompts = _prompts(examples, len(examples))
    per_token = 3 * 2 * 32 * 4  # n_layer × (keys + values) × n_embd × float32
    assert estimate_bytes(teacher, [len(p) for p in prompts]) == sum(len(p) - 1 for p in prompts) * per_token
    cache = for_teacher(teacher, prompts, 1)
    assert isinstance(cache, PrefixCache)
    assert set(cache.store) == {tuple(p[:-1]) for p in prompts}  # filled with the training prompts
    assert for_teacher(copy.deepcopy(teacher), prompts, 1) is cache  # reloaded, same weights: the same cache
    other = for_teacher(teacher, prompts[:10], 1)  # other prompts (another suite): filled in other batches
    assert other is not cache and set(other.store) == {tuple(p[:-1]) for p in prompts[:10]}
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1.0
    assert for_teacher(changed, prompts, 1) is not cache
    assert for_teacher(teacher, prompts, 0) is None  # off
    assert for_teacher(teacher, prompts * 100, 1) is None  # 4,800 prompts do not fit 1 MiB
    monkeypatch.setenv("DISTILLBENCH_GPT2_FAST", "0")
    assert for_teacher(teacher, prompts, 1) is None  # a model the fast path does not compute


def test_a_filled_cache_holds_each_prompts_keys_and_values(setup):
    """Filled in batches of FILL_BATCH (some prompts repeated): every prefix's values equal its own forward's."""
    tok, examples = setup
    teacher = _teacher(tok)
    prompts = _prompts(examples, len(examples)) + _prompts(examples, 3)
    cache = PrefixCache(teacher, prompts)
    assert len(cache.store) == len({tuple(p[:-1]) for p in prompts}) and cache.misses == 0
    for p in prompts[::7]:
        with torch.no_grad():
            full = _library_keys_values(teacher, torch.tensor(p[:-1]))
        torch.testing.assert_close(cache.store[tuple(p[:-1])], full, rtol=1e-10, atol=1e-10)


def _prompts(examples, n):
    return [e["input_ids"][: e["prompt_len"]] for e in examples[:n]]


def test_teacher_samples_from_cached_prompts_equal_samples_without(setup):
    tok, examples = setup
    teacher = _teacher(tok)
    prompts = _prompts(examples, 10)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0, max_new_tokens=6, max_length=40,
              seed=5)
    assert sample_rows(teacher, prompts, prefix=PrefixCache(teacher), **kw) == sample_rows(teacher, prompts, **kw)


def test_mixed_samples_equal_with_cached_prompts_and_through_the_library(setup, monkeypatch):
    """MiniLLM's teacher-mixed sampler: gpt2_fast decoders (the teacher from cached prompts or not) and the models'
    own forwards draw the same tokens with the same probabilities."""
    tok, examples = setup
    student, teacher = tiny_gpt2(tok, n_layer=1, seed=4).double(), _teacher(tok)
    prompts = _prompts(examples, 10)
    kw = dict(mix_alpha=0.2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0, max_new_tokens=6,
              max_length=40, seed=7)
    fast = mixed_sample_rows(student, teacher, prompts, **kw)
    cached = mixed_sample_rows(student, teacher, prompts, teacher_prefix=PrefixCache(teacher), **kw)
    monkeypatch.setenv("DISTILLBENCH_GPT2_FAST", "0")
    library = mixed_sample_rows(student, teacher, prompts, **kw)
    for other in (cached, library):
        assert [r["input_ids"] for r in other] == [r["input_ids"] for r in fast]
        for a, b in zip(other, fast):
            for key in ("student_logprobs", "teacher_logprobs", "mix_weight"):
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------------------ end to end
def _smoke_suite(tmp_path, recipe, prefix_mb=None):
    import yaml

    from harness import steps
    from harness.suite import load_suite
    from tests.conftest import REPO

    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    cfg.pop("tuning", None)
    cfg.update(workdir=str(tmp_path / "work"), results=str(tmp_path / "results"), recipes=[recipe], seeds=[1])
    cfg["training"].update(max_steps=4, log_every=1)
    if prefix_mb is not None:
        cfg["training"]["teacher_prefix_mb"] = prefix_mb
    path = tmp_path / f"suite-{prefix_mb}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    suite = load_suite(path)
    if not (tmp_path / "work").exists():
        steps.prepare_data(suite)
        steps.prepare_tokenizer(suite)
        steps.prepare_teacher(suite, progress=False)
        steps.build_teacher_cache(suite, progress=False)
        steps.init_student(suite, 1)
    return suite


@pytest.mark.parametrize("recipe", ["seqkd", "minillm"])
def test_distill_scores_and_samples_the_teacher_from_its_cached_prompts(tmp_path, monkeypatch, recipe):
    """A run through harness.steps.distill uses the cache for the live teacher's forward and its sampling; a second
    run in the same process (the cache warm) gives the same bits; without the cache (teacher_prefix_mb: 0) the same
    losses up to round-off."""
    import json

    from harness import steps
    from harness import teacher_prefix as tp

    used = {"rows": 0, "prompts": 0}
    for name, key in (("for_rows", "rows"), ("for_prompts", "prompts")):
        real = getattr(tp.PrefixCache, name)
        monkeypatch.setattr(tp.PrefixCache, name, lambda self, *a, _r=real, _k=key, **k: used.__setitem__(
            _k, used[_k] + 1) or _r(self, *a, **k))

    def run(suite):
        out = steps.distill(suite, suite.recipes()[recipe], 1, progress=False)
        record = json.loads((out / "run.json").read_text())
        assert record["status"] == "ok", record.get("error")
        (out / "run.json").unlink()
        return [v for _, v in record["curve"]]

    suite = _smoke_suite(tmp_path, recipe)
    first = run(suite)
    assert used["rows"] > 0 and used["prompts"] > 0
    assert run(suite) == first  # the process's cache is warm now: same bits
    used.update(rows=0, prompts=0)
    plain = run(_smoke_suite(tmp_path, recipe, prefix_mb=0))
    assert used == {"rows": 0, "prompts": 0}
    assert plain == pytest.approx(first, rel=1e-4)
