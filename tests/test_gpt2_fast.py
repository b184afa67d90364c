"""harness.gpt2_fast against transformers' own GPT-2: hidden states, gradients, decoded tokens, and who is served."""

from __future__ import annotations

import pytest
import torch

from harness import gpt2_fast
from harness.evaluation.generation import generate
from harness.models import counted_rows, full_logits
from harness.modes.sampling import sample_rows
from tests.conftest import tiny_gpt2


def _gpt2(vocab=40, layers=2, embd=32, heads=4, activation="gelu", seed=0, **extra):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=embd, n_layer=layers, n_head=heads,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      activation_function=activation, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, **extra))


def _batch(B=6, T=12, vocab=40, seed=1, pad_right=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B, 2):  # every other row padded by b tokens
        if pad_right:
            mask[b, T - b:] = 0
        else:
            mask[b, :b] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
@pytest.mark.parametrize("padded", [False, True])
def test_hidden_states_and_gradients_equal_the_library(activation, padded):
    model = _gpt2(activation=activation)
    ids, mask = _batch()
    if not padded:
        mask = torch.ones_like(mask)
    valid = mask.bool()
    ref = model.transformer(input_ids=ids, attention_mask=mask)[0]
    (ref[valid] ** 2).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    new = gpt2_fast.hidden_states(model, ids, mask)
    (new[valid] ** 2).sum().backward()
    torch.testing.assert_close(new[valid], ref[valid], rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch.isfinite(new).all()  # padded positions too (no NaN from fully masked rows)


def test_full_logits_and_counted_rows_equal_the_library():
    model = _gpt2()
    ids, mask = _batch()
    loss_mask = mask.clone()
    loss_mask[:, :3] = 0
    ref = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(full_logits(model, ids, mask)[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(counted_rows(model, ids, mask, loss_mask), ref[loss_mask.bool()], rtol=1e-5, atol=1e-5)


def _counted(ids, mask, share=0.3, empty_row=2, seed=3):
    """Scattered counted positions (real tokens only), with one row that counts nothing."""
    g = torch.Generator().manual_seed(seed)
    rows = (torch.rand(ids.shape, generator=g) < share) & mask.bool()
    rows[empty_row] = False
    return rows


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("pad_right", [True, False])
@pytest.mark.parametrize("share", [0.3, 1.0])
def test_counted_hidden_states_and_gradients_equal_the_library(layers, pad_right, share):
    model = _gpt2(layers=layers).double()  # float64: round-off far below any mistake (a wrong key or mask)
    ids, mask = _batch(pad_right=pad_right)
    rows = _counted(ids, mask, share)
    ref = model.transformer(input_ids=ids, attention_mask=mask)[0][rows]
    (ref ** 2).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    new = gpt2_fast.counted_hidden_states(model, ids, mask, rows)
    assert new.shape == (int(rows.sum()), 32)
    torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-10)
    (new ** 2).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_counted_hidden_states_without_counted_rows_or_mask():
    model = _gpt2()
    ids, mask = _batch()
    none = torch.zeros_like(mask, dtype=torch.bool)
    out = gpt2_fast.counted_hidden_states(model, ids, mask, none)
    assert out.shape == (0, 32) and out.requires_grad
    rows = _counted(ids, torch.ones_like(mask))
    ref = model.transformer(input_ids=ids)[0][rows]
    torch.testing.assert_close(gpt2_fast.counted_hidden_states(model, ids, None, rows), ref, rtol=1e-5, atol=1e-6)


def test_counted_hidden_states_skip_the_work_no_counted_row_needs():
    """A short response at the end of a right-padded row: the matmuls of the forward drop to well under the full
    forward's (positions after the last counted one and padding cost nothing; the last block's queries and MLP run
    on the counted rows only), and tokens after a row's last counted position cannot change anything."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _gpt2(layers=2)
    ids, mask = _batch(B=8, T=24, pad_right=True)
    lengths = mask.sum(1)
    rows = torch.zeros_like(mask, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        rows[b, n - 4 : n - 1] = True  # a 3-token response; the final token has no target
    with FlopCounterMode(display=False) as full:
        model.transformer(input_ids=ids, attention_mask=mask)
    with FlopCounterMode(display=False) as counted:
        out = gpt2_fast.counted_hidden_states(model, ids, mask, rows)
    assert counted.get_total_flops() < 0.65 * full.get_total_flops()
    changed = ids.clone()
    changed[torch.arange(8), lengths - 1] = 5  # every row's final token
    torch.testing.assert_close(gpt2_fast.counted_hidden_states(model, changed, mask, rows), out)


def _left_padded(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("sampling", [False, True])
def test_decode_returns_generates_tokens(sampling):
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

    from harness.draw import sampling_processors

    model = _gpt2(vocab=12, seed=3).eval()  # a small vocabulary: rows meet eos (2) at different steps
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 12, (n,), generator=g).tolist() for n in (3, 7, 5, 1, 6, 7, 2, 4)]
    ids, mask = _left_padded(prompts)

    def draws():
        return sampling_processors(0.8, 0, 0.95, torch.Generator().manual_seed(7)) if sampling else []

    def run(eos):
        return gpt2_fast.decode(model, ids, mask, max_new_tokens=10, eos_id=eos, pad_id=0,
                                processors=[NoRepeatNGramLogitsProcessor(2)] + draws())

    eos = int(run(-1)[:, ids.shape[1] + 2].mode().values)  # a token some rows produce at step 3: they end there
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=eos,
                         pad_token_id=0, no_repeat_ngram_size=2, logits_processor=LogitsProcessorList(draws()))
    new = run(eos)
    ended = (new[:, ids.shape[1]:] == eos).any(-1)
    assert 0 < int(ended.sum()) < len(prompts)  # some rows end early, others run on (padding after eos)
    assert torch.equal(new, ref)


def test_decode_greedy_equals_full_forwards():
    """Independent of generate(): each greedy token is the argmax of a full forward over the row so far."""
    model = _gpt2(vocab=30, seed=4).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    ids, mask = _left_padded(prompts)
    out = gpt2_fast.decode(model, ids, mask, max_new_tokens=5, eos_id=2, pad_id=0)
    for b, prompt in enumerate(prompts):
        row = list(prompt)
        for _ in range(out.shape[1] - ids.shape[1]):
            with torch.no_grad():
                token = int(model(input_ids=torch.tensor([row])).logits[0, -1].argmax())
            row.append(token)
            if token == 2:
                break
        got = out[b, ids.shape[1]:].tolist()[: len(row) - len(prompt)]
        assert got == row[len(prompt):]


@pytest.fixture(scope="module")
def model_and_tok(tiny_tokenizer):
    return tiny_gpt2(tiny_tokenizer, n_layer=2, seed=6), tiny_tokenizer


def test_samplers_give_the_same_rows_with_and_without_the_fast_path(model_and_tok, monkeypatch):
    model, tok = model_and_tok
    texts = ["Q: 1 + 1 =", "List: a b c d", "Capital of", "Name three colours and a"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0, max_new_tokens=8, max_length=48,
              seed=3, top_p=0.9)
    gen_kw = dict(max_prompt_tokens=16, max_length=40, max_new_tokens=8, batch_size=3, progress=False,
                  seed=2, num_return_sequences=2)
    assert gpt2_fast.eligible(model) and gpt2_fast.plain_generation_config(model)
    fast_rows, fast_texts = sample_rows(model, prompts, **kw), generate(model, tok, texts, **gen_kw)
    monkeypatch.setenv("DISTILLBENCH_GPT2_FAST", "0")
    assert not gpt2_fast.eligible(model)
    assert sample_rows(model, prompts, **kw) == fast_rows
    assert generate(model, tok, texts, **gen_kw) == fast_texts


def test_only_plain_gpt2_models_are_served():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _gpt2()
    assert gpt2_fast.eligible(model.train()) and gpt2_fast.eligible(model.eval())
    assert not gpt2_fast.eligible(model.transformer)  # the body alone: not a head model
    assert not gpt2_fast.eligible(_gpt2(scale_attn_by_inverse_layer_idx=True))
    dropout = _gpt2()
    dropout.config.resid_pdrop = 0.1
    assert not gpt2_fast.eligible(dropout.train()) and gpt2_fast.eligible(dropout.eval())
    hooked = _gpt2()
    hooked.transformer.h[0].register_forward_hook(lambda *a: None)
    assert not gpt2_fast.eligible(hooked)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    assert not gpt2_fast.eligible(llama)


def test_a_generation_config_that_adds_processors_keeps_the_library_path():
    model = _gpt2()
    assert gpt2_fast.plain_generation_config(model)
    model.generation_config.repetition_penalty = 1.3
    assert not gpt2_fast.plain_generation_config(model)


# ------------------------------------------------------------------------------------------ cached prefixes (past)
def _library_keys_values(model, ids):
    """Keys | values [n_layer, L, 2H] of one row, from the library's own KV cache."""
    cache = model(input_ids=ids[None], use_cache=True).past_key_values
    out = []
    for layer in cache.layers:
        k, v = layer.keys[0], layer.values[0]  # [heads, L, D]
        out.append(torch.cat([k.transpose(0, 1).flatten(1), v.transpose(0, 1).flatten(1)], dim=-1))
    return torch.stack(out)


@pytest.mark.parametrize("layers", [1, 3])
def test_prefix_keys_values_equal_the_library_cache(layers):
    model = _gpt2(layers=layers).double().eval()
    ids = torch.tensor([5, 9, 3, 17, 22, 8, 4])
    with torch.no_grad():
        ref = _library_keys_values(model, ids)
    new = gpt2_fast.prefix_keys_values(model, ids)
    assert new.shape == (layers, 7, 64)
    torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
    assert gpt2_fast.prefix_keys_values(model, ids[:0]).shape == (layers, 0, 64)


def _prompt_rows(mask, response=4):
    """Right-padded rows whose last ``response`` real positions are counted; the prompt ends one before."""
    lengths = mask.sum(1)
    prompt_len = (lengths - response).clamp_min(1)
    rows = torch.zeros_like(mask, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prompt_len.tolist(), lengths.tolist())):
        rows[b, p - 1: n - 1] = True
    return prompt_len, rows


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_counted_hidden_states_from_cached_prefixes_equal_the_library(layers):
    """Each row's first positions given as keys and values (some rows none, one row counting nothing): the hidden
    states of the counted positions equal the library's full forward (float64)."""
    model = _gpt2(layers=layers).double().eval()
    ids, mask = _batch(B=7, T=14, pad_right=True)
    prompt_len, rows = _prompt_rows(mask)
    rows[3] = False  # counts nothing: no prefix, no work
    prefix = (prompt_len - 1).masked_fill(~rows.any(1), 0)
    prefix[5] = 0  # a row computed in full
    with torch.no_grad():
        ref = model.transformer(input_ids=ids, attention_mask=mask)[0][rows]
        kv = torch.cat([gpt2_fast.prefix_keys_values(model, ids[b, :n]) for b, n in enumerate(prefix.tolist())], 1)
        new = gpt2_fast.counted_hidden_states(model, ids, mask, rows, (prefix, kv))
    torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-10)


def test_counted_hidden_states_refuse_a_counted_position_inside_the_prefix():
    model = _gpt2().eval()
    ids, mask = _batch(B=2, T=8)
    rows = torch.zeros_like(mask, dtype=torch.bool)
    rows[:, 2:5] = True
    prefix = torch.tensor([3, 2])  # row 0's counted position 2 lies in its prefix
    kv = torch.cat([gpt2_fast.prefix_keys_values(model, ids[b, :n]) for b, n in enumerate(prefix.tolist())], 1)
    with pytest.raises(ValueError, match="inside its row's given prefix"):
        gpt2_fast.counted_hidden_states(model, ids, mask, rows, (prefix, kv))
    with pytest.raises(ValueError, match="past holds"):
        gpt2_fast.counted_hidden_states(model, ids, mask, rows, (torch.tensor([2, 2]), kv))


def test_a_cached_prefix_removes_the_prompts_work():
    """With every prompt's keys and values given, the forward's matmuls cover the last prompt token and the response
    only: well under half of the work without them."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _gpt2(layers=3).eval()
    ids, mask = _batch(B=8, T=24, pad_right=True)
    prompt_len, rows = _prompt_rows(mask, response=3)
    prefix = prompt_len - 1
    kv = torch.cat([gpt2_fast.prefix_keys_values(model, ids[b, :n]) for b, n in enumerate(prefix.tolist())], 1)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        gpt2_fast.counted_hidden_states(model, ids, mask, rows)
    with torch.no_grad(), FlopCounterMode(display=False) as cached:
        gpt2_fast.counted_hidden_states(model, ids, mask, rows, (prefix, kv))
    assert cached.get_total_flops() < 0.4 * plain.get_total_flops()


@pytest.mark.parametrize("sampling", [False, True])
def test_decode_from_cached_prompts_equals_decode(sampling):
    """The prompts' keys and values given (all but each prompt's last token): the same tokens as decoding them."""
    from harness.draw import sampling_processors

    model = _gpt2(vocab=12, seed=3).double().eval()  # float64: no argmax or draw flips on round-off
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 12, (n,), generator=g).tolist() for n in (3, 7, 5, 1, 6, 7, 2, 4)]
    ids, mask = _left_padded(prompts)

    def run(past):
        draws = sampling_processors(0.8, 0, 0.95, torch.Generator().manual_seed(7)) if sampling else []
        return gpt2_fast.decode(model, ids, mask, max_new_tokens=10, eos_id=2, pad_id=0, processors=draws,
                                past=past)

    past = torch.cat([gpt2_fast.prefix_keys_values(model, torch.tensor(p[:-1])) for p in prompts], dim=1)
    want = run(None)
    for _ in range(3):  # freed NaN memory of the caches' size [8, 4, 17, 8]: padding columns must not read it
        poison = [torch.full((8, 4, 17, 8), float("nan"), dtype=torch.float64) for _ in range(4)]
        del poison
        assert torch.equal(run(past), want)
    with pytest.raises(ValueError, match="past holds"):
        run(past[:, 1:])
