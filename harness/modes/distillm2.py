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
from ..schema import Field
from ..objectives.sequence import sentence_probs
from ..objectives.wrapper import log_probs
from .registry import register_mode
from .sampling import SamplingSource
from .seq_kd import TeacherSampling


@register_mode("distillm2")
class DistiLLM2Pairs(TeacherSampling):
    """DistiLLM-2 (Ko et al., ICML 2025): every micro-batch holds, for each of its B prompts, a TEACHER sample
    and a STUDENT sample (2B rows: teacher responses first), both drawn on the fly with ``temperature``/``top_k``/
    ``top_p`` (released: 0.8, 0, 0.95) and the suite's ``max_new_tokens`` (one batched ``generate`` call per model,
    KV cache, eval mode). It attaches:

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

    The released pipeline samples both responses ONCE before training (vLLM, from the initial student) and
    trains on that fixed set; here both are fresh samples of the current models for every micro-batch.
    """

    params = {
        **SamplingSource.params,
        "temperature": Field((float,), 0.8, gt=0, help="sampling temperature of both models (generate_vllm.py: 0.8)"),
        "top_p": Field((float,), 0.95, gt=0, le=1, help="nucleus filter of both models (generate_vllm.py: 0.95)"),
        "anchor_batches": Field((int,), 1, ge=0, help="micro-batches that measure the α anchors (0: fixed α)"),
    }

    def __init__(self, ctx, *, anchor_batches: int, **sampling):
        super().__init__(ctx, anchor_batches=anchor_batches, **sampling)
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
                    logits = model(**inputs).logits
            finally:
                model.train(was)
            gaps.append(sentence_probs(log_probs(logits, 1.0), batch["labels"].to(device),
                                       batch["loss_mask"].to(device)))
        gap = (gaps[0] - gaps[1]).cpu()  # s_p − s_q per row
        role = batch["pair_role"]
        for k, (rows, sign) in enumerate(((role == 0, 1.0), (role == 1, -1.0))):
            self.anchor_sums[k] += float((sign * gap[rows]).sum())
            self.anchor_counts[k] += int(rows.sum())

    def __call__(self, i: int) -> dict:
        reference = self.ctx.reference(i)
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
                "anchor_counts": list(self.anchor_counts)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.anchor_sums, self.anchor_counts = list(state["anchor_sums"]), list(state["anchor_counts"])
