"""Training on the counted rows [N, V] (:func:`harness.distill.train`'s path for losses without sequence-level
terms) is training on [B, T, V]: the same loss curve and the same final parameters, bit for bit; and the teacher
functions' rows form (``f.rows(batch)``, :mod:`harness.teacher_cache`, :func:`harness.steps.live_teacher`) gives
``f(batch)[loss_mask > 0]``, in row-major order of the mask.

Why bitwise: both paths apply the student's output layer to the same hidden rows (``models._head_rows``); the
dense path scatters them into zeros and every objective selects the same rows back, in the same order, with the
same weights (``1 / normalizer``), so the losses and the gradients reaching those rows are the same floats.
"""

from __future__ import annotations

import pytest
import torch

from harness import distill
from harness.data import batching
from harness.distill import TrainConfig, train
from harness.models import build_tiny
from harness.recipes import discover
from harness.steps import live_teacher, reference_batches
from harness.teacher_cache import build_cache, cached_or_live


class _Suite:  # the field reference_batches reads
    def __init__(self, bs):
        self.training = TrainConfig(per_device_train_batch_size=bs)


@pytest.fixture(scope="module")
def setup(tiny_data, tiny_tokenizer):
    tok = tiny_tokenizer
    examples = [batching.encode(tok, it, 40, 48) for it in tiny_data["train"][:48]]
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    teacher = build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}, len(tok), 0, 64, special).eval()
    return tok, examples, teacher, special


def _run(setup, recipe: str, teacher_fn, *, rows: bool, monkeypatch, chunk_size=None):
    tok, examples, _, special = setup
    monkeypatch.setattr(distill, "_ROWS", rows)
    loss = discover("recipes")[recipe].build_loss()
    student = build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}, len(tok), 1, 64, special)
    cfg = TrainConfig(max_steps=5, per_device_train_batch_size=6, gradient_accumulation_steps=2, log_every=1,
                      learning_rate=1e-2, chunk_size=chunk_size, kernel="torch")
    result = train(student, reference_batches(_Suite(6), examples, tok.pad_token_id, seed=3), cfg, seed=3,
                   loss=loss, teacher_logits=teacher_fn if loss.needs_teacher else None, progress=False)
    return result, student.state_dict()


def _assert_same(a, b):
    (ra, pa), (rb, pb) = a, b
    assert ra.curve == rb.curve and ra.parts == rb.parts
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("recipe", ["sft", "fkl", "sinkhorn", "skl", "tvd", "uld"])
def test_rows_path_trains_exactly_as_the_dense_path(setup, recipe, monkeypatch, one_thread):
    teacher_fn = live_teacher(setup[2])
    assert discover("recipes")[recipe].build_loss().rowwise
    _assert_same(_run(setup, recipe, teacher_fn, rows=True, monkeypatch=monkeypatch),
                 _run(setup, recipe, teacher_fn, rows=False, monkeypatch=monkeypatch))


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_rows_path_with_a_cached_teacher_and_chunks(setup, chunk_size, monkeypatch, one_thread):
    tok, examples, teacher, _ = setup
    cache = build_cache(teacher, examples, tok.pad_token_id, mode="exact", dtype="float32", progress=False)
    teacher_fn = cached_or_live(cache, None)
    _assert_same(_run(setup, "sinkhorn", teacher_fn, rows=True, monkeypatch=monkeypatch, chunk_size=chunk_size),
                 _run(setup, "sinkhorn", teacher_fn, rows=False, monkeypatch=monkeypatch, chunk_size=chunk_size))


def test_the_comparison_sees_rows_out_of_order(setup, monkeypatch, one_thread):
    """The test above can fail: student rows in another order than the teacher's and the labels change the run."""
    real = distill.counted_rows
    monkeypatch.setattr(distill, "counted_rows", lambda *a: real(*a).flip(0))
    teacher_fn = live_teacher(setup[2])
    shuffled = _run(setup, "sinkhorn", teacher_fn, rows=True, monkeypatch=monkeypatch)
    with pytest.raises(AssertionError):
        _assert_same(shuffled, _run(setup, "sinkhorn", teacher_fn, rows=False, monkeypatch=monkeypatch))


def test_losses_with_sequence_level_terms_keep_the_dense_form():
    recipes = discover("recipes")
    assert not recipes["minillm"].build_loss().rowwise
    assert not recipes["distillm2"].build_loss().rowwise
    from harness.cross_tokenizer import CrossTokenizerLoss

    assert not CrossTokenizerLoss(recipes["uld"].build_loss()).rowwise  # per-sequence alignment across tokenizers


def _mixed_batch(examples, pad_id, cached_rows, cached_ids):
    """Rows the cache has never seen (student samples) interleaved with reference rows named by ``cached_rows``."""
    sampled = iter([{"input_ids": e["input_ids"][: e["prompt_len"]] + [5, 6, 7][: i + 1], "prompt_len": e["prompt_len"]}
                    for i, e in enumerate(examples[10:13])])
    cached = dict(zip(cached_rows, cached_ids))
    n = len(cached_rows) + 3
    rows = [examples[cached[b]] if b in cached else next(sampled) for b in range(n)]
    batch = batching.collate(rows, pad_id)
    batch["source"] = "generated"
    batch["cached_rows"], batch["cached_example_ids"] = torch.tensor(cached_rows), torch.tensor(cached_ids)
    return batch


@pytest.mark.parametrize("plain_live", [False, True])
def test_a_mixed_batch_gives_the_rows_of_the_dense_form(setup, plain_live):
    tok, examples, teacher, _ = setup
    cache = build_cache(teacher, examples[:6], tok.pad_token_id, mode="exact", dtype="float32", progress=False)
    live = live_teacher(teacher)
    if plain_live:  # a live teacher function without a rows form: its dense output's rows
        dense_live = live
        live = lambda b: dense_live(b)  # noqa: E731
    batch = _mixed_batch(examples, tok.pad_token_id, [4, 0, 2], [1, 5, 3])  # unsorted, live rows in between
    fn = cached_or_live(cache, live)
    mask = batch["loss_mask"] > 0
    rows = fn.rows(batch)
    assert rows.shape == (int(mask.sum()), cache.vocab_size)
    assert torch.equal(rows, fn(batch)[mask])
    # batch row b's block: the cache's rows of its example (rows 4, 0, 2), the teacher's logits (rows 1, 3, 5)
    blocks = rows.split(mask.sum(1).tolist())
    for b, example in ((4, 1), (0, 5), (2, 3)):
        assert torch.equal(blocks[b], cache.rows(torch.tensor([example])))
    with torch.no_grad():
        full = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for b in (1, 3, 5):
        torch.testing.assert_close(blocks[b], full[b][mask[b]], rtol=1e-5, atol=1e-5)


def test_live_and_cached_rows_equal_their_dense_forms(setup):
    tok, examples, teacher, _ = setup
    batch = batching.collate(examples[:8], tok.pad_token_id)
    batch["example_ids"] = torch.arange(8)
    mask = batch["loss_mask"] > 0
    live = live_teacher(teacher)
    with torch.no_grad():
        assert torch.equal(live.rows(batch), live(batch)[mask])
    for mode in ("exact", "sparse", "sampled"):
        cache = build_cache(teacher, examples[:8], tok.pad_token_id, mode=mode, top_k=8, samples=8, dtype="float32",
                            progress=False)
        assert torch.equal(cache.teacher_rows(batch), cache.teacher_logits(batch)[mask]), mode
        assert torch.equal(cached_or_live(cache, None).rows(batch), cache.rows(torch.arange(8))), mode
    short = dict(batch, example_ids=torch.arange(7))  # rows that are not the batch's: refused, not mis-served
    with pytest.raises(ValueError, match="rebuild it"):
        cache.teacher_rows(short)
