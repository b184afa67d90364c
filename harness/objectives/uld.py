"""Universal Logit Distillation (ULD): a loss that needs no shared vocabulary.

Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
2024 (arXiv 2402.12030). Conventions follow TRL's GOLD trainer (read at
``huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8 trl/experimental/gold/gold_trainer.py``,
``ULDLoss._compute_distillation_loss``, the non-hybrid branch):

- at each aligned response position, q = softmax(z_s / τ) (student, width V_s) and p = softmax(z_t / τ)
  (teacher, width V_t), each sorted in decreasing order;
- the shorter sorted vector is padded with zeros to max(V_s, V_t);
- ℓ = Σ_i |q_(i) − p_(i)|, the L1 distance between the sorted vectors. This is the paper's closed form of
  the Wasserstein-1 distance with the cost that ignores token identity (every token equally far from every
  other), after matching the distributions rank to rank. It is 0 iff the two distributions are equal up
  to a relabelling of tokens, lies in [0, 2], and is symmetric in p and q;
- GOLD reduces per sequence (Σ over the sequence's aligned positions / their number) and then averages
  over sequences, our ``per_sequence_mean``; the registry's default is the token mean.

Two entry points:

- :func:`uld`, the registered per-position divergence ``fn(log_q [N, V_s], log_p [N, V_t]) -> [N]``. Through
  the objectives wrapper both widths are equal (:func:`harness.models.align_vocab` pads with ``-inf``,
  i.e. probability 0, which sorts to the end: the same as zero-padding the sorted vector); called directly,
  it accepts different widths.
- :func:`uld_sequences`, GOLD's positional alignment for a student and a teacher with different
  tokenizers: each sequence's response positions are taken in order on both sides and truncated to the
  shorter one (the original ULD paper's alignment; GOLD's ``use_extended_uld=False``). Aligning through the
  response text (GOLD's byte-offset groups) is the data path's job, not this module's.

Only the teacher's row statistics matter (its sorted probabilities), so the sparse (top-k + flat tail) and
sampled teacher caches are refused for it (see :func:`harness.teacher_cache.supported`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sorted_probs(log_x: Tensor, width: int) -> Tensor:
    """``exp(log_x)`` sorted decreasing along the last axis, zero-padded on the right to ``width`` columns."""
    x = log_x.exp().sort(dim=-1, descending=True).values
    if x.shape[-1] < width:
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    return x


def uld(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Universal Logit Distillation: Σ_i |sort(q)_i − sort(p)_i| (sorted decreasing, zero-padded), per position.

    ``log_q`` [N, V_s] and ``log_p`` [N, V_t] may differ in width. Value in [0, 2]; 0 iff q is a permutation
    of p (padded zeros aside). The gradient reaches the student through the sort (a permutation).
    """
    width = max(log_q.shape[-1], log_p.shape[-1])
    return (sorted_probs(log_q, width) - sorted_probs(log_p, width)).abs().sum(-1)


def uld_sequences(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_mask: Tensor,
    teacher_mask: Tensor,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """ULD between a student and a teacher with different tokenizers, GOLD's positional alignment.

    ``student_logits`` [B, T_s, V_s], ``teacher_logits`` [B, T_t, V_t] (lengths and widths may differ),
    ``student_mask`` [B, T_s] and ``teacher_mask`` [B, T_t] mark each side's response positions (the
    positions whose logits predict a response token). For sequence b, the n_b = min(#student, #teacher)
    first response positions of each side are paired in order; its loss is Σ ℓ / n_b, and the result is the
    mean over sequences with n_b > 0 (0 with a zero gradient if there is none). The teacher is detached.
    """
    losses = []
    for b in range(student_logits.shape[0]):
        s_idx = torch.nonzero(student_mask[b] > 0).flatten()
        t_idx = torch.nonzero(teacher_mask[b] > 0).flatten()
        n = min(len(s_idx), len(t_idx))
        if n == 0:
            continue
        dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        log_q = torch.log_softmax(student_logits[b, s_idx[:n]].to(dtype) / temperature, -1)
        with torch.no_grad():
            log_p = torch.log_softmax(teacher_logits[b, t_idx[:n]].to(dtype) / temperature, -1)
        losses.append(uld(log_q, log_p).sum() / n)
    if not losses:
        return student_logits.sum() * 0.0
    return torch.stack(losses).mean()


def _register() -> None:
    from . import register

    register("uld")(uld)


_register()
