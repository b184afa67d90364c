"""Fused LM head + loss: the full ``[N, V]`` logits never exist (Liger's chunked-loss idea).

    >>> from harness.objectives.fused import fused_linear_loss
    >>> loss = fused_linear_loss("jsd", h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, mask)  # doctest: +SKIP
    >>> loss.backward()   # gradients reach h_s (and the student network above it) and lm_head.weight

For chunks of counted positions, the student's logits ``h_s[rows] @ W_sᵀ`` and the teacher's
``h_t[rows] @ W_tᵀ`` are formed, the objective's loss and its gradient with respect to that chunk of student
logits are computed at once (a Triton kernel writing the gradient over the chunk's logits in place, or
PyTorch autograd on the chunk), and the gradient is pushed through the head right away:
``∂/∂h_s[rows] = G @ W_s`` and ``∂/∂W_s += Gᵀ @ h_s[rows]``. Memory is the two gradients (``[N, H]`` and
``[V, H]``, which autograd would hold anyway) plus one chunk of logits of each model; positions that are
not counted cost nothing (no matmul).

Shapes and conventions
----------------------
- ``student_hidden`` ``[B, T, H]`` or ``[N, H]``: the student's last hidden states (after the final norm),
  gradients flow to it. ``student_weight`` ``[V, H]``: its output layer (``lm_head.weight``), gradients flow.
- ``teacher_hidden`` ``[B, T, H_t]`` / ``[N, H_t]`` and ``teacher_weight`` ``[V_t, H_t]``: constants. If
  ``V_t ≠ V``, the columns past the narrower vocabulary are ``-inf`` on both sides (the default of
  :func:`harness.models.align_vocab`): they contribute nothing, so only the first ``min(V, V_t)`` are computed.
  Not needed for ``ce``, which takes ``labels`` ``[B, T]`` (``-100`` ignored).
- No biases (GPT-2, Llama and Qwen heads have none).
- ``mask``, ``temperature``, ``reduction`` (``mean``, ``sum``, ``per_sequence_mean``; not ``none``),
  ``normalizer``, ``kernel``: as in :mod:`harness.objectives.wrapper`. The value and both gradients equal
  those of ``objective(h_s @ W_sᵀ, h_t @ W_tᵀ, mask)`` up to round-off: the head's matmuls run in the inputs'
  dtype, and the weight gradient is accumulated over chunks in the weight's dtype (as Liger does), so bf16
  weights see one bf16 rounding per chunk.
- ``chunk_size``: positions per chunk; default: as many as fit :data:`FUSED_CHUNK_ELEMENTS` logits (Triton)
  or ``8 × wrapper.CHUNK_ELEMENTS`` (PyTorch, whose float32 temporaries are ~10 chunk-sized copies).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import kernels as _kernels
from .wrapper import CHUNK_ELEMENTS, _nll, per_position_loss, position_weights

#: logits per chunk (rows × V) of the Triton fused path: 2^25 = 256 rows at V = 128,256 (64 MiB in bf16)
FUSED_CHUNK_ELEMENTS = 1 << 25


def _resolve(objective, params: dict | None) -> tuple[Callable, dict, bool]:
    """(per-position fn, parameters with defaults, is_ce) of an id, or of a user per-position function."""
    if callable(objective):
        return objective, dict(params or {}), False
    import harness.objectives as O  # the registry imports the wrapper; import it here, not at module level

    obj = O.get(objective, **(params or {}))
    if obj.spec.kind == "batch":
        raise ValueError(f"objective {objective!r} is batch-wise: the fused LM-head path takes per-position "
                         "objectives and ce only")
    if obj.spec.kind == "labels":
        return _nll, {}, True
    return obj.spec.fn, dict(obj.params), False


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, index, weights, fn, kid, params, temperature, rows, needs_h, needs_w):
        needs_grad = needs_h or needs_w
        grad_h = torch.zeros_like(hs) if needs_h else None
        grad_w = torch.zeros_like(ws) if needs_w else None
        if wt is not None and wt.shape[0] != ws.shape[0]:  # columns past the narrower vocabulary count for 0
            width = min(ws.shape[0], wt.shape[0])
            ws_used, wt = ws[:width], wt[:width]
        else:
            ws_used = ws
        first = int(index[0])
        contiguous = int(index[-1]) - first + 1 == index.numel()
        total = torch.zeros((), dtype=torch.float64, device=hs.device)
        for start in range(0, index.numel(), rows):
            n = min(rows, index.numel() - start)
            chunk = None if contiguous else index[start : start + n]
            take = (lambda x: x.narrow(0, first + start, n)) if contiguous else (lambda x: x.index_select(0, chunk))
            h = take(hs)
            w = weights[start : start + n]
            z = h @ ws_used.t()
            target = take(ht) if wt is None else take(ht) @ wt.t()  # ht: labels [N, 1] for ce
            if kid is not None:
                g = z if needs_grad else None  # our own chunk: the gradient overwrites it in place
                tgt = target.reshape(-1) if kid == "ce" else target
                ell = _kernels.loss_and_grad(kid, z, tgt, w, params, temperature=temperature, grad=g)
                total += (ell.to(torch.float64) * w).sum()
            else:
                with torch.enable_grad():
                    zz = z.detach().requires_grad_(needs_grad)
                    ell = per_position_loss(fn, zz, target, temperature, params)
                    chunk_loss = (ell * w.to(ell.dtype)).sum()
                total += chunk_loss.detach().to(torch.float64)
                g = torch.autograd.grad(chunk_loss, zz)[0] if needs_grad else None
                del zz, ell, chunk_loss
            del z, target
            if needs_grad:
                if needs_h:
                    gh = g @ ws_used
                    if contiguous:
                        grad_h.narrow(0, first + start, n).copy_(gh)
                    else:
                        grad_h.index_copy_(0, chunk, gh)
                if needs_w:
                    grad_w.narrow(0, 0, ws_used.shape[0]).addmm_(g.t(), h)
                del g
        ctx.grads = (grad_h, grad_w)
        return total.to(torch.float64 if hs.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("this fused loss was already back-propagated (its gradients are consumed); "
                               "compute the loss again instead of retain_graph=True")
        grad_h, grad_w = grads
        if not (grad_out.numel() == 1 and float(grad_out) == 1.0):
            for g in (grad_h, grad_w):
                if g is not None:
                    g.mul_(grad_out.to(g.dtype))
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None, None


def fused_linear_loss(
    objective: str | Callable,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    params: dict | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    normalizer: float | None = None,
    chunk_size: int | None = None,
    kernel: str = "auto",
) -> Tensor:
    """Loss of ``objective`` on the logits ``student_hidden @ student_weightᵀ`` (see the module docstring).

    ``objective``: a built-in id (``"fkl"``, ..., ``"ce"``) or a per-position function
    ``fn(log_q, log_p, **params) -> [n]``; ``params`` override the id's defaults.
    """
    _kernels.check_kernel(kernel)
    fn, params, is_ce = _resolve(objective, params)
    if reduction == "none" or reduction not in ("mean", "sum", "per_sequence_mean"):
        raise ValueError(f"fused_linear_loss: reduction must be mean, sum or per_sequence_mean, got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"fused_linear_loss: temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_loss: chunk_size must be ≥ 1, got {chunk_size}")
    hidden = student_hidden.shape[-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden:
        raise ValueError(f"fused_linear_loss: student_weight {tuple(student_weight.shape)} must be [V, "
                         f"{hidden}] for hidden states {tuple(student_hidden.shape)}")
    lead = student_hidden.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, device=student_hidden.device)
    if mask.shape != lead:
        raise ValueError(f"fused_linear_loss: mask {tuple(mask.shape)} must match hidden states {tuple(lead)}")
    hs = student_hidden.reshape(-1, hidden)
    if is_ce:
        if labels is None or labels.shape != lead:
            raise ValueError(f"fused_linear_loss: ce needs labels of shape {tuple(lead)} (-100 where ignored)")
        mask = (mask > 0) & (labels != -100)
        ht, wt, temperature = labels.reshape(-1, 1).clamp_min(0), None, 1.0
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("fused_linear_loss: this objective needs teacher_hidden and teacher_weight")
        if teacher_hidden.shape[:-1] != lead or teacher_weight.dim() != 2 \
                or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(f"fused_linear_loss: teacher hidden {tuple(teacher_hidden.shape)} / weight "
                             f"{tuple(teacher_weight.shape)} do not fit student hidden {tuple(student_hidden.shape)}")
        ht, wt = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(), teacher_weight.detach()

    flat = mask.reshape(-1) > 0
    index = torch.nonzero(flat).flatten()
    out_dtype = torch.float64 if hs.dtype == torch.float64 else torch.float32
    if index.numel() == 0:  # 0, attached to the graph, zero gradients
        return (hs[:0].sum() + student_weight[:0].sum()).to(out_dtype)
    weights = position_weights(mask, reduction, normalizer).to(hs.device)[index]

    width = student_weight.shape[0] if wt is None else min(student_weight.shape[0], wt.shape[0])
    probe = hs[:1]
    kid = _kernels.select(kernel, fn, probe, params)
    if kid is not None:
        _kernels.validate_params(kid, fn, params)
    budget = FUSED_CHUNK_ELEMENTS if kid is not None else 8 * CHUNK_ELEMENTS
    rows = chunk_size or max(1, min(index.numel(), budget // width))
    grad_on = torch.is_grad_enabled()
    needs_h = grad_on and student_hidden.requires_grad
    needs_w = grad_on and student_weight.requires_grad
    return _FusedLinearLoss.apply(hs, student_weight, ht, wt, index, weights, fn, kid, params, temperature, rows,
                                  needs_h, needs_w)


__all__ = ["FUSED_CHUNK_ELEMENTS", "fused_linear_loss"]
