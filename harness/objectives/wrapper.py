"""The part of every objective that is written once: selection, dtype, temperature, reduction, chunking.

Shapes and conventions
----------------------
- ``student_logits``: ``[B, T, V]`` or ``[N, V]``, any float dtype, gradients flow to it.
- ``teacher_logits``: same shape, treated as constants (detached).
- ``mask``: ``[B, T]`` or ``[N]``; positions with ``mask > 0`` count (prompt and padding are 0). ``None``
  counts every position. For ``ce`` the positions whose label is ``-100`` are also excluded.
- q = softmax(z_s / τ) is the student, p = softmax(z_t / τ) the teacher; both in float32 (float64 stays
  float64) whatever the input dtype, via ``log_softmax``. ``-inf`` logits are clamped to the most negative
  finite float *after* the log-softmax, so padded vocabulary rows contribute exactly 0 and get 0 gradient.
- Reductions are weighted sums ``Σ_i w_i ℓ_i`` over counted positions:
  ``mean`` (default, token mean: w = 1 / #counted — DistiLLM's and MiniLLM's convention), ``sum`` (w = 1),
  ``per_sequence_mean`` (mean over sequences of each sequence's token mean), and ``normalizer=n``
  (w = 1 / n, for a global token count under gradient accumulation or data parallelism, overriding the
  reduction's denominator). ``none`` returns the per-position losses ``[B, T]`` (0 where not counted).
  No counted position gives 0 with a zero gradient, never NaN.
- ``chunk_size=k`` evaluates at most k counted positions, and at most :data:`CHUNK_ELEMENTS` logits, at a
  time and computes their gradient during the forward pass (as Liger's chunked losses do): the extra memory
  is one gradient buffer in the student's dtype plus the float32 temporaries of one chunk (≈ 10 × 2 MiB),
  instead of several float32 copies of the whole logits tensor. Value and gradient equal the dense
  computation up to float round-off.
- ``kernel``: ``"auto"`` (default: Triton kernels on CUDA tensors, PyTorch elsewhere), ``"triton"`` or
  ``"torch"``; see :mod:`harness.objectives.kernels`. The Triton path never materialises float32 copies, so
  it ignores ``chunk_size``.
- ``inplace=True`` writes the student's gradient into the student logits' own storage (Triton path and
  chunked PyTorch path; without ``chunk_size`` the PyTorch path then chunks by :data:`CHUNK_ELEMENTS`): no
  gradient buffer at all, but the logits are destroyed by the call. Only for logits that nothing reads
  afterwards (not when the same logits feed a CE term computed later); an op that saved them for its backward
  raises autograd's in-place error instead of computing a wrong gradient. (``reduction='none'`` on the
  PyTorch path ignores it.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels as _kernels

REDUCTIONS = ("mean", "sum", "per_sequence_mean", "none")
#: the most logits (rows × V) one chunk of the PyTorch chunked path holds: one float32 temporary ≤ 2 MiB
CHUNK_ELEMENTS = 1 << 19


def rows_per_chunk(chunk_size: int | None, vocab: int, n_rows: int) -> int:
    """Positions per chunk: ``chunk_size`` (all rows if None), capped so that a chunk has ≤ CHUNK_ELEMENTS logits."""
    cap = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return max(1, min(n_rows if chunk_size is None else chunk_size, cap))


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / τ)`` in float32 (float64 kept), with ``-inf`` clamped to the finite minimum."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    out = torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)
    # Only padded vocabularies hold -inf; skip the extra copy otherwise (amin: one reduction, no temporary;
    # a bool isinf() mask cost more than the log_softmax itself).
    has_neg_inf = out.numel() > 0 and bool(out.amin() == float("-inf"))
    return out.clamp_min(torch.finfo(dtype).min) if has_neg_inf else out


def position_weights(mask: Tensor, reduction: str, normalizer: float | None) -> Tensor:
    """Weights ``w`` [N] (flattened positions) such that the reduced loss is ``Σ w_i ℓ_i``."""
    m = (mask > 0).to(torch.float64)
    if normalizer is not None:
        if normalizer <= 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        return (m / normalizer).flatten()
    if reduction == "sum":
        return m.flatten()
    if reduction == "mean":
        return (m / m.sum().clamp_min(1.0)).flatten()
    if reduction == "per_sequence_mean":
        per_seq = m.reshape(-1, m.shape[-1]) if m.dim() > 1 else m.reshape(1, -1)
        counts = per_seq.sum(-1, keepdim=True)
        n_seqs = (counts > 0).sum().clamp_min(1)
        return (per_seq / counts.clamp_min(1.0) / n_seqs).flatten()
    raise ValueError(f"unknown reduction {reduction!r}; accepted: {', '.join(REDUCTIONS)}")


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def per_position_loss(fn, student_rows, teacher_rows, temperature, params) -> Tensor:
    """ℓ [n] for already selected rows [n, V].

    Integer ``teacher_rows`` ([n, 1] labels, for ``ce``) are passed through unchanged; float rows are
    turned into the teacher's log-probabilities.
    """
    log_q = log_probs(student_rows, temperature)
    if teacher_rows.is_floating_point():
        with torch.no_grad():
            teacher_rows = log_probs(teacher_rows, temperature)
    return fn(log_q, teacher_rows, **params)


class _ChunkedWeightedLoss(torch.autograd.Function):
    """Σ_i w_i ℓ_i over selected rows, chunk by chunk, with the gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx, student, teacher, index, weights, fn, params, temperature, rows, needs_grad, inplace):
        grad = None
        if needs_grad:
            if inplace:  # the student's storage receives the gradient; rows not counted get 0
                grad = student.detach()
                if index.numel() < student.shape[0]:
                    keep = torch.zeros(student.shape[0], dtype=torch.bool, device=student.device)
                    keep[index] = True
                    grad.masked_fill_(~keep[:, None], 0)
            else:
                grad = torch.zeros_like(student)
        # all counted rows one contiguous range (the usual unmasked case): chunks are views, not copies
        first = int(index[0])
        contiguous = int(index[-1]) - first + 1 == index.numel()
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for start in range(0, index.numel(), rows):
            n = min(rows, index.numel() - start)
            if contiguous:
                s_rows, t_rows = student.narrow(0, first + start, n), teacher.narrow(0, first + start, n)
            else:
                chunk = index[start : start + n]
                s_rows, t_rows = student.index_select(0, chunk), teacher.index_select(0, chunk)
            with torch.enable_grad():
                s = s_rows.detach().requires_grad_(needs_grad)
                ell = per_position_loss(fn, s, t_rows, temperature, params)
                chunk_loss = (ell * weights[start : start + n].to(ell.dtype)).sum()
            if needs_grad:
                (g,) = torch.autograd.grad(chunk_loss, s)
                del s, ell, s_rows
                if contiguous:
                    grad.narrow(0, first + start, n).copy_(g)
                else:
                    grad.index_copy_(0, chunk, g.to(grad.dtype))
                del g
            total += chunk_loss.detach().to(torch.float64)
        ctx.grad = grad
        out_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        return total.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("this chunked loss was already back-propagated (its gradient buffer is consumed); "
                               "compute the loss again instead of retain_graph=True")
        if not (grad_out.numel() == 1 and float(grad_out) == 1.0):  # the usual case needs no pass at all
            grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None, None


def reduce_per_position(
    fn,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    params: dict,
    *,
    temperature: float,
    reduction: str,
    chunk_size: int | None,
    normalizer: float | None,
    kernel: str = "auto",
    inplace: bool = False,
) -> Tensor:
    """Apply a per-position divergence ``fn(log_q, log_p, **params) -> [n]`` with masking and reduction.

    ``kernel`` and ``inplace``: see the module docstring and :mod:`harness.objectives.kernels`.
    """
    _kernels.check_kernel(kernel)
    student = _rows(student_logits)
    teacher = _rows(teacher_logits).detach()
    flat_mask = mask.reshape(-1)
    counted = flat_mask > 0
    index = torch.nonzero(counted).flatten()
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")

    kid = _kernels.select(kernel, fn, student, params) if index.numel() else None
    if kid is not None:
        weights = None if reduction == "none" else position_weights(mask, reduction, normalizer).to(student.device)
        out = _kernels.triton_loss(kid, fn, student, teacher, weights, counted, params, temperature=temperature,
                                   inplace=inplace)
        return out.reshape(mask.shape) if reduction == "none" else out

    if reduction == "none":
        out = torch.zeros(flat_mask.shape, dtype=torch.float64 if student.dtype == torch.float64 else torch.float32,
                          device=student.device)
        if index.numel():
            ell = per_position_loss(fn, student[index], teacher[index], temperature, params)
            out = out.index_put((index,), ell.to(out.dtype))
        else:  # still attached to the graph: backward gives a zero gradient
            out = out + student[:0].sum().to(out.dtype)
        return out.reshape(mask.shape)

    weights = position_weights(mask, reduction, normalizer).to(student.device)[index]
    if index.numel() == 0:
        return student[:0].sum().to(torch.float64 if student.dtype == torch.float64 else torch.float32)

    if chunk_size is None and not inplace:
        ell = per_position_loss(fn, student[index], teacher[index], temperature, params)
        return (ell * weights.to(ell.dtype)).sum()

    needs_grad = torch.is_grad_enabled() and student.requires_grad
    rows = rows_per_chunk(chunk_size, student.shape[-1], index.numel())
    return _ChunkedWeightedLoss.apply(
        student, teacher, index, weights, fn, params, temperature, rows, needs_grad, inplace
    )


def reduce_batchwise(fn, student_logits, teacher_logits, mask, params, *, temperature, reduction, chunk_size,
                     normalizer) -> Tensor:
    """Apply a batch-wise objective (one scalar over all counted positions, e.g. Sinkhorn)."""
    if reduction not in ("mean",) or normalizer is not None:
        raise ValueError(
            "batch-wise objectives (sinkhorn) define one value per batch: only reduction='mean' "
            "without normalizer is accepted"
        )
    student = _rows(student_logits)
    teacher = _rows(teacher_logits).detach()
    index = torch.nonzero(mask.reshape(-1) > 0).flatten()
    log_q = log_probs(student[index], temperature)
    with torch.no_grad():
        log_p = log_probs(teacher[index], temperature)
    return fn(log_q, log_p, **params)


def _nll(log_q: Tensor, labels: Tensor) -> Tensor:
    """−log q[label] per row; ``labels`` is [n, 1] long."""
    return -log_q.gather(-1, labels).squeeze(-1)


def cross_entropy(student_logits, labels, mask, *, reduction, chunk_size, normalizer, kernel="auto",
                  inplace=False) -> Tensor:
    """Cross-entropy of the student on ``labels`` (−log q[label], τ = 1), same masking and reduction."""
    if labels is None:
        raise ValueError("objective 'ce' needs labels=[B, T] (long, -100 where ignored)")
    counted = (labels != -100) & (mask > 0)
    safe_labels = labels.clamp_min(0)

    # The labels travel in place of the teacher rows, as [N, 1] integers.
    return reduce_per_position(
        _nll, student_logits, safe_labels.unsqueeze(-1), counted, {},
        temperature=1.0, reduction=reduction, chunk_size=chunk_size, normalizer=normalizer, kernel=kernel,
        inplace=inplace,
    )
