"""``distillm2``: DistiLLM-2's paired batches, a teacher response and a student response for every prompt.

Read from jongwooko/distillm-2@fe4cf9bfbb4f83219dd1d69219800164b59685fa: ``generate/generate_vllm.py`` (one
response per prompt from each model, ``--temperature 0.8 --top_p 0.95``), ``generate/reformat.py`` (teacher
response = "chosen", student response = "rejected"), ``src/distillm_trainer.py`` ``concatenated_forward``
(l.1244-1318: one forward over [chosen; rejected]) and ``log`` (l.1515-1535: the α anchors). The loss is the
objective ``distillm2`` (:mod:`harness.objectives.sequence`), which reads what this mode attaches.
"""

from __future__ import annotations

import math

import torch

from ..data.batching import collate
from ..models import full_logits
from ..schema import Field
from ..objectives.sequence import sentence_probs
from ..objectives.wrapper import log_probs
from .registry import register_mode
from .sampling import SamplingSource, pack_rows, unpack_rows
from .seq_kd import TeacherSampling


@register_mode("distillm2")
class DistiLLM2Pairs(TeacherSampling):
    """DistiLLM-2 (Ko et al., ICML 2025): every micro-batch holds, for each of its B prompts, a TEACHER sample
    and a STUDENT sample (2B rows: teacher responses first), drawn with ``temperature``/``top_k``/``top_p``
    (released: 0.8, 0, 0.95) and the suite's ``max_new_tokens`` (batched ``generate`` calls, KV cache, eval mode).

    ``sampling = "once"`` (default, the released pipeline: ``generate_vllm.py`` runs before training and the
    trainer reads a fixed set of pairs): before the first step, one teacher and one student response for every
    training prompt that the run's micro-batches ``0 … max_steps·grad_accum·world_size − 1`` contain, from the
    INITIAL student; a prompt met again in a later epoch gets the same pair. Prompts are sampled in example-id
    order in chunks of the micro-batch size, chunk k seeded by ``(seed, k)`` (teacher and student on independent
    streams), so the set depends on the seed and the run's length only; every process of a multi-process run
    samples the whole set (the same one). The pairs travel in :meth:`state_dict`, so a resumed run trains on the
    pairs of its initial student. ``sampling = "per_batch"``: fresh samples of the CURRENT models for every
    micro-batch (one ``generate`` call per model and micro-batch). It attaches:

    ``pair_role`` [2B]
        0 for teacher-response rows, 1 for student-response rows.
    ``progress``
        optimizer steps done / total (``ctx.step_of(i) / ctx.max_steps``), for β's ramp.
    ``alpha_anchor`` [2]
        ``[A₁, A₂]`` of the per-sentence α (NaN while not measured): the mean over the first
        ``anchor_batches`` micro-batches of ``s_p − s_q`` on teacher-response rows and ``s_q − s_p`` on
        student-response rows (``s``: geometric-mean token probability of the response), measured with no-grad
        forwards of both models in eval mode; those first micro-batches train with the base α (as the released
        code before its first log). ``anchor_batches = 0``: fixed α (the released default ``update_alpha=False``).
    """

    params = {
        **SamplingSource.params,
        "temperature": Field((float,), 0.8, gt=0, help="sampling temperature of both models (generate_vllm.py: 0.8)"),
        "top_p": Field((float,), 0.95, gt=0, le=1, help="nucleus filter of both models (generate_vllm.py: 0.95)"),
        "anchor_batches": Field((int,), 1, ge=0, help="micro-batches that measure the α anchors (0: fixed α)"),
        "sampling": Field((str,), "once", choices=("once", "per_batch"),
                          help="'once': a fixed pair per training prompt, sampled before training from the initial "
                               "student (released); 'per_batch': fresh samples of the current models per micro-batch"),
    }

    def __init__(self, ctx, *, anchor_batches: int, sampling: str, **sampling_params):
        super().__init__(ctx, anchor_batches=anchor_batches, sampling=sampling, **sampling_params)
        self.sampling = sampling
        self.pairs: dict[str, dict[int, dict]] | None = None  # role -> example id -> sampled row ("once")
        self.anchor_batches = int(anchor_batches)
        self.anchor_sums = [0.0, 0.0]
        self.anchor_counts = [0, 0]

    @property
    def anchor(self) -> list[float]:
        """``[A₁, A₂]`` once ``anchor_batches`` micro-batches were measured, else ``[nan, nan]``."""
        if self.anchor_batches == 0 or self.counts["generated"] < self.anchor_batches or 0 in self.anchor_counts:
            return [math.nan, math.nan]
        return [self.anchor_sums[k] / self.anchor_counts[k] for k in range(2)]

    def _measure(self, batch: dict) -> None:
        """Add this micro-batch's ``s_p − s_q`` (teacher rows) and ``s_q − s_p`` (student rows) to the anchors."""
        device = next(self.ctx.student.parameters()).device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        gaps = []
        for model in (self.ctx.teacher, self.ctx.student):
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    logits = full_logits(model, inputs["input_ids"], inputs["attention_mask"])
            finally:
                model.train(was)
            gaps.append(sentence_probs(log_probs(logits, 1.0), batch["labels"].to(device),
                                       batch["loss_mask"].to(device)))
        gap = (gaps[0] - gaps[1]).cpu()  # s_p − s_q per row
        role = batch["pair_role"]
        for k, (rows, sign) in enumerate(((role == 0, 1.0), (role == 1, -1.0))):
            self.anchor_sums[k] += float((sign * gap[rows]).sum())
            self.anchor_counts[k] += int(rows.sum())

    def _sample_once(self) -> dict[str, dict[int, dict]]:
        """A teacher and a student row for every prompt of the run's micro-batches (see the class docstring)."""
        prompts: dict[int, list[int]] = {}
        for i in range(self.ctx.max_steps * self.ctx.grad_accum * self.ctx.world_size):
            ref = self.ctx.reference(i)
            if "example_ids" not in ref:
                raise ValueError(f"{self.name}: sampling 'once' needs reference batches with example_ids "
                                 "(harness.steps.reference_batches sets them); use sampling: per_batch otherwise")
            for b, j in enumerate(ref["example_ids"].tolist()):
                prompts.setdefault(int(j), ref["input_ids"][b, : int(ref["prompt_len"][b])].tolist())
        ids, size = sorted(prompts), self.ctx.micro_batch_size()
        pairs: dict[str, dict[int, dict]] = {"teacher": {}, "student": {}}
        for k, start in enumerate(range(0, len(ids), size)):
            chunk = ids[start : start + size]
            batch = collate([{"input_ids": prompts[j], "prompt_len": len(prompts[j])} for j in chunk], self.pad_id)
            batch["example_ids"] = torch.tensor(chunk)
            for role, rows in (("teacher", self._generate_teacher_rows(batch, k)),
                               ("student", self._generate_rows(batch, k))):
                pairs[role].update((row["example_id"], row) for row in rows)
        return pairs

    def __call__(self, i: int) -> dict:
        reference = self.ctx.reference(i)
        if self.sampling == "once":
            if self.pairs is None:
                self.pairs = self._sample_once()
            ids = [int(j) for j in reference["example_ids"].tolist()]
            teacher_rows = [self.pairs["teacher"][j] for j in ids]
            student_rows = [self.pairs["student"][j] for j in ids]
        else:
            teacher_rows = self._generate_teacher_rows(reference, i)
            student_rows = self._generate_rows(reference, i)
        batch = collate(teacher_rows + student_rows, self.pad_id)
        batch["source"] = "generated"
        batch["pair_role"] = torch.tensor([0] * len(teacher_rows) + [1] * len(student_rows))
        batch["progress"] = torch.tensor(self.ctx.step_of(i) / self.ctx.max_steps, dtype=torch.float64)
        batch["alpha_anchor"] = torch.tensor(self.anchor, dtype=torch.float64)
        if self.counts["generated"] < self.anchor_batches:
            self._measure(batch)
        self.counts["generated"] += 1
        return batch

    @property
    def stats(self) -> dict:
        return {**super().stats, "alpha_anchor": self.anchor}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "anchor_sums": list(self.anchor_sums),
                "anchor_counts": list(self.anchor_counts),
                "pairs": None if self.pairs is None else {role: pack_rows(list(rows.values()))
                                                          for role, rows in self.pairs.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.anchor_sums, self.anchor_counts = list(state["anchor_sums"]), list(state["anchor_counts"])
        packed = state.get("pairs")
        self.pairs = None if packed is None else {
            role: {row["example_id"]: row for row in unpack_rows(rows)} for role, rows in packed.items()}

