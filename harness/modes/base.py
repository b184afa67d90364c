"""What every training mode shares: the context it is built with, the batch-source interface, seeded draws.

A training mode is a *batch source*: ``source(i)`` returns the i-th micro-batch that
:func:`harness.distill.train` trains on (the dict of :func:`harness.data.batching.collate`, plus ``source`` in
:data:`SOURCES`). It is built from a :class:`ModeContext` (what the suite and the run provide) and the recipe's
``mode_params`` (what the method is about). The divergence never knows the mode; the mode never knows the
divergence.

Determinism: every random choice of a mode is a function of ``(seed, i, stream)`` (:func:`draw_rng`,
:func:`torch_seed`), never of the global RNGs that ``train`` seeds and checkpoints; so a seeded run gives the
same curve twice and a resumed run continues exactly (with the source's own ``state_dict`` restored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from ..schema import ConfigError, Field

SOURCES = ("reference", "generated", "replay")

# independent random streams per micro-batch index
STREAM_LAMBDA, STREAM_GENERATE, STREAM_CHOICE, STREAM_REPLAY = 1, 2, 3, 4


def draw_rng(seed: int, i: int, stream: int) -> np.random.Generator:
    """A NumPy generator owned by micro-batch ``i`` of run ``seed`` (``SeedSequence([seed, i, stream])``)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(i), int(stream)])))


def torch_seed(seed: int, i: int, stream: int) -> int:
    """A 63-bit torch seed derived like :func:`draw_rng` (for sampling under ``torch.random.fork_rng``)."""
    return int(np.random.SeedSequence([int(seed), int(i), int(stream)]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class ModeContext:
    """Everything a batch source may need besides its own parameters; filled in by the harness (``steps.py``).

    reference
        ``reference(i)``: the i-th reference micro-batch (the same for every recipe of a suite and seed).
    student, tokenizer, pad_id
        The model being trained (sampled from by sampling modes), its tokenizer (its ``eos_token_id`` ends
        samples) and the pad id of collated rows.
    seed
        The training seed; with the micro-batch index it seeds every draw of the mode.
    max_steps, grad_accum, world_size
        Optimizer steps of the run, micro-batches per optimizer step and processes: micro-batch ``i`` (the global
        index ``train`` passes) belongs to optimizer step ``i // (grad_accum · world_size)`` (0-based).
    batch_size, n_train
        Rows per micro-batch (per process; ``None``: read from ``reference(0)``) and training examples; together
        they give :attr:`steps_per_epoch`.
    max_length
        Longest row (prompt + response) in tokens.
    max_new_tokens
        The SUITE's sampling budget for student samples (``None``: up to ``max_length``). Recipes do not set it.
    teacher
        The teacher model, for the modes that sample from it (``generates_with_teacher``: ``seq_kd``,
        ``distillm2``); ``None`` otherwise. It is only sampled from (eval mode, no gradient), never trained.
    teacher_prefix
        The teacher's :class:`harness.teacher_prefix.PrefixCache` (its prompts' keys and values, computed once per
        process) when it is served, for the samplers to skip the teacher's prefill; ``None`` otherwise.
    val_loss
        ``val_loss() -> float``: the student's loss on the validation set (see
        :func:`harness.modes.validation_loss`), for the modes whose :attr:`BatchSource.needs_val_loss` is true.
    extra
        Anything else a user's mode needs (the harness passes it through untouched).
    """

    reference: Callable[[int], dict]
    student: Any = None
    tokenizer: Any = None
    pad_id: int | None = None
    seed: int = 0
    max_steps: int = 1
    grad_accum: int = 1
    world_size: int = 1
    batch_size: int | None = None
    n_train: int | None = None
    max_length: int = 512
    max_new_tokens: int | None = None
    val_loss: Callable[[], float] | None = None
    teacher: Any = None
    teacher_prefix: Any = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("max_steps", "grad_accum", "world_size", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModeContext: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "n_train", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"ModeContext: {name} must be >= 1 or None, got {value}")

    def step_of(self, i: int) -> int:
        """The 0-based optimizer step that micro-batch ``i`` belongs to."""
        return int(i) // (self.grad_accum * self.world_size)

    def micro_batch_size(self) -> int:
        """Rows per micro-batch: ``batch_size``, or the size of ``reference(0)`` (a pure function of 0)."""
        if self.batch_size is None:
            self.batch_size = int(self.reference(0)["input_ids"].shape[0])
        return int(self.batch_size)

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per pass over the training set, ``n_train // (batch · grad_accum · world_size)`` (at
        least 1), as DistiLLM's ``train_iters_per_epoch``; ``None`` when ``n_train`` is unknown."""
        if self.n_train is None:
            return None
        return max(1, int(self.n_train) // (self.micro_batch_size() * self.grad_accum * self.world_size))


class BatchSource:
    """The interface of a training mode. Subclass it, declare ``params``, decorate with ``@register_mode(name)``.

    Class attributes (queried by the harness without building the source):

    ``params``
        ``{name: harness.schema.Field}``: the mode's parameters with defaults, ranges and help; recipes' ``mode_params``
        are checked against it. Method parameters only: budgets (``max_new_tokens``) come from the suite.
    ``samples_student``
        True when some batches are student samples: the teacher must then score them live (a teacher cache of the
        reference data is not enough).
    ``needs_val_loss``
        True when the source calls ``ctx.val_loss``.
    ``generates_with_teacher``
        True when the source samples responses from the teacher (``ctx.teacher``): the harness must load the
        teacher's weights and pass the model, whatever the loss.

    An instance is called once per micro-batch index, in order (as ``train`` does), and keeps ``counts`` (batches
    per source), ``timings`` (seconds; ``generation_s`` at least) and :attr:`stats`; ``state_dict`` /
    ``load_state_dict`` carry everything needed to resume. The class docstring is the mode's card.
    """

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Field]] = {}
    samples_student: ClassVar[bool] = False
    needs_val_loss: ClassVar[bool] = False
    generates_with_teacher: ClassVar[bool] = False

    def __init__(self, ctx: ModeContext, **params: Any):
        unknown = set(params) - set(type(self).params)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected parameter(s) {sorted(unknown)}")
        self.ctx = ctx
        self.timings: dict[str, float] = {"generation_s": 0.0}
        self.counts: dict[str, int] = {s: 0 for s in SOURCES}

    @classmethod
    def validate_params(cls, params: dict, where: str) -> None:
        """Checks across parameters that a :class:`Field` cannot express; raise :class:`ConfigError`."""

    def __call__(self, i: int) -> dict:
        raise NotImplementedError

    def _reference(self, i: int) -> dict:
        batch = self.ctx.reference(i)
        batch["source"] = "reference"
        self.counts["reference"] += 1
        return batch

    def _time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    @property
    def stats(self) -> dict:
        return {"mode": self.name, "batches": dict(self.counts)}

    def generation_costs(self, train_time_s: float) -> dict:
        """What sampling cost, for the leaderboard's cost table: ``generation_share`` (seconds generating / the
        run's training wall time) and ``generated_tokens_per_s`` (tokens generated by any model — student samples,
        teacher samples, mixture samples — per second of generation). Empty for a mode that never generates."""
        seconds = float(self.timings.get("generation_s", 0.0))
        tokens = sum(int(getattr(self, name, {}).get("tokens", 0)) for name in ("sampled", "teacher_sampled"))
        if seconds <= 0:
            return {}
        return {"generation_share": round(seconds / train_time_s, 4) if train_time_s > 0 else None,
                "generated_tokens_per_s": round(tokens / seconds, 1)}

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "timings": dict(self.timings)}

    def load_state_dict(self, state: dict) -> None:
        self.counts.update(state["counts"])
        self.timings.update(state["timings"])


def require(ok: bool, where: str, message: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{where}: {message}")
