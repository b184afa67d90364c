"""Recipes: one YAML file per method, found by scanning a directory (``recipes/*.yaml``).

A recipe may only change what its method is about — the loss, its parameters, the training mode and the
method's own settings. Data, budgets (steps, lengths, sampling budgets), seeds and models belong to the
suite, so every recipe of a comparison gets the same.

    # recipes/sinkhorn.yaml — the general form: a weighted sum of objectives
    description: SinKD's language-model loss
    reference:                       # the method card: what this row claims to be
      paper: "Cui et al., SinKD, ..."
      code: "owner/repo@<commit> path (function)"
      deviations: []                 # every difference from the released code's defaults
    loss:
      - {objective: ce, weight: 1.0}
      - {objective: fkl, weight: 0.1}
      - {objective: sinkhorn, weight: 1.0, temperature: 2.0, params: {epsilon: 0.1, debias: false}}
    mode: off_policy                 # a registered training mode (harness.modes)
    mode_params: {}                  # that mode's method parameters
    dropout: keep                    # keep | disable: as the method's released code trains

    # recipes/skl.yaml — the short form of the classic mix (1 − kd_weight)·CE + kd_weight·D
    objective: skl                   # a built-in id (harness.objectives.available()) or package.module:function
    params: {alpha: 0.1}             # checked against the objective's signature and declared ranges
    temperature: 1.0
    kd_weight: 1.0

A ``module:function`` objective is imported with the recipe's own directory on ``sys.path``, so a user's
``my_loss.py`` next to ``my_recipe.yaml`` works without installing anything; that module file is an input
of the recipe's runs (editing it re-runs them).
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import ConfigError, Field, check, read_yaml

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

TERM_SCHEMA = {
    "objective": Field((str,), required=True, help="a built-in id or 'package.module:function'"),
    "weight": Field((float,), 1.0, help="the term's weight w_k in Σ_k w_k·D_k"),
    "params": Field((dict, type(None)), None, help="the objective's parameters (see `distillbench objectives`)"),
    "temperature": Field((float,), 1.0, gt=0, help="τ of both softmaxes of this term (ignored by ce)"),
    "label": Field((str,), "", help="name of the term in logs (default: the objective id)"),
}

REFERENCE_SCHEMA = {
    "paper": Field((str,), "", help="authors, title, venue, arXiv id"),
    "code": Field((str,), "", help="released code as owner/repo@commit path (function), or 'none released'"),
    "deviations": Field((list,), None, help="every difference from the released code's defaults ([] = none)"),
    "notes": Field((str,), "", help="anything else a reader of the leaderboard should know"),
}

RECIPE_SCHEMA = {
    "name": Field((str,), None, help="defaults to the file name"),
    "description": Field((str,), "", help="one line shown in listings"),
    "reference": Field((dict, type(None)), None, help="the method card: {paper, code, deviations, notes}"),
    "loss": Field((list,), None, min_len=1, help="weighted sum of terms {objective, weight, params, temperature}"),
    "objective": Field((str,), None, help="short form: the divergence D of (1 − kd_weight)·CE + kd_weight·D"),
    "params": Field((dict, type(None)), None, help="short form: D's parameters"),
    "temperature": Field((float,), None, gt=0, help="short form: τ of D"),
    "kd_weight": Field((float,), None, ge=0, le=1, help="short form: λ in (1 − λ)·CE + λ·D"),
    "mode": Field((str,), "off_policy", help="training mode: where a batch's responses come from"),
    "mode_params": Field((dict, type(None)), None, help="the mode's parameters"),
    "dropout": Field((str,), "keep", choices=("keep", "disable"),
                     help="keep the model's dropout or disable it during training, as the method's code does"),
}


@dataclass(frozen=True)
class TermSpec:
    """One term of a recipe's loss, as written in the file."""

    objective: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    label: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    terms: tuple[TermSpec, ...]
    mode: str = "off_policy"
    mode_params: dict[str, Any] = field(default_factory=dict)
    dropout: str = "keep"
    description: str = ""
    reference: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    # ------------------------------------------------------------------ the loss
    def build_loss(self):
        """The :class:`harness.objectives.composite.WeightedLoss` of this recipe."""
        from . import objectives
        from .objectives.composite import Term, WeightedLoss

        return WeightedLoss([Term(objectives.get(t.objective, **t.params), t.weight, t.temperature, t.label)
                             for t in self.terms])

    @property
    def primary(self) -> TermSpec:
        """The term that names the method: the first one that needs the teacher (``ce`` for SFT)."""
        for t in self.terms:
            if t.objective != "ce" and t.weight != 0:
                return t
        return self.terms[0]

    @property
    def objective(self) -> str:
        return self.primary.objective

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.primary.params)

    @property
    def kd_weight(self) -> float:
        return self.primary.weight

    @property
    def temperature(self) -> float:
        return self.primary.temperature

    def build_objective(self) -> objectives.Objective:
        from . import objectives

        return objectives.get(self.objective, **self.params)

    @property
    def uses_teacher(self) -> bool:
        """False for pure SFT (only ``ce`` terms): its runs need no teacher forward at all."""
        from . import objectives

        return any(objectives.spec(t.objective).needs_teacher and t.weight != 0 for t in self.terms)

    @property
    def base_dir(self) -> Path | None:
        """The recipe's folder (a ``file.py:Class`` mode or ``module:function`` objective resolves against it)."""
        return Path(self.path).resolve().parent if self.path else None

    @property
    def samples_student(self) -> bool:
        """Whether the recipe's mode trains on student samples (then the teacher runs live on them)."""
        from . import modes

        return modes.needs_student_samples(self.mode, self.base_dir)

    def objective_ids(self) -> list[str]:
        return [t.objective for t in self.terms if t.weight != 0]

    def source_files(self) -> list[str]:
        """Files that determine this recipe's runs: the recipe itself and its user objectives' modules."""
        files = [self.path] if self.path else []
        for t in self.terms:
            if ":" in t.objective:
                module = sys.modules.get(t.objective.partition(":")[0]) or importlib.import_module(
                    t.objective.partition(":")[0])
                if getattr(module, "__file__", None):
                    files.append(str(Path(module.__file__).resolve()))
        return files

    def summary(self) -> str:
        return " + ".join(f"{t.weight:g}·{t.objective}" + (f"{t.params}" if t.params else "") for t in self.terms)

    def to_dict(self) -> dict:
        return {"name": self.name, "loss": [dict(t.__dict__) for t in self.terms], "mode": self.mode,
                "mode_params": dict(self.mode_params), "dropout": self.dropout, "description": self.description,
                "reference": dict(self.reference), "path": self.path}


def _terms(raw: dict, where: str) -> tuple[TermSpec, ...]:
    short = [k for k in ("objective", "params", "temperature", "kd_weight") if raw[k] is not None]
    if raw["loss"] is not None:
        if short:
            raise ConfigError(f"{where}: key {short[0]!r} cannot be combined with 'loss'; put it in a loss term")
        specs = []
        for i, entry in enumerate(raw["loss"]):
            t = check(entry, TERM_SCHEMA, where, prefix=f"loss[{i}].")
            specs.append(TermSpec(t["objective"], t["weight"], t["params"] or {}, t["temperature"], t["label"]))
        return tuple(specs)
    if raw["objective"] is None:
        raise ConfigError(f"{where}: missing required key 'objective' (a built-in id or 'package.module:function'), "
                          "or a 'loss' list of terms")
    kd = 1.0 if raw["kd_weight"] is None else raw["kd_weight"]
    tau = 1.0 if raw["temperature"] is None else raw["temperature"]
    if raw["objective"] == "ce":
        return (TermSpec("ce", 1.0, raw["params"] or {}, 1.0),)
    terms = [TermSpec(raw["objective"], kd, raw["params"] or {}, tau)]
    if kd < 1.0:
        terms.insert(0, TermSpec("ce", 1.0 - kd))
    return tuple(terms)


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate one recipe; errors name the file, the key, the value and the accepted values."""
    path = Path(path)
    where = str(path)
    raw = check(read_yaml(path), RECIPE_SCHEMA, where)
    name = raw["name"] if raw["name"] is not None else path.stem
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: recipe name {name!r} must be non-empty and use only letters, digits, '_', "
                          "'-' and '.' (it names directories and Snakemake targets); rename the file or set 'name'")
    if name in ("teacher", "init"):
        raise ConfigError(f"{where}: recipe name {name!r} is reserved for the reference rows; choose another")
    terms = _terms(raw, where)
    from . import modes, objectives  # imported here: the steps that never read a recipe need no torch

    if not isinstance(raw["mode"], str) or not raw["mode"]:
        raise ConfigError(f"{where}: key 'mode' must be a training mode name; registered: {', '.join(modes.available())}")
    try:
        mode_params = modes.check_params(raw["mode"], raw["mode_params"] or {}, where, base_dir=path.parent)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: key 'mode': {msg}") from None
    reference = check(raw["reference"] or {}, REFERENCE_SCHEMA, where, prefix="reference.")
    recipe_dir = str(path.resolve().parent)
    if any(":" in t.objective for t in terms) and recipe_dir not in sys.path:
        sys.path.insert(0, recipe_dir)
    for i, t in enumerate(terms):
        key = f"loss[{i}]" if raw["loss"] is not None else None
        try:
            objectives.get(t.objective, **t.params)
        except objectives.ObjectiveError as exc:
            k = key or ("params" if t.params and t.objective in objectives.available() else "objective")
            raise ConfigError(f"{where}: key {k!r}: {exc}") from exc
    return Recipe(name, terms, raw["mode"], mode_params, raw["dropout"], raw["description"],
                  {k: v for k, v in reference.items() if v not in (None, "")}, str(path))


def discover(recipes_dir: str | Path, names: list[str] | None = None) -> dict[str, Recipe]:
    """All recipes of a directory (sorted by name), or the named subset; unknown names list the known ones.

    With ``names``, only the named recipes are loaded and validated: one broken draft elsewhere in the
    directory does not break a suite that does not use it.
    """
    recipes_dir = Path(recipes_dir)
    if not recipes_dir.is_dir():
        raise ConfigError(f"{recipes_dir}: recipes directory not found (key 'recipes_dir' is relative to the "
                          "directory you run from)")
    paths = {p.stem: p for p in sorted(recipes_dir.glob("*.yaml"))}
    if names is not None:
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ConfigError(f"key 'recipes': recipe names must be non-empty strings, got {bad[0]!r}")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"key 'recipes': recipe {dup!r} is listed twice")
        missing = [n for n in names if n not in paths]
        if missing:  # a recipe may set `name:` other than its file name: look in every file
            every = discover(recipes_dir)
            if all(n in every for n in names):
                return {n: every[n] for n in names}
            missing = [n for n in names if n not in every]
            import difflib

            close = difflib.get_close_matches(missing[0], list(paths), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"no recipe named {missing[0]!r} in {recipes_dir}{hint}; known: {', '.join(sorted(paths))}")
        paths = {n: paths[n] for n in names}
    found = {}
    for stem, path in paths.items():
        recipe = load_recipe(path)
        if recipe.name in found:
            raise ConfigError(f"{path}: recipe name {recipe.name!r} also used by {found[recipe.name].path}")
        found[recipe.name] = recipe
    return found
