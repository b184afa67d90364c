"""Recipes: every shipped recipe loads; a user's objective added from outside the package works end to end."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from harness import objectives
from harness.recipes import discover, load_recipe
from harness.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_every_builtin_objective_has_a_recipe_and_all_recipes_load():
    recipes = discover(REPO / "recipes")
    used = {r.objective for r in recipes.values()}
    assert set(objectives.available()) <= used
    assert recipes["sft"].objective == "ce" and not recipes["sft"].uses_teacher
    assert recipes["skl"].build_objective().params == {"alpha": 0.1}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_user_objective_from_a_temporary_directory(tmp_path, tiny_tokenizer, tiny_data, one_thread):
    _write(tmp_path, "my_losses_hellinger.py", '''
        import torch

        def hellinger(log_q, log_p, power: float = 0.5):
            """Squared Hellinger distance 1 - sum sqrt(p q)."""
            return 1 - torch.exp(power * (log_q + log_p)).sum(-1)
    ''')
    recipe_path = _write(tmp_path, "hellinger.yaml", '''
        description: Squared Hellinger distance
        objective: my_losses_hellinger:hellinger
        params: {power: 0.5}
        kd_weight: 1.0
        mode: off_policy
    ''')
    recipe = load_recipe(recipe_path)  # puts the recipe's directory on sys.path
    obj = recipe.build_objective()
    # hand-computed: p = (1/2, 1/2), q = (1/4, 3/4): 1 − (sqrt(1/8) + sqrt(3/8))
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    expected = 1 - (math.sqrt(0.125) + math.sqrt(0.375))
    assert float(obj(q.log(), p.log())) == pytest.approx(expected, abs=1e-12)
    assert float(obj(p.log(), p.log())) == pytest.approx(0.0, abs=1e-12)
    # the same API as the built-ins: masking, reduction, chunking, parameter checks
    z_s = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(2, 5, 7, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64)
    dense = obj(z_s, z_t, mask)
    assert float(obj(z_s, z_t, mask, chunk_size=2).detach()) == pytest.approx(float(dense.detach()), abs=1e-12)
    with pytest.raises(objectives.ObjectiveError, match="power"):
        obj(z_s, z_t, mask, alpha=1.0)
    # and it trains through the same loop as every other recipe
    from harness.data import batching
    from harness.distill import TrainConfig, train
    from harness.models import build_tiny
    from harness.steps import live_teacher, reference_batches

    tok = tiny_tokenizer
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    teacher = build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}, len(tok), 0, 64, special).eval()
    student = build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}, len(tok), 1, 64, special)
    examples = [batching.encode(tok, it, 40, 48) for it in tiny_data["train"]]

    class Suite:
        training = TrainConfig(per_device_train_batch_size=8)

    result = train(student, reference_batches(Suite, examples, tok.pad_token_id, 1),
                   TrainConfig(max_steps=4, per_device_train_batch_size=8, log_every=1), seed=1,
                   objective=obj, kd_weight=recipe.kd_weight, teacher_logits=live_teacher(teacher), progress=False)
    assert len(result.curve) == 4 and all(math.isfinite(loss) for _, loss in result.curve)


@pytest.mark.parametrize("body, needle", [
    ("objective: fkl\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("objective: fkl\nkd_weight: high\n", "key 'kd_weight' must be number"),
    ("description: no objective\n", "missing required key 'objective'"),
    ("objective: fkll\n", "unknown objective id 'fkll'; known ids: ab, akl, bdkd, ce, distillm2, fkl"),
    ("objective: fkl\nparams: {alpha: 0.1}\n", "does not accept parameter(s) alpha; accepted: none"),
    ("objective: nowhere_module_xyz:fn\n", "cannot import module 'nowhere_module_xyz'"),
    ("objective: fkl\nmode: sometimes\n", "registered modes: adaptive_off_policy, distillm2, minillm, off_policy, on_policy, seq_kd"),
    ("objective: jsd\nmode: on_policy\nmode_params: {lambda: 0.5}\n", "unknown key 'mode_params.lambda'"),
])
def test_recipe_errors_name_the_file_the_key_and_the_accepted_values(tmp_path, body, needle):
    path = _write(tmp_path, "bad.yaml", body)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and needle in str(err.value)
