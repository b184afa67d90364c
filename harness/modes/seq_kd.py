"""``seq_kd``: teacher-generated responses (TRL ``GKDTrainer`` with ``seq_kd=True``), and the sampling base class
shared with the modes that sample from both the teacher and the student (:class:`TeacherSampling`).

Read from huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8 ``trl/experimental/gkd/gkd_trainer.py``
(``GKDTrainer.__init__`` l.211-225: one ``GenerationConfig`` for both models, ``do_sample=True``, ``temperature``,
``top_k=0``, ``top_p=1.0``, ``max_new_tokens``; ``training_step`` l.491-535: ``if random.random() <= lmbda``:
student samples, ``elif seq_kd``: teacher samples, else the dataset's responses) and ``gkd_config.py``
(``temperature=0.9``, ``lmbda=0.5``, ``seq_kd=False``).
"""

from __future__ import annotations

import time

import torch

from ..data.batching import collate
from ..schema import Field
from .base import STREAM_LAMBDA, ModeContext, draw_rng, torch_seed
from .registry import register_mode
from .sampling import SamplingSource, sample_rows

#: the random stream of teacher samples (independent of the student's, ``STREAM_GENERATE``)
STREAM_TEACHER = 5


class TeacherSampling(SamplingSource):
    """Base class of the modes that sample from the teacher too (not a mode itself).

    Teacher samples use the same sampling parameters and budget as student samples (TRL uses one
    ``GenerationConfig`` for both) and :func:`harness.modes.sampling.sample_rows` (one batched ``generate`` call,
    KV cache, eval mode). Bookkeeping: ``timings["generation_s"]`` is the time of all sampling (student and
    teacher), ``timings["teacher_generation_s"]`` the teacher's part; :attr:`stats` gives tokens per second of
    each model (``generation``).
    """

    generates_with_teacher = True

    def __init__(self, ctx: ModeContext, **params):
        super().__init__(ctx, **params)
        if ctx.teacher is None:
            raise ValueError(f"{self.name}: this mode samples from the teacher and needs ctx.teacher (the teacher "
                             "model); harness.steps.distill passes it for modes with generates_with_teacher")
        self.timings["teacher_generation_s"] = 0.0
        self.teacher_sampled = {"samples": 0, "tokens": 0, "ended_with_eos": 0}
        self.counts["teacher_generated"] = 0

    def _generate_teacher_rows(self, batch: dict, i: int) -> list[dict]:
        ids, plen = batch["input_ids"], batch["prompt_len"]
        prompts = [ids[b, : int(plen[b])].tolist() for b in range(ids.shape[0])]
        start = time.perf_counter()
        rows = sample_rows(self.ctx.teacher, prompts, eos_id=self.eos_id, pad_id=self.pad_id,
                           temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                           max_new_tokens=self.ctx.max_new_tokens, max_length=self.ctx.max_length,
                           seed=torch_seed(self.ctx.seed, i, STREAM_TEACHER), prefix=self.ctx.teacher_prefix)
        seconds = time.perf_counter() - start
        self._time("generation_s", seconds)
        self._time("teacher_generation_s", seconds)
        if "example_ids" in batch:
            for row, j in zip(rows, batch["example_ids"].tolist()):
                row["example_id"] = j
        self.teacher_sampled["samples"] += len(rows)
        self.teacher_sampled["tokens"] += sum(r["sample_len"] for r in rows)
        self.teacher_sampled["ended_with_eos"] += sum(r["ended_with_eos"] for r in rows)
        return rows

    def _collate_teacher(self, rows: list[dict]) -> dict:
        """A training batch of teacher samples: ``source = "generated"`` (scored by the live teacher, never the
        reference cache), counted under ``counts["teacher_generated"]``."""
        batch = collate(rows, self.pad_id)
        batch["source"] = "generated"
        if all("example_id" in r for r in rows):
            batch["prompt_example_ids"] = torch.tensor([r["example_id"] for r in rows])
        self.counts["teacher_generated"] += 1
        return batch

    @property
    def stats(self) -> dict:
        out = super().stats
        student_s = self.timings["generation_s"] - self.timings["teacher_generation_s"]
        teacher_s = self.timings["teacher_generation_s"]
        n = self.teacher_sampled["samples"]
        out["teacher_sampled"] = {**self.teacher_sampled,
                                  "mean_sample_len": round(self.teacher_sampled["tokens"] / n, 3) if n else None}
        out["generation"] = {
            "student_generation_s": round(student_s, 4),
            "teacher_generation_s": round(teacher_s, 4),
            "student_generated_tokens": self.sampled["tokens"],
            "teacher_generated_tokens": self.teacher_sampled["tokens"],
            "student_tokens_per_s": round(self.sampled["tokens"] / student_s, 1) if student_s > 0 else None,
            "teacher_tokens_per_s": round(self.teacher_sampled["tokens"] / teacher_s, 1) if teacher_s > 0 else None,
        }
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher_sampled": dict(self.teacher_sampled)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teacher_sampled.update(state["teacher_sampled"])


@register_mode("seq_kd")
class SeqKD(TeacherSampling):
    """Sequence-level KD inside GKD (TRL ``GKDTrainer`` with ``seq_kd=True``): with probability ``lmbda`` a
    micro-batch's responses are student samples (as ``on_policy``), otherwise they are TEACHER samples for the
    same prompts; the reference responses are never trained on. The recipe's loss is applied to either (TRL: its
    generalized JSD on both). ``lmbda = 0`` is pure sequence-level KD (Kim & Rush 2016) on freshly sampled
    teacher responses; with a ``ce`` loss it is their word-level-free SeqKD (cross-entropy on teacher outputs).

    Both models sample with the same ``temperature``/``top_k``/``top_p`` (TRL: 0.9, 0, 1.0) and the suite's
    ``max_new_tokens``, one batched ``generate`` call each (KV cache, eval mode). The draw is seeded by
    ``(seed, i)`` and taken as ``r < lmbda`` (TRL: ``random.random() <= lmbda``); teacher and student samples use
    independent seeded streams. Every sampled token and the eos that ended it are targets.
    """

    params = {
        "lmbda": Field((float,), 0.5, ge=0, le=1, help="probability that a micro-batch is student samples (GKD's "
                                                       "λ); the other micro-batches are teacher samples"),
        **SamplingSource.params,
        "temperature": Field((float,), 0.9, gt=0, help="sampling temperature of both models (TRL GKDConfig: 0.9)"),
    }

    def __init__(self, ctx, *, lmbda: float, **sampling):
        super().__init__(ctx, lmbda=lmbda, **sampling)
        self.lmbda = float(lmbda)

    def __call__(self, i: int) -> dict:
        batch = self.ctx.reference(i)
        if draw_rng(self.ctx.seed, i, STREAM_LAMBDA).random() < self.lmbda:
            return self._collate(self._generate_rows(batch, i), "generated")
        return self._collate_teacher(self._generate_teacher_rows(batch, i))
