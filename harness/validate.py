"""Validate a whole plan up front (suite, every recipe, data paths, model sources), so a typo fails in seconds.

Runs at the start of every distill step and on demand with ``distillbench validate``.
"""

from __future__ import annotations

from pathlib import Path

from .data.errors import DataError
from .data.instruct import check_data_plan
from .recipes import discover
from .schema import ConfigError
from .suite import Suite


def _check_model_source(suite: Suite, role: str) -> None:
    entry = getattr(suite, role)
    if entry["path"] and not Path(entry["path"]).is_dir():
        raise ConfigError(f"{suite.origin}: key '{role}.path': directory {entry['path']!r} not found "
                          "(give a saved model directory, or 'hub:' with a network)")


def _recipe_line(name, recipe) -> str:
    return f"{name} [{'+'.join(recipe.objective_ids())}, {recipe.mode}]"


def validate_plan(suite: Suite, recipes_dir: str | None = None, check_data: bool = True) -> str:
    """Raise ConfigError/DataError/ObjectiveError on the first problem; return a summary of the plan."""
    recipes = discover(recipes_dir or suite.recipes_dir, suite.recipe_names)
    if suite.baseline not in recipes:
        raise ConfigError(f"{suite.origin}: key 'baseline': no recipe named {suite.baseline!r}; "
                          f"known: {', '.join(sorted(recipes))}")
    if suite.cross_tokenizer:  # a student with its own tokenizer: only objectives and modes defined across tokenizers
        from .cross_tokenizer import check_plan

        check_plan(suite, recipes)
    cache = suite.teacher_cache or {}
    if cache:  # which objectives each cache mode can serve (harness.teacher_cache.supported says why not)
        from .objectives import spec as objective_spec
        from .teacher_cache import supported

        for name, recipe in recipes.items():
            for term in recipe.terms:
                if not term.weight or objective_spec(term.objective).kind == "sequence":
                    continue  # sequence-level terms score live samples, never the cache
                ok, why = supported(cache["mode"], term.objective, term.temperature, cache)
                if not ok:
                    raise ConfigError(f"{suite.origin}: key 'teacher_cache.mode': recipe {name!r} ({recipe.path}): "
                                      f"{why}; use mode 'exact' or leave that recipe out")
    for role in ("teacher", "student"):
        _check_model_source(suite, role)
    n_items = {}
    if check_data:  # every set entry checked; local (and already cached Hub) files loaded; no validation/test overlap
        n_items = check_data_plan(suite.data, suite.evaluation["sets"], where=suite.origin)
    runs = len(recipes) * len(suite.seeds)
    lines = [
        f"suite {suite.name!r} ({suite.origin}): OK",
        f"  recipes ({len(recipes)}): {', '.join(_recipe_line(n, r) for n, r in recipes.items())}",
        f"  seeds: {suite.seeds} -> {runs} distillation runs of {suite.training.max_steps} steps "
        f"x {suite.training.per_device_train_batch_size * suite.training.gradient_accumulation_steps} sequences",
        f"  evaluation sets: {', '.join(s['name'] for s in suite.evaluation['sets'])}",
    ]
    if n_items:
        lines.append("  items: " + ", ".join(f"{k}={v}" for k, v in n_items.items()))
    return "\n".join(lines)


def plan_or_exit(suite_file):
    """Load and validate a suite for the Snakefile; a user error prints one line and exits with status 2."""
    import sys

    from .models import ModelError
    from .objectives import ObjectiveError
    from .suite import load_suite

    try:
        suite = load_suite(suite_file)
        validate_plan(suite, check_data=True)
        return suite
    except (ConfigError, DataError, ModelError, ObjectiveError) as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"distillbench: error: {message}", file=sys.stderr)
        sys.exit(2)
