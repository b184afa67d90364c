"""MiniLLM's loss (kind ``"sequence"``): reverse KL by policy gradient on teacher-mixed student samples, with
the single-step term computed exactly, plus a language-model term on reference rows.

Gu, Dong, Wei, Huang, MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024 (arXiv 2306.08543).
Read from microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3: ``minillm/minillm/losses.py``
(``ppo_loss``, ``_get_advantages_and_returns``, ``_pg_loss``, ``_reg_loss``, ``pt_loss``),
``minillm/minillm/sampler.py`` (``run_sample``: rewards and the old log-probabilities, stored at sampling time),
``minillm/minillm/reward.py`` (``log p``), ``minillm/minillm/trainer.py`` (``loss = rl_loss + lm_coef · pt_loss``),
``minillm/arguments.py`` and ``scripts/gpt2/minillm/train_base_xl.sh`` (defaults).

Conventions: p is the teacher, q the student (``softmax(logits / temperature)``; released temperature 1). The
micro-batch comes from the training mode ``minillm``: ``minillm_role`` [B] (1: a response sampled from the
mixture, 0: a reference row), ``mix_weight`` [B, T] (the importance weight ``w_t = q_old(y_t) / ((1 − α)
q_old(y_t) + α p(y_t))`` at each sampled token's label position) and, optionally, ``old_logprobs`` [B, T]
(``log q_old(y_t)``: the student's log-probability when the response was sampled, the released store's
``logprobs``). Only counted positions (``loss_mask``) enter.

On the sampled rows, per counted position t of a row (y_t its label, positions in order), with
``log q_old(y_t)`` = ``old_logprobs`` when the batch has them and ``sg(log q(y_t))`` (the current student,
detached) otherwise:

    r_t   = clip((log p(y_t) − log q_old(y_t)) / reward_scaling, ±cliprange_reward)      (released rewards)
    R_t   = Σ_{s ≥ t} γ^{s−t} r_s / L_t,   L_t = counted positions s ≥ t of the row      (length normalisation)
    A_t   = (R_t − mean R) / sqrt(var R + 1e-8)   over the micro-batch's sampled positions  (whitening)
    ρ_t   = exp(log q(y_t) − log q_old(y_t)) · w_t                (gradient ρ_t ∇ log q(y_t))
    pg    = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))                             (clipped surrogate)
    reg   = mean_t Σ_v q_v (log q_v − log p_v)            (single-step term: exact per-step reverse KL)

(released ``run_sample``: rewards ``t_rewards + ent_rewards`` = log p − log q_old, scaled and clipped at
sampling time; ``_pg_loss``: ratio ``exp(logprobs − old_logprobs) · w``.) Without ``old_logprobs`` the ratio is
w_t in value (the first PPO step on fresh rollouts) and the rewards use the current student.

``include_current_step = true`` (released) sums R_t from s = t, so r_t enters the long-term reward too; the
paper's decomposition starts the long-term sum at s = t + 1 (``false``). On the reference rows:

    pt    = (1 − kd_ratio) · mean_t (−log q(y_t)) + kd_ratio · mean_t (−Σ_v p_v log q_v)

and the loss is ``pg + reg + lm_coef · pt`` (``reg`` dropped when ``single_step`` is false), times
``Σ loss_mask / normalizer`` (the micro-batch's share of the step's tokens, as other sequence-level terms). A
part without rows (no sampled or no reference rows) contributes 0. Released defaults: γ = 0.95, ε = 0.2,
reward_scaling = 0.5, cliprange_reward = 100, lm_coef = 1, kd_ratio = 0.5 (the training scripts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..schema import Field
from . import _REGISTRY, ObjectiveError, ObjectiveSpec
from .wrapper import log_probs


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float, include_current_step: bool = True) -> Tensor:
    """``Σ_{s ≥ t} γ^{s−t} r_s`` per position [B, T] (``s > t`` when ``include_current_step`` is false), masked
    positions contributing 0; rows are independent."""
    r = rewards * mask
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        if include_current_step:
            running = r[:, t] + gamma * running
            out[:, t] = running
        else:
            out[:, t] = running
            running = r[:, t] + gamma * running
    return out


def remaining_lengths(mask: Tensor) -> Tensor:
    """Counted positions from t to the end of the row, ``Σ_{s ≥ t} mask_s`` [B, T] (at least 1)."""
    return mask.flip(-1).cumsum(-1).flip(-1).clamp_min(1.0)


def minillm(student_logits: Tensor, teacher_logits: Tensor, batch: dict | None = None, *,
            normalizer: float | None = None, temperature: float = 1.0, gamma: float = 0.95, cliprange: float = 0.2,
            reward_scaling: float = 0.5, cliprange_reward: float = 100.0, single_step: bool = True,
            include_current_step: bool = True, whiten: bool = True, lm_coef: float = 1.0,
            kd_ratio: float = 0.5) -> Tensor:
    """MiniLLM's loss on one micro-batch (see the module docstring). ``student_logits``/``teacher_logits``
    [B, T, V]; ``batch`` needs ``labels``, ``loss_mask``, ``minillm_role`` [B] and ``mix_weight`` [B, T], and may
    hold ``old_logprobs`` [B, T] (``log q_old`` at the sampled tokens' label positions)."""
    if not isinstance(batch, dict):
        raise ObjectiveError("objective 'minillm' is sequence-level: WeightedLoss calls it with the micro-batch "
                             "(harness.distill.train passes batch=); it cannot be applied position by position "
                             "through Objective.__call__")
    if "minillm_role" not in batch or "mix_weight" not in batch:
        raise ValueError("objective 'minillm' needs batch['minillm_role'] and batch['mix_weight']: use it with the "
                         "training mode 'minillm'")
    device = student_logits.device
    labels, mask = batch["labels"].to(device), (batch["loss_mask"].to(device) > 0)
    role = torch.as_tensor(batch["minillm_role"], device=device)
    b, t = torch.nonzero(mask, as_tuple=True)
    log_q = log_probs(student_logits[b, t], temperature)                           # [n, V]
    with torch.no_grad():
        log_p = log_probs(teacher_logits[b, t].detach(), temperature)
    y = labels[b, t].clamp_min(0).unsqueeze(-1)
    lq_tok = log_q.gather(-1, y).squeeze(-1)                                      # [n]
    lp_tok = log_p.gather(-1, y).squeeze(-1)
    dtype = log_q.dtype
    sampled = role[b] == 1
    zero = log_q.new_zeros(())
    pg = reg = pt = zero
    if bool(sampled.any()):
        shape = labels.shape
        smask = torch.zeros(shape, dtype=dtype, device=device)
        smask[b[sampled], t[sampled]] = 1.0
        lq_s = lq_tok[sampled]
        with torch.no_grad():
            if "old_logprobs" in batch:
                old = torch.as_tensor(batch["old_logprobs"], device=device).to(dtype)[b[sampled], t[sampled]]
            else:
                old = lq_s.detach()
            r = torch.zeros(shape, dtype=dtype, device=device)
            r[b[sampled], t[sampled]] = ((lp_tok[sampled] - old) / reward_scaling).clamp(
                -cliprange_reward, cliprange_reward)
            ret = discounted_returns(r, smask, gamma, include_current_step) / remaining_lengths(smask)
            adv = ret[b[sampled], t[sampled]]
            if whiten and adv.numel() > 1:
                var, mean = torch.var_mean(adv)
                adv = (adv - mean) * torch.rsqrt(var + 1e-8)
            elif whiten:
                adv = adv - adv.mean()
            w = torch.as_tensor(batch["mix_weight"], device=device).to(dtype)[b[sampled], t[sampled]]
        ratio = torch.exp(lq_s - old) * w
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)).mean()
        if single_step:
            lq_all, lp_all = log_q[sampled], log_p[sampled]
            reg = (lq_all.exp() * (lq_all - lp_all)).sum(-1).mean()
    ref = ~sampled
    if lm_coef != 0 and bool(ref.any()):
        ce = -lq_tok[ref].mean()
        soft = -(log_p[ref].exp() * log_q[ref]).sum(-1).mean() if kd_ratio != 0 else zero
        pt = (1.0 - kd_ratio) * ce + kd_ratio * soft
    value = pg + reg + lm_coef * pt
    if normalizer is not None:
        value = value * (float(b.shape[0]) / normalizer)
    return value


_REGISTRY["minillm"] = ObjectiveSpec(
    "minillm", minillm, "sequence", False,
    {
        "gamma": Field((float,), 0.95, ge=0, le=1, help="discount of the long-term reward (released --gamma 0.95)"),
        "cliprange": Field((float,), 0.2, ge=0, help="clip of the importance ratio in the surrogate "
                                                   "(released --cliprange 0.2)"),
        "reward_scaling": Field((float,), 0.5, gt=0, help="rewards are divided by it (released --reward-scaling 0.5)"),
        "cliprange_reward": Field((float,), 100.0, gt=0, help="rewards are clipped to +-it "
                                                            "(released --cliprange-reward 100)"),
        "single_step": Field((bool,), True, help="add the exact per-step reverse KL (released --single-step-reg)"),
        "include_current_step": Field((bool,), True, help="long-term reward from s >= t as released (false: s > t, "
                                                          "the paper's R_{t+1})"),
        "whiten": Field((bool,), True, help="whiten the advantages over the micro-batch's sampled tokens "
                                            "(released: always)"),
        "lm_coef": Field((float,), 1.0, ge=0, help="weight of the LM term on reference rows (released --lm-coef 1)"),
        "kd_ratio": Field((float,), 0.5, ge=0, le=1, help="share of the teacher's soft cross-entropy in the LM term "
                                                        "(released scripts --kd-ratio 0.5)"),
    },
    "MiniLLM: reverse KL by policy gradient on teacher-mixed samples + exact per-step reverse KL + LM term.",
)
