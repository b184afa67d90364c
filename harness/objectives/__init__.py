"""The objectives library: a registry of distillation losses with one public shape.

    >>> import harness.objectives as O
    >>> O.available()
    ['akl', 'ce', 'fkl', 'jsd', 'rkl', 'sinkhorn', 'skl', 'srkl', 'tvd']
    >>> loss = O.get("skl")(student_logits, teacher_logits, mask, alpha=0.1)   # doctest: +SKIP

``get(id)`` returns an :class:`Objective`; calling it as
``obj(student_logits, teacher_logits, mask=None, *, labels=None, temperature=1.0, reduction="mean",
chunk_size=None, normalizer=None, **params)`` returns a 0-dim float32 tensor (see
:mod:`harness.objectives.wrapper` for shapes, masking and reductions). ``id`` may also be a
``"package.module:function"`` path to a user's per-position divergence with the built-in signature
``fn(log_q: [N, V], log_p: [N, V], **params) -> [N]`` (see :mod:`harness.objectives.divergences`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from torch import Tensor

from . import divergences, sinkhorn as _sinkhorn
from .wrapper import REDUCTIONS, cross_entropy, reduce_batchwise, reduce_per_position

Kind = Literal["per_position", "batch", "labels"]


class ObjectiveError(ValueError):
    """An unknown objective id, an unknown parameter, or a user objective that cannot be imported."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the registry knows about one objective."""

    name: str
    fn: Callable[..., Tensor] | None
    kind: Kind = "per_position"
    #: whether the objective is defined on a sparse (top-k + flat tail) teacher cache: per-token divergences
    #: whose value is a sum of per-token terms are; akl (its weight sums |p − q| over the whole vocabulary)
    #: and sinkhorn (L1 costs between whole rows) depend on the tail's shape, which the sparse cache discards.
    #: User objectives are assumed not to be. Checked by harness.validate for suites with a sparse cache.
    sparse_ok: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "labels"


_REGISTRY: dict[str, ObjectiveSpec] = {}


def _defaults(fn: Callable) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())[2:]
    bad = [p.name for p in params if p.default is inspect.Parameter.empty or p.kind is p.VAR_KEYWORD]
    if bad:
        raise ObjectiveError(
            f"objective function {fn.__module__}.{fn.__qualname__}: parameters after (log_q, log_p) must have "
            f"defaults, found {bad}"
        )
    return {p.name: p.default for p in params}


def register(name: str, *, kind: Kind = "per_position", sparse_ok: bool = False):
    """Decorator: register ``fn(log_q, log_p, **params)`` under ``name``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ObjectiveError(f"objective id {name!r} is already registered")
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        _REGISTRY[name] = ObjectiveSpec(name, fn, kind, sparse_ok, _defaults(fn), summary)
        return fn

    return deco


register("fkl", sparse_ok=True)(divergences.fkl)
register("rkl", sparse_ok=True)(divergences.rkl)
register("jsd", sparse_ok=True)(divergences.jsd)
register("tvd", sparse_ok=True)(divergences.tvd)
register("skl", sparse_ok=True)(divergences.skl)
register("srkl", sparse_ok=True)(divergences.srkl)
register("akl")(divergences.akl)
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
        return ObjectiveSpec(name, fn, kind, False, _defaults(fn), (inspect.getdoc(fn) or "").split("\n")[0])
    raise ObjectiveError(
        f"unknown objective id {name!r}; known ids: {', '.join(available())} "
        "(or give a user function as 'package.module:function')"
    )


class Objective:
    """A callable objective with bound default parameters."""

    def __init__(self, spec: ObjectiveSpec, params: dict[str, Any] | None = None):
        self.spec = spec
        self.params = {**spec.defaults, **self.check_params(params or {})}

    @property
    def name(self) -> str:
        return self.spec.name

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.spec.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.spec.defaults)) or "none"
            raise ObjectiveError(
                f"objective {self.spec.name!r} does not accept parameter(s) {', '.join(unknown)}; "
                f"accepted: {accepted}"
            )
        return dict(params)

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
        **params,
    ) -> Tensor:
        if reduction not in REDUCTIONS:
            raise ObjectiveError(f"unknown reduction {reduction!r}; accepted: {', '.join(REDUCTIONS)}")
        if temperature <= 0:
            raise ObjectiveError(f"temperature must be > 0, got {temperature}")
        kwargs = {**self.params, **self.check_params(params)}
        if mask is None:
            mask = student_logits.new_ones(student_logits.shape[:-1])
        if mask.shape != student_logits.shape[:-1]:
            raise ObjectiveError(
                f"mask shape {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)}[:-1]"
            )
        common = dict(reduction=reduction, chunk_size=chunk_size, normalizer=normalizer)
        if self.spec.kind == "labels":
            return cross_entropy(student_logits, labels, mask, **common)
        if teacher_logits is None:
            raise ObjectiveError(f"objective {self.spec.name!r} needs teacher_logits")
        if teacher_logits.shape != student_logits.shape:
            raise ObjectiveError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                f"{tuple(student_logits.shape)} differ; align the vocabularies first "
                "(harness.models.align_vocab pads the smaller one with -inf)"
            )
        reduce = reduce_batchwise if self.spec.kind == "batch" else reduce_per_position
        return reduce(self.spec.fn, student_logits, teacher_logits, mask, kwargs, temperature=temperature, **common)


def get(name: str, **params) -> Objective:
    """The objective ``name`` (registered id or ``module:function``), with optional default parameters."""
    return Objective(spec(name), params)


__all__ = ["Objective", "ObjectiveError", "ObjectiveSpec", "available", "get", "register", "spec"]
