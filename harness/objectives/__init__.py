"""The objectives library: a registry of distillation losses with one public shape.

    >>> import harness.objectives as O
    >>> O.available()
    ['ab', 'akl', 'bdkd', 'ce', 'fkl', 'jsd', 'rkl', 'sinkhorn', 'skl', 'srkl', 'todi', 'tvd']
    >>> loss = O.get("skl")(student_logits, teacher_logits, mask, alpha=0.1)   # doctest: +SKIP

``get(id)`` returns an :class:`Objective`; calling it as
``obj(student_logits, teacher_logits, mask=None, *, labels=None, temperature=1.0, reduction="mean",
chunk_size=None, normalizer=None, **params)`` returns a 0-dim float32 tensor (see
:mod:`harness.objectives.wrapper` for shapes, masking and reductions). ``id`` may also be a
``"package.module:function"`` path to a user's per-position divergence with the built-in signature
``fn(log_q: [N, V], log_p: [N, V], **params) -> [N]`` (see :mod:`harness.objectives.divergences`).

Parameters
----------
Every parameter after ``(log_q, log_p)`` must have a default. Its accepted **type** comes from the
signature: the annotation (``float``, ``int``, ``bool``, ``str``, ``Literal[...]`` for a fixed set of
strings, ``X | None``) or, without one, the type of the default. A ``float`` parameter accepts integers, an
``int`` parameter only integers, ``bool`` is never taken for a number, and numbers must be finite. Its
accepted **range** and one-line **help** come from ``fn.param_ranges``, a mapping from parameter name to a
:class:`harness.schema.Field` (only its ``ge``/``gt``/``le``/``lt``, ``choices`` and ``help`` are used; the
types always come from the signature) or to a plain dict of those keywords::

    def hellinger(log_q, log_p, scale: float = 1.0): ...
    hellinger.param_ranges = {"scale": {"gt": 0, "help": "multiplies the loss"}}

``register(name, params={...})`` declares the same for a built-in. :meth:`Objective.check_params` (run by
:func:`get` and at every call with parameters) raises :class:`ObjectiveError` naming the objective, the
parameter, the value, the accepted type/range and the fix. :func:`describe` lists every objective with its
parameters (type, default, range, help), for a generated reference page.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import types as _types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from torch import Tensor

from ..schema import Field, type_names
from . import divergences, sinkhorn as _sinkhorn
from .wrapper import REDUCTIONS, cross_entropy, reduce_batchwise, reduce_per_position

Kind = Literal["per_position", "batch", "labels"]


class ObjectiveError(ValueError):
    """An unknown objective id, a bad parameter, or a user objective that cannot be imported."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the registry knows about one objective."""

    name: str
    fn: Callable[..., Tensor] | None
    kind: Kind = "per_position"
    #: whether the objective is defined on a sparse (top-k + flat tail) teacher cache: per-token divergences
    #: whose value is a sum of per-token terms f(p_v, q_v) are; akl (its weight sums |p − q| over the whole
    #: vocabulary), bdkd (its gates compare whole-row entropies, which a flat tail inflates) and sinkhorn
    #: (L1 costs between whole rows) depend on the tail's shape, which the sparse cache discards.
    #: User objectives are assumed not to be. Checked by harness.validate for suites with a sparse cache.
    sparse_ok: bool = False
    #: parameter name -> Field (types and default from the signature, range/choices/help declared)
    params: dict[str, Field] = field(default_factory=dict)
    summary: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: f.default for name, f in self.params.items()}

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "labels"


_REGISTRY: dict[str, ObjectiveSpec] = {}
_SIMPLE = {"float": float, "int": int, "bool": bool, "str": str}


def _fn_name(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _annotation_types(annotation: Any, default: Any) -> tuple[tuple[type, ...], tuple | None]:
    """(accepted types, choices) of one parameter; empty types = anything."""
    if isinstance(annotation, str):  # unresolved (postponed) annotation of a simple type
        annotation = _SIMPLE.get(annotation.strip(), inspect.Parameter.empty)
    if annotation is inspect.Parameter.empty:
        if default is None:
            return (), None
        return (type(default),), None
    if annotation is Any:
        return (), None
    origin = typing.get_origin(annotation)
    if origin is Literal:
        values = typing.get_args(annotation)
        return tuple(dict.fromkeys(type(v) for v in values)), values
    if origin in (typing.Union, _types.UnionType):
        accepted: list[type] = []
        choices = None
        for arg in typing.get_args(annotation):
            t, c = _annotation_types(arg, default)
            if not t:
                return (), None
            accepted += [x for x in t if x not in accepted]
            choices = c if c is not None else choices
        return tuple(accepted), choices
    if isinstance(annotation, type):
        return (annotation,), None
    return (), None  # an annotation we cannot check (e.g. a generic): accept anything


def _declared_field(fn: Callable, name: str, declared: Any) -> Field:
    if isinstance(declared, Field):
        return declared
    if isinstance(declared, dict):
        try:
            return Field((), **declared)
        except TypeError as exc:
            raise ObjectiveError(
                f"objective function {_fn_name(fn)}: param_ranges[{name!r}] has an unknown key ({exc}); "
                "accepted: ge, gt, le, lt, choices, help"
            ) from None
    raise ObjectiveError(
        f"objective function {_fn_name(fn)}: param_ranges[{name!r}] must be a harness.schema.Field or a dict "
        f"of its keywords (ge, gt, le, lt, choices, help), got {type(declared).__name__}"
    )


def _param_fields(fn: Callable, declared: dict[str, Any] | None = None) -> dict[str, Field]:
    """The Field of each parameter after (log_q, log_p): types/default from the signature, range declared."""
    try:
        sig = inspect.signature(fn, eval_str=True)
    except Exception:  # an annotation that does not evaluate: fall back to the raw strings
        sig = inspect.signature(fn)
    params = list(sig.parameters.values())[2:]
    bad = [p.name for p in params if p.default is inspect.Parameter.empty or p.kind is p.VAR_KEYWORD]
    if bad:
        raise ObjectiveError(
            f"objective function {_fn_name(fn)}: parameters after (log_q, log_p) must have defaults, found {bad}"
        )
    declared = dict(declared if declared is not None else getattr(fn, "param_ranges", None) or {})
    unknown = sorted(set(declared) - {p.name for p in params})
    if unknown:
        raise ObjectiveError(
            f"objective function {_fn_name(fn)}: param_ranges names {unknown}, which are not parameters of it"
        )
    out = {}
    for p in params:
        types_, choices = _annotation_types(p.annotation, p.default)
        base = _declared_field(fn, p.name, declared[p.name]) if p.name in declared else Field(())
        out[p.name] = dataclasses.replace(base, types=types_, default=p.default,
                                          choices=base.choices if base.choices is not None else choices)
    for name, f in out.items():  # a default outside its own declared range is a bug of the declaration
        why = _problem(f, f.default)
        if why:
            raise ObjectiveError(f"objective function {_fn_name(fn)}: default {name}={f.default!r} {why}")
    return out


def _problem(f: Field, value: Any) -> str | None:
    """Why ``value`` is not accepted by ``f`` (type, choices, finiteness, range), or None."""
    if f.types:
        ok = isinstance(value, f.types) and not (isinstance(value, bool) and bool not in f.types)
        if not ok and float in f.types and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            return f"must be {_kind(f.types)}, got {type(value).__name__} {value!r}"
    if f.choices is not None and value not in f.choices:
        return f"must be one of {', '.join(map(repr, f.choices))}, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        why = f.problem(value)
        if why:
            return f"{why}, got {value!r}"
    return None


def _kind(types_: tuple[type, ...]) -> str:
    what = {float: "a number", int: "an integer", bool: "true or false", str: "a string", type(None): "null"}
    return " or ".join(what.get(t, type_names((t,))) for t in types_) or "a value"


def _expected(f: Field) -> str:
    """What to set a parameter to, in words: 'a number in [0, 1)', 'an integer >= 1', 'one of ...'."""
    if f.choices is not None:
        return "one of " + ", ".join(map(repr, f.choices))
    kind = _kind(f.types)
    rng = f.range_text()
    if not rng:
        return kind + (" (finite)" if float in f.types else "")
    return f"{kind} in {rng}" if "," in rng else f"{kind} {rng}"


def register(name: str, *, kind: Kind = "per_position", sparse_ok: bool = False,
             params: dict[str, Any] | None = None):
    """Decorator: register ``fn(log_q, log_p, **params)`` under ``name``.

    ``params`` declares ranges/help per parameter (see the module docstring); by default ``fn.param_ranges``.
    """

    def deco(fn):
        if name in _REGISTRY:
            raise ObjectiveError(f"objective id {name!r} is already registered")
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        _REGISTRY[name] = ObjectiveSpec(name, fn, kind, sparse_ok, _param_fields(fn, params), summary)
        return fn

    return deco


register("fkl", sparse_ok=True)(divergences.fkl)
register("rkl", sparse_ok=True)(divergences.rkl)
register("jsd", sparse_ok=True)(divergences.jsd)
register("tvd", sparse_ok=True)(divergences.tvd)
register("skl", sparse_ok=True)(divergences.skl)
register("srkl", sparse_ok=True)(divergences.srkl)
register("akl")(divergences.akl)
register("bdkd")(divergences.bdkd)
# ab and todi are sums of per-token terms f(p_v, q_v) (todi's weight is per token too), like fkl
register("ab", sparse_ok=True)(divergences.ab)
register("todi", sparse_ok=True)(divergences.todi)
register("sinkhorn", kind="batch")(_sinkhorn.sinkhorn)
_REGISTRY["ce"] = ObjectiveSpec("ce", None, "labels", True, {}, "Cross-entropy on the reference response (SFT).")


def available() -> list[str]:
    """The registered objective ids, sorted."""
    return sorted(_REGISTRY)


def _import_user_function(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ObjectiveError(f"objective path {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, SyntaxError, anything raised at import
        raise ObjectiveError(
            f"objective {path!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
            "is its directory on PYTHONPATH (or next to the recipe)?"
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ObjectiveError(f"objective {path!r}: module {module_name!r} has no function {attr!r}")
    return fn


def spec(name: str) -> ObjectiveSpec:
    """The :class:`ObjectiveSpec` of a registered id or of a ``module:function`` path."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        fn = _import_user_function(name)
        kind = getattr(fn, "objective_kind", "per_position")
        return ObjectiveSpec(name, fn, kind, False, _param_fields(fn), (inspect.getdoc(fn) or "").split("\n")[0])
    raise ObjectiveError(
        f"unknown objective id {name!r}; known ids: {', '.join(available())} "
        "(or give a user function as 'package.module:function')"
    )


def describe(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per objective (registered ids by default): id, kind, sparse_ok, summary and its parameters.

    Each parameter is ``{"name", "type", "default", "range", "help"}`` with ``type`` in words ("number",
    "integer", "true/false", "string"), ``range`` in interval notation (``[0, 1)``, ``> 0``) or the accepted
    choices, empty when unbounded.
    """
    rows = []
    for name in names if names is not None else available():
        s = spec(name)
        rows.append({
            "id": name, "kind": s.kind, "sparse_ok": s.sparse_ok, "summary": s.summary,
            "params": [
                {"name": p, "type": type_names(f.types) if f.types else "any", "default": f.default,
                 "range": ("one of " + ", ".join(map(str, f.choices))) if f.choices is not None else f.range_text(),
                 "help": f.help}
                for p, f in s.params.items()
            ],
        })
    return rows


class Objective:
    """A callable objective with bound default parameters."""

    def __init__(self, spec: ObjectiveSpec, params: dict[str, Any] | None = None):
        self.spec = spec
        self.params = {**spec.defaults, **self.check_params(params or {})}

    @property
    def name(self) -> str:
        return self.spec.name

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validated copy of ``params`` (ints turned into floats where a number is expected).

        Raises :class:`ObjectiveError` naming the objective, the parameter, the value, what is accepted and
        the fix, for an unknown name, a wrong type (``"0.1"``, ``[0.2]``, ``true`` for a number, ``2.0`` for
        an integer), a non-finite number or a value out of the declared range.
        """
        fields = self.spec.params
        unknown = sorted(set(params) - set(fields))
        if unknown:
            accepted = ", ".join(sorted(fields)) or "none"
            raise ObjectiveError(
                f"objective {self.spec.name!r} does not accept parameter(s) {', '.join(unknown)}; "
                f"accepted: {accepted}"
            )
        out = {}
        for name, value in params.items():
            f = fields[name]
            why = _problem(f, value)
            if why:
                help_ = f" ({f.help})" if f.help else ""
                raise ObjectiveError(
                    f"objective {self.spec.name!r}: parameter {name!r} {why}{help_}; set {name} to {_expected(f)}"
                )
            if float in f.types and int not in f.types and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            out[name] = value
        return out

    def with_params(self, **params) -> "Objective":
        """A copy with some defaults replaced (used by recipes)."""
        return Objective(self.spec, {**self.params, **params})

    def __repr__(self) -> str:
        return f"Objective({self.spec.name!r}, {self.params})"

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        temperature: float = 1.0,
        reduction: str = "mean",
        chunk_size: int | None = None,
        normalizer: float | None = None,
        kernel: str = "auto",
        **params,
    ) -> Tensor:
        if reduction not in REDUCTIONS:
            raise ObjectiveError(f"unknown reduction {reduction!r}; accepted: {', '.join(REDUCTIONS)}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ObjectiveError(f"temperature must be a finite number > 0, got {temperature!r}")
        kwargs = {**self.params, **self.check_params(params)} if params else self.params
        if mask is None:
            mask = student_logits.new_ones(student_logits.shape[:-1])
        if mask.shape != student_logits.shape[:-1]:
            raise ObjectiveError(
                f"mask shape {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)}[:-1]"
            )
        common = dict(reduction=reduction, chunk_size=chunk_size, normalizer=normalizer)
        if self.spec.kind == "labels":
            return cross_entropy(student_logits, labels, mask, kernel=kernel, **common)
        if teacher_logits is None:
            raise ObjectiveError(f"objective {self.spec.name!r} needs teacher_logits")
        if teacher_logits.shape != student_logits.shape:
            raise ObjectiveError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                f"{tuple(student_logits.shape)} differ; align the vocabularies first "
                "(harness.models.align_vocab pads the smaller one with -inf)"
            )
        if self.spec.kind == "batch":
            return reduce_batchwise(self.spec.fn, student_logits, teacher_logits, mask, kwargs,
                                    temperature=temperature, **common)
        return reduce_per_position(self.spec.fn, student_logits, teacher_logits, mask, kwargs,
                                   temperature=temperature, kernel=kernel, **common)


def get(name: str, **params) -> Objective:
    """The objective ``name`` (registered id or ``module:function``), with optional default parameters."""
    return Objective(spec(name), params)


__all__ = ["Objective", "ObjectiveError", "ObjectiveSpec", "available", "describe", "get", "register", "spec"]
from . import sequence as _sequence  # noqa: E402,F401  (registers the sequence-level objectives)
from . import uld as _uld  # noqa: E402,F401  (registers "uld": Universal Logit Distillation)
from . import minillm as _minillm  # noqa: E402,F401  (registers "minillm": MiniLLM's policy-gradient loss)
