"""Recipes: one YAML file per objective, found by scanning a directory (``recipes/*.yaml``).

A recipe may only change what it is about — the objective, its parameters, the training mode and the KD
weight. Data, budgets, seeds and models belong to the suite, so every recipe of a comparison gets the same.

    # recipes/skl.yaml
    description: Skew KL, DistiLLM
    objective: skl              # a built-in id (harness.objectives.available()) or package.module:function
    params: {alpha: 0.1}        # checked against the objective's signature
    temperature: 1.0            # τ of both softmaxes
    kd_weight: 1.0              # λ_kd in (1 − λ_kd)·CE + λ_kd·divergence
    mode: off_policy            # off_policy | on_policy | adaptive_off_policy
    mode_params: {}             # see MODE_PARAMS

A ``module:function`` objective is imported with the recipe's own directory on ``sys.path``, so a user's
``my_loss.py`` next to ``my_recipe.yaml`` works without installing anything.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import objectives
from .schema import ConfigError, Field, check, read_yaml

MODES = ("off_policy", "on_policy", "adaptive_off_policy")

#: Accepted ``mode_params`` per training mode, with their defaults (TRL GKD and DistiLLM values).
MODE_PARAMS: dict[str, dict[str, Field]] = {
    "off_policy": {},
    "on_policy": {
        "lmbda": Field((float,), 0.5, help="probability that a batch's responses are student samples"),
        "temperature": Field((float,), 0.9, help="sampling temperature"),
        "max_new_tokens": Field((int,), 128, help="longest sampled response"),
    },
    "adaptive_off_policy": {
        "buffer_capacity": Field((int,), 1000, help="replay buffer size in samples"),
        "threshold_step": Field((float,), 0.1, help="rise of the threshold α_a"),
        "loss_margin": Field((float,), 0.1, help="validation-loss rise that triggers a threshold rise"),
        "check_every": Field((int,), 20, help="optimizer steps between validation-loss checks"),
        "temperature": Field((float,), 1.0, help="sampling temperature"),
        "max_new_tokens": Field((int,), 128, help="longest sampled response"),
    },
}

RECIPE_SCHEMA = {
    "name": Field((str,), None, help="defaults to the file name"),
    "description": Field((str,), ""),
    "objective": Field((str,), required=True, help="a built-in id or 'package.module:function'"),
    "params": Field((dict,), None),
    "temperature": Field((float,), 1.0),
    "kd_weight": Field((float,), 1.0),
    "mode": Field((str,), "off_policy", choices=MODES),
    "mode_params": Field((dict,), None),
}


@dataclass(frozen=True)
class Recipe:
    name: str
    objective: str
    params: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    kd_weight: float = 1.0
    mode: str = "off_policy"
    mode_params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: str | None = None

    def build_objective(self) -> objectives.Objective:
        return objectives.get(self.objective, **self.params)

    @property
    def uses_teacher(self) -> bool:
        """False for pure SFT (objective ``ce``): its runs need no teacher forward at all."""
        return objectives.spec(self.objective).needs_teacher and self.kd_weight > 0

    def to_dict(self) -> dict:
        return asdict(self)


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate one recipe; errors name the file, the key and the accepted values."""
    path = Path(path)
    where = str(path)
    raw = check(read_yaml(path), RECIPE_SCHEMA, where)
    name = raw["name"] or path.stem
    params = raw["params"] or {}
    if not 0.0 <= raw["kd_weight"] <= 1.0:
        raise ConfigError(f"{where}: key 'kd_weight' must lie in [0, 1], got {raw['kd_weight']}")
    if raw["temperature"] <= 0:
        raise ConfigError(f"{where}: key 'temperature' must be > 0, got {raw['temperature']}")
    mode_params = check(raw["mode_params"] or {}, MODE_PARAMS[raw["mode"]], where, prefix="mode_params.")
    recipe_dir = str(path.resolve().parent)
    if ":" in raw["objective"] and recipe_dir not in sys.path:
        sys.path.insert(0, recipe_dir)
    try:
        objectives.get(raw["objective"], **params)
    except objectives.ObjectiveError as exc:
        key = "params" if params and raw["objective"] in objectives.available() else "objective"
        raise ConfigError(f"{where}: key {key!r}: {exc}") from exc
    return Recipe(name, raw["objective"], params, raw["temperature"], raw["kd_weight"], raw["mode"],
                  mode_params, raw["description"], str(path))


def discover(recipes_dir: str | Path, names: list[str] | None = None) -> dict[str, Recipe]:
    """All recipes of a directory (sorted by name), or the named subset; unknown names list the known ones."""
    recipes_dir = Path(recipes_dir)
    if not recipes_dir.is_dir():
        raise ConfigError(f"{recipes_dir}: recipes directory not found")
    found = {}
    for path in sorted(recipes_dir.glob("*.yaml")):
        recipe = load_recipe(path)
        if recipe.name in found:
            raise ConfigError(f"{path}: recipe name {recipe.name!r} also used by {found[recipe.name].path}")
        found[recipe.name] = recipe
    if names is None:
        return found
    missing = [n for n in names if n not in found]
    if missing:
        raise ConfigError(f"no recipe named {missing[0]!r} in {recipes_dir}; known: {', '.join(sorted(found))}")
    return {n: found[n] for n in names}
