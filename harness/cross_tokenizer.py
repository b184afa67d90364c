"""Cross-tokenizer distillation: a student with its own tokenizer (``student.tokenizer`` in the suite).

What changes when the student's tokenizer differs from the teacher's, and nothing else:

- the tokenizer step also trains (or saves) the student's tokenizer into ``workdir/student_tokenizer``
  (:func:`prepare_student_tokenizer`); the student is built, trained and evaluated on its own tokens;
- the plan admits only objectives that need no shared vocabulary (:data:`CROSS_TOKENIZER_OBJECTIVES`, plus ``ce``,
  which reads only the student's labels), only the ``off_policy`` mode (the reference responses: the same text
  on both sides), and no teacher cache (it holds the teacher's rows in the teacher's token space)
  (:func:`check_plan`);
- a distillation run pairs each batch with the teacher's tokens of the same examples
  (:func:`harness.data.cross_tokenizer.with_teacher_tokens`), the teacher scores them live
  (:func:`live_teacher`), and :class:`CrossTokenizerLoss` computes each term on its own side's positions.

Alignment of the two sides' response positions (``student.tokenizer.alignment``), after TRL's GOLD trainer
(``huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8 trl/experimental/gold/gold_trainer.py``, ``ULDLoss``):

- ``index`` (default; the released ULD code's and GOLD's ``use_extended_uld=False``): each sequence's response
  positions are paired in order, truncated to the shorter answer (:func:`harness.objectives.uld.uld_sequences`);
- ``text`` (GOLD's ``use_extended_uld=True``, ``uld_token_merge_strategy="observed"``): tokens are grouped at the
  byte boundaries of the response text both tokenisations share, a group's distribution being its first
  position's times the probabilities of its later tokens (:func:`harness.objectives.uld.uld_text_aligned`).

Reduction as GOLD: each sequence's mean over its aligned positions (groups), then the mean over the sequences of
the micro-batch; under gradient accumulation each micro-batch is weighted by its share of the step's counted
student tokens (the convention of the harness's batch-wise terms, :mod:`harness.objectives.composite`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schema import ConfigError

#: objectives defined between two different vocabularies
CROSS_TOKENIZER_OBJECTIVES = ("uld",)
#: objectives that read only the student's labels (valid whatever the teacher's tokenizer)
STUDENT_ONLY_OBJECTIVES = ("ce",)
#: modes whose batches are the reference responses (text both tokenizers can encode)
CROSS_TOKENIZER_MODES = ("off_policy",)


# ----------------------------------------------------------------------------------------------- plan
def check_plan(suite, recipes: dict) -> None:
    """Refuse what cannot run across tokenizers, with one line naming the file, the recipe and the fix."""
    if not suite.cross_tokenizer:
        return
    if suite.teacher_cache:
        raise ConfigError(f"{suite.origin}: key 'teacher_cache': the cache holds the teacher's rows in its own token "
                          "space, which a student with its own tokenizer ('student.tokenizer') cannot use; remove "
                          "'teacher_cache' (the teacher is scored live)")
    allowed = CROSS_TOKENIZER_OBJECTIVES + STUDENT_ONLY_OBJECTIVES
    for name, recipe in recipes.items():
        for objective in recipe.objective_ids():
            if objective not in allowed:
                raise ConfigError(
                    f"{suite.origin}: recipe {name!r} ({recipe.path}): objective {objective!r} compares teacher and "
                    "student token by token, but 'student.tokenizer' gives the student its own tokenizer; "
                    f"cross-tokenizer objectives: {', '.join(CROSS_TOKENIZER_OBJECTIVES)} (and "
                    f"{', '.join(STUDENT_ONLY_OBJECTIVES)}, which reads only the student's labels); leave the recipe out")
        if recipe.uses_teacher and recipe.mode not in CROSS_TOKENIZER_MODES:
            raise ConfigError(
                f"{suite.origin}: recipe {name!r} ({recipe.path}): mode {recipe.mode!r} is not supported with a student "
                f"that has its own tokenizer ('student.tokenizer'); supported: {', '.join(CROSS_TOKENIZER_MODES)}")


# ----------------------------------------------------------------------------------------------- tokenizer step
def prepare_student_tokenizer(suite):
    """Train the student's tokenizer on the suite's training data (``student.tokenizer.vocab_size``), or save the
    named one (``path`` / ``hub``), into ``suite.student_tokenizer_dir``: the same rules as the suite's tokenizer."""
    from .data.tokenizer import item_texts, train_tokenizer
    from .steps import eval_set_spec, load_eval_set, train_items

    spec = suite.student["tokenizer"]
    out = suite.student_tokenizer_dir
    if spec["path"] or spec["hub"]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec["path"] or spec["hub"])
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(str(out))
        return tok
    texts = item_texts(train_items(suite))
    if suite.data["kind"] != "tiny":  # evaluation prompts, never their answers (as the suite's tokenizer)
        texts += item_texts(sum((load_eval_set(eval_set_spec(suite, s)) for s in suite.evaluation["sets"]), []),
                            include_responses=False)
    return train_tokenizer(texts, spec["vocab_size"], out)


# ----------------------------------------------------------------------------------------------- distill step
def paired_reference(suite, reference, student_tok, teacher_tok):
    """``reference`` (the student's reference batches) with the teacher's tokens of the same examples attached."""
    from .data import cross_tokenizer as xdata
    from .data.instruct import filter_long_prompts, load_jsonl

    cfg = suite.training
    # the same items, in the same order, as harness.steps.encoded_train with the student's tokenizer
    items, _ = filter_long_prompts(load_jsonl(suite.data_path("train"), name="train"), student_tok,
                                   cfg.max_prompt_tokens)
    pairs = [xdata.encode_pair(it, student_tok, teacher_tok, cfg.max_prompt_tokens, cfg.max_length) for it in items]
    return xdata.with_teacher_tokens(reference, pairs, teacher_tok.pad_token_id)


def live_teacher(teacher):
    """``teacher_logits(batch)`` for :func:`harness.distill.train`: scores the teacher's own tokens of the batch and
    attaches the logits [B, T_t, V_t] as ``batch["teacher_logits"]``; returns None, so that the loop's vocabulary
    alignment (which assumes one tokenizer) leaves them alone and :class:`CrossTokenizerLoss` reads them there."""

    def teacher_logits(batch: dict) -> None:
        batch["teacher_logits"] = teacher(input_ids=batch["teacher_input_ids"],
                                          attention_mask=batch["teacher_attention_mask"]).logits
        return None

    return teacher_logits


def teacher_side(suite, loss, device: str):
    """``(loss, teacher_fn, teacher_model)`` of a cross-tokenizer run: the recipe's loss wrapped, the live teacher."""
    from .models import load_model
    from .steps import teacher_source

    teacher = load_model(teacher_source(suite), device=device)
    return CrossTokenizerLoss(loss, alignment=suite.student["tokenizer"]["alignment"]), live_teacher(teacher), teacher


def uld_text_batch(student_logits: Tensor, teacher_logits: Tensor, batch: dict, student_mask: Tensor, *,
                   temperature: float) -> Tensor:
    """GOLD's text-aligned ULD over a micro-batch: the mean over sequences of
    :func:`harness.objectives.uld.uld_text_aligned` (sequences with no aligned group are left out)."""
    from .objectives.uld import uld_text_aligned

    losses = []
    for b in range(student_logits.shape[0]):
        s_rows = torch.nonzero(student_mask[b] > 0).flatten()
        t_rows = torch.nonzero(batch["teacher_loss_mask"][b] > 0).flatten()
        s_ends, t_ends = batch["student_ends"][b], batch["teacher_ends"][b]
        if len(s_rows) != len(s_ends) or len(t_rows) != len(t_ends):
            raise ValueError(f"sequence {b}: {len(s_rows)}/{len(t_rows)} response positions but {len(s_ends)}/"
                             f"{len(t_ends)} offsets (student/teacher)")
        if not len(s_rows) or not len(t_rows):
            continue
        losses.append(uld_text_aligned(
            student_logits[b, s_rows], teacher_logits[b, t_rows], s_ends, t_ends,
            batch["labels"][b, s_rows].tolist(), batch["teacher_labels"][b, t_rows].tolist(), temperature=temperature))
    if not losses:
        return student_logits.sum() * 0.0
    return torch.stack(losses).mean()


class CrossTokenizerLoss:
    """A recipe's :class:`~harness.objectives.composite.WeightedLoss` across tokenizers (same call signature).

    ``ce`` terms read the student's labels, as usual. ``uld`` terms read the teacher's logits from
    ``batch["teacher_logits"]`` [B, T_t, V_t] (attached by :func:`live_teacher`; the ``teacher_logits`` argument is
    None) and its response positions ``batch["teacher_loss_mask"]``; the student's positions are ``mask``
    [B, T_s]. A term's value is GOLD's per-sequence mean (see the module docstring) times this micro-batch's share
    ``Σ mask / normalizer`` of the step's counted tokens.
    """

    #: ULD across tokenizers pairs each sequence's student and teacher positions: the loss needs [B, T_s, V_s]
    rowwise = False

    def __init__(self, inner, alignment: str = "index"):
        if alignment not in ("index", "text"):
            raise ValueError(f"alignment {alignment!r}; accepted: index, text")
        for t in inner.terms:
            if t.objective.name not in CROSS_TOKENIZER_OBJECTIVES + STUDENT_ONLY_OBJECTIVES:
                raise ValueError(f"objective {t.objective.name!r} is not defined across tokenizers")
        self.inner = inner
        self.terms = inner.terms
        self.alignment = alignment

    @property
    def needs_teacher(self) -> bool:
        return self.inner.needs_teacher

    def __repr__(self) -> str:
        return f"{self.inner!r} [cross-tokenizer, {self.alignment} alignment]"

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, mask: Tensor, *, labels: Tensor,
                 normalizer: float, chunk_size: int | None = None, kernel: str = "auto",
                 batch: dict | None = None) -> tuple[Tensor, dict[str, float]]:
        from .objectives.uld import uld_sequences

        total = None
        parts: dict[str, float] = {}
        for t in self.terms:
            if t.objective.spec.kind == "labels":
                value = t.objective(student_logits, None, mask, labels=labels, normalizer=normalizer,
                                    chunk_size=chunk_size, kernel=kernel)
            else:
                if batch is None or "teacher_logits" not in batch:
                    raise ValueError("a cross-tokenizer term needs batch['teacher_logits'] (harness.cross_tokenizer."
                                     "live_teacher)")
                t_logits = batch["teacher_logits"]
                if self.alignment == "index":
                    value = uld_sequences(student_logits, t_logits, mask, batch["teacher_loss_mask"],
                                          temperature=t.temperature)
                else:
                    value = uld_text_batch(student_logits, t_logits, batch, mask, temperature=t.temperature)
                value = value * (float((mask > 0).sum()) / normalizer)
            value = t.weight * value
            parts[t.label] = float(value.detach())
            total = value if total is None else total + value
        return total.to(torch.float32) if total.dtype != torch.float64 else total, parts
