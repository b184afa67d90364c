"""The output layer applied at counted positions only (:func:`harness.models.counted_logits`).

Two claims make it safe to train with: (1) at counted positions the logits and their gradients are the model's own
(``model(...).logits``, computed here independently by the full forward), and (2) no recipe's loss reads a position
outside the loss mask, so the zeros there change nothing: every recipe of ``recipes/`` gives the same value and the
same gradient with the logits outside the mask replaced by noise.
"""

from __future__ import annotations

import pytest
import torch

from harness.models import build_tiny, counted_logits, counted_rows
from harness.recipes import discover

V, B, T = 40, 4, 9
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, -2:] = 0                     # right padding, as training batches have
    attention[3, -4:] = 0
    mask = torch.zeros(B, T)
    mask[:, 4:] = 1.0                         # responses
    mask[attention == 0] = 0.0
    mask[:, -1] = 0.0                         # the last position has no target
    return ids, attention, mask


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_counted_rows_and_gradients_equal_the_full_forward(arch):
    spec = {"arch": arch, "n_layer": 2, "n_embd": 16, "n_head": 2}
    model = build_tiny(spec, V, seed=3, max_positions=16, special_ids=SPECIAL).double()
    ids, attention, mask = _batch()
    rows = mask > 0
    weights = torch.randn(int(rows.sum()), V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    full = model(input_ids=ids, attention_mask=attention).logits
    (full[rows] * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    packed = counted_rows(model, ids, attention, mask)  # the teacher cache's form: [N, V], row-major order
    assert packed.shape == (int(rows.sum()), V)
    torch.testing.assert_close(packed, full[rows].detach(), rtol=1e-12, atol=1e-12)
    out = counted_logits(model, ids, attention, mask)
    assert out.shape == full.shape
    torch.testing.assert_close(out[rows], full[rows].detach(), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(out[~rows]) == 0          # never computed
    (out[rows] * weights).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_wrapped_or_unknown_model_gets_its_full_logits():
    model = build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}, V, seed=0, max_positions=16,
                       special_ids=SPECIAL)

    class Wrapper(torch.nn.Module):  # what DDP looks like from here: not a PreTrainedModel
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    ids, attention, mask = _batch()
    full = model(input_ids=ids, attention_mask=attention).logits
    out = counted_logits(Wrapper(model), ids, attention, mask)
    assert torch.equal(out, full)                        # every position, including the uncounted ones
    assert torch.equal(counted_rows(Wrapper(model), ids, attention, mask), full[mask > 0])  # the full forward's rows
    model.config.model_type = "gemma2"                   # a soft-capped head: not in HEAD_ONLY_TYPES
    assert torch.equal(counted_logits(model, ids, attention, mask), full)


def _mode_fields(recipe, mask: torch.Tensor) -> dict:
    """The per-row fields the recipe's training mode attaches (values as the modes make them)."""
    rows = mask.shape[0]
    half = torch.tensor([0] * (rows // 2) + [1] * (rows - rows // 2))
    fields = {"progress": torch.tensor(0.3, dtype=torch.float64),
              "alpha_anchor": torch.tensor([0.2, 0.1], dtype=torch.float64),
              "pair_role": half, "minillm_role": 1 - half,
              "mix_weight": torch.where(mask > 0, torch.linspace(0.6, 1.4, mask.numel()).reshape(mask.shape),
                                        torch.ones_like(mask)).double()}
    return fields


@pytest.mark.parametrize("name", sorted(discover("recipes")))
def test_no_recipe_reads_logits_outside_the_loss_mask(name):
    recipe = discover("recipes")[name]
    loss = recipe.build_loss()
    g = torch.Generator().manual_seed(7)
    _, _, mask = _batch()
    labels = torch.randint(3, V, (B, T), generator=g)
    labels[mask == 0] = -100
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    noise = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 5
    outside = (mask == 0)[..., None]
    batch = {"labels": labels, "loss_mask": mask, **_mode_fields(recipe, mask)}

    def value_and_grad(s, t):
        s = s.clone().requires_grad_(True)
        value, _ = loss(s, t if loss.needs_teacher else None, mask, labels=labels, normalizer=float(mask.sum()),
                        batch=batch, kernel="torch")
        value.backward()
        return value.detach(), s.grad[~outside.squeeze(-1)]

    v0, g0 = value_and_grad(student, teacher)
    v1, g1 = value_and_grad(torch.where(outside, noise, student), torch.where(outside, -noise, teacher))
    assert torch.isfinite(v0)
    torch.testing.assert_close(v1, v0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)
