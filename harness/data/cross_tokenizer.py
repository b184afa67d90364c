"""The same training text under two tokenizers: the student's batch, and the teacher's tokens of each example.

Cross-tokenizer distillation (a student with its own tokenizer, ``student.tokenizer`` in the suite) follows TRL's
GOLD trainer (read at ``huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8
trl/experimental/gold/gold_trainer.py``, ``build_teacher_inputs_from_texts`` and ``ULDLoss``): every training
example (prompt, response) is tokenised by each side's own tokenizer, prompt and response separately, the
response followed by that side's EOS; the student trains on its tokens, the teacher is scored live on its own.

Each side's response positions are the ones whose ``loss_mask`` is 1 (:mod:`harness.data.batching`: position t
predicts token t + 1; the last response position predicts EOS). :func:`byte_ends` gives, per response token,
its end offset in the UTF-8 bytes of the response text, EOS at the text's byte length, as GOLD's offsets do:
the coordinate both sides share, for the text alignment of :func:`harness.objectives.uld.align_by_offsets`.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import batching


def byte_ends(tokenizer, text: str) -> list[int]:
    """End offset (in UTF-8 bytes of ``text``) of each token of ``tokenizer.encode(text)``, then EOS at len(bytes).

    Needs a fast tokenizer (character offsets). A token's end offset is the byte length of ``text`` up to its
    last character. The list has ``len(encode(text)) + 1`` entries, non-decreasing; the last two are equal when
    the text is non-empty (the last token and the EOS both end at the end of the text, as in GOLD).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [len(text[:end].encode("utf-8")) for _, end in enc["offset_mapping"]]
    return ends + [len(text.encode("utf-8"))]


def encode_pair(item: dict, student_tok, teacher_tok, max_prompt_tokens: int, max_length: int) -> dict:
    """One example under both tokenizers: ``{"student": encoded, "teacher": encoded}`` (each as
    :func:`harness.data.batching.encode`, prompt left-truncated to ``max_prompt_tokens`` tokens of that side,
    the whole cut at ``max_length`` tokens of that side), with ``"ends"`` [n_response_kept] added to each: the byte
    end offsets of the response tokens (EOS included) that survived the cut."""
    out = {}
    for side, tok in (("student", student_tok), ("teacher", teacher_tok)):
        enc = batching.encode(tok, item, max_prompt_tokens, max_length)
        kept = len(enc["input_ids"]) - enc["prompt_len"]
        out[side] = {**enc, "ends": byte_ends(tok, item["output"])[:kept]}
    return out


def with_teacher_tokens(next_batch: Callable[[int], dict], pairs: list[dict],
                        teacher_pad_id: int) -> Callable[[int], dict]:
    """Wrap a reference-batch source (``next_batch(i)``, whose batches carry ``example_ids`` into ``pairs``, the
    :func:`encode_pair` of every training example in the student's order) so each batch also carries the teacher's
    tokens of the same examples: ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels`` and
    ``teacher_loss_mask`` [B, T_t] (the teacher's own collation, right-padded with its pad id), and the byte end
    offsets of both sides' kept response tokens, ``student_ends`` / ``teacher_ends`` (lists of B lists).
    """

    def paired(i: int) -> dict:
        batch = next_batch(i)
        chosen = [pairs[j] for j in batch["example_ids"].tolist()]
        t = batching.collate([p["teacher"] for p in chosen], teacher_pad_id)
        return {**batch, "teacher_input_ids": t["input_ids"], "teacher_attention_mask": t["attention_mask"],
                "teacher_labels": t["labels"], "teacher_loss_mask": t["loss_mask"],
                "student_ends": [p["student"]["ends"] for p in chosen],
                "teacher_ends": [p["teacher"]["ends"] for p in chosen]}

    for name in ("state_dict", "load_state_dict"):  # keep a resumable source resumable
        if hasattr(next_batch, name):
            setattr(paired, name, getattr(next_batch, name))
    return paired


def response_rows(mask: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence, the positions (in order) whose ``mask`` [B, T] is > 0: the rows that predict response tokens."""
    return [torch.nonzero(mask[b] > 0).flatten() for b in range(mask.shape[0])]
