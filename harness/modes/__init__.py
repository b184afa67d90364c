"""Training modes: where a micro-batch's responses come from (reference data, student samples, a replay buffer).

Each mode is one :class:`BatchSource` subclass that declares its parameters (``params``, harness.schema
``Field``s) and registers itself with ``@register_mode(name)``; the class docstring is its card.

=========================  ===================================================================================
``off_policy``             the reference batches (:mod:`.off_policy`)
``on_policy``              GKD's student data fraction λ (TRL ``GKDTrainer``); optional replay buffer as in
                           DistiLLM's GKD/ImitKD baselines (:mod:`.on_policy`)
``adaptive_off_policy``    DistiLLM's adaptive schedule with its replay buffer (:mod:`.adaptive`)
``seq_kd``                 teacher samples, or student samples for a fraction λ (TRL ``GKDTrainer`` with
                           ``seq_kd=True``) (:mod:`.seq_kd`)
``distillm2``              a teacher and a student sample per prompt, for DistiLLM-2's loss (:mod:`.distillm2`)
``minillm``                samples from the teacher-student mixture + the reference rows, for MiniLLM's loss
                           (:mod:`.minillm`)
=========================  ===================================================================================

The harness uses :func:`check_params` (recipe validation), :func:`needs_student_samples` /
:func:`needs_val_loss` (what to load) and :func:`build` with a :class:`ModeContext` (the run). A user's mode is a
registered name after importing their module, or ``package.module:Class`` / ``file.py:Class`` in the recipe.
"""

from .base import SOURCES, BatchSource, ModeContext
from .registry import (available, build, card, check_params, get, needs_student_samples, needs_val_loss, params,
                       register_mode)
from .sampling import ReplayBuffer, SamplingSource, sample_rows
from .off_policy import OffPolicy
from .on_policy import OnPolicy
from .adaptive import AdaptiveOffPolicy, AdaptiveThreshold, choose_source, sgo_threshold
from .seq_kd import SeqKD, TeacherSampling
from .distillm2 import DistiLLM2Pairs
from .minillm import MiniLLMSampling, mixed_sample_rows
from .validation import validation_loss
from .compat import batch_source

__all__ = [
    "SOURCES", "AdaptiveOffPolicy", "DistiLLM2Pairs", "MiniLLMSampling", "AdaptiveThreshold", "BatchSource", "ModeContext", "OffPolicy", "OnPolicy",
    "ReplayBuffer", "SamplingSource", "SeqKD", "TeacherSampling", "available", "batch_source", "build", "card", "check_params", "choose_source",
    "get", "mixed_sample_rows", "needs_student_samples", "needs_val_loss", "params", "register_mode", "sample_rows", "sgo_threshold",
    "validation_loss",
]
