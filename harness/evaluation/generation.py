"""Batched generation for evaluation (HF ``generate`` with the KV cache).

Protocol defaults (MiniLLM / DistiLLM): sampling with temperature 1.0, top-p 1.0, top-k 0 (disabled),
``no_repeat_ngram_size=6``, prompt ≤ 256 tokens (truncated from the LEFT, so the "### Response:" end
survives), prompt + continuation ≤ 512 tokens; one sample per item per evaluation seed, seeds
:data:`EVAL_SEEDS`, mean of the metric reported. ``do_sample=False`` gives greedy decoding, which must
be *reported as greedy* (it is not the protocol's number).

Determinism: the output is a function of (model, tokenizer, prompts, settings, ``seed``,
``batch_size``). Tokens are drawn by :func:`harness.draw.categorical` from a generator seeded with ``seed`` once
before the first batch; the global torch RNG is untouched. Prompts are
processed longest first (less padding) and returned in input order. Greedy outputs do not depend on the
batching (left padding + attention-mask-derived positions), up to float round-off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .. import gpt2_fast
from ..draw import sampling_processors

EVAL_SEEDS: tuple[int, ...] = (10, 20, 30, 40, 50)

__all__ = ["EVAL_SEEDS", "generate", "encode_prompts", "model_max_positions"]


def model_max_positions(model) -> int | None:
    """The model's context size (``n_positions`` / ``max_position_embeddings``) if its config has one."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, no special tokens added (the training encoding's convention, as in
    ``harness.data.batching.encode_prompt``), keeping the LAST ``max_prompt_tokens`` tokens.
    Returns ``[N][L_i]`` with ``1 <= L_i <= max_prompt_tokens``."""
    if max_prompt_tokens < 1:
        raise ValueError("max_prompt_tokens must be >= 1")
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    out = []
    for i, seq in enumerate(ids):
        if len(seq) == 0:
            raise ValueError(f"prompt {i} encodes to no token")
        out.append(list(seq[-max_prompt_tokens:]))
    return out


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the longest: ``input_ids [B, L]`` and ``attention_mask [B, L]`` (0 on padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = 6,
    max_prompt_tokens: int = 256,
    max_length: int = 512,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    seed: int = 10,
    num_return_sequences: int = 1,
    progress: bool = True,
) -> list[list[str]]:
    """Generate continuations of ``prompts``; returns ``[N][num_return_sequences]`` decoded strings.

    Args:
        model: a HF causal LM (its device is used; it is put in eval mode for the call and restored).
        tokenizer: its tokenizer; must define ``eos_token_id`` (``pad_token_id`` falls back to eos).
        prompts: ``N`` prompt strings (the Alpaca prompt, ending with ``"### Response:\\n"``).
        do_sample: sample (protocol) or greedy (``False``; report it as greedy).
        temperature, top_p, top_k: sampling settings; ``top_k=0`` disables top-k (HF's default is 50).
        no_repeat_ngram_size: forbid repeating any n-gram of this size (0 disables).
        max_prompt_tokens: prompts are truncated from the left to this many tokens.
        max_length: bound on prompt + continuation tokens per sequence; clamped to the model's
            context size when the config declares a smaller one.
        max_new_tokens: new-token budget; default ``max_length - max_prompt_tokens`` (MiniLLM pads
            prompts to ``max_prompt_tokens``, giving every item the same budget); always also clamped
            so that the batch's longest prompt + continuation ≤ ``max_length``.
        batch_size: prompts per ``generate`` call (left padding inside a batch).
        seed: seed of the draws' generator, set once before the first batch (global RNG untouched).
        num_return_sequences: samples per prompt (needs ``do_sample=True`` when > 1).
        progress: show a tqdm bar over batches.

    Returns:
        For each prompt, in input order, its ``num_return_sequences`` continuations: generated tokens
        only, stopped at eos, decoded with ``skip_special_tokens=True`` and stripped.
    """
    if num_return_sequences < 1:
        raise ValueError("num_return_sequences must be >= 1")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("greedy decoding returns one sequence per prompt; use do_sample=True")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not prompts:
        return []
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer needs an eos token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    context = model_max_positions(model)
    total_cap = min(max_length, context) if context else max_length
    max_prompt_tokens = min(max_prompt_tokens, total_cap - 1)
    budget = max_new_tokens if max_new_tokens is not None else max_length - max_prompt_tokens

    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first, stable
    device = next(model.parameters()).device
    # Sampling runs generate() greedy on processors that draw the token (harness.draw: one uniform per row from
    # `generator`, the global RNG untouched); the sampling settings a checkpoint's generation_config may carry are
    # neutralised either way. Rows are repeated here for num_return_sequences (what generate would do).
    gen_kwargs = dict(
        do_sample=False,
        no_repeat_ngram_size=no_repeat_ngram_size,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    generator = torch.Generator(device=device).manual_seed(int(seed) % (2**63))
    processors = sampling_processors(temperature, top_k, top_p, generator) if do_sample else []
    if processors:
        from transformers import LogitsProcessorList

        gen_kwargs["logits_processor"] = LogitsProcessorList(processors)
    fast = gpt2_fast.eligible(model) and gpt2_fast.plain_generation_config(model)
    if fast:  # generate()'s own processors come first: n-gram blocking, then the caller's (the draw last)
        from transformers import NoRepeatNGramLogitsProcessor

        ngram = [NoRepeatNGramLogitsProcessor(no_repeat_ngram_size)] if no_repeat_ngram_size else []
        processors = ngram + processors

    results: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            input_ids, attention_mask = _left_pad([encoded[i] for i in idx], pad_id)
            width = input_ids.shape[1]
            new_tokens = min(budget, total_cap - width)
            if new_tokens < 1:
                for i in idx:
                    results[i] = [""] * num_return_sequences
                continue
            input_ids = input_ids.repeat_interleave(num_return_sequences, 0).to(device)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, 0).to(device)
            if fast:  # harness.gpt2_fast: generate()'s decoding without its per-step overhead
                out = gpt2_fast.decode(model, input_ids, attention_mask, max_new_tokens=new_tokens, eos_id=eos_id,
                                       pad_id=pad_id, processors=processors)
            else:
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                     **gen_kwargs)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for row, i in enumerate(idx):
                chunk = texts[row * num_return_sequences : (row + 1) * num_return_sequences]
                results[i] = [t.strip() for t in chunk]
    finally:
        model.train(was_training)
    return results
