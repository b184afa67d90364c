"""A recipe's loss: a weighted sum of objectives, each with its own parameters and temperature.

    loss = Σ_k w_k · D_k(student ‖ teacher; τ_k, params_k)

e.g. SinKD's language-model loss ``CE + 0.1·KL + 1·Sinkhorn`` is three terms, the classic KD mix
``(1 − λ)·CE + λ·D`` two. Each term is an :class:`~harness.objectives.Objective`; ``ce`` terms read the
labels, every other term the teacher's logits.

Shapes and conventions (per micro-batch)
----------------------------------------
- ``student_logits``, ``teacher_logits``: ``[B, T, V]`` (the teacher's may be ``None`` when no term needs
  it); ``mask``: ``[B, T]`` response positions; ``labels``: ``[B, T]`` long, ``-100`` where ignored.
  A loss without sequence-level terms (:attr:`WeightedLoss.rowwise`) also takes the counted rows alone:
  logits ``[N, V]``, ``mask`` and ``labels`` ``[N]`` (what :func:`harness.distill.train` passes: the rows of
  ``mask > 0`` in row-major order, an all-ones mask), with the same value as on the ``[B, T, V]`` form.
- ``batch``: the micro-batch dict (``harness.distill.train`` passes it); only sequence-level terms (kind
  ``"sequence"``, :mod:`harness.objectives.sequence`) read it, as
  ``fn(student_logits, teacher_logits, batch, normalizer=, temperature=, **params)``.
- ``normalizer``: the step's global count of counted tokens (over all micro-batches and processes), so that
  the gradient of a step under accumulation equals that of one large batch. Per-position terms are divided
  by it; a batch-wise term (Sinkhorn: one value per micro-batch) is weighted by this micro-batch's share of
  the tokens, ``value · Σ mask / normalizer``.
- ``kernel``: ``auto`` (fused Triton kernels on CUDA, PyTorch elsewhere), ``triton`` or ``torch``; the same
  values either way (:mod:`harness.objectives.kernels`).
- Returns ``(total, parts)``: ``total`` a 0-dim float32 tensor on the graph; ``parts`` the detached
  contribution of each term (already multiplied by its weight), keyed by the term's label, for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import Objective, get


@dataclass(frozen=True)
class Term:
    """One weighted objective of a loss."""

    objective: Objective
    weight: float = 1.0
    temperature: float = 1.0
    label: str = ""

    @property
    def needs_teacher(self) -> bool:
        return self.objective.spec.needs_teacher and self.weight != 0


class WeightedLoss:
    """Σ_k w_k · D_k over :class:`Term` s (see the module docstring for shapes and normalisation)."""

    def __init__(self, terms: list[Term]):
        terms = [t for t in terms if t.weight != 0]
        if not terms:
            raise ValueError("a loss needs at least one term with a non-zero weight")
        seen: dict[str, int] = {}
        labelled = []
        for t in terms:
            base = t.label or t.objective.name
            seen[base] = seen.get(base, 0) + 1
            labelled.append(Term(t.objective, t.weight, t.temperature, base if seen[base] == 1 else f"{base}#{seen[base]}"))
        self.terms = labelled

    @classmethod
    def kd(cls, objective: Objective, kd_weight: float = 1.0, temperature: float = 1.0) -> "WeightedLoss":
        """The classic mix ``(1 − λ)·CE + λ·D`` (a ``ce`` objective alone is SFT)."""
        if objective.spec.kind == "labels":
            return cls([Term(objective, 1.0)])
        return cls([Term(get("ce"), 1.0 - kd_weight), Term(objective, kd_weight, temperature)])

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms)

    @property
    def rowwise(self) -> bool:
        """Whether the loss may be called on counted rows ``[N, V]`` with an ``[N]`` mask: no term is sequence-level
        (those read ``[B, T, V]`` and the batch's per-row fields); per-position, batch-wise and label terms see only
        the counted rows, in the same order, and the same count ``Σ mask > 0``."""
        return all(t.objective.spec.kind != "sequence" for t in self.terms)

    def __repr__(self) -> str:
        return " + ".join(f"{t.weight:g}·{t.objective.name}(τ={t.temperature:g})" for t in self.terms)

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, mask: Tensor, *, labels: Tensor,
                 normalizer: float, chunk_size: int | None = None,
                 kernel: str = "auto", batch: dict | None = None) -> tuple[Tensor, dict[str, float]]:
        total = None
        parts: dict[str, float] = {}
        for t in self.terms:
            if t.objective.spec.kind == "sequence":
                # sequence-level terms (harness.objectives.sequence) read the micro-batch: labels, per-row tags
                # and values a training mode attached; they return the micro-batch's share of the step's loss
                if batch is None:
                    raise ValueError(f"objective {t.objective.name!r} is sequence-level and needs batch=")
                value = t.objective.spec.fn(student_logits, teacher_logits, {**batch, "loss_mask": mask},
                                            normalizer=normalizer, temperature=t.temperature, **t.objective.params)
            elif t.objective.spec.kind == "labels":
                value = t.objective(student_logits, None, mask, labels=labels, normalizer=normalizer,
                                    chunk_size=chunk_size, kernel=kernel)
            elif t.objective.spec.kind == "batch":
                value = t.objective(student_logits, teacher_logits, mask, temperature=t.temperature)
                value = value * (float((mask > 0).sum()) / normalizer)
            else:
                value = t.objective(student_logits, teacher_logits, mask, temperature=t.temperature,
                                    normalizer=normalizer, chunk_size=chunk_size, kernel=kernel)
            value = t.weight * value
            parts[t.label] = float(value.detach())
            total = value if total is None else total + value
        return total.to(torch.float32) if total.dtype != torch.float64 else total, parts
