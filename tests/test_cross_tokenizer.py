"""Cross-tokenizer distillation: a student with its own tokenizer (harness.cross_tokenizer).

Conventions are TRL's GOLD trainer's, read at huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8
trl/experimental/gold/gold_trainer.py (build_teacher_inputs_from_texts: completion-relative UTF-8 byte offsets, the
EOS at the completion's byte length; ULDLoss._compute_distillation_loss: positional pairing truncated to the shorter
answer, or byte-boundary groups with the "observed" merge; per-sequence mean, then the mean over sequences).
Expected values are written here by hand or in numpy float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness.data import batching
from harness.data.cross_tokenizer import byte_ends, encode_pair, with_teacher_tokens
from harness.data.tokenizer import train_tokenizer
from harness.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """A byte-only tokenizer (no merges: one token per byte) and one that merged 'ab' and ' cd'."""
    bytes_only = train_tokenizer(["x"], 259)
    merged = train_tokenizer(["ab cd ab cd ab cd"] * 4, 263)
    assert merged.convert_ids_to_tokens(merged.encode("ab cd")) == ["ab", "Ġcd"]
    assert bytes_only.convert_ids_to_tokens(bytes_only.encode("ab cd")) == ["a", "b", "Ġ", "c", "d"]
    return merged, bytes_only


def test_byte_ends_count_utf8_bytes_and_put_eos_at_the_end(toks):
    merged, bytes_only = toks
    # 'é' is two bytes (two byte-level tokens, both ending after it: byte 3); EOS ends at the text's 5 bytes
    assert byte_ends(bytes_only, "aé b") == [1, 3, 3, 4, 5, 5]
    assert byte_ends(merged, "ab cd") == [2, 5, 5]
    assert byte_ends(bytes_only, "ab cd") == [1, 2, 3, 4, 5, 5]


def test_each_side_encodes_the_example_with_its_own_tokenizer(toks):
    merged, bytes_only = toks
    pair = encode_pair({"prompt": "Q:", "output": "ab cd"}, merged, bytes_only, max_prompt_tokens=8, max_length=64)
    s, t = pair["student"], pair["teacher"]
    assert merged.decode(s["input_ids"][: s["prompt_len"]]) == "Q:" == bytes_only.decode(t["input_ids"][: t["prompt_len"]])
    assert merged.convert_ids_to_tokens(s["input_ids"][s["prompt_len"]:]) == ["ab", "Ġcd", "<|endoftext|>"]
    assert len(t["input_ids"]) - t["prompt_len"] == 6 and t["input_ids"][-1] == bytes_only.eos_token_id
    assert s["ends"] == [2, 5, 5] and t["ends"] == [1, 2, 3, 4, 5, 5]
    # a cut at max_length keeps the offsets of the response tokens that survive it
    cut = encode_pair({"prompt": "Q:", "output": "ab cd"}, merged, bytes_only, max_prompt_tokens=8, max_length=5)
    assert cut["teacher"]["ends"] == [1, 2, 3] and cut["student"]["ends"] == [2, 5, 5]


def _batch(toks, outputs):
    merged, bytes_only = toks
    items = [{"prompt": "Q:", "output": o} for o in outputs]
    pairs = [encode_pair(it, merged, bytes_only, 8, 64) for it in items]

    def next_batch(i):
        order = [1, 0] if i else [0, 1]
        batch = batching.collate([pairs[j]["student"] for j in order], merged.pad_token_id)
        batch["example_ids"] = torch.tensor(order)
        return batch

    return with_teacher_tokens(next_batch, pairs, bytes_only.pad_token_id)


def test_batches_carry_the_teacher_tokens_of_the_same_examples(toks):
    merged, bytes_only = toks
    source = _batch(toks, ["ab cd", "cd ab"])
    for i in (0, 1):
        b = source(i)
        for row in range(2):
            s_text = merged.decode(b["input_ids"][row][b["attention_mask"][row] > 0], skip_special_tokens=True)
            t_text = bytes_only.decode(b["teacher_input_ids"][row][b["teacher_attention_mask"][row] > 0],
                                       skip_special_tokens=True)
            assert s_text == t_text == "Q:" + ["ab cd", "cd ab"][b["example_ids"][row]]
        # response positions: 3 on the student's side (ab, Ġcd, EOS), 6 on the teacher's (a, b, Ġ, c, d, EOS)
        assert b["loss_mask"].sum(1).tolist() == [3, 3] and b["teacher_loss_mask"].sum(1).tolist() == [6, 6]


def _np_sorted_l1(q, p):
    w = max(q.shape[-1], p.shape[-1])
    qs, ps = np.zeros((len(q), w)), np.zeros((len(p), w))
    qs[:, : q.shape[1]] = -np.sort(-q, axis=-1)
    ps[:, : p.shape[1]] = -np.sort(-p, axis=-1)
    return np.abs(qs - ps).sum(-1)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("alignment", ["index", "text"])
def test_uld_across_tokenizers_pairs_the_hand_written_positions(toks, alignment):
    """'ab cd': student rows 1, 2, 3 predict (ab, Ġcd, EOS); teacher rows 1..6 predict (a, b, Ġ, c, d, EOS).
    index: student rows 1, 2, 3 with teacher rows 1, 2, 3 (truncated to the shorter answer, 3).
    text: groups at the shared byte ends 2, 5, 5: student [1], [2], [3] with teacher [1, 2], [3, 4, 5], [6]; a
    teacher group is its first row's distribution times the probabilities of the later rows' tokens."""
    from harness.cross_tokenizer import CrossTokenizerLoss
    from harness.objectives import get
    from harness.objectives.composite import Term, WeightedLoss

    merged, bytes_only = toks
    batch = _batch(toks, ["ab cd", "ab cd"])(0)
    g = torch.Generator().manual_seed(0)
    zs = 2 * torch.randn(*batch["input_ids"].shape, len(merged), generator=g, dtype=torch.float64)
    zt = 2 * torch.randn(*batch["teacher_input_ids"].shape, len(bytes_only), generator=g, dtype=torch.float64)
    batch["teacher_logits"] = zt
    loss = CrossTokenizerLoss(WeightedLoss([Term(get("uld"), 1.5, 2.0)]), alignment=alignment)
    zs.requires_grad_(True)
    value, parts = loss(zs, None, batch["loss_mask"], labels=batch["labels"], normalizer=6.0, batch=batch)

    tau = 2.0
    q_all, p_all = _softmax(zs.detach().numpy() / tau), _softmax(zt.numpy() / tau)
    t_ids = bytes_only.encode("Q:ab cd") + [bytes_only.eos_token_id]
    per_seq = []
    for b in range(2):
        q = q_all[b, [1, 2, 3]]
        if alignment == "index":
            p = p_all[b, [1, 2, 3]]
        else:
            p = np.stack([p_all[b, 1] * p_all[b, 2, t_ids[3]],
                          p_all[b, 3] * p_all[b, 4, t_ids[5]] * p_all[b, 5, t_ids[6]],
                          p_all[b, 6]])
        per_seq.append(_np_sorted_l1(q, p).mean())
    expected = 1.5 * np.mean(per_seq) * 6 / 6.0  # micro-batch share Σ mask / normalizer = 6 / 6
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert parts["uld"] == pytest.approx(expected, rel=1e-12)
    value.backward()
    grad = zs.grad.abs().sum(-1)
    assert (grad[:, [1, 2, 3]] > 0).all() and (grad[:, [0, 4]] == 0).all()  # only the response rows learn


def _suite_file(tmp_path, **changes):
    d = yaml.safe_load((REPO / "config" / "tiny-xtok.yaml").read_text())
    for key, value in changes.items():
        node = d
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_token_level_objectives_are_refused_in_one_line(tmp_path):
    from harness.suite import load_suite
    from harness.validate import validate_plan

    path = _suite_file(tmp_path, recipes=["sft", "uld", "fkl"])
    with pytest.raises(ConfigError) as err:
        validate_plan(load_suite(path), check_data=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: recipe 'fkl' (recipes/fkl.yaml): objective 'fkl' ")
    assert "cross-tokenizer objectives: uld" in msg and "student.tokenizer" in msg
    # sft (ce only) and uld pass
    assert "OK" in validate_plan(load_suite(_suite_file(tmp_path, recipes=["sft", "uld"])), check_data=False)


def test_caches_modes_and_a_teacher_tokenizer_are_refused(tmp_path):
    from harness.suite import load_suite
    from harness.validate import validate_plan

    with pytest.raises(ConfigError, match=r"key 'teacher_cache': .*remove 'teacher_cache'"):
        validate_plan(load_suite(_suite_file(tmp_path, teacher_cache={"mode": "exact"})), check_data=False)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "sft.yaml").write_text((REPO / "recipes" / "sft.yaml").read_text())
    (recipes / "onuld.yaml").write_text(yaml.safe_dump({
        "description": "uld on student samples", "reference": {"paper": "x", "code": "none released", "deviations": []},
        "loss": [{"objective": "uld", "weight": 1.0}], "mode": "on_policy"}))
    with pytest.raises(ConfigError, match=r"recipe 'onuld' .*mode 'on_policy' is not supported .*supported: off_policy"):
        validate_plan(load_suite(_suite_file(tmp_path, recipes_dir=str(recipes), recipes=["sft", "onuld"])),
                      check_data=False)
    with pytest.raises(ConfigError, match=r"key 'teacher.tokenizer'"):
        load_suite(_suite_file(tmp_path, **{"teacher.tokenizer": {"vocab_size": 300}}))
    with pytest.raises(ConfigError, match=r"key 'student.tokenizer.alignment' has value 'bytes'"):
        load_suite(_suite_file(tmp_path, **{"student.tokenizer": {"vocab_size": 300, "alignment": "bytes"}}))


def test_distill_end_to_end_with_different_tokenizers(tmp_path, one_thread, monkeypatch):
    """data → both tokenizers → teacher → student → uld run, small sizes: the student trains on its own
    vocabulary and the teacher is scored live on its own (no cache)."""
    from harness import steps
    from harness.io import read_json
    from harness.models import load_model
    from harness.suite import load_suite
    from harness.validate import validate_plan

    monkeypatch.chdir(REPO)
    path = _suite_file(
        tmp_path, workdir=str(tmp_path / "work"), seeds=[1], tuning=None, device="cpu",
        **{"data.sizes": {"train": 120, "valid": 10, "test": 10}, "tokenizer.vocab_size": 400,
           "student.tokenizer": {"vocab_size": 300, "alignment": "text"}, "student.n_embd": 16, "student.n_layer": 1,
           "student.pretrain": {"max_steps": 2, "learning_rate": 0.005}, "teacher.n_layer": 1, "teacher.n_embd": 32,
           "teacher.pretrain": {"max_steps": 5, "learning_rate": 0.005},
           "training.max_steps": 4, "training.per_device_train_batch_size": 8, "training.log_every": 2})
    suite = load_suite(path)
    validate_plan(suite, check_data=False)
    steps.prepare_data(suite)
    steps.prepare_tokenizer(suite)
    steps.prepare_teacher(suite, progress=False)
    steps.init_student(suite, 1, progress=False)
    recipe = suite.recipes()["uld"]
    run = read_json(steps.distill(suite, recipe, 1, progress=False) / "run.json")
    assert run["status"] == "ok", run.get("error")
    assert "cross-tokenizer, text alignment" in run["loss"]
    assert all(terms["uld"] > 0 for _, terms in run["loss_terms"])
    student = load_model(suite.run_dir("uld", 1) / "model")
    teacher = load_model(suite.teacher_dir)
    s_tok, t_tok = (steps.load_tokenizer(d) for d in (suite.student_tokenizer_dir, suite.tokenizer_dir))
    assert len(s_tok) < len(t_tok) and student.config.vocab_size == len(s_tok) != teacher.config.vocab_size
    assert not suite.cache_path.exists()
