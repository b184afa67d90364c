"""A small schema checker for recipe and suite YAML: every error names the file, the key, the value and the fix.

A :class:`Field` declares a key's accepted types, default, choices and numeric range; :func:`check` applies a
mapping of fields to a mapping read from YAML and fills in defaults. Numbers must be finite (YAML's ``.nan``
and ``.inf`` are refused everywhere), booleans are never taken for numbers, and an integer is accepted where
a number (float) is expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or suite file that does not follow its schema."""


@dataclass(frozen=True)
class Field:
    """One key of a schema.

    ``ge``/``gt``/``le``/``lt`` bound numeric values (inclusive/exclusive); ``min_len`` bounds lists and
    strings; ``help`` is the one-line meaning shown in errors and in the generated reference page.
    """

    types: tuple[type, ...]
    default: Any = None
    required: bool = False
    choices: tuple | None = None
    help: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_len: int | None = None

    def range_text(self) -> str:
        """The accepted range in interval notation, e.g. ``[0, 1)``, ``> 0``; empty when unbounded."""
        lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if lo and hi:
            return f"{lo}, {hi}"
        if lo:
            return f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        if hi:
            return f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}"
        return ""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` (already of an accepted type) is out of range, or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt) or \
               (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt):
                return f"must lie in {self.range_text()}" if "," in self.range_text() else f"must be {self.range_text()}"
        if self.min_len is not None and isinstance(value, (list, str, dict)) and len(value) < self.min_len:
            return "must not be empty" if self.min_len == 1 else f"needs at least {self.min_len} entries"
        return None


def type_names(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "integer", float: "number", str: "string", dict: "mapping",
             list: "list", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file (and the line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at line {line}); "
                          "save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = ": ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
        raise ConfigError(f"{path}: not valid YAML{at}: {' '.join((what or str(exc)).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    return data


def check_value(value: Any, field: Field, where: str, name: str) -> Any:
    """One value against its field: type (int → float where a number is expected), choices, range."""
    ok = isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)
    if not ok and float in field.types and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(
            f"{where}: key {name!r} must be {type_names(field.types)}, got {type(value).__name__} {value!r}"
            + (f" ({field.help})" if field.help else "")
        )
    if field.choices is not None and value not in field.choices:
        raise ConfigError(
            f"{where}: key {name!r} has value {value!r}; accepted values: {', '.join(map(str, field.choices))}"
        )
    why = field.problem(value)
    if why:
        raise ConfigError(f"{where}: key {name!r} {why}, got {value!r}" + (f" ({field.help})" if field.help else ""))
    return value


def check(data: dict, schema: dict[str, Field], where: str, prefix: str = "") -> dict:
    """Validate ``data`` against ``schema``; return a copy with defaults filled in."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: key {prefix.rstrip('.')!r} must be a mapping, got {type(data).__name__} {data!r}")
    unknown = sorted(set(data) - set(schema), key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}'; accepted keys: {', '.join(sorted(schema))}"
        )
    out = {}
    for key, field in schema.items():
        name = f"{prefix}{key}"
        if key not in data:
            if field.required:
                raise ConfigError(f"{where}: missing required key {name!r} ({field.help or type_names(field.types)})")
            out[key] = field.default
            continue
        value = data[key]
        if value is None and type(None) in field.types:
            out[key] = None
            continue
        out[key] = check_value(value, field, where, name)
    return out
