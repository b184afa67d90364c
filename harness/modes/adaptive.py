"""``adaptive_off_policy``: DistiLLM's adaptive off-policy schedule (student-generated output, SGO).

Read from jongwooko/distillm@d47e77ff9d27721783b32213be38c1204230cc0a (``finetune.py``, ``distillm/buffer.py``,
``distillm/sampler.py``, ``arguments.py``, ``scripts/*/distillm/*.sh``); line numbers below are of that commit.
"""

from __future__ import annotations

import math
import time

from ..schema import Field
from .base import STREAM_CHOICE, STREAM_REPLAY, draw_rng, require
from .registry import register_mode
from .sampling import ReplayBuffer, SamplingSource

REPLAY_RATIOS = ("decreasing", "constant", "increasing")


class AdaptiveThreshold:
    """DistiLLM's α_a (``adaptive_threshold``, finetune.py l.265-266 and l.410-417).

    α_a starts at ``start`` (``--init-threshold``, 0). The first :meth:`update` only sets the reference loss (the
    evaluation before training, l.266). Each later call compares with the reference exactly as the released code
    does, ``val_loss >= reference + margin`` in float64 (``--loss-eps``), and on a rise sets
    α_a = min(α_a + ``step``, ``max_value``) (``+= 0.1`` then ``min(·, 1.0)``, l.415-416).

    ``compare_to`` says which loss the next check is compared with:

    ``"last_rise"`` (default, DistiLLM)
        the reference is replaced only when α_a rose (``prev_avg_loss = curr_avg_loss`` inside the ``if``, l.417):
        a slow drift upwards accumulates until it reaches the margin.
    ``"last_check"``
        the reference is the previous check's loss (the design document's wording): only a rise of at least the
        margin between two consecutive checks counts.

    A non-finite loss is recorded and otherwise ignored (the released code would compare NaN, which is never
    ``>=``, and keep its reference: the same outcome for ``last_rise``).
    """

    def __init__(self, step: float = 0.1, margin: float = 0.1, start: float = 0.0, max_value: float = 1.0,
                 compare_to: str = "last_rise"):
        if compare_to not in ("last_rise", "last_check"):
            raise ValueError(f"compare_to must be 'last_rise' or 'last_check', got {compare_to!r}")
        self.step, self.margin, self.max_value = float(step), float(margin), float(max_value)
        self.compare_to = compare_to
        self.alpha = float(start)
        self.reference: float | None = None
        self.history: list[dict] = []

    def update(self, val_loss: float, at_step: int | None = None) -> bool:
        """Record one validation loss; return True when α_a rose."""
        val_loss = float(val_loss)
        rose = False
        if math.isfinite(val_loss):
            if self.reference is None:
                self.reference = val_loss
            else:
                rose = val_loss >= self.reference + self.margin
                if rose:
                    self.alpha = min(self.alpha + self.step, self.max_value)
                if rose or self.compare_to == "last_check":
                    self.reference = val_loss
        self.history.append({"step": at_step, "val_loss": val_loss, "alpha": self.alpha, "rose": rose,
                             "reference": self.reference})
        return rose

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "reference": self.reference, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.reference, self.history = state["alpha"], state["reference"], list(state["history"])


def sgo_threshold(alpha: float, global_step: int, max_steps: int, replay_ratio: str = "decreasing") -> float:
    """DistiLLM's ``samp_threshold`` s (finetune.py l.291-298), with ``global_step`` 1-based as there (the
    optimizer step being taken): α·(1 − t/T) (``decreasing``, the default), α·0.5 (``constant``), α·t/T
    (``increasing``)."""
    if replay_ratio == "constant":
        return alpha * 0.5
    if replay_ratio == "increasing":
        return alpha * global_step / max_steps
    if replay_ratio == "decreasing":
        return alpha * (1 - global_step / max_steps)
    raise ValueError(f"replay_ratio must be one of {REPLAY_RATIOS}, got {replay_ratio!r}")


def choose_source(r: float, alpha: float, s: float, buffer_full: bool) -> str:
    """DistiLLM's branch for one draw ``r ~ U(0, 1)`` (finetune.py l.311-323):

    - ``"generated"`` if r < s, or if r < α while the replay buffer is not yet full (fresh samples are generated,
      pushed to the buffer and trained on);
    - else ``"replay"`` if r < α (a draw from the buffer, which is then full);
    - else ``"reference"``.
    """
    if r < s or (r < alpha and not buffer_full):
        return "generated"
    if r < alpha:
        return "replay"
    return "reference"


@register_mode("adaptive_off_policy")
class AdaptiveOffPolicy(SamplingSource):
    """DistiLLM's adaptive off-policy schedule (Ko et al., ICML 2024; jongwooko/distillm@d47e77ff ``finetune.py``).

    A FIFO replay buffer of student samples (``buffer_capacity`` rows, ``distillm/buffer.py``) and a threshold α_a
    (:class:`AdaptiveThreshold`) that starts at ``init_threshold`` and rises by ``threshold_step`` when the student's
    validation loss (``ctx.val_loss``) rose by at least ``loss_margin`` over the reference loss (``compare_to``).
    The loss is checked before the first step and then every ``check_every`` optimizer steps (``"epoch"``: once per
    pass over the training data, the released scripts' ``--eval-interval -1``). Each micro-batch draws r ~ U(0, 1)
    (seeded by ``(seed, i)``) and, with s = α_a·(1 − t/T) (t the 1-based optimizer step, T the run's steps;
    ``replay_ratio``), trains on fresh student samples (pushed to the buffer) if r < s or if r < α_a while the
    buffer is not full; on a uniform draw of ``batch`` rows from the full buffer if r < α_a; else on the reference
    batch (:func:`choose_source`). Samples: the student in eval mode, multinomial with ``temperature`` 1, top-k 0,
    top-p 1 (``--temperature 1.0 --top-k 0 --gen-top-p 1.0``), up to the suite's ``max_new_tokens``."""

    needs_val_loss = True
    params = {
        "buffer_capacity": Field((int,), 1000, ge=1, help="replay buffer size in rows (--capacity 1000)"),
        "init_threshold": Field((float,), 0.0, ge=0, le=1, help="initial α_a (--init-threshold 0.0)"),
        "threshold_step": Field((float,), 0.1, gt=0, le=1, help="rise of α_a at each rise of the validation loss "
                                                                "(finetune.py: 0.1, capped at 1)"),
        "loss_margin": Field((float,), 0.1, help="validation-loss rise that raises α_a (--loss-eps 0.1)"),
        "check_every": Field((int, str), "epoch", ge=1,
                             help="optimizer steps between validation-loss checks, or 'epoch' (--eval-interval -1: "
                                  "once per pass over the training data)"),
        "compare_to": Field((str,), "last_rise", choices=("last_rise", "last_check"),
                            help="reference loss of a check: the loss at the last rise of α_a (DistiLLM) or the "
                                 "previous check's"),
        "replay_ratio": Field((str,), "decreasing", choices=REPLAY_RATIOS,
                              help="s = α_a·(1 − t/T) (decreasing, DistiLLM's default), α_a/2 or α_a·t/T "
                                   "(--replay-ratio)"),
        **SamplingSource.params,
    }

    @classmethod
    def validate_params(cls, params: dict, where: str) -> None:
        every = params["check_every"]
        require(not isinstance(every, str) or every == "epoch", where,
                f"key 'mode_params.check_every' must be a number of optimizer steps (>= 1) or 'epoch', got {every!r}")

    def __init__(self, ctx, *, buffer_capacity: int, init_threshold: float, threshold_step: float,
                 loss_margin: float, check_every: int | str, compare_to: str, replay_ratio: str, **sampling):
        super().__init__(ctx, buffer_capacity=buffer_capacity, init_threshold=init_threshold,
                         threshold_step=threshold_step, loss_margin=loss_margin, check_every=check_every,
                         compare_to=compare_to, replay_ratio=replay_ratio, **sampling)
        where = f"training mode {self.name!r}"
        require(callable(ctx.val_loss), where, "needs ctx.val_loss (the student's validation loss)")
        n = ctx.micro_batch_size()
        require(buffer_capacity >= n, where, f"key 'mode_params.buffer_capacity' ({buffer_capacity}) must be at "
                                             f"least the micro-batch size ({n}): replay draws a whole micro-batch")
        if check_every == "epoch":
            require(ctx.steps_per_epoch is not None, where, "check_every 'epoch' needs ctx.n_train")
            self.check_every = int(ctx.steps_per_epoch)
        else:
            self.check_every = int(check_every)
        self.replay_ratio = replay_ratio
        self.buffer = ReplayBuffer(buffer_capacity)
        self.threshold = AdaptiveThreshold(threshold_step, loss_margin, start=init_threshold, compare_to=compare_to)
        self._last_check_step = -1

    def _maybe_check(self, step: int) -> None:
        if step % self.check_every == 0 and step > self._last_check_step:
            self._last_check_step = step
            start = time.perf_counter()
            loss = self.ctx.val_loss()
            self._time("val_loss_s", time.perf_counter() - start)
            self.threshold.update(loss, at_step=step)

    def __call__(self, i: int) -> dict:
        step = self.ctx.step_of(i)
        self._maybe_check(step)
        alpha = self.threshold.alpha
        s = sgo_threshold(alpha, step + 1, self.ctx.max_steps, self.replay_ratio)
        r = draw_rng(self.ctx.seed, i, STREAM_CHOICE).random()
        choice = choose_source(r, alpha, s, self.buffer.full)
        if choice == "reference":
            return self._reference(i)
        batch = self.ctx.reference(i)  # its prompts are answered (generated) or it is skipped (replay)
        if choice == "generated":
            rows = self._generate_rows(batch, i)
            self.buffer.push(rows)
            return self._collate(rows, "generated")
        n = int(batch["input_ids"].shape[0])
        return self._collate(self.buffer.sample(n, draw_rng(self.ctx.seed, i, STREAM_REPLAY)), "replay")

    @property
    def stats(self) -> dict:
        return {**super().stats, "threshold": self.threshold.alpha, "threshold_history": list(self.threshold.history),
                "check_every": self.check_every, "buffer_size": len(self.buffer)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict(), "threshold": self.threshold.state_dict(),
                "last_check_step": self._last_check_step}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
        self.threshold.load_state_dict(state["threshold"])
        self._last_check_step = state["last_check_step"]
