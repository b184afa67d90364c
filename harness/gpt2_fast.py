"""A functional forward and decoding loop for ``transformers``' GPT-2, without the library's per-call overhead.

The embedded suites train GPT-2 models of 0.1–0.6 M parameters on one CPU thread, where a forward of the
library's ``GPT2Model`` spends as much time in its own machinery (the 4-D mask builder, cache objects, output
classes, argument checks) as in arithmetic: a no-grad forward of the tiny student over ``[32, 48]`` tokens takes
~13 ms through the library against ~7 ms of the same operations called directly, and a decoding step of 32 rows
~3 ms against ~0.7 ms. This module runs the same operations on the model's own parameters:

- :func:`hidden_states` — ``model.transformer(...)[0]`` (after ``ln_f``), ``[B, T, H]``; gradients flow into the
  model's parameters as through the module call.
- :func:`decode` — ``model.generate(...)`` run greedy on a list of logits processors, with a key/value cache:
  same prefill positions (``cumsum(attention_mask) − 1``), same order of processors, same eos padding and stopping.

Same math, not the same kernels' every call: outputs equal the library's up to float round-off (tests compare
hidden states, gradients and decoded tokens with the library's). Only a plain :class:`GPT2LMHeadModel` whose
forward has nothing else in it is served (:func:`eligible`): no cross-attention, no layer-index attention scaling,
no upcast-reordered attention, no dropout while training, no device map, no hooks; any other model goes through
``transformers`` as before. ``DISTILLBENCH_GPT2_FAST=0`` in the environment turns the fast path off (A/B runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["enabled", "eligible", "hidden_states", "counted_hidden_states", "decode", "plain_generation_config"]

#: generation_config fields that do not change what ``generate`` computes for the calls this harness makes
#: (ids it is given anyway, sampling settings it neutralises, bookkeeping).
_NEUTRAL_GENERATION_FIELDS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
    "_from_model_config", "do_sample", "temperature", "top_k", "top_p", "max_length", "use_cache",
    "output_attentions", "output_hidden_states",
})


def enabled() -> bool:
    """Whether the fast path is on (``DISTILLBENCH_GPT2_FAST`` unset or not ``0``)."""
    return os.environ.get("DISTILLBENCH_GPT2_FAST", "1") != "0"


def eligible(model) -> bool:
    """Whether ``model`` is a plain ``GPT2LMHeadModel`` this module computes exactly as ``transformers`` does."""
    if not enabled() or type(model).__name__ != "GPT2LMHeadModel":
        return False
    from transformers import GPT2LMHeadModel

    if not isinstance(model, GPT2LMHeadModel) or getattr(model, "hf_device_map", None):
        return False
    cfg = model.config
    if (cfg.add_cross_attention or cfg.scale_attn_by_inverse_layer_idx or not cfg.scale_attn_weights
            or getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager")):
        return False
    if model.transformer.gradient_checkpointing and model.training:
        return False
    if model.training and max(cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) > 0:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def plain_generation_config(model) -> bool:
    """Whether ``model.generation_config`` adds nothing to a ``generate`` call beyond :data:`_NEUTRAL_GENERATION_FIELDS`
    (no repetition penalty, suppressed tokens, minimum length, ... that :func:`decode` would have to copy)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    diff = config.to_diff_dict()
    return set(diff) <= _NEUTRAL_GENERATION_FIELDS and not diff.get("output_attentions") and not diff.get(
        "output_hidden_states")


def _norm(ln, x: Tensor) -> Tensor:
    """``ln(x)`` of a ``LayerNorm`` over the last dimension, called functionally."""
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def _finish(block, h: Tensor, o: Tensor) -> Tensor:
    """A block after its attention, per token: ``h`` [N, H] the block's input rows, ``o`` [N, H] their attention
    outputs (heads concatenated) → the residual with the output projection, then the MLP sublayer, [N, H]."""
    attn, mlp = block.attn, block.mlp
    h = h + torch.addmm(attn.c_proj.bias, o, attn.c_proj.weight)
    y = mlp.act(torch.addmm(mlp.c_fc.bias, _norm(block.ln_2, h), mlp.c_fc.weight))
    return h + torch.addmm(mlp.c_proj.bias, y, mlp.c_proj.weight)


def _attend(block, h: Tensor, cache: tuple[Tensor, Tensor] | None, start: int,
            mask: Tensor | None, last_only: bool = False) -> Tensor:
    """One block: ``h`` [B, T, H] → [B, T, H]. With ``cache`` (keys, values [B, heads, T_max, D]) the block's keys
    and values are written at ``start:start+T`` and attention reads ``[:start+T]``. ``mask``: bool
    [B, 1, T, T_keys] (True = attend) or ``None`` for plain causal attention over ``h`` alone. ``last_only``: keys
    and values of every position (into ``cache``), everything else for the last position only: ``[B, 1, H]`` (the
    last block of a decoding step, whose other positions nobody reads)."""
    attn = block.attn
    B, T, H = h.shape
    qkv = torch.addmm(attn.c_attn.bias, _norm(block.ln_1, h).reshape(B * T, H), attn.c_attn.weight)
    q, k, v = qkv.view(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    if cache is not None:
        keys, values = cache
        keys[:, :, start:start + T] = k
        values[:, :, start:start + T] = v
        k, v = keys[:, :, :start + T], values[:, :, :start + T]
    causal = mask is None
    if last_only and T > 1:  # the last query sees every key: no causal mask
        q, h, T, causal = q[:, :, -1:], h[:, -1:], 1, False
        mask = None if mask is None else mask[:, :, -1:]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=attn.scaling)
    return _finish(block, h.reshape(B * T, H), o.transpose(1, 2).reshape(B * T, H)).view(B, T, H)


def _padding_mask(attention_mask: Tensor, T: int) -> Tensor | None:
    """Causal ∧ key-not-padding, bool [B, 1, T, T], with the diagonal always on (a left-padding query attends to
    itself: finite garbage where the library may leave NaN; no counted position reads it). ``None`` when nothing is
    padded (plain causal attention)."""
    if bool(attention_mask.all()):
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    keep = causal & attention_mask[:, None, None, :].bool()
    return keep | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


def hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None) -> Tensor:
    """``model.transformer(input_ids, attention_mask=..., position_ids=...)[0]`` of an :func:`eligible` model:
    ``[B, T, H]`` after the final layer norm. ``attention_mask`` [B, T] (1 = token, 0 = padding; default all 1);
    ``position_ids`` [B, T] or [1, T] default ``0..T−1`` as in the library (right padding: positions of the tokens
    are their indices)."""
    t = model.transformer
    B, T = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(T, device=input_ids.device)[None]
    h = t.wte(input_ids) + t.wpe(position_ids)
    mask = None if attention_mask is None else _padding_mask(attention_mask, T)
    for block in t.h:
        h = _attend(block, h, None, 0, mask)
    return _norm(t.ln_f, h)


def _attend_packed(block, h: Tensor, where: tuple[Tensor, Tensor], shape: tuple[int, int],
                   mask: Tensor | None) -> Tensor:
    """One block on packed tokens: ``h`` [M, H] are the tokens at ``where = (rows, columns)`` (row-major) of a
    ``[B, W]`` batch (``shape``); every per-token operation runs on the M tokens only, attention on their keys and
    values scattered back into ``[B, heads, W, D]`` (positions that are not packed are zeros no packed query reads:
    :func:`counted_hidden_states` packs every position up to the last one read). ``mask`` as in :func:`_attend`."""
    attn = block.attn
    H = h.shape[-1]
    qkv = torch.addmm(attn.c_attn.bias, _norm(block.ln_1, h), attn.c_attn.weight)
    qkv = h.new_zeros((*shape, 3 * H)).index_put(where, qkv)
    q, k, v = qkv.view(*shape, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scaling)
    return _finish(block, h, o.transpose(1, 2)[where].reshape(-1, H))


def counted_hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None, rows: Tensor) -> Tensor:
    """``hidden_states(model, input_ids, attention_mask)[rows]`` of an :func:`eligible` model, ``[N, H]`` in row-major
    order of ``rows`` (bool ``[B, T]``: the positions a loss reads), computing only what those rows depend on.

    A position of a causal model reads the keys and values of the positions up to itself, so in row ``b`` every
    block runs on positions ``0..last[b]`` (``last[b]``: the row's last counted position) and nothing after it —
    no padding, no final token (whose prediction no loss reads), nothing for a row with no counted position — and
    the last block's queries, attention output and MLP run on the counted positions only (its keys and values on
    all of ``0..last[b]``). A training batch of the tiny suite counts ~13% of its positions (the responses), and
    ~24% of them are padding: a student step's forward and backward take ~0.7× the work of the full forward. Same
    math as :func:`hidden_states` (default positions ``0..T−1``; causal ∧ key-not-padding attention, diagonal
    always on); equal up to float round-off (the matmuls have other shapes), gradients likewise (tests).
    """
    rows = rows.bool()
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rb, rt = rows.nonzero(as_tuple=True)
    if rb.numel() == 0:
        return hidden_states(model, input_ids, attention_mask)[rows]
    t = model.transformer
    position = torch.arange(T, device=device)
    last = torch.where(rows, position, -1).amax(1)  # [B]; -1: nothing counted in the row
    width = int(last.max()) + 1
    shape = (B, width)
    kb, kt = (position[None, :width] <= last[:, None]).nonzero(as_tuple=True)  # the packed tokens, row-major
    mask = _padding_mask(attention_mask[:, :width], width)
    h = t.wte(input_ids[kb, kt]) + t.wpe(kt)  # [M, H]
    for block in t.h[:-1]:
        h = _attend_packed(block, h, (kb, kt), shape, mask)

    block = t.h[-1]
    attn = block.attn
    H, heads, dim = h.shape[-1], attn.num_heads, attn.head_dim
    x = _norm(block.ln_1, h)
    weight, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D [H, 3H]: columns q | k | v
    kv = h.new_zeros((*shape, 2 * H)).index_put((kb, kt), torch.addmm(bias[H:], x, weight[:, H:]))
    k, v = kv.view(*shape, 2, heads, dim).permute(2, 0, 3, 1, 4)  # [B, heads, W, D] each
    packed = torch.empty(shape, dtype=torch.long, device=device)
    packed[kb, kt] = torch.arange(kb.numel(), device=device)
    counted = packed[rb, rt]  # the counted positions among the packed tokens
    slot = rows.long().cumsum(1)[rb, rt] - 1  # the j-th counted position of its row
    queries = (B, int(slot.max()) + 1)
    q = torch.addmm(bias[:H], x[counted], weight[:, :H])
    q = q.new_zeros((*queries, H)).index_put((rb, slot), q).view(*queries, heads, dim).transpose(1, 2)
    # a query slot a row does not use sits at the last key (never NaN: it attends to itself)
    at = torch.full(queries, width - 1, dtype=torch.long, device=device).index_put((rb, slot), rt)
    keys = position[:width]
    allowed = ((keys <= at[..., None]) & attention_mask[:, None, :width].bool()) | (keys == at[..., None])
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=attn.scaling)
    return _norm(t.ln_f, _finish(block, h[counted], o.transpose(1, 2)[rb, slot].reshape(-1, H)))


@torch.no_grad()
def decode(model, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int, eos_id: int, pad_id: int,
           processors: Sequence[Callable[[Tensor, Tensor], Tensor]] = ()) -> Tensor:
    """``model.generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=False, eos_token_id=eos_id,
    pad_token_id=pad_id, logits_processor=processors)`` of an :func:`eligible` model, in eval mode.

    ``input_ids``, ``attention_mask`` [B, W], left-padded. Each step: the last position's logits in float32, every
    processor ``p(ids_so_far [B, W+t], scores [B, V]) → scores`` in order (all rows, finished ones too, as
    ``generate`` does, so processors that draw random numbers consume the same stream), argmax; a row that has
    produced ``eos_id`` gets ``pad_id`` afterwards; stops when every row has ended or after ``max_new_tokens``.
    Returns ``[B, W + n]`` (``n`` ≤ ``max_new_tokens`` steps run), like ``generate``.
    """
    t = model.transformer
    B, W = input_ids.shape
    total = W + max_new_tokens
    heads, dim = t.h[0].attn.num_heads, t.h[0].attn.head_dim
    param = t.wte.weight
    caches = [(param.new_empty((B, heads, total, dim)), param.new_empty((B, heads, total, dim))) for _ in t.h]
    keys_on = torch.ones((B, total), dtype=torch.bool, device=input_ids.device)
    keys_on[:, :W] = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    mask = _padding_mask(attention_mask, W)
    ids, step_ids, start = input_ids, input_ids, 0
    next_position = positions[:, -1:] + 1
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        h = t.wte(step_ids) + t.wpe(positions)
        for layer, (block, cache) in enumerate(zip(t.h, caches)):
            h = _attend(block, h, cache, start, mask, last_only=layer == len(t.h) - 1)
        last = _norm(t.ln_f, h[:, -1])
        scores = model.lm_head(last).float()
        for processor in processors:
            scores = processor(ids, scores)
        token = scores.argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad_id))
        ids = torch.cat([ids, token[:, None]], dim=1)
        unfinished &= token != eos_id
        if not bool(unfinished.any()):
            break
        start += step_ids.shape[1]
        step_ids, positions = token[:, None], next_position
        next_position = next_position + 1
        mask = keys_on[:, None, None, :start + 1]
    return ids
