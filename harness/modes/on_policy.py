"""``on_policy``: GKD's student data fraction λ (TRL ``GKDTrainer``), optionally through DistiLLM's replay buffer."""

from __future__ import annotations

from ..schema import Field
from .base import STREAM_LAMBDA, STREAM_REPLAY, draw_rng, require
from .registry import register_mode
from .sampling import ReplayBuffer, SamplingSource


@register_mode("on_policy")
class OnPolicy(SamplingSource):
    """On-policy KD (GKD, Agarwal et al. 2024; TRL ``GKDTrainer.training_step``): with probability ``lmbda`` a
    micro-batch's responses are replaced by student samples for the same prompts, otherwise the reference batch
    is used. The draw is seeded by ``(seed, i)``; TRL draws ``random.random() <= lmbda``, we use ``<`` so that
    ``lmbda = 0`` never samples. One batched ``generate`` call per sampled micro-batch (KV cache), in eval mode,
    with ``temperature``/``top_k``/``top_p`` and the suite's ``max_new_tokens``; every sampled token and the eos
    that ended the sample are targets (TRL's ``generate_on_policy_outputs`` labels).

    ``replay_capacity > 0`` is DistiLLM's ``mixed`` baselines (jongwooko/distillm ``finetune.py``, GKD and ImitKD
    runs): a sampled batch is pushed to a FIFO buffer of that many rows and the micro-batch trained on is a
    uniform draw of ``batch`` rows from the buffer (``source = "replay"``), which may mix fresh and older samples.
    ``replay_capacity = 0`` (default) trains on the fresh samples, as TRL does."""

    params = {
        "lmbda": Field((float,), 0.5, ge=0, le=1, help="probability that a micro-batch is student samples (GKD's λ)"),
        **SamplingSource.params,
        "temperature": Field((float,), 0.9, gt=0, help="sampling temperature (TRL GKDConfig: 0.9)"),
        "replay_capacity": Field((int,), 0, ge=0, help="0: train on the fresh samples (TRL); N > 0: push them to "
                                                       "a FIFO buffer of N rows and train on a draw from it "
                                                       "(DistiLLM's GKD/ImitKD baselines: 1000)"),
    }

    def __init__(self, ctx, *, lmbda: float, replay_capacity: int, **sampling):
        super().__init__(ctx, lmbda=lmbda, replay_capacity=replay_capacity, **sampling)
        self.lmbda = float(lmbda)
        self.buffer = None
        if replay_capacity:
            n = ctx.micro_batch_size()
            require(replay_capacity >= n, f"training mode {self.name!r}",
                    f"key 'mode_params.replay_capacity' ({replay_capacity}) must be at least the micro-batch size "
                    f"({n}) or 0")
            self.buffer = ReplayBuffer(replay_capacity)

    def __call__(self, i: int) -> dict:
        if draw_rng(self.ctx.seed, i, STREAM_LAMBDA).random() < self.lmbda:
            batch = self.ctx.reference(i)
            rows = self._generate_rows(batch, i)
            if self.buffer is None:
                return self._collate(rows, "generated")
            self.buffer.push(rows)
            n = int(batch["input_ids"].shape[0])
            return self._collate(self.buffer.sample(n, draw_rng(self.ctx.seed, i, STREAM_REPLAY)), "replay")
        return self._reference(i)

    @property
    def stats(self) -> dict:
        out = super().stats
        if self.buffer is not None:
            out["buffer_size"] = len(self.buffer)
        return out

    def state_dict(self) -> dict:
        out = super().state_dict()
        if self.buffer is not None:
            out["buffer"] = self.buffer.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])
