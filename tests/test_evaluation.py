"""Tests for harness.evaluation: ROUGE-L (pinned), generation, text/model metrics, lm-eval, driver.

Everything runs offline on tiny models built here (a byte-level BPE tokenizer trained in a fixture and
2-layer GPT-2s): a random one, an all-zero one (uniform next-token distribution, so log-likelihoods
are known exactly) and one trained to memorise a handful of items (so greedy outputs are known).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from harness.evaluation import (
    EVAL_SEEDS,
    calibration_ece,
    coverage,
    distinct_n,
    ece_from_logits,
    evaluate_model,
    exact_match,
    generate,
    item_answers,
    load_rouge_metric,
    model_metrics,
    normalize_answer,
    response_nll,
    rouge_l,
    run_lm_eval,
    teacher_agreement,
    valid_rate,
    write_task_configs,
)
from harness.evaluation.generation import encode_prompts
from harness.evaluation.lm_eval_bridge import flatten_results, infer_task_kind, load_template
from harness.evaluation.metrics.rouge_l.rouge_core import rouge_l_item, rouge_l_per_item
from harness.evaluation.model_metrics import (agreement_stats, ece_bin_stats, ece_from_bin_stats, nll_stats,
                                             teacher_fit_stats, teacher_response_logits)
from harness.report.metric_info import metric_info

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTILLBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))

TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# Items the "memorised" model learns (prompt -> first answer); the colour item has three answers.
MEMO = [
    ("Name the capital of France.", ["paris"]),
    ("What is two plus two?", ["four", "4"]),
    ("Name a primary colour.", ["red", "blue", "yellow"]),
    ("Which animal says moo?", ["a cow"]),
    ("Spell the word dog backwards.", ["god"]),
    ("What is the opposite of hot?", ["cold"]),
]


def make_item(i: int, instruction: str, answers: list[str], **extra) -> dict:
    return {
        "id": f"t{i}",
        "task": "test",
        "instruction": instruction,
        "input": "",
        "output": answers[0],
        "answers": list(answers),
        "prompt": TEMPLATE.format(instruction=instruction),
        **extra,
    }


MEMO_ITEMS = [make_item(i, ins, ans) for i, (ins, ans) in enumerate(MEMO)]


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def single_thread_torch():
    """Tiny models gain nothing from intra-op threads, and oversubscribed cores make them crawl."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [it["prompt"] + " ".join(it["answers"]) for it in MEMO_ITEMS] * 20
    corpus += ["the cat sat on the mat", "the quick brown fox jumps over the lazy dog"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def tiny_gpt2(tokenizer, seed: int = 0, initializer_range: float = 0.02):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=initializer_range,
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def random_model(tokenizer):
    # a larger init makes logits (and top-1 margins) larger than float round-off
    return tiny_gpt2(tokenizer, seed=1, initializer_range=0.5)


@pytest.fixture(scope="module")
def zero_model(tokenizer):
    """All parameters 0: logits are 0, the next-token distribution is uniform over the vocabulary."""
    model = tiny_gpt2(tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def collate(tokenizer, items, response_key="output"):
    """Test collate: prompt + response + eos, RIGHT padded, labels shifted (target of logits[t])."""
    seqs, starts = [], []
    for it in items:
        p = tokenizer(it["prompt"], add_special_tokens=False)["input_ids"]
        r = tokenizer(it[response_key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + r)
        starts.append(len(p))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for b, (s, start) in enumerate(zip(seqs, starts)):
        ids[b, : len(s)] = torch.tensor(s)
        att[b, : len(s)] = 1
        for t in range(start - 1, len(s) - 1):
            labels[b, t] = s[t + 1]
    return {"input_ids": ids, "attention_mask": att, "labels": labels, "loss_mask": (labels != -100).float()}


@pytest.fixture(scope="module")
def memorised_model(tokenizer):
    """Trained to answer each MEMO prompt with its first answer (colour item: all three answers)."""
    rows = [dict(it, output=it["answers"][0]) for it in MEMO_ITEMS]
    rows += [dict(MEMO_ITEMS[2], output=a) for a in MEMO_ITEMS[2]["answers"][1:]]
    batch = collate(tokenizer, rows)
    model = tiny_gpt2(tokenizer, seed=0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(200):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_pinned_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5; P = R = 5/6
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(250 / 3)
    # pred 3 tokens, ref 5 tokens, LCS "a b" = 2 -> P = 2/3, R = 2/5, F = 2PR/(P+R) = 0.5
    assert rouge_l_item("a x b", ["a b c d e"]) == pytest.approx(50.0)
    # identical modulo case/punctuation -> 100; stemming: "cats running" ~ "cat run"
    assert rouge_l_item("The Cat, sat!", ["the cat sat"]) == pytest.approx(100.0)
    assert rouge_l_item("cats running", ["cat runs"]) == pytest.approx(100.0)
    # empty prediction -> 0
    assert rouge_l([""], [["anything at all"]]) == 0.0


def test_rouge_l_max_over_references_and_mean_over_items():
    # S-NI style: several references, the best one counts (50.0 vs 83.33 vs 0)
    refs = ["a b c d e", "the cat is on the mat", "nothing shared here"]
    assert rouge_l_item("the cat sat on the mat", refs) == pytest.approx(250 / 3)
    assert rouge_l_per_item(["the cat sat on the mat", "", "a x b"], [refs, ["x"], ["a b c d e"]]) == pytest.approx(
        [250 / 3, 0.0, 50.0]
    )
    assert rouge_l(["the cat sat on the mat", "", "a x b"], [refs, ["x"], ["a b c d e"]]) == pytest.approx(
        (250 / 3 + 0 + 50) / 3
    )
    with pytest.raises(ValueError):
        rouge_l(["a"], [[]])
    with pytest.raises(ValueError):
        rouge_l(["a", "b"], [["a"]])
    with pytest.raises(TypeError):
        rouge_l(["a"], ["a"])  # a bare string is not a reference list


def test_rouge_metric_module_loads_offline_and_matches_pure_function():
    metric = load_rouge_metric()
    preds = ["the cat sat on the mat", "", "a x b"]
    refs = [["a b c d e", "the cat is on the mat"], ["x"], ["a b c d e"]]
    out = metric.compute(predictions=preds, references=refs)
    assert set(out) == {"rougeL"}
    assert out["rougeL"] == pytest.approx(rouge_l(preds, refs))
    assert out["rougeL"] == pytest.approx((250 / 3 + 0 + 50) / 3)


def test_rouge_real_sni_reference_against_itself_is_100():
    path = SHARED_DATA / "instruct" / "sinst_valid.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    refs = [r["output"] if isinstance(r["output"], list) else [r["output"]] for r in rows]
    preds = [r[-1] for r in refs]  # the last reference of each item, scored against all of them
    assert len(preds) > 100 and any(len(r) > 1 for r in refs)
    assert rouge_l(preds, refs) == pytest.approx(100.0)


# ------------------------------------------------------------------------------------- text metrics
def test_exact_match_valid_rate_hand_computed():
    answers = [["Paris"], ["four", "4"], ["red", "blue"]]
    assert normalize_answer("  The  Cat!\n") == "the cat"
    # "paris." matches (case, punctuation); "4 " matches; "green" does not -> 2/3
    assert exact_match(["paris.", "4 ", "green"], answers) == pytest.approx(200 / 3)
    assert exact_match([], []) == 0.0
    # 6 samples, valid: paris, PARIS, four, blue -> 4/6
    samples = [["paris", "PARIS", "rome"], ["four"], ["blue", "green"]]
    assert valid_rate(samples, answers) == pytest.approx(400 / 6)
    # one sample per item: valid_rate == exact_match
    assert valid_rate([["paris."], ["4 "], ["green"]], answers) == pytest.approx(200 / 3)
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_coverage_hand_computed():
    answers = [["Paris"], ["red", "blue", "yellow"], ["yes", "Yes.", "no"]]
    samples = [["rome"], ["red", "Red", "blue", "green"], ["yes", "yes"]]
    # item 0 ignored (one answer); item 1: {red, blue} of 3 -> 2/3; item 2: answers {yes, no}, {yes} -> 1/2
    assert coverage(samples, answers) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert coverage([["a"], ["b"]], [["a"], ["b", "B"]]) is None  # no item with >= 2 distinct answers
    assert coverage([["x"]], [["x", "y"]]) == pytest.approx(0.5)


def test_distinct_n_hand_computed():
    texts = ["a b a b", "a b c", ""]
    # unigrams: a b a b a b c -> 7 total, 3 unique
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: (a b)(b a)(a b) + (a b)(b c) -> 5 total, unique {ab, ba, bc} = 3
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["a"], 2) == 0.0
    assert distinct_n(["x y z"], 3) == 1.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


# ------------------------------------------------------------------------------------ model metrics
def _two_way_logits(p: float) -> list[float]:
    """Logits over V=2 with softmax = (p, 1 - p)."""
    return [math.log(p), math.log(1 - p)]


def test_ece_from_logits_hand_built():
    # confidences (top-1 prob) .85 .85 .65 .65 (+ one masked token with .95); predicted class 0
    logits = torch.tensor([[_two_way_logits(0.85), _two_way_logits(0.85), _two_way_logits(0.65),
                            _two_way_logits(0.65), _two_way_logits(0.95)]])
    labels = torch.tensor([[0, 1, 0, 1, 1]])  # correct, wrong, correct, wrong, (wrong but masked)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # 10 bins: (0.8, 0.9]: acc .5, conf .85, gap .35; (0.6, 0.7]: acc .5, conf .65, gap .15; weights 1/2
    assert ece_from_logits(logits, labels, mask, n_bins=10) == pytest.approx(0.25)
    # -100 labels are excluded like a zero mask
    assert ece_from_logits(logits, torch.tensor([[0, 1, 0, 1, -100]]), None, n_bins=10) == pytest.approx(0.25)
    # one bin: |acc .5 - mean conf .75| = .25
    assert ece_from_logits(logits, labels, mask, n_bins=1) == pytest.approx(0.25)
    # 3 of 4 correct: (0.8, 0.9] acc .5 gap .35, (0.6, 0.7] acc 1 gap .35 -> .35; one bin: |.75 - .75| = 0
    three_right = torch.tensor([[0, 1, 0, 0, 1]])
    assert ece_from_logits(logits, three_right, mask, n_bins=10) == pytest.approx(0.35)
    assert ece_from_logits(logits, three_right, mask, n_bins=1) == pytest.approx(0.0, abs=1e-7)
    # counts land in the expected bins
    count, conf_sum, correct = ece_bin_stats(logits, labels, mask, n_bins=10)
    assert count.tolist() == [0, 0, 0, 0, 0, 0, 2, 0, 2, 0]
    assert conf_sum[8].item() == pytest.approx(1.7) and correct[8].item() == 1
    # nothing selected -> 0
    assert ece_from_logits(logits, labels, torch.zeros_like(mask)) == 0.0


def test_agreement_and_nll_stats_hand_built():
    # token 1: teacher (.5, .5) [argmax 0], student (.25, .75) [argmax 1] -> disagree, KL = .5 ln(4/3)
    # token 2: both (.8, .2) -> agree, KL 0; token 3 masked out
    student = torch.tensor([[_two_way_logits(0.25), _two_way_logits(0.8), [9.0, -9.0]]])
    teacher = torch.tensor([[[0.0, 0.0], _two_way_logits(0.8), [-9.0, 9.0]]])
    labels = torch.tensor([[1, 0, -100]])
    agree, kl_sum, n = agreement_stats(student, teacher, labels)
    assert (agree, n) == (1.0, 2)
    assert kl_sum == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    # extra (padded) teacher vocabulary columns are cut before normalising
    padded = torch.cat([teacher, torch.full((1, 3, 2), 50.0)], dim=-1)
    assert agreement_stats(student, padded, labels)[1] == pytest.approx(kl_sum, abs=1e-6)
    # NLL of labels 1 then 0: -ln .75 - ln .8 ... for the student: -ln(.75) - ln(.8)
    nll, n = nll_stats(student, labels)
    assert n == 2 and nll == pytest.approx(-math.log(0.75) - math.log(0.8), abs=1e-6)


def _np_fit_reference(student, teacher, labels):
    """Independent float64 numpy formulas: per response token, with p = softmax(teacher), q = softmax(student)
    over the shared vocabulary prefix: agreement, KL(p||q), JSD = 0.5 KL(p||m) + 0.5 KL(q||m) with m = (p + q)/2
    formed directly (not in the log domain), TVD = 0.5 sum |p - q|."""
    import numpy as np

    v = min(student.shape[-1], teacher.shape[-1])
    keep = (labels != -100).numpy()
    zs = student.double().numpy()[keep][:, :v]
    zt = teacher.double().numpy()[keep][:, :v]
    q = np.exp(zs - zs.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    p = np.exp(zt - zt.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    m = 0.5 * (p + q)

    def kl(a, b):
        return np.where(a > 0, a * (np.log(np.where(a > 0, a, 1.0)) - np.log(b)), 0.0).sum(-1)

    return {
        "agree": float((p.argmax(-1) == q.argmax(-1)).sum()),
        "kl": float(kl(p, q).sum()),
        "jsd": float((0.5 * kl(p, m) + 0.5 * kl(q, m)).sum()),
        "tvd": float((0.5 * np.abs(p - q).sum(-1)).sum()),
        "n": int(keep.sum()),
    }


def test_teacher_fit_two_way_hand_computed():
    # token 1: teacher (.5, .5), student (.25, .75); token 2: both (.8, .2); token 3 masked
    student = torch.tensor([[_two_way_logits(0.25), _two_way_logits(0.8), [9.0, -9.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.0, 0.0], _two_way_logits(0.8), [-9.0, 9.0]]], dtype=torch.float64)
    labels = torch.tensor([[1, 0, -100]])
    st = teacher_fit_stats(student, teacher, labels)
    m = (0.375, 0.625)
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert st["n"] == 2 and st["agree"] == 1.0
    assert st["kl"] == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert st["jsd"] == pytest.approx(jsd, abs=1e-6)  # token 2 contributes 0
    assert st["tvd"] == pytest.approx(0.25, abs=1e-6)
    # disjoint one-hot distributions: JSD -> ln 2 (its maximum), TVD -> 1
    far = teacher_fit_stats(torch.tensor([[[60.0, -60.0]]]), torch.tensor([[[-60.0, 60.0]]]), torch.tensor([[0]]))
    assert far["jsd"] == pytest.approx(math.log(2), abs=1e-6) and far["tvd"] == pytest.approx(1.0, abs=1e-6)


def test_teacher_fit_stats_against_numpy_reference(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    student = 3 * torch.randn(2, 6, 7, generator=gen)
    teacher = 3 * torch.randn(2, 6, 9, generator=gen)  # two padded vocabulary columns, cut before softmax
    labels = torch.randint(0, 7, (2, 6), generator=gen)
    labels[0, :2] = -100
    labels[1, 5] = -100
    ref = _np_fit_reference(student, teacher, labels)
    got = teacher_fit_stats(student, teacher, labels)
    assert got["n"] == ref["n"] == 9 and got["agree"] == ref["agree"]
    for key in ("kl", "jsd", "tvd"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    # properties: JSD and TVD are symmetric, KL is not; all are 0 for identical inputs; JSD <= ln 2 per token
    swapped = teacher_fit_stats(teacher[..., :7], student, labels)
    assert swapped["jsd"] == pytest.approx(got["jsd"], rel=1e-5) and swapped["tvd"] == pytest.approx(got["tvd"], rel=1e-5)
    assert swapped["kl"] != pytest.approx(got["kl"], rel=1e-3)
    same = teacher_fit_stats(student, student, labels)
    assert same["jsd"] == pytest.approx(0.0, abs=1e-6) and same["tvd"] == pytest.approx(0.0, abs=1e-6)
    assert got["jsd"] <= got["n"] * math.log(2)
    # chunking over tokens changes nothing
    monkeypatch.setattr(sys.modules["harness.evaluation.model_metrics"], "FIT_CHUNK_ROWS", 2)
    chunked = teacher_fit_stats(student, teacher, labels)
    for key in ("agree", "kl", "jsd", "tvd", "n"):
        assert chunked[key] == pytest.approx(got[key], rel=1e-6), key
    # the metric is the jsd objective at beta = 0.5 and the tvd objective (the report's legend says so)
    from harness.objectives.divergences import jsd as jsd_objective, tvd as tvd_objective

    keep = labels != -100
    log_q = torch.log_softmax(student[keep].double(), -1)
    log_p = torch.log_softmax(teacher[keep][:, :7].double(), -1)
    assert float(jsd_objective(log_q, log_p, beta=0.5).sum()) == pytest.approx(ref["jsd"], rel=1e-9)
    assert float(tvd_objective(log_q, log_p).sum()) == pytest.approx(ref["tvd"], rel=1e-9)


def test_model_metrics_on_models(tokenizer, zero_model, random_model):
    items = MEMO_ITEMS
    one_batch = [collate(tokenizer, items)]
    three_batches = [collate(tokenizer, items[i : i + 2]) for i in range(0, len(items), 2)]
    vocab = len(tokenizer)
    # uniform model: NLL = ln V exactly, ppl = V; confidence 1/V, accuracy 0 (argmax = token 0 = eos)
    out = response_nll(zero_model, one_batch)
    assert out["response_nll"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert out["response_ppl"] == pytest.approx(vocab, rel=1e-4)
    # self-agreement is perfect, KL 0
    agree = teacher_agreement(random_model, random_model, one_batch)
    assert agree["top1_agreement"] == 1.0 and agree["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert agree["jsd_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert agree["tvd_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    # token-pooled over batches: right padding leaves the response logits unchanged
    pooled = model_metrics(random_model, three_batches, teacher=zero_model)
    whole = model_metrics(random_model, one_batch, teacher=zero_model)
    for key in ("ece", "response_nll", "top1_agreement", "kl_to_teacher", "jsd_to_teacher", "tvd_to_teacher",
                "n_response_tokens"):
        assert pooled[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6)
    assert 0.0 < pooled["jsd_to_teacher"] <= math.log(2) and 0.0 < pooled["tvd_to_teacher"] <= 1.0
    assert 0.0 <= pooled["ece"] <= 1.0 and 0.0 <= pooled["top1_agreement"] <= 1.0
    assert pooled["kl_to_teacher"] > 0.0
    assert calibration_ece(random_model, one_batch) == pytest.approx(whole["ece"])
    assert random_model.training is False


def test_model_metrics_response_rows_and_teacher_logits_once(tokenizer, random_model, memorised_model):
    """model_metrics computes logits at the response positions only and may take the teacher's rows computed
    once (teacher_response_logits): both give what the library's full forwards give through the pure stats."""
    batches = [collate(tokenizer, MEMO_ITEMS[i : i + 2]) for i in range(0, len(MEMO_ITEMS), 2)]
    bins, nll, n, fit = [torch.zeros(15, dtype=torch.float64) for _ in range(3)], 0.0, 0, {}
    with torch.no_grad():
        for batch in batches:
            student = random_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            teacher = memorised_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for acc, part in zip(bins, ece_bin_stats(student, batch["labels"], batch["loss_mask"])):
                acc += part
            s, k = nll_stats(student, batch["labels"], batch["loss_mask"])
            nll, n = nll + s, n + k
            for key, value in teacher_fit_stats(student, teacher, batch["labels"], batch["loss_mask"]).items():
                fit[key] = fit.get(key, 0.0) + value
    expected = {"ece": ece_from_bin_stats(*bins), "response_nll": nll / n, "n_response_tokens": float(n),
                "top1_agreement": fit["agree"] / n, "kl_to_teacher": fit["kl"] / n, "jsd_to_teacher": fit["jsd"] / n,
                "tvd_to_teacher": fit["tvd"] / n}
    rows = teacher_response_logits(memorised_model, batches)
    assert [r.shape[0] for r in rows] == [int((b["labels"] != -100).sum()) for b in batches]
    for out in (model_metrics(random_model, batches, teacher=memorised_model),
                model_metrics(random_model, batches, teacher_logits=rows)):
        for key, value in expected.items():
            assert out[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    with pytest.raises(ValueError, match="teacher_logits holds 1 batches"):
        model_metrics(random_model, batches, teacher_logits=rows[:1])


# --------------------------------------------------------------------------------------- generation
PROMPTS = [
    TEMPLATE.format(instruction="Name the capital of France."),
    "the cat",
    TEMPLATE.format(instruction="the quick brown fox jumps over the lazy dog " * 2),
    "a",
    TEMPLATE.format(instruction="What is the opposite of hot?"),
]


def test_encode_prompts_truncates_from_the_left(tokenizer):
    full = tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    assert len(full) > 8
    assert encode_prompts(tokenizer, [PROMPTS[2], "a"], 8) == [full[-8:], tokenizer("a", add_special_tokens=False)["input_ids"]]


def tiny_llama(tokenizer, seed: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.5,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_greedy_batched_equals_unbatched(tokenizer, random_model, arch):
    """Left padding is correct: positions come from the attention mask, pads are never attended."""
    model = random_model if arch == "gpt2" else tiny_llama(tokenizer)
    kw = dict(do_sample=False, max_new_tokens=12, progress=False)
    batched = generate(model, tokenizer, PROMPTS, batch_size=4, **kw)
    single = generate(model, tokenizer, PROMPTS, batch_size=1, **kw)
    assert batched == single
    assert all(len(s) == 1 and isinstance(s[0], str) for s in batched)
    assert any(s[0] for s in batched)  # not all empty


def test_generate_sampling_is_seeded_and_leaves_rng_alone(tokenizer, random_model):
    kw = dict(max_new_tokens=10, batch_size=2, progress=False)
    torch.manual_seed(123)
    a = generate(random_model, tokenizer, PROMPTS, seed=10, **kw)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = generate(random_model, tokenizer, PROMPTS, seed=10, **kw)
    assert a == b
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # the caller's RNG stream is untouched by generate
    c = generate(random_model, tokenizer, PROMPTS, seed=20, **kw)
    assert c != a
    many = generate(random_model, tokenizer, PROMPTS[:2], seed=10, num_return_sequences=3, **kw)
    assert [len(s) for s in many] == [3, 3]
    with pytest.raises(ValueError):
        generate(random_model, tokenizer, PROMPTS, do_sample=False, num_return_sequences=2)
    assert generate(random_model, tokenizer, [], progress=False) == []


@pytest.mark.parametrize("fast", ["1", "0"])  # harness.gpt2_fast's decoding, and the library's generate()
def test_generate_respects_length_limits(tokenizer, random_model, monkeypatch, fast):
    from harness import gpt2_fast

    monkeypatch.setenv("DISTILLBENCH_GPT2_FAST", fast)
    calls = []
    original, original_decode = random_model.generate, gpt2_fast.decode

    def spy(**kwargs):
        out = original(**kwargs)
        calls.append((kwargs["input_ids"].shape[1], out.shape[1], kwargs["attention_mask"]))
        return out

    def spy_decode(model, input_ids, attention_mask, **kwargs):
        out = original_decode(model, input_ids, attention_mask, **kwargs)
        calls.append((input_ids.shape[1], out.shape[1], attention_mask))
        return out

    monkeypatch.setattr(random_model, "generate", spy)
    monkeypatch.setattr(gpt2_fast, "decode", spy_decode)
    generate(random_model, tokenizer, PROMPTS, max_prompt_tokens=8, max_length=14, batch_size=2, progress=False)
    assert calls
    for width, total, mask in calls:
        assert width <= 8 and total <= 14
        # left padding: every row's real tokens end at the last column
        assert mask[:, -1].all()
    # the model's context (n_positions=128) caps max_length=512
    calls.clear()
    generate(random_model, tokenizer, PROMPTS[:1], do_sample=False, max_length=512, progress=False)
    assert calls[0][1] <= 128


def test_generate_memorised_answers_stop_at_eos(tokenizer, memorised_model):
    prompts = [it["prompt"] for it in MEMO_ITEMS]
    out = generate(memorised_model, tokenizer, prompts, do_sample=False, batch_size=3, progress=False)
    greedy = [s[0] for s in out]
    for text, item in zip(greedy, MEMO_ITEMS):
        assert text in item["answers"], (text, item["answers"])
    assert greedy[0] == "paris" and greedy[5] == "cold"


# ------------------------------------------------------------------------------------------ lm-eval
def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_lm_eval_templates_and_flattening(tmp_path):
    mc, gen = load_template("mc"), load_template("gen")
    assert mc["output_type"] == "multiple_choice" and gen["output_type"] == "generate_until"
    assert gen["generation_kwargs"]["until"] == ["<|endoftext|>", "\n\n"]
    assert {m["metric"] for m in gen["metric_list"]} == {"exact_match"}
    assert infer_task_kind([{"choices": ["a"], "label": 0}]) == "mc"
    assert infer_task_kind([{"choices": ["a"], "label": 0}, {"output": "x"}]) == "gen"
    data = _write_jsonl(tmp_path / "d.jsonl", [make_item(0, "x", ["y"])])
    (written,) = write_task_configs({"my_task": data}, tmp_path / "tasks")
    import yaml

    cfg = yaml.safe_load(written.read_text())
    assert cfg["task"] == "my_task" and cfg["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())
    flat = flatten_results({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "em,strict": 1}})
    assert flat == {"lm_eval/t/acc": 0.5, "lm_eval/t/em_strict": 1.0}


def test_run_lm_eval_offline_uniform_model_prefers_fewest_tokens(tmp_path, tokenizer, zero_model):
    """A uniform model scores a choice by -n_tokens * ln V: the shortest choice always wins."""
    short, mid, long = "cat", "the cat sat", "the quick brown fox jumps over the lazy dog"
    rows_short_gold, rows_long_gold = [], []
    for i, (ins, _) in enumerate(MEMO[:4]):
        order = [[short, mid, long], [long, short, mid], [mid, long, short], [short, long, mid]][i]
        rows_short_gold.append(make_item(i, ins, [short], choices=order, label=order.index(short)))
        rows_long_gold.append(make_item(i, ins, [long], choices=order, label=order.index(long)))
    task_data = {
        "db_short_gold": _write_jsonl(tmp_path / "short.jsonl", rows_short_gold),
        "db_long_gold": {"path": str(_write_jsonl(tmp_path / "long.jsonl", rows_long_gold)), "kind": "mc"},
    }
    out = run_lm_eval(zero_model, tokenizer, task_data, batch_size=8)
    assert out["lm_eval/db_short_gold/acc"] == 1.0
    assert out["lm_eval/db_long_gold/acc"] == 0.0
    assert all(0.0 <= v <= 1.0 for v in out.values())


def test_run_lm_eval_builds_tasks_once_and_scores_each_model_afresh(tmp_path, tokenizer, zero_model,
                                                                     memorised_model, monkeypatch):
    """The built tasks are reused across models (one TaskManager.load), yet each call scores its own model:
    the memorised model answers every item, the uniform one (greedy: always the same token) none; a data
    file rewritten in place is read again."""
    from lm_eval.tasks import TaskManager

    loads = []
    real_load = TaskManager.load
    monkeypatch.setattr(TaskManager, "load", lambda self, *a, **k: loads.append(1) or real_load(self, *a, **k))
    path = _write_jsonl(tmp_path / "gen.jsonl", MEMO_ITEMS)
    task = {"db_reuse_gen": {"path": str(path), "kind": "gen"}}
    scores = [run_lm_eval(m, tokenizer, task, batch_size=8)["lm_eval/db_reuse_gen/exact_match"]
              for m in (memorised_model, zero_model, memorised_model)]
    assert scores == [1.0, 0.0, 1.0] and len(loads) == 1
    _write_jsonl(path, [{**it, "answers": ["zzz"]} for it in MEMO_ITEMS])  # same path, new answers
    assert run_lm_eval(memorised_model, tokenizer, task, batch_size=8)["lm_eval/db_reuse_gen/exact_match"] == 0.0
    assert len(loads) == 2


def test_run_lm_eval_fast_path_matches_lm_eval_simple_evaluate(tmp_path, tokenizer, memorised_model,
                                                                zero_model, monkeypatch):
    """The cached-task path (lm-eval's ``evaluate`` on tasks built once) gives exactly the numbers of
    lm-eval's own ``simple_evaluate``, for loglikelihood and generation tasks and two models."""
    from harness.evaluation import lm_eval_bridge as bridge

    mc_rows = [make_item(i, ins, ans, choices=[ans[0], "the lazy dog", "brown fox"], label=0)
               for i, (ins, ans) in enumerate(MEMO)]
    task = {"db_same_mc": _write_jsonl(tmp_path / "mc.jsonl", mc_rows),
            "db_same_gen": _write_jsonl(tmp_path / "gen.jsonl", MEMO_ITEMS)}
    out = {}
    for fast in (False, True, False, True):
        monkeypatch.setattr(bridge, "_fast_path", lambda fast=fast: fast)
        for name, model in (("memorised", memorised_model), ("zero", zero_model)):
            out.setdefault((fast, name), []).append(run_lm_eval(model, tokenizer, task, batch_size=8))
    for name in ("memorised", "zero"):
        assert out[(True, name)] == out[(False, name)]
        assert out[(True, name)][0] == out[(True, name)][1]
    assert out[(True, "memorised")][0]["lm_eval/db_same_mc/acc"] == 1.0
    assert set(out[(True, "zero")][0]) == {"lm_eval/db_same_mc/acc", "lm_eval/db_same_mc/acc_norm",
                                            "lm_eval/db_same_gen/exact_match"}


def _short_context_copy(model, tokenizer, n_positions: int):
    """The same GPT-2 with its position table cut to ``n_positions`` (identical outputs on shorter inputs)."""
    from transformers import GPT2LMHeadModel

    cfg = model.config.to_dict()
    cfg["n_positions"] = n_positions
    small = GPT2LMHeadModel(type(model.config).from_dict(cfg)).eval()
    state = {k: (v[:n_positions] if k.endswith("wpe.weight") else v) for k, v in model.state_dict().items()}
    small.load_state_dict(state, strict=False)
    return small


def test_mc_items_from_answers_deterministic_and_valid():
    from harness.evaluation.lm_eval_bridge import mc_items_from_answers

    items = [make_item(i, f"What is {i} plus 1?", [str(i + 1)]) | {"task": "add"} for i in range(8)]
    items += [make_item(20 + i, f"Reverse {w}.", [w[::-1]]) | {"task": "reverse"} for i, w in enumerate(["ab", "cd"])]
    items += [make_item(30, "Name a colour.", ["red", "blue"]) | {"task": "add"}]  # several answers: skipped
    mc = mc_items_from_answers(items, n_choices=4, seed=3)
    assert [it["id"] for it in mc] == [f"t{i}" for i in range(8)]  # 'reverse' has 2 answers only: skipped
    for it in mc:
        assert len(it["choices"]) == len(set(it["choices"])) == 4
        assert it["choices"][it["label"]] == it["answers"][0]
        others = [c for j, c in enumerate(it["choices"]) if j != it["label"]]
        assert all(c in {str(k + 1) for k in range(8)} and c != it["answers"][0] for c in others)
        assert "red" not in it["choices"]  # a several-answer item never lends distractors
    assert mc_items_from_answers(items, n_choices=4, seed=3) == mc  # deterministic
    assert mc_items_from_answers(items, n_choices=4, seed=4) != mc
    assert {it["label"] for it in mc} != {mc[0]["label"]}  # the gold is not always in one position
    assert infer_task_kind(mc) == "mc" and "choices" not in items[0]  # inputs untouched


def test_lm_eval_generation_never_truncates_prompts(tmp_path, tokenizer, memorised_model, caplog):
    """lm-eval keeps the last (context - max_gen_toks) prompt tokens; with the template's 32 new tokens a
    small-context model (the tiny suite's: 48) lost the question. The bridge fits max_gen_toks instead."""
    from harness.evaluation.lm_eval_bridge import fit_max_gen_toks, model_context_length

    longest = max(len(tokenizer(it["prompt"], add_special_tokens=False)["input_ids"]) for it in MEMO_ITEMS)
    context = longest + 6  # room for the memorised answers (+ eos), not for 32 tokens
    small = _short_context_copy(memorised_model, tokenizer, context)
    assert model_context_length(small) == context
    assert fit_max_gen_toks("t", MEMO_ITEMS, tokenizer, context, 32) == 6
    assert fit_max_gen_toks("t", MEMO_ITEMS, tokenizer, context, 4) == 4
    with pytest.raises(ValueError, match="no room to generate"):
        fit_max_gen_toks("t", MEMO_ITEMS, tokenizer, longest, 32)
    task = {"db_memo_gen": _write_jsonl(tmp_path / "gen.jsonl", MEMO_ITEMS)}
    caplog.set_level("WARNING")
    out = run_lm_eval(small, tokenizer, task, batch_size=8)
    assert not [r for r in caplog.records if "truncation" in r.getMessage().lower()]
    assert out["lm_eval/db_memo_gen/exact_match"] == 1.0  # the whole question reached the model


# ----------------------------------------------------------------------------------------- driver
def test_evaluate_model_end_to_end(tmp_path, tokenizer, memorised_model, random_model):
    gen_items = MEMO_ITEMS
    mc_rows = [
        make_item(i, ins, ans, choices=[ans[0], "the lazy dog", "brown fox"][::1 - 2 * (i % 2)],
                  label=0 if i % 2 == 0 else 2)
        for i, (ins, ans) in enumerate(MEMO)
    ]
    lm_tasks = {
        "memo": {
            "db_memo_mc": _write_jsonl(tmp_path / "mc.jsonl", mc_rows),
            "db_memo_gen": _write_jsonl(tmp_path / "gen.jsonl", gen_items),
        }
    }
    batches = {"memo": [collate(tokenizer, gen_items)]}

    # greedy: one pass, reported as greedy; memorised answers -> ROUGE-L and EM 100
    res = evaluate_model(
        memorised_model, tokenizer, {"memo": gen_items}, teacher=memorised_model,
        batches_for_model_metrics=batches, gen_cfg={"do_sample": False, "progress": False},
        lm_eval_tasks=lm_tasks, lm_eval_kwargs={"batch_size": 8},
    )["memo"]
    assert res["greedy"] == 1.0 and res["n_eval_seeds"] == 1.0 and res["n_items"] == 6.0
    assert res["rougeL"] == pytest.approx(100.0) and res["exact_match"] == pytest.approx(100.0)
    assert res["valid_rate"] == pytest.approx(100.0)
    # coverage over the two several-answer items, one greedy sample each: 1/2 and 1/3
    assert res["coverage"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert res["top1_agreement"] == 1.0 and res["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert res["response_nll"] < 0.5 and 0.0 <= res["ece"] <= 1.0
    assert res["lm_eval/db_memo_mc/acc"] == 1.0
    assert res["lm_eval/db_memo_gen/exact_match"] == 1.0
    # the report knows the better direction of every metric the evaluation writes (timings and counts aside)
    not_metrics = {"greedy", "n_items", "n_eval_seeds", "n_response_tokens"}
    undeclared = [k for k in res if not k.endswith("_s") and k not in not_metrics and metric_info(k) is None]
    assert undeclared == []
    assert {"jsd_to_teacher", "tvd_to_teacher", "response_nll"} <= set(res)
    for key in ("generation_s", "eval_time_s", "lm_eval_s", "model_metrics_s"):
        assert res[key] >= 0.0
    assert res["eval_time_s"] >= res["generation_s"] + res["lm_eval_s"]

    # sampling, 2 seeds, extra coverage samples, no teacher / batches / lm-eval
    odd = [make_item(10, "Say something.", ["ok"])]
    res = evaluate_model(
        random_model, tokenizer, {"memo": gen_items, "odd": odd},
        gen_cfg={"max_new_tokens": 8, "progress": False}, eval_seeds=(10, 20), n_coverage_samples=4,
    )
    memo, odd_res = res["memo"], res["odd"]
    assert memo["greedy"] == 0.0 and memo["n_eval_seeds"] == 2.0
    for key in ("rougeL", "exact_match", "valid_rate"):
        assert 0.0 <= memo[key] <= 100.0
    assert 0.0 <= memo["coverage"] <= 1.0 and 0.0 <= memo["distinct_1"] <= 1.0
    assert memo["rougeL_seed_std"] >= 0.0
    assert odd_res["coverage"] is None
    assert "ece" not in memo and "top1_agreement" not in memo
    with pytest.raises(ValueError):
        evaluate_model(random_model, tokenizer, {"odd": odd}, gen_cfg={"seed": 1})


def test_item_answers_and_seeds():
    assert item_answers({"answers": ["a", "b"], "output": "a"}) == ["a", "b"]
    assert item_answers({"output": "x"}) == ["x"]
    assert item_answers({"output": ["x", "y"]}) == ["x", "y"]
    assert EVAL_SEEDS == (10, 20, 30, 40, 50)


def test_lm_eval_model_shortcuts_match_hflm(tokenizer, random_model, memorised_model, monkeypatch):
    """The wrapper :func:`run_lm_eval` uses (memoised ``tok_encode``, GPT-2 forwards and greedy decoding through
    ``harness.gpt2_fast``) answers lm-eval's requests as ``HFLM`` itself does: the same log-likelihoods up to
    float round-off, the same greedy flags and the same generated strings; and it does take its shortcuts."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from harness import gpt2_fast
    from harness.evaluation.lm_eval_bridge import _hflm_class

    contexts = [it["prompt"] for it in MEMO_ITEMS] + ["the cat", "the quick brown"]
    continuations = [" paris", " four", " the lazy dog", " sat on the mat", " fox"]
    ll = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in
          enumerate((c, x) for c in contexts for x in continuations)]
    until = {"until": ["\n\n", "<|endoftext|>"], "max_gen_toks": 12, "do_sample": False}
    gen = [Instance("generate_until", {}, (c, dict(until)), i) for i, c in enumerate(contexts)]
    decodes = []
    real_decode = gpt2_fast.decode
    monkeypatch.setattr(gpt2_fast, "decode", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    for model in (random_model, memorised_model):
        kwargs = {"pretrained": model, "tokenizer": tokenizer, "batch_size": 3, "device": "cpu", "max_length": 128}
        library, ours = HFLM(**kwargs), _hflm_class()(**kwargs)
        expected, got = library.loglikelihood(ll, disable_tqdm=True), ours.loglikelihood(ll, disable_tqdm=True)
        assert [g for _, g in got] == [g for _, g in expected]
        assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], rel=1e-5, abs=1e-5)
        texts = ours.generate_until(gen, disable_tqdm=True)
        assert texts == library.generate_until(gen, disable_tqdm=True)
        assert ours.generate_until(gen, disable_tqdm=True) == texts  # memoised encodings, same answers
    assert decodes, "the greedy requests did not go through harness.gpt2_fast.decode"
    assert texts[0].strip() == "paris"  # the memorised model answers (its generation was really compared)
