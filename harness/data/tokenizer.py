"""A small byte-level BPE tokenizer trained locally (no Hub access).

Special tokens: ``<|endoftext|>`` (id 0; used as both eos and bos, GPT-2 style) and ``<pad>``
(id 1). ``encode(text)`` adds no special tokens; decoding is exact for any text
(byte-level: every string round-trips, ``clean_up_tokenization_spaces`` is off). Training is
deterministic for the same texts and settings. ``save_pretrained(out_dir)`` output loads offline
with ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)


def item_texts(items: Iterable[dict], include_responses: bool = True) -> list[str]:
    """Texts to train a tokenizer on: ``prompt + output`` of every item, plus any extra answers.

    With ``include_responses=False`` only the prompts are used (for evaluation sets, so that no
    reference answer influences the tokenizer).
    """
    texts = []
    for it in items:
        if not include_responses:
            texts.append(it["prompt"])
            continue
        texts.append(it["prompt"] + it["output"])
        texts.extend(a for a in it.get("answers", ()) if a != it["output"])
    return texts


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    *,
    min_frequency: int = 2,
    model_max_length: int = 1024,
):
    """Train a byte-level BPE tokenizer on ``texts``; return a ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts the 256 byte symbols and the 2 special tokens, so it must be > 258; the
    result may be smaller when the texts offer fewer merges. If ``out_dir`` is given the tokenizer is
    saved there with ``save_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}")
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer saved by ``train_tokenizer`` (offline; ``AutoTokenizer.from_pretrained``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
