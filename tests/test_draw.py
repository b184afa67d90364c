"""The token draw (harness.draw) and the samplers built on it: the distribution against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch

from harness.draw import CategoricalDraw, categorical, sampling_processors
from harness.evaluation.generation import generate
from harness.modes.sampling import sample_rows
from tests.conftest import tiny_gpt2


def _first_above(cum: list[float], x: float) -> int:
    """Independent inverse CDF: the first index whose running sum exceeds x (pure Python floats)."""
    for i, c in enumerate(cum):
        if c > x:
            return i
    return len(cum) - 1


def test_categorical_is_the_inverse_cdf_of_one_uniform_per_row():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(64, 50, generator=g) ** 4  # unnormalised rows, some near 0
    probs[:, ::7] = 0.0
    drawn = categorical(probs, torch.Generator().manual_seed(11))
    u = torch.rand((64, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(11))  # the same stream
    for b in range(64):
        row = [float(x) for x in probs[b].double()]
        cum = [sum(row[: i + 1]) for i in range(len(row))]
        assert int(drawn[b]) == _first_above(cum, float(u[b]) * cum[-1])


def test_categorical_frequencies_match_the_probabilities_and_zeros_are_never_drawn():
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    n = 200_000
    drawn = categorical(p.repeat(n, 1) * 3.0, torch.Generator().manual_seed(0))  # scale must not matter
    counts = torch.bincount(drawn, minlength=len(p)).double()
    assert counts[p == 0].sum() == 0
    for k in torch.nonzero(p).flatten().tolist():
        sd = math.sqrt(n * float(p[k]) * (1 - float(p[k])))
        assert abs(float(counts[k]) - n * float(p[k])) < 5 * sd, (k, float(counts[k]))


def test_categorical_one_hot_rows_and_shape_errors():
    p = torch.eye(5)
    assert categorical(p, torch.Generator().manual_seed(0)).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"probs \[B, V\]"):
        categorical(torch.ones(5), None)


def test_categorical_draw_processor_returns_zero_at_the_drawn_token_only():
    scores = torch.randn(8, 30)
    out = CategoricalDraw(torch.Generator().manual_seed(5))(torch.zeros(8, 3, dtype=torch.long), scores)
    token = categorical(torch.softmax(scores, -1), torch.Generator().manual_seed(5))
    assert torch.equal(out.argmax(-1), token)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(8, dtype=torch.long))
    assert float(out.max()) == 0.0


def test_sampling_processors_order_and_identity_settings():
    g = torch.Generator()
    names = [type(p).__name__ for p in sampling_processors(0.7, 5, 0.9, g)]
    assert names == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "CategoricalDraw"]
    assert [type(p).__name__ for p in sampling_processors(1.0, 0, 1.0, g)] == ["CategoricalDraw"]


@pytest.fixture(scope="module")
def model_and_tok(tiny_tokenizer):
    return tiny_gpt2(tiny_tokenizer, n_layer=1, seed=4), tiny_tokenizer


def test_sample_rows_first_token_follows_the_models_tempered_softmax(model_and_tok):
    model, tok = model_and_tok
    prompt = tok("Q: 2 + 3 =", add_special_tokens=False)["input_ids"]
    n, temperature = 20_000, 0.9
    rows = sample_rows(model, [prompt] * n, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=temperature,
                       max_new_tokens=1, max_length=48, seed=1)
    first = torch.tensor([r["input_ids"][len(prompt)] for r in rows])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    p = torch.softmax(logits / temperature, -1)
    counts = torch.bincount(first, minlength=len(p)).double()
    # chi-square over the tokens of expected count >= 5, the rest pooled: far below the 1e-6 tail
    big = n * p >= 5
    chi2 = float((((counts[big] - n * p[big]) ** 2) / (n * p[big])).sum())
    rest_e, rest_o = float(n * p[~big].sum()), float(counts[~big].sum())
    chi2 += (rest_o - rest_e) ** 2 / max(rest_e, 1e-9)
    dof = int(big.sum())
    assert chi2 < dof + 8 * math.sqrt(2 * dof), (chi2, dof)


def test_sample_rows_top_k_1_is_greedy_and_leaves_the_global_rng_alone(model_and_tok):
    model, tok = model_and_tok
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Q: 1 + 1 =", "List: a b", "Capital of")]
    state = torch.get_rng_state()
    rows = sample_rows(model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0, top_k=1,
                       max_new_tokens=6, max_length=48, seed=9)
    assert torch.equal(torch.get_rng_state(), state)
    for prompt, row in zip(prompts, rows):  # greedy decoding by full forwards, independent of generate()
        ids = list(prompt)
        for _ in range(row["sample_len"]):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert row["input_ids"] == ids


def test_evaluation_generate_samples_per_seed_and_returns_n_sequences(model_and_tok):
    model, tok = model_and_tok
    prompts = ["Q: 1 + 1 =", "List: a b", "Capital of"]
    kw = dict(max_prompt_tokens=16, max_length=40, max_new_tokens=6, batch_size=2, progress=False,
              no_repeat_ngram_size=0)
    a = generate(model, tok, prompts, seed=1, **kw)
    assert a == generate(model, tok, prompts, seed=1, **kw)
    assert any(generate(model, tok, prompts, seed=s, **kw) != a for s in (2, 3, 4))
    many = generate(model, tok, prompts, seed=1, num_return_sequences=3, **kw)
    assert [len(x) for x in many] == [3, 3, 3]
    greedy = generate(model, tok, prompts, do_sample=False, **kw)
    assert generate(model, tok, prompts, seed=5, top_k=1, **kw) == greedy
