"""``off_policy``: the reference responses of the training set (supervised KD; every objective's default)."""

from __future__ import annotations

from .base import BatchSource
from .registry import register_mode


@register_mode("off_policy")
class OffPolicy(BatchSource):
    """Off-policy (supervised KD): every micro-batch is the reference batch ``ctx.reference(i)``, unchanged
    (only ``source = "reference"`` is added), so losses equal those of passing ``reference`` to ``train`` directly.
    No parameters; never samples, so a teacher cache of the training data serves every batch."""

    def __call__(self, i: int) -> dict:
        return self._reference(i)
