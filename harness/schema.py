"""A small schema checker for recipe and suite YAML: every error names the file, the key and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or suite file that does not follow its schema."""


@dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    default: Any = None
    required: bool = False
    choices: tuple | None = None
    help: str = ""


def _type_names(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "integer", float: "number", str: "string", dict: "mapping",
             list: "list", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file (and the line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = ": ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
        raise ConfigError(f"{path}: not valid YAML{at}: {' '.join((what or str(exc)).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    return data


def check(data: dict, schema: dict[str, Field], where: str, prefix: str = "") -> dict:
    """Validate ``data`` against ``schema``; return a copy with defaults filled in."""
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}'; accepted keys: {', '.join(sorted(schema))}"
        )
    out = {}
    for key, field in schema.items():
        name = f"{prefix}{key}"
        if key not in data:
            if field.required:
                raise ConfigError(f"{where}: missing required key {name!r} ({field.help or _type_names(field.types)})")
            out[key] = field.default
            continue
        value = data[key]
        ok = isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)
        if not ok and float in field.types and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(
                f"{where}: key {name!r} must be {_type_names(field.types)}, got {type(value).__name__} {value!r}"
            )
        if field.choices is not None and value not in field.choices:
            raise ConfigError(
                f"{where}: key {name!r} has value {value!r}; accepted values: {', '.join(map(str, field.choices))}"
            )
        out[key] = value
    return out
