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
  shorter one (the original ULD paper's alignment; GOLD's ``use_extended_uld=False``).
- :func:`align_by_offsets`, :func:`merge_groups` and :func:`uld_text_aligned`: alignment through the
  response text (GOLD's ``use_extended_uld=True`` with ``uld_token_merge_strategy="observed"``): tokens of
  the two tokenizers are grouped at the text boundaries both share, and a group of several tokens is
  represented by its first position's distribution times the probabilities of the group's later tokens.
  Producing the offsets (one end offset per response token, in a coordinate both sides share: bytes of
  the response text) is the data path's job.

Only the teacher's row statistics matter (its sorted probabilities), so the sparse (top-k + flat tail) and
sampled teacher caches are refused for it (see :func:`harness.teacher_cache.supported`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .divergences import argsort_desc, sort_desc


def sorted_probs(log_x: Tensor, width: int) -> Tensor:
    """``exp(log_x)`` sorted decreasing along the last axis, zero-padded on the right to ``width`` columns.

    With a gradient, the permutation is found without one and the probabilities gathered through it (the
    gradient of a sort: the same scatter); without, only the values are sorted.
    """
    x = log_x.exp()
    if torch.is_grad_enabled() and x.requires_grad:
        x = x.gather(-1, argsort_desc(x).to(x.device))
    else:
        x = sort_desc(x)
    return _pad_to(x, width)


def _pad_to(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x


def uld(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Universal Logit Distillation: Σ_i |sort(q)_i − sort(p)_i| (sorted decreasing, zero-padded), per position.

    ``log_q`` [N, V_s] and ``log_p`` [N, V_t] may differ in width. Value in [0, 2]; 0 iff q is a permutation
    of p (padded zeros aside). The gradient reaches the student through the sort (a permutation):
    ∂ℓ/∂log q_v = q_v · sign(sort(q)_r − sort(p)_r) at v's rank r (0 where the two are equal), likewise for p.
    """
    return _SortedL1.apply(log_q, log_p)


class _SortedL1(torch.autograd.Function):
    """:func:`uld` with its gradient written out: the argsort of a side is only computed when that side needs a
    gradient (the teacher's values are sorted without one), and the backward pass is one scatter of the signs
    per side (autograd through abs, gather and exp made five passes and kept more)."""

    @staticmethod
    def forward(ctx, log_q, log_p):
        width = max(log_q.shape[-1], log_p.shape[-1])
        sides = []
        for log_x, needs in zip((log_q, log_p), ctx.needs_input_grad[:2]):
            x = log_x.exp()
            order = argsort_desc(x).to(x.device) if needs else None
            sides.append((x, order, _pad_to(x.gather(-1, order) if needs else sort_desc(x), width)))
        (q, q_order, qs), (p, p_order, ps) = sides
        diff = qs - ps
        ctx.save_for_backward(diff, q, q_order, p, p_order)
        return diff.abs().sum(-1)

    @staticmethod
    def backward(ctx, grad_out):
        diff, q, q_order, p, p_order = ctx.saved_tensors
        g = grad_out.unsqueeze(-1) * diff.sgn()
        grad_q = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_q = torch.empty_like(q).scatter_(-1, q_order, g[..., : q.shape[-1]]).mul_(q)
        if ctx.needs_input_grad[1]:
            grad_p = torch.empty_like(p).scatter_(-1, p_order, g[..., : p.shape[-1]].neg()).mul_(p)
        return grad_q, grad_p


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


def align_by_offsets(s_ends: list[int], t_ends: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Group two tokenisations of the same text at the boundaries they share.

    ``s_ends[i]`` / ``t_ends[j]`` are the end offsets (increasing) of the student's / teacher's response
    tokens in the response text. Walking both lists, the side whose current token ends first advances; when
    both current tokens end at the same offset, a group closes on each side. Tokens left after the last
    shared boundary (texts of different lengths) form one final group per side. Returns the groups of
    indices, one list per group, the same number on both sides.
    """
    s_groups: list[list[int]] = []
    t_groups: list[list[int]] = []
    s_cur: list[int] = []
    t_cur: list[int] = []
    i = j = 0
    while i < len(s_ends) and j < len(t_ends):
        if s_ends[i] < t_ends[j]:
            s_cur.append(i)
            i += 1
        elif s_ends[i] > t_ends[j]:
            t_cur.append(j)
            j += 1
        else:  # a boundary both tokenisations share: close a group on each side
            s_groups.append(s_cur + [i])
            t_groups.append(t_cur + [j])
            s_cur, t_cur = [], []
            i += 1
            j += 1
    s_cur += list(range(i, len(s_ends)))
    t_cur += list(range(j, len(t_ends)))
    if s_cur or t_cur:
        s_groups.append(s_cur)
        t_groups.append(t_cur)
    return s_groups, t_groups


def merge_groups(log_x: Tensor, groups: list[list[int]], token_ids: list[int]) -> Tensor:
    """``[n_groups, V]`` log of each group's merged (unnormalised) distribution, GOLD's "observed" strategy.

    A group ``[g_0, g_1, ..]`` of positions is represented by the distribution at its first position times
    the probabilities of the tokens actually at its later positions: log x[g_0] + Σ_{m ≥ 1} log x[g_m,
    token_ids[g_m]] (the probability of the group's whole text, spread as the first token's alternatives).
    An empty group gives an all-zero row (log = -inf; :func:`uld` then compares it with zeros). GOLD clamps
    each later probability at 1e-8 before multiplying; in the log domain no clamp is needed (a deviation only
    for probabilities below 1e-8).
    """
    rows = []
    for g in groups:
        if not g:
            rows.append(torch.full_like(log_x[0], float("-inf")))
            continue
        later = sum((log_x[m, token_ids[m]] for m in g[1:]), log_x.new_zeros(()))
        rows.append(log_x[g[0]] + later)
    return torch.stack(rows) if rows else log_x[:0]


def uld_text_aligned(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_ends: list[int],
    teacher_ends: list[int],
    student_ids: list[int],
    teacher_ids: list[int],
    *,
    temperature: float = 1.0,
) -> Tensor:
    """ULD of one sequence aligned through its text: Σ over shared-boundary groups of ℓ / number of groups.

    ``student_logits`` [n_s, V_s] and ``teacher_logits`` [n_t, V_t] are the rows that predict the n_s / n_t
    response tokens ``student_ids`` / ``teacher_ids``, whose end offsets in the response text are
    ``student_ends`` / ``teacher_ends``. Groups with an empty side are dropped (as GOLD does). The teacher is
    detached. Returns a 0-dim tensor (0 with a zero gradient when no group is left).
    """
    s_groups, t_groups = align_by_offsets(student_ends, teacher_ends)
    pairs = [(sg, tg) for sg, tg in zip(s_groups, t_groups) if sg and tg]
    if not pairs:
        return student_logits.sum() * 0.0
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    q = merge_groups(log_q, [sg for sg, _ in pairs], student_ids)
    p = merge_groups(log_p, [tg for _, tg in pairs], teacher_ids)
    return uld(q, p).sum() / len(pairs)


def _register() -> None:
    from . import register

    register("uld")(uld)


_register()
