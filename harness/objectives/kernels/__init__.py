"""Loss kernels: which implementation computes a per-position objective, and the autograd glue of the Triton one.

``kernel`` (an argument of :func:`harness.objectives.wrapper.reduce_per_position`,
:func:`~harness.objectives.wrapper.cross_entropy` and :func:`harness.objectives.fused.fused_linear_loss`):

- ``"torch"``: the PyTorch formulas of :mod:`harness.objectives.divergences` (autograd, optionally chunked).
- ``"triton"``: the fused kernels of :mod:`.triton_divergence`: loss and gradient in one launch, two or three
  passes over the vocabulary per position (akl: ten), float32 math on bf16/fp16/fp32 logits, gradient in the
  logits' dtype. Needs ``triton`` and CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).
- ``"auto"`` (default): Triton for CUDA tensors when ``triton`` is importable, PyTorch otherwise.

Values and gradients agree between the two up to float32 round-off (tests/test_kernels.py). A kernel exists
only for the built-in ids in :data:`KERNEL_IDS`; user objectives (``module:function``), float64 logits and
parameter values a kernel does not cover (``ab`` with α ≤ 0 or β ≤ 0) always take the PyTorch path, whatever
``kernel`` says. Parameters are validated by the PyTorch function itself (called once on a 1 × 2 example), so
both paths accept and refuse the same values.

The Triton path computes the gradient during the forward call (as Liger's losses do) and keeps it until
``backward``: one logits-sized buffer, or none with ``inplace=True``, where the gradient overwrites the student
logits (only safe when nothing reads those logits after the loss call: not when the same logits also feed a CE
term computed later). Backward through the loss once only (no ``retain_graph`` double backward).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

KERNELS = ("auto", "triton", "torch")
#: objective ids with a Triton kernel, and the parameter names each kernel understands
KERNEL_PARAMS: dict[str, tuple[str, ...]] = {
    "fkl": (), "rkl": (), "tvd": (), "todi": (), "ce": (),
    "jsd": ("beta",), "skl": ("alpha",), "srkl": ("alpha",), "akl": ("mu",), "bdkd": ("weight_high", "weight_low"),
    "ab": ("alpha", "beta"),
}
KERNEL_IDS = tuple(sorted(KERNEL_PARAMS))
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_id(fn) -> str | None:
    """The built-in id whose kernel computes per-position function ``fn``, or None (a user objective).

    ``fn`` is the function registered under that id (whatever its name), or a function of
    :mod:`harness.objectives.divergences` named like the id; the wrapper's ``_nll`` is ``ce``.
    """
    module, name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
    if module == "harness.objectives.wrapper" and name == "_nll":
        return "ce"
    if module != "harness.objectives.divergences":
        return None
    from harness.objectives import _REGISTRY  # imported by the time a loss is computed

    for rid, spec in _REGISTRY.items():
        if spec.fn is fn:
            return rid if rid in KERNEL_PARAMS else None
    return name if name in KERNEL_PARAMS else None


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")


def select(kernel: str, fn, student: Tensor, params: dict) -> str | None:
    """The kernel id to run with Triton for ``fn`` on ``student``, or None for the PyTorch path."""
    check_kernel(kernel)
    if kernel == "torch":
        return None
    kid = kernel_id(fn)
    if kid is None or student.dtype not in _DTYPES:
        return None
    if kid == "ab" and not (params.get("alpha", 0.2) > 0 and params.get("beta", 0.7) > 0):
        return None
    if kid == "bdkd" and params.get("weight_low", 1.0) != 1.0:  # the kernel's off-gate weight is 1
        return None
    if kernel == "auto":
        return kid if student.is_cuda and triton_available() else None
    if not triton_available():
        raise RuntimeError("kernel='triton' needs the triton package (pip install triton); "
                           "use kernel='auto' or kernel='torch'")
    if not student.is_cuda and not interpreting():
        raise ValueError("kernel='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, for tests); "
                         f"got a {student.device.type} tensor: use kernel='auto' or kernel='torch'")
    return kid


def validate_params(kid: str, fn, params: dict) -> None:
    """Refuse what the PyTorch function refuses, and parameters the kernel does not know (one line each)."""
    unknown = sorted(set(params) - set(KERNEL_PARAMS[kid]))
    if unknown:
        raise ValueError(
            f"the Triton kernel of {kid!r} knows parameter(s) {', '.join(KERNEL_PARAMS[kid]) or 'none'}, got "
            f"{', '.join(unknown)}: update harness/objectives/kernels KERNEL_PARAMS, or use kernel='torch'"
        )
    if kid != "ce":
        from .. import available, get

        if getattr(fn, "__module__", "") == "harness.objectives.divergences" and kid in available():
            get(kid, **params)  # the registry's checks (types, ranges): the same refusals as the PyTorch path
        example = torch.log_softmax(torch.tensor([[0.0, 1.0]]), -1)
        fn(example, example.flip(-1), **params)  # and the function's own


def _module():
    from . import triton_divergence

    return triton_divergence


class _WeightedSum(torch.autograd.Function):
    """Σ_i w_i ℓ_i over all rows (w_i = 0: not counted), gradient computed by the kernel in the forward call."""

    @staticmethod
    def forward(ctx, student, teacher, weights, kid, params, temperature, needs_grad, inplace):
        grad = None
        if needs_grad:
            grad = student.detach() if inplace else torch.empty_like(student)  # detach: autograd may keep it as .grad
        ell = _module().launch(kid, student, teacher, weights.to(torch.float32), params, temperature, grad)
        if needs_grad and inplace:
            torch.autograd.graph.increment_version(student)  # an earlier op that saved these logits will refuse
        ctx.grad = grad
        return (ell.to(torch.float64) * weights).sum().to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("this kernel loss was already back-propagated (its gradient buffer is consumed); "
                               "compute the loss again instead of retain_graph=True")
        if not (grad_out.numel() == 1 and float(grad_out) == 1.0):
            grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None, None, None, None


class _PerRow(torch.autograd.Function):
    """ℓ_i for every row (0 where not counted); backward scales gradient row i by the incoming ∂/∂ℓ_i."""

    @staticmethod
    def forward(ctx, student, teacher, counted, kid, params, temperature, needs_grad, inplace):
        grad = None
        if needs_grad:
            grad = student.detach() if inplace else torch.empty_like(student)  # detach: autograd may keep it as .grad
        ell = _module().launch(kid, student, teacher, counted, params, temperature, grad)
        if needs_grad and inplace:
            torch.autograd.graph.increment_version(student)
        ctx.grad = grad
        return ell

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("this kernel loss was already back-propagated (its gradient buffer is consumed); "
                               "compute the loss again instead of retain_graph=True")
        grad.mul_(grad_out.to(grad.dtype)[:, None])
        return grad, None, None, None, None, None, None, None


def _contiguous_rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_loss(
    kid: str,
    fn,
    student: Tensor,
    teacher: Tensor,
    weights: Tensor | None,
    counted: Tensor,
    params: dict,
    *,
    temperature: float,
    inplace: bool = False,
) -> Tensor:
    """The Triton path of :func:`harness.objectives.wrapper.reduce_per_position`.

    ``student`` [N, V] rows; ``teacher`` [N, V] logits (detached), or [N, 1] long labels for ``ce``;
    ``weights`` [N] float64 position weights of the reduction (0 where not counted), or None for
    ``reduction='none'`` (returns ℓ [N] float32, 0 where not counted); ``counted`` [N] bool.
    """
    validate_params(kid, fn, params)
    student = _contiguous_rows(student)
    teacher = teacher.reshape(-1).contiguous() if kid == "ce" else _contiguous_rows(teacher)
    needs_grad = torch.is_grad_enabled() and student.requires_grad
    if weights is None:
        return _PerRow.apply(student, teacher, counted.to(torch.float32), kid, params, temperature, needs_grad,
                             inplace)
    return _WeightedSum.apply(student, teacher, weights.to(torch.float64), kid, params, temperature, needs_grad,
                              inplace)


def loss_and_grad(
    kid: str,
    student: Tensor,
    teacher: Tensor,
    weights: Tensor,
    params: dict,
    *,
    temperature: float,
    grad: Tensor | None,
) -> Tensor:
    """Direct kernel call without autograd (used by the fused LM-head path): ℓ [N] float32; fills ``grad``.

    ``grad`` rows are ``w_i ∂ℓ_i/∂student_i``; it may be ``student`` itself. ``teacher`` is [N] long labels for
    ``ce``.
    """
    return _module().launch(kid, student, teacher, weights.to(torch.float32), params, temperature, grad)


__all__ = ["KERNELS", "KERNEL_IDS", "KERNEL_PARAMS", "check_kernel", "interpreting", "kernel_id",
           "loss_and_grad", "select", "triton_available", "triton_loss", "validate_params"]
