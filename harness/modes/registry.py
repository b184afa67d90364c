"""The registry of training modes: ``@register_mode(name)`` on a :class:`BatchSource` subclass is all it takes.

A recipe's ``mode`` is a registered name (:func:`available`), or a user's class named as
``package.module:Class`` (imported) or ``path/to/file.py:Class`` (loaded by path, relative to the recipe's
folder), so a user adds a mode from their own code without editing the harness.

    from harness.modes import BatchSource, register_mode
    from harness.schema import Field

    @register_mode("every_other")
    class EveryOther(BatchSource):
        \"\"\"Reference batches, but only every other index (a toy).\"\"\"
        params = {"offset": Field((int,), 0, ge=0, help="index added before the lookup")}

        def __init__(self, ctx, *, offset):
            super().__init__(ctx, offset=offset)
            self.offset = offset

        def __call__(self, i):
            return self._reference(2 * i + self.offset)
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from ..schema import ConfigError, Field, check
from .base import BatchSource, ModeContext

_REGISTRY: dict[str, type[BatchSource]] = {}


def register_mode(name: str):
    """Class decorator: register a :class:`BatchSource` subclass as the training mode ``name``.

    Refuses a name already taken by another class (re-registering the same class, e.g. on a module reload, is
    fine), a name with ``:`` (reserved for ``module:Class``), and ``params`` that are not ``Field``s.
    """
    if not isinstance(name, str) or not name.strip() or ":" in name or name != name.strip():
        raise ValueError(f"register_mode: a mode name is a non-empty string without ':' or spaces, got {name!r}")

    def decorate(cls):
        _check_class(cls, name)
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"register_mode: mode {name!r} is already registered by "
                             f"{old.__module__}.{old.__qualname__}; choose another name")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _check_class(cls: Any, name: str) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, BatchSource)):
        raise TypeError(f"mode {name!r}: {cls!r} is not a subclass of harness.modes.BatchSource")
    bad = [k for k, f in cls.params.items() if not isinstance(f, Field)]
    if bad:
        raise TypeError(f"mode {name!r}: params {bad} are not harness.schema.Field")


def available() -> list[str]:
    """The registered mode names, sorted."""
    return sorted(_REGISTRY)


def get(mode: str, base_dir: str | Path | None = None) -> type[BatchSource]:
    """The class of ``mode``: a registered name, ``package.module:Class`` or ``file.py:Class`` (``base_dir``: the
    folder a relative file path is resolved against, normally the recipe's). Unknown names raise
    :class:`ConfigError` listing the registered ones."""
    if not isinstance(mode, str):
        raise ConfigError(f"a training mode is a string, got {type(mode).__name__} {mode!r}")
    if mode in _REGISTRY:
        return _REGISTRY[mode]
    if ":" in mode:
        return _import_class(mode, base_dir)
    close = difflib.get_close_matches(mode, available(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown training mode {mode!r}{hint}; registered modes: {', '.join(available())}; "
                      "a mode of your own is 'package.module:Class' or 'file.py:Class'")


def _import_class(spec: str, base_dir: str | Path | None) -> type[BatchSource]:
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_absolute():
                path = Path(base_dir or ".") / path
            path = path.resolve()
            if not path.is_file():
                raise ConfigError(f"training mode {spec!r}: file {path} not found")
            key = "distillbench_user_mode_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            module = sys.modules.get(key)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[key] = module
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(key, None)
                    raise
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:  # an import error in the user's file: one line, the cause kept
        raise ConfigError(f"training mode {spec!r}: cannot import {target!r}: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"training mode {spec!r}: {target!r} has no attribute {attr!r}")
    try:
        _check_class(cls, spec)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    if not cls.name:
        cls.name = spec
    return cls


def params(mode: str, base_dir: str | Path | None = None) -> dict[str, Field]:
    """The mode's parameters (``{name: Field}``), for validating a recipe's ``mode_params``."""
    return dict(get(mode, base_dir).params)


def check_params(mode: str, mode_params: dict | None, where: str, base_dir: str | Path | None = None) -> dict:
    """Validate a recipe's ``mode_params`` (types, ranges, choices, unknown keys, cross-checks); return them with
    the defaults filled in. Errors are one :class:`ConfigError` line naming ``where`` and the key."""
    cls = get(mode, base_dir)
    out = check(mode_params or {}, cls.params, where, prefix="mode_params.")
    cls.validate_params(out, where)
    return out


def needs_student_samples(mode: str, base_dir: str | Path | None = None) -> bool:
    """Whether the mode trains on student samples (then the teacher must run live, not only from its cache)."""
    return bool(get(mode, base_dir).samples_student)


def needs_val_loss(mode: str, base_dir: str | Path | None = None) -> bool:
    """Whether the mode calls ``ctx.val_loss`` (DistiLLM's adaptive schedule does)."""
    return bool(get(mode, base_dir).needs_val_loss)


def card(mode: str, base_dir: str | Path | None = None) -> str:
    """The mode's card: its docstring, then one line per parameter (default, range, help)."""
    cls = get(mode, base_dir)
    lines = [inspect.cleandoc(cls.__doc__ or cls.__name__)]
    for key, f in cls.params.items():
        extra = ", ".join(x for x in (f"choices {list(f.choices)}" if f.choices else "", f.range_text()) if x)
        lines.append(f"  {key} = {f.default!r}" + (f" ({extra})" if extra else "") + (f": {f.help}" if f.help else ""))
    return "\n".join(lines)


def build(mode: str, mode_params: dict | None, ctx: ModeContext, base_dir: str | Path | None = None) -> BatchSource:
    """The batch source of ``mode`` with ``mode_params`` (validated, defaults filled) in context ``ctx``."""
    cls = get(mode, base_dir)
    checked = check_params(mode, mode_params, f"training mode {mode!r}", base_dir)
    return cls(ctx, **checked)
