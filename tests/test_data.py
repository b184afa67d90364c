"""Tests for harness.data: prompts, tiny generator, real-set loaders, tokenizer, batching."""

from __future__ import annotations

import collections
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import (
    SET_SCHEMA,
    DataError,
    build_prompt,
    check_no_overlap,
    check_set_spec,
    collate,
    collate_prompts,
    encode,
    epoch_order,
    filter_long_prompts,
    find_overlap,
    generate_tiny,
    item_texts,
    iterate_batches,
    load_eval_set,
    load_jsonl,
    load_set,
    load_tokenizer,
    num_batches,
    train_tokenizer,
    validate_item,
    write_jsonl_atomic,
    write_tiny,
)
from harness.data import tiny
from harness.data.tiny import FAMILIES, KNOWLEDGE_FAMILIES, SEVERAL_ANSWER_FAMILIES
from harness.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILLBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))
INSTRUCT = SHARED / "instruct"
needs_shared = pytest.mark.skipif(not INSTRUCT.is_dir(), reason=f"real data not found at {INSTRUCT}")

SMALL = {"train": 600, "valid": 40, "test": 40}


@pytest.fixture(scope="module")
def tiny_data():
    return generate_tiny(0)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(item_texts(tiny_data["train"]), 1000, out), out


# ---------------------------------------------------------------- prompts


def test_build_prompt_variants():
    assert build_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:\n"
    )
    assert build_prompt("Do X.", "the input") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n"
        "### Input:\nthe input\n\n### Response:\n"
    )
    assert build_prompt("Do X.", None) == build_prompt("Do X.")


@needs_shared
def test_prompt_matches_real_files_byte_for_byte():
    rng = random.Random(0)
    n_with = n_without = 0
    for f in sorted(INSTRUCT.glob("*.jsonl")):
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        for row in rng.sample(rows, min(60, len(rows))):
            inp = row.get("input") or ""
            assert build_prompt(row["instruction"], inp) == row["prompt"], (f.name, row["instruction"][:60])
            n_with += bool(inp)
            n_without += not inp
    assert n_with > 20 and n_without > 20  # both variants were really checked


# ---------------------------------------------------------------- tiny generator


def test_tiny_deterministic_files(tmp_path):
    a = write_tiny(tmp_path / "a", seed=3, sizes=SMALL)
    b = write_tiny(tmp_path / "b", seed=3, sizes=SMALL)
    c = write_tiny(tmp_path / "c", seed=4, sizes=SMALL)
    assert set(a) == {"train", "valid", "test"}
    for s in a:
        assert a[s].name == f"{s}.jsonl"
        assert a[s].read_bytes() == b[s].read_bytes()
        assert a[s].read_bytes() != c[s].read_bytes()
    assert not list((tmp_path / "a").glob(".*tmp"))  # no temp files left behind
    assert len(a["train"].read_text().splitlines()) == SMALL["train"]
    # the world (facts) does not depend on the split seed
    facts = {}
    for d in (generate_tiny(3, 600, 40, 40), generate_tiny(4, 600, 40, 40)):
        for it in d["train"]:
            if it["task"] == "capital" and it["input"]:
                assert facts.setdefault(it["input"], it["output"]) == it["output"]


def test_tiny_cli(tmp_path, capsys):
    paths = tiny.main([str(tmp_path), "--seed", "1", "--n-train", "100", "--n-valid", "20", "--n-test", "20"])
    assert [len(load_jsonl(paths[s])) for s in ("train", "valid", "test")] == [100, 20, 20]
    assert "train.jsonl" in capsys.readouterr().out


def test_tiny_sizes_and_families(tiny_data):
    assert {s: len(v) for s, v in tiny_data.items()} == {"train": 4000, "valid": 200, "test": 200}
    for s, items in tiny_data.items():
        assert {it["task"] for it in items} == set(FAMILIES), s
    with pytest.raises(ValueError, match="n_valid"):
        generate_tiny(0, 100, 5, 20)


def test_tiny_splits_disjoint(tiny_data):
    keys = {s: {(it["instruction"], it["input"]) for it in items} for s, items in tiny_data.items()}
    assert not keys["train"] & keys["valid"]
    assert not keys["train"] & keys["test"]
    assert not keys["valid"] & keys["test"]
    tiny.check_disjoint(tiny_data)
    with pytest.raises(ValueError, match="share"):
        tiny.check_disjoint({"train": tiny_data["train"][:5], "test": tiny_data["train"][:1]})


def test_tiny_items_valid(tiny_data):
    for s, items in tiny_data.items():
        ids = [it["id"] for it in items]
        assert len(set(ids)) == len(ids)
        for it in items:
            validate_item(it)
            assert it["prompt"] == build_prompt(it["instruction"], it["input"])
            assert 1 <= len(it["output"].split()) <= 6
            if it["task"] in KNOWLEDGE_FAMILIES and it["task"] not in SEVERAL_ANSWER_FAMILIES:
                assert len(it["choices"]) == 4 and it["choices"][it["label"]] == it["output"]
                assert len(set(it["choices"])) == 4
            if it["task"] in SEVERAL_ANSWER_FAMILIES:
                assert 3 <= len(it["answers"]) <= 8
                assert abs(sum(it["answer_probs"]) - 1) < 1e-9
            else:
                assert it["answers"] == [it["output"]]
    # both prompt variants occur
    assert any(it["input"] for it in tiny_data["train"]) and any(not it["input"] for it in tiny_data["train"])


def test_tiny_one_answer_correct(tiny_data):
    for it in tiny_data["train"] + tiny_data["test"]:
        t, text = it["task"], it["instruction"] + " " + it["input"]
        nums = [int(x) for x in text.replace("?", " ").replace(".", " ").split() if x.isdigit()]
        if t == "add":
            assert int(it["output"]) == sum(nums)
        elif t == "successor":
            assert int(it["output"]) == nums[0] + 1
        elif t == "predecessor":
            assert int(it["output"]) == nums[0] - 1
        elif t in ("reverse", "sort"):
            letters = (it["input"] or it["instruction"].split(":", 1)[1]).split()
            want = letters[::-1] if t == "reverse" else sorted(letters)
            assert it["output"].split() == want
        elif t == "even_below":
            assert set(it["answers"]) == {str(k) for k in range(2, nums[0], 2)}


def test_several_answer_tasks_non_uniform(tiny_data):
    for fam in SEVERAL_ANSWER_FAMILIES:
        per_prompt = collections.defaultdict(collections.Counter)
        pooled = collections.Counter()
        for it in tiny_data["train"]:
            if it["task"] == fam:
                assert it["output"] in it["answers"]
                per_prompt[tuple(it["answers"])][it["output"]] += 1
                pooled[it["answers"].index(it["output"])] += 1  # rank of the drawn answer
        assert max(len(c) for c in per_prompt.values()) >= 3, fam  # several answers really drawn
        # rank 0 (the mode) is drawn clearly more often than rank 2: a non-uniform distribution
        assert pooled[0] > 2 * pooled[2], (fam, pooled)


def test_knowledge_facts_taught_in_train(tiny_data):
    train = {(it["task"], it["output"]) for it in tiny_data["train"]}
    for it in tiny_data["test"]:
        if it["task"] in ("capital", "animal"):
            assert (it["task"], it["output"]) in train


# ---------------------------------------------------------------- real-set loaders


@needs_shared
def test_load_real_sets():
    counts = {"dolly_dev": 1000, "dolly_valid": 500, "self-inst_valid": 242, "vicuna_valid": 80, "sinst_valid": 1694}
    for name, n in counts.items():
        items = load_jsonl(INSTRUCT / f"{name}.jsonl")
        assert len(items) == n
        for it in items:
            validate_item(it)
            assert it["prompt"] == build_prompt(it["instruction"], it["input"])
    vic = load_jsonl(INSTRUCT / "vicuna_valid.jsonl")
    assert all(it["input"] == "" for it in vic) and vic[0]["task"] not in ("", "vicuna_valid")


@needs_shared
def test_sinst_answers_are_lists():
    items = load_jsonl(INSTRUCT / "sinst_valid.jsonl")
    raw = [json.loads(line) for line in (INSTRUCT / "sinst_valid.jsonl").read_text().splitlines()]
    for it, r in zip(items, raw):
        assert isinstance(r["output"], list)
        assert it["answers"] == r["output"] and it["output"] == r["output"][0]
        assert isinstance(it["output"], str)
    assert any(len(it["answers"]) > 1 for it in items)


def test_list_output_is_explicit(tmp_path):
    row = {"instruction": "i", "output": json.dumps(["a", "b"])}
    p = tmp_path / "my_sinst.jsonl"
    p.write_text(json.dumps(row) + "\n")
    assert load_jsonl(p)[0]["answers"] == ['["a", "b"]']  # off by default, whatever the name says (MiniLLM)
    (it,) = load_jsonl(p, list_output=True)
    assert it["answers"] == ["a", "b"] and it["output"] == "a"
    q = tmp_path / "uinst_valid.jsonl"  # issue 16: a text answer "[]" in an UnNI-like set is one reference
    q.write_text(json.dumps({"instruction": "i", "output": "[]"}) + "\n")
    assert load_jsonl(q)[0]["answers"] == ["[]"]
    r = tmp_path / "real_list.jsonl"  # a JSON list in the file is a list of references, always
    r.write_text(json.dumps({"instruction": "i", "output": ["x", "y"]}) + "\n")
    assert load_jsonl(r)[0]["answers"] == ["x", "y"]


def test_list_output_error_names_the_setting_and_the_way_out(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps({"instruction": "i", "output": "ok"}) + "\n" +
                 json.dumps({"instruction": "j", "output": "[]"}) + "\n")
    spec = {"name": "uinst", "path": str(p), "list_output": True}
    with pytest.raises(DataError) as e:
        load_set(spec, where="config/mine.yaml", key="evaluation.sets[4]")
    msg = str(e.value)
    assert "line 2, field 'output'" in msg and "\n" not in msg
    assert "because list_output is on ('list_output: true' in key 'evaluation.sets[4]' of config/mine.yaml)" in msg
    assert "set 'list_output: false' in that entry" in msg
    p.write_text(json.dumps({"instruction": "i", "output": "[not json"}) + "\n")
    with pytest.raises(DataError, match="does not parse.*because list_output is on.*list_output: false"):
        load_set(spec, where="config/mine.yaml", key="evaluation.sets[4]")
    p.write_text(json.dumps({"instruction": "i", "output": []}) + "\n")
    with pytest.raises(DataError, match="a list stored in the file is always read as the item's references"):
        load_set({**spec, "list_output": False}, where="config/mine.yaml", key="evaluation.sets[4]")


@needs_shared
def test_load_eval_set_local(tmp_path):
    items = load_eval_set({"name": "dolly", "path": str(INSTRUCT / "dolly_valid.jsonl"), "limit": 7})
    assert len(items) == 7 and items[0]["id"] == "dolly-00001"
    rel = load_eval_set({"name": "sinst", "path": "instruct/sinst_valid.jsonl"}, base_dir=SHARED)
    assert len(rel) == 1694


def test_set_schema_documents_every_key():
    assert set(SET_SCHEMA) == {"name", "path", "hub", "file", "revision", "split", "select", "limit",
                               "expect_items", "list_output", "template"}
    for key, field in SET_SCHEMA.items():
        assert len(field.help) > 40, key  # the reference page is generated from these
    assert SET_SCHEMA["list_output"].default is False


@pytest.mark.parametrize("entry, words", [
    ({"name": "x"}, ["key 'evaluation.sets[1]' needs one of 'path'"]),
    ({"name": "x", "path": "a.jsonl", "hub": "MiniLLM/dolly", "file": "raw.jsonl"}, ["gives 'path' and 'hub'"]),
    ({"name": "x", "hub": "MiniLLM/sinst", "split": "test"}, ["evaluation.sets[1].split", "holds 0_2/valid.jsonl"]),
    ({"name": "x", "path": "a.jsonl", "revision": "main"}, ["'evaluation.sets[1].revision' applies to a 'hub'"]),
    ({"name": "x", "split": "test", "select": {"stop": 3}}, ["'evaluation.sets[1].select' applies to a file"]),
    ({"name": "x", "path": "a.jsonl", "select": {"start": 5, "stop": 5}}, ["takes no row (start 5 >= stop 5)"]),
    ({"name": "x", "path": "a.jsonl", "select": {"first": 5}}, ["unknown key 'evaluation.sets[1].select.first'"]),
    ({"name": "x", "path": "a.jsonl", "select": {"start": -1}}, ["'evaluation.sets[1].select.start' must be >= 0"]),
    ({"name": "x", "path": "a.jsonl", "limit": 0}, ["'evaluation.sets[1].limit' must be >= 1"]),
    ({"name": "x", "path": "a.jsonl", "list_output": "yes"}, ["'evaluation.sets[1].list_output' must be true/false"]),
    ({"name": "x", "path": "a.jsonl", "template": "chatml"}, ["accepted values: file, alpaca, minillm-qwen2"]),
    ({"name": "x", "path": "a.jsonl", "splt": "test"}, ["unknown key 'evaluation.sets[1].splt'"]),
    ({"path": "a.jsonl"}, ["missing required key 'evaluation.sets[1].name'"]),
    ("dolly.jsonl", ["key 'evaluation.sets[1]' must be a mapping"]),
])
def test_set_spec_errors_are_one_line_with_file_and_key(entry, words):
    with pytest.raises(ConfigError) as e:
        check_set_spec(entry, "config/mine.yaml", "evaluation.sets[1]")
    msg = str(e.value)
    assert msg.startswith("config/mine.yaml: ") and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_set_spec_defaults_and_idempotence():
    spec = check_set_spec({"path": "a.jsonl", "select": {"stop": 9}}, "s.yaml", "data.valid", default_name="valid")
    assert spec["name"] == "valid" and spec["select"] == {"start": 0, "stop": 9}
    assert spec["list_output"] is False and spec["template"] == "file" and spec["limit"] is None
    assert check_set_spec(spec, "s.yaml", "data.valid") == spec


def _write_rows(path, n, **extra):
    rows = [{"instruction": f"q{i}", "output": f"a{i}", **extra} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n" +  # a blank line: rows != lines
                    "".join(json.dumps(r) + "\n" for r in rows[3:]))
    return rows


def test_select_limit_expect_items(tmp_path):
    p = tmp_path / "raw.jsonl"
    _write_rows(p, 10)
    take = lambda **kw: [it["instruction"] for it in load_set({"name": "r", "path": str(p), **kw})]  # noqa: E731
    assert take(select={"stop": 4}) == ["q0", "q1", "q2", "q3"]          # rows, not physical lines
    assert take(select={"start": 4}) == [f"q{i}" for i in range(4, 10)]
    assert take(select={"start": 2, "stop": 5}, limit=2) == ["q2", "q3"]  # select first, then limit
    assert take(select={"start": 9, "stop": 50}) == ["q9"]
    ids = [it["id"] for it in load_set({"name": "r", "path": str(p), "select": {"start": 3}})]
    assert ids[:2] == ["r-00005", "r-00006"]  # ids keep the physical line number (line 4 is blank)
    too_far = r"\(key 'data.train' of s.yaml\).*select.start is 10 but the file holds 10 rows"
    with pytest.raises(DataError, match=too_far):
        load_set({"name": "r", "path": str(p), "select": {"start": 10}}, where="s.yaml", key="data.train")
    assert len(load_set({"name": "r", "path": str(p), "expect_items": 10})) == 10
    with pytest.raises(DataError, match="holds 4 items after select/limit, but 'expect_items' is 5"):
        load_set({"name": "r", "path": str(p), "select": {"stop": 4}, "expect_items": 5})


def test_directory_with_file_and_file_without_directory(tmp_path):
    (tmp_path / "11_").mkdir()
    _write_rows(tmp_path / "11_" / "valid.jsonl", 4)
    assert len(load_set({"name": "s", "path": str(tmp_path), "file": "11_/valid.jsonl"})) == 4
    with pytest.raises(DataError, match="is a file, but 'file' names a file inside a directory"):
        load_set({"name": "s", "path": str(tmp_path / "11_" / "valid.jsonl"), "file": "valid.jsonl"})


def test_templates(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi", "prompt": "custom<n>prompt"},
            {"instruction": "Add.", "input": "1 2", "output": "3"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    file_items = load_set({"name": "t", "path": str(p)})
    assert file_items[0]["prompt"] == "custom\nprompt"  # the file's prompt; "<n>" read as a newline (MiniLLM)
    assert file_items[1]["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
        "### Input:\n1 2\n\n### Response:\n")
    alpaca = load_set({"name": "t", "path": str(p), "template": "alpaca"})
    assert alpaca[0]["prompt"] == ("Below is an instruction that describes a task. Write a response that "
                                   "appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n"
                                   "### Response:\n")
    qwen = load_set({"name": "t", "path": str(p), "template": "minillm-qwen2"})
    # MiniLLM's qwen2 template, microsoft/LMOps@4f2a9deb minillm/tools/process_data_dolly.py
    assert qwen[0]["prompt"] == ("<|im_start|>Below is an instruction that describes a task. Write a response "
                                 "that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n"
                                 "### Response:\n<|im_end|><|im_start|>Assistant:")
    assert qwen[1]["prompt"].startswith("<|im_start|>Below is an instruction that describes a task, paired with")
    assert qwen[1]["prompt"].endswith("### Input:\n1 2\n\n### Response:\n<|im_end|><|im_start|>Assistant:")


# ---------------------------------------------------------------- leakage


def _item(instruction, output, input="", answers=None, id="x"):  # noqa: A002
    return {"id": id, "instruction": instruction, "input": input, "output": output,
            "answers": answers or [output]}


def test_find_overlap_by_content():
    a = [_item("What is 2+2?", "Four."), _item("Name a fruit.", "apple"), _item("Q", "A", input="ctx")]
    b = [_item("what  is 2+2? ", "four."),                   # case and whitespace differ: same item
         _item("Name a fruit.", "pear", answers=["pear", "APPLE"]),  # shares one reference
         _item("Q", "A", input="other"),                      # other input: another item
         _item("Name a fruit.", "banana")]                    # same question, other answer: not an overlap
    assert find_overlap(a, b) == [(0, 0), (1, 1)]
    assert find_overlap(a, []) == [] and find_overlap([], b) == []


@needs_shared
def test_minillm_dev_and_test_files_do_not_overlap():
    dev = load_jsonl(INSTRUCT / "dolly_dev.jsonl")
    test = load_jsonl(INSTRUCT / "dolly_valid.jsonl")
    assert find_overlap(dev, test) == []
    # one question is in both, with different answers ("What is the meaning of life?"): not an overlap
    same_q = [(i, j) for i, x in enumerate(dev) for j, y in enumerate(test) if x["prompt"] == y["prompt"]]
    assert same_q == [(635, 183)]
    assert len(find_overlap(test, test)) == 500
    check_no_overlap({"data.valid": dev}, {"evaluation.sets[0] (dolly)": test}, where="s.yaml")
    with pytest.raises(DataError) as e:
        check_no_overlap({"data.valid": test[:10] + dev[:5]}, {"evaluation.sets[0] (dolly)": test}, where="s.yaml")
    msg = str(e.value)
    assert msg.startswith("s.yaml (key 'data.valid'): 10 item(s) of data.valid are also in evaluation.sets[0]")
    assert "'dolly_valid-00001' = 'dolly_valid-00001'" in msg and "\n" not in msg


# ---------------------------------------------------------------- MiniLLM's scoring


@needs_shared
def test_rouge_l_pinned_to_rouge_score_with_max_over_references():
    """ROUGE-L as MiniLLM computes it (microsoft/LMOps@4f2a9deb minillm/rouge_metric.py): the library scorer
    with Porter stemming, F-measure, max over an item's references, x 100, mean over items."""
    from rouge_score import rouge_scorer

    from harness.evaluation.text_metrics import minillm_response, rouge_l, rouge_l_per_item

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = random.Random(3)
    dolly = load_jsonl(INSTRUCT / "dolly_valid.jsonl")[:40]
    sinst = [it for it in load_jsonl(INSTRUCT / "sinst_valid.jsonl") if len(it["answers"]) > 1][:40]
    items = dolly + sinst
    preds = []
    for it in items:  # perturbed references: dropped, swapped and upper-cased words, "<n>" line breaks
        words = rng.choice(it["answers"]).split()
        words = [w.upper() if rng.random() < 0.2 else w for w in words if rng.random() > 0.2]
        if len(words) > 3:
            k = rng.randrange(len(words) - 1)
            words[k], words[k + 1] = words[k + 1], words[k]
        preds.append(" <n>".join(words) if rng.random() < 0.3 else " ".join(words))
    cleaned = [minillm_response(p) for p in preds]
    expected = [100 * max(scorer.score(target=ref, prediction=p)["rougeL"].fmeasure for ref in it["answers"])
                for p, it in zip(cleaned, items)]
    got = rouge_l_per_item(cleaned, [it["answers"] for it in items])
    assert got == pytest.approx(expected, abs=1e-12)
    assert rouge_l(cleaned, [it["answers"] for it in items]) == pytest.approx(sum(expected) / len(expected))
    assert len({round(x, 6) for x in expected}) > 20  # the perturbations really spread the scores
    # "<n>" matters: the scorer keeps its "n" as a word, MiniLLM reads it as a newline before scoring
    assert minillm_response(" a b<n>c ") == "a b\nc"
    raw = 100 * scorer.score("a b c", "a b<n>c")["rougeL"].fmeasure
    assert raw == pytest.approx(100 * 2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert rouge_l([minillm_response("a b<n>c")], [["a b c"]]) == pytest.approx(100.0)


def _err(tmp_path, name, text):
    p = tmp_path / name
    if text is not None:
        p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    return str(e.value), e.value


def test_data_errors(tmp_path):
    msg, err = _err(tmp_path, "missing.jsonl", None)
    assert "missing.jsonl" in msg and "not found" in msg and "Fix:" in msg

    msg, err = _err(tmp_path, "empty.jsonl", "\n\n")
    assert "empty.jsonl" in msg and "line 1" in msg and "empty" in msg and "Fix:" in msg

    good = json.dumps({"instruction": "a", "output": "b"})
    msg, err = _err(tmp_path, "bad.jsonl", good + "\n" + good + "\n{not json\n")
    assert "bad.jsonl" in msg and "line 3" in msg and "field '(whole line)'" in msg and "Fix:" in msg
    assert err.line == 3

    msg, err = _err(tmp_path, "noout.jsonl", good + "\n" + json.dumps({"instruction": "a", "input": "c"}) + "\n")
    assert "noout.jsonl" in msg and "line 2" in msg and "field 'output'" in msg and "Fix:" in msg
    assert (err.line, err.field) == (2, "output")

    msg, err = _err(tmp_path, "noins.jsonl", json.dumps({"output": "b"}) + "\n")
    assert "line 1" in msg and "field 'instruction'" in msg

    msg, err = _err(tmp_path, "list.jsonl", "[1, 2]\n")
    assert "line 1" in msg and "not an object" in msg

    msg, err = _err(tmp_path, "dup.jsonl", json.dumps({"id": "x", "instruction": "a", "output": "b"}) + "\n" +
                    json.dumps({"id": "x", "instruction": "c", "output": "d"}) + "\n")
    assert "line 2" in msg and "field 'id'" in msg
    assert isinstance(err, ValueError)


def test_write_jsonl_atomic_roundtrip(tmp_path):
    items = [{"instruction": "héllo\nworld", "output": "ok"}]
    p = write_jsonl_atomic(tmp_path / "sub" / "x.jsonl", items)
    assert load_jsonl(p)[0]["instruction"] == "héllo\nworld"
    assert [f.name for f in p.parent.iterdir()] == ["x.jsonl"]


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens_and_save_load(tiny_tok):
    tok, out = tiny_tok
    assert len(tok) == 1000
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id != tok.pad_token_id
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    again = load_tokenizer(out)
    text = "What is the capital of Zorvia?\n\n### Response:\nRulik"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert again.pad_token_id == tok.pad_token_id and again.eos_token_id == tok.eos_token_id
    assert tok.encode("ab", add_special_tokens=False) == tok("ab")["input_ids"]  # adds no specials


def test_tokenizer_round_trip(tiny_tok):
    tok, _ = tiny_tok
    texts = ["Héllo, wörld! 你好 🙂\n\n\tindent  two  spaces", "  leading", "trailing  ", "a\r\nb", ""]
    if INSTRUCT.is_dir():
        for f in sorted(INSTRUCT.glob("*.jsonl")):
            lines = f.read_text(encoding="utf-8").splitlines()[:20]
            texts += [json.loads(line)["prompt"] + str(json.loads(line)["output"]) for line in lines]
    for t in texts:
        assert tok.decode(tok.encode(t, add_special_tokens=False)) == t


def test_tokenizer_deterministic(tmp_path):
    texts = item_texts(generate_tiny(0, 300, 20, 20)["train"])
    a = train_tokenizer(texts, 400)
    b = train_tokenizer(texts, 400, tmp_path / "b")
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    with pytest.raises(ValueError):
        train_tokenizer(texts, 100)


def test_tiny_lengths_short(tiny_data, tiny_tok):
    tok, _ = tiny_tok
    lens = [len(encode(tok, it, 256, 512)["input_ids"]) for it in tiny_data["train"]]
    assert max(lens) <= 80


def test_filter_long_prompts(tiny_tok):
    tok, _ = tiny_tok
    items = [
        {"prompt": build_prompt("short")},
        {"prompt": build_prompt("long " * 300)},
        {"prompt": build_prompt("also short")},
    ]
    kept, dropped = filter_long_prompts(items, tok, max_prompt_tokens=256)
    assert dropped == 1 and kept == [items[0], items[2]]
    n = len(tok.encode(items[0]["prompt"], add_special_tokens=False))
    assert filter_long_prompts(items[:1], tok, n) == (items[:1], 0)
    assert filter_long_prompts(items[:1], tok, n - 1) == ([], 1)


# ---------------------------------------------------------------- batching


class ToyTok:
    """One token per character: ord(c) + 10; eos = 2."""

    eos_token_id = 2

    def encode(self, text, add_special_tokens=False):
        return [ord(c) + 10 for c in text]


def test_encode_truncation():
    tok = ToyTok()
    e = encode(tok, {"prompt": "abcdef", "output": "xy"}, max_prompt_tokens=4, max_length=100)
    assert e == {"input_ids": [ord(c) + 10 for c in "cdef"] + [ord("x") + 10, ord("y") + 10, 2], "prompt_len": 4}
    e = encode(tok, {"prompt": "abc", "output": "xyz"}, max_prompt_tokens=10, max_length=5)
    assert e["input_ids"] == [ord(c) + 10 for c in "abcxy"] and e["prompt_len"] == 3  # eos cut off
    e = encode(tok, {"prompt": "abcdef", "output": "x"}, max_prompt_tokens=10, max_length=4)
    assert e["prompt_len"] == 4 and len(e["input_ids"]) == 4
    e = encode(tok, {"prompt": "ab", "output": "x"}, 10, 10, response="zz")
    assert e["input_ids"][2:] == [ord("z") + 10] * 2 + [2]


def test_collate_label_shift():
    pad = 0
    ex = [
        {"input_ids": [11, 12, 13, 21, 22, 2], "prompt_len": 3},  # prompt 11 12 13, response 21 22 eos
        {"input_ids": [14, 15, 23, 2], "prompt_len": 2},
    ]
    b = collate(ex, pad)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape == b["loss_mask"].shape == (2, 6)
    assert b["input_ids"].dtype == torch.long and b["loss_mask"].dtype == torch.float32
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 2], [14, 15, 23, 2, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    # logits at position t predict token t+1: targets only where t+1 is a response token
    assert b["labels"].tolist() == [[-100, -100, 21, 22, 2, -100], [-100, 23, 2, -100, -100, -100]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]]
    assert b["prompt_len"].tolist() == [3, 2] and b["lengths"].tolist() == [6, 4]
    # general identity: labels[:, t] == input_ids[:, t+1] wherever defined
    m = b["labels"][:, :-1] != -100
    assert torch.equal(b["labels"][:, :-1][m], b["input_ids"][:, 1:][m])
    # the number of targets equals the number of response tokens (incl. eos)
    assert b["loss_mask"].sum().item() == (6 - 3) + (4 - 2)


def test_collate_edge_cases():
    b = collate([{"input_ids": [5, 6], "prompt_len": 2}], 0)  # response truncated away
    assert b["loss_mask"].sum().item() == 0
    b = collate([{"input_ids": [5, 6], "prompt_len": 0}], 0)
    assert b["labels"].tolist() == [[6, -100]]
    with pytest.raises(ValueError):
        collate([{"input_ids": [5], "prompt_len": 3}], 0)
    with pytest.raises(ValueError):
        collate([], 0)


def test_collate_equals_a_per_row_reference_on_random_batches():
    """The vectorised collate against the convention written row by row in plain Python."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        ex = []
        for _ in range(int(rng.integers(1, 9))):
            n = int(rng.integers(1, 12))
            ex.append({"input_ids": rng.integers(3, 50, n).tolist(), "prompt_len": int(rng.integers(0, n + 1))})
        b = collate(ex, pad_id=1)
        T = max(len(e["input_ids"]) for e in ex)
        for row, e in enumerate(ex):
            ids, p, n = e["input_ids"], e["prompt_len"], len(e["input_ids"])
            assert b["input_ids"][row].tolist() == ids + [1] * (T - n)
            assert b["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
            want = [ids[t + 1] if t + 1 < n and t + 1 >= max(p, 1) else -100 for t in range(T)]
            assert b["labels"][row].tolist() == want
        assert b["prompt_len"].tolist() == [e["prompt_len"] for e in ex]
        assert b["lengths"].tolist() == [len(e["input_ids"]) for e in ex]
        assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == torch.long
    with pytest.raises(ValueError, match="example 1: prompt_len 4 outside 0..2"):
        collate([{"input_ids": [5, 6], "prompt_len": 1}, {"input_ids": [5, 6], "prompt_len": 4}], 0)
    with pytest.raises(ValueError, match="at least one token"):
        collate([{"input_ids": [], "prompt_len": 0}], 0)


def test_collate_with_real_tokenizer_and_ce(tiny_data, tiny_tok):
    tok, _ = tiny_tok
    items = tiny_data["train"][:8]
    b = collate([encode(tok, it, 256, 512) for it in items], tok.pad_token_id)
    assert b["loss_mask"].sum(1).tolist() == [len(tok.encode(it["output"])) + 1 for it in items]
    logits = torch.randn(*b["input_ids"].shape, len(tok))
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["labels"], ignore_index=-100)
    assert torch.isfinite(loss)


def test_collate_prompts_left_padding():
    ids, mask = collate_prompts([[7, 8, 9], [4]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    assert (ids[:, -1] == torch.tensor([9, 4])).all()  # every row's last prompt token is at T-1


def test_batch_order_deterministic_and_resumable():
    data = list(range(23))
    a = list(iterate_batches(data, 5, seed=1, epoch=0))
    assert a == list(iterate_batches(data, 5, seed=1, epoch=0))
    assert a != list(iterate_batches(data, 5, seed=1, epoch=1))
    assert a != list(iterate_batches(data, 5, seed=2, epoch=0))
    assert sorted(x for batch in a for x in batch) == data
    assert [len(x) for x in a] == [5, 5, 5, 5, 3] and len(a) == num_batches(23, 5)
    assert list(iterate_batches(data, 5, seed=1, epoch=0, start_batch=3)) == a[3:]
    assert list(iterate_batches(data, 5, seed=1, epoch=0, drop_last=True)) == a[:4]
    assert epoch_order(23, 1, 0) == [x for batch in a for x in batch]
    with pytest.raises(ValueError):
        list(iterate_batches(data, 5, 1, 0, start_batch=6))


def test_tiny_files_reload_identically(tmp_path):
    paths = write_tiny(tmp_path, seed=0, sizes=SMALL)
    data = generate_tiny(0, SMALL["train"], SMALL["valid"], SMALL["test"])
    for s, p in paths.items():
        assert load_jsonl(p) == data[s]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "i", "output": "a", "answers": ["b"]}) + "\n")
    with pytest.raises(DataError, match="line 1, field 'answers'"):
        load_jsonl(bad)


def test_item_texts_without_responses():
    items = [{"prompt": "P", "output": "secret", "answers": ["secret", "other"]}]
    assert item_texts(items) == ["Psecret", "other"]
    assert item_texts(items, include_responses=False) == ["P"]


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=5))
def test_collate_property(shapes):
    """For any prompt/response lengths: targets are exactly the next tokens of the response (incl. eos)."""
    examples = []
    for i, (p, r) in enumerate(shapes):
        ids = [100 + 10 * i + k for k in range(p + r)] + [2]
        examples.append({"input_ids": ids, "prompt_len": p})
    b = collate(examples, pad_id=0)
    for row, e in enumerate(examples):
        ids, p = e["input_ids"], e["prompt_len"]
        targets = [(t, b["labels"][row, t].item()) for t in range(b["labels"].shape[1]) if b["labels"][row, t] != -100]
        assert targets == [(t, ids[t + 1]) for t in range(p - 1, len(ids) - 1)]
        assert b["loss_mask"][row].sum().item() == len(ids) - p
