"""A functional forward and decoding loop for ``transformers``' GPT-2, without the library's per-call overhead.

The embedded suites train GPT-2 models of 0.1–0.6 M parameters on one CPU thread, where a forward of the
library's ``GPT2Model`` spends as much time in its own machinery (the 4-D mask builder, cache objects, output
classes, argument checks) as in arithmetic: a no-grad forward of the tiny student over ``[32, 48]`` tokens takes
~13 ms through the library against ~7 ms of the same operations called directly, and a decoding step of 32 rows
~3 ms against ~0.7 ms. This module runs the same operations on the model's own parameters:

- :func:`hidden_states` — ``model.transformer(...)[0]`` (after ``ln_f``), ``[B, T, H]``; gradients flow into the
  model's parameters as through the module call.
- :func:`counted_hidden_states` — the same rows at the positions a loss reads only, computing nothing else.
- :func:`decode` — ``model.generate(...)`` run greedy on a list of logits processors, with a key/value cache:
  same prefill positions (``cumsum(attention_mask) − 1``), same order of processors, same eos padding and stopping;
  :class:`Decoder` is its loop, one step at a time.
- :func:`keys_values` — rows' keys and values at every block, which the two above take as ``past`` (a frozen
  teacher's prompts, computed once: :mod:`harness.teacher_prefix`).

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

__all__ = ["enabled", "eligible", "hidden_states", "counted_hidden_states", "keys_values", "prefix_keys_values",
           "Decoder", "decode",
           "plain_generation_config"]

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


def _query_slots(qb: Tensor, qt: Tensor, B: int, width: int, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Queries at positions ``(qb, qt)`` (row-major) of a ``[B, width]`` batch, laid out as ``[B, S]`` slots (S: the
    most queries of a row): ``slot`` [N] (the j-th query of its row) and ``allowed`` bool [B, 1, S, width], causal ∧
    key-not-padding for each query (a slot a row does not use sits at the last key and attends to itself: never
    NaN)."""
    counts = torch.bincount(qb, minlength=B)
    slot = torch.arange(qb.numel(), device=qb.device) - (counts.cumsum(0) - counts)[qb]
    at = torch.full((B, int(counts.max())), width - 1, dtype=torch.long, device=qb.device).index_put((qb, slot), qt)
    keys = torch.arange(width, device=qb.device)
    allowed = ((keys <= at[..., None]) & attention_mask[:, None, :width].bool()) | (keys == at[..., None])
    return slot, allowed[:, None]


def _attend_slots(attn, q: Tensor, kv: Tensor, qb: Tensor, slots: tuple[Tensor, Tensor]) -> Tensor:
    """Attention of the queries ``q`` [N, H] at rows ``qb`` and ``slots`` (:func:`_query_slots`) over the keys |
    values ``kv`` [B, W, 2H] → their outputs, heads concatenated, [N, H]."""
    slot, allowed = slots
    B, W, H = kv.shape[0], kv.shape[1], q.shape[-1]
    heads, dim = attn.num_heads, attn.head_dim
    q = q.new_zeros((B, allowed.shape[2], H)).index_put((qb, slot), q).view(B, -1, heads, dim).transpose(1, 2)
    k, v = kv.view(B, W, 2, heads, dim).permute(2, 0, 3, 1, 4)  # [B, heads, W, D] each
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=attn.scaling)
    return o.transpose(1, 2)[qb, slot].reshape(-1, H)


def _attend_packed(block, h: Tensor, where: tuple[Tensor, Tensor], shape: tuple[int, int],
                   mask: Tensor | None, given: tuple[tuple[Tensor, Tensor], Tensor] | None = None,
                   record: Tensor | None = None, slots: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One block on packed tokens: ``h`` [M, H] are the tokens at ``where = (rows, columns)`` (row-major) of a
    ``[B, W]`` batch (``shape``); every per-token operation runs on the M tokens only, attention on their keys and
    values scattered back into ``[B, heads, W, D]`` (positions that are neither packed nor given are zeros no
    packed query reads: :func:`counted_hidden_states` packs every position up to the last one read). ``given``:
    ``((rows, columns), kv)``, the keys | values ``kv`` [P, 2H] of P other positions of the batch (a cached
    prefix), written into the attention's keys and values; then ``slots`` (:func:`_query_slots` of the packed
    tokens) lays out the queries, so attention runs for the packed positions only. ``record`` [M, 2H]: receives the
    packed tokens' keys | values. ``mask`` as in :func:`_attend` (without ``given``)."""
    attn = block.attn
    H = h.shape[-1]
    qkv = torch.addmm(attn.c_attn.bias, _norm(block.ln_1, h), attn.c_attn.weight)
    if record is not None:
        record.copy_(qkv[:, H:])
    if given is not None:
        kv = h.new_zeros((*shape, 2 * H)).index_put(where, qkv[:, H:])
        (gb, gt), kv_given = given
        kv[gb, gt] = kv_given
        return _finish(block, h, _attend_slots(attn, qkv[:, :H], kv, where[0], slots))
    qkv = h.new_zeros((*shape, 3 * H)).index_put(where, qkv)
    q, k, v = qkv.view(*shape, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scaling)
    return _finish(block, h, o.transpose(1, 2)[where].reshape(-1, H))


def counted_hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None, rows: Tensor,
                          past: tuple[Tensor, Tensor] | None = None) -> Tensor:
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

    ``past``: ``(prefix [B] long, kv [n_layer, ΣP, 2H])``, the keys and values of each row's first ``prefix[b]``
    positions at every block (rows in order, :func:`keys_values` of those tokens): the blocks then run on positions
    ``prefix[b]..last[b]`` only, queries included (a frozen teacher's prompt, computed once and reused). Every
    counted position must be at or after its row's prefix.
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
    kept = position[None, :width] <= last[:, None]
    given = mask = slots = None
    if past is not None:
        prefix, kv = past
        prefix = prefix.to(device)
        if bool((rt < prefix[rb]).any()):
            raise ValueError("counted_hidden_states: a counted position lies inside its row's given prefix")
        before = position[None, :width] < prefix[:, None]
        given = before.nonzero(as_tuple=True)
        if given[0].numel() != kv.shape[1]:
            raise ValueError(f"counted_hidden_states: past holds {kv.shape[1]} positions, the prefixes "
                             f"{given[0].numel()}")
        kept = kept & ~before
    kb, kt = kept.nonzero(as_tuple=True)  # the packed tokens, row-major
    if given is None:
        mask = _padding_mask(attention_mask[:, :width], width)
    else:
        slots = _query_slots(kb, kt, B, width, attention_mask)
    h = t.wte(input_ids[kb, kt]) + t.wpe(kt)  # [M, H]
    for layer, block in enumerate(t.h[:-1]):
        h = _attend_packed(block, h, (kb, kt), shape, mask, None if given is None else (given, kv[layer]),
                           slots=slots)

    block = t.h[-1]
    attn = block.attn
    H = h.shape[-1]
    x = _norm(block.ln_1, h)
    weight, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D [H, 3H]: columns q | k | v
    kv_last = h.new_zeros((*shape, 2 * H)).index_put((kb, kt), torch.addmm(bias[H:], x, weight[:, H:]))
    if given is not None:
        kv_last[given] = kv[-1]
    packed = torch.empty(shape, dtype=torch.long, device=device)
    packed[kb, kt] = torch.arange(kb.numel(), device=device)
    counted = packed[rb, rt]  # the counted positions among the packed tokens
    q = torch.addmm(bias[:H], x[counted], weight[:, :H])
    o = _attend_slots(attn, q, kv_last, rb, _query_slots(rb, rt, B, width, attention_mask))
    return _norm(t.ln_f, _finish(block, h[counted], o))


@torch.no_grad()
def keys_values(model, input_ids: Tensor, lengths: Tensor) -> Tensor:
    """The keys and values at every block of an :func:`eligible` model of each row's first ``lengths[b]`` tokens
    (``input_ids`` [B, T], rows starting at position 0): ``[n_layer, ΣL, 2H]``, the rows' positions in row-major
    order, keys | values in the column order of ``c_attn``'s output — what :func:`counted_hidden_states` and
    :class:`Decoder` take as ``past``. The blocks run on those positions only (packed, the last block's keys and
    values only). Equal to the full forward's keys and values up to float round-off; for one batch, always the same
    bits (a cache filled in a fixed order of batches does not depend on what else a process computed)."""
    t = model.transformer
    B, T = input_ids.shape
    H = t.wte.weight.shape[1]
    lengths = lengths.to(input_ids.device)
    width = int(lengths.max()) if B else 0
    position = torch.arange(width, device=input_ids.device)
    kept = position[None, :] < lengths[:, None]
    kb, kt = kept.nonzero(as_tuple=True)
    out = t.wte.weight.new_empty((len(t.h), kb.numel(), 2 * H))
    if kb.numel() == 0:
        return out
    mask = _padding_mask(kept.long(), width)
    h = t.wte(input_ids[kb, kt]) + t.wpe(kt)
    for layer, block in enumerate(t.h[:-1]):
        h = _attend_packed(block, h, (kb, kt), (B, width), mask, record=out[layer])
    attn = t.h[-1].attn  # the last block: keys and values only
    out[-1] = torch.addmm(attn.c_attn.bias[H:], _norm(t.h[-1].ln_1, h), attn.c_attn.weight[:, H:])
    return out


def prefix_keys_values(model, ids: Tensor) -> Tensor:
    """:func:`keys_values` of one row of tokens ``ids`` [L] at positions ``0..L−1``: ``[n_layer, L, 2H]``."""
    return keys_values(model, ids[None], torch.tensor([ids.shape[0]], device=ids.device))


class Decoder:
    """Step-by-step decoding of an :func:`eligible` model with a key/value cache: the loop of :func:`decode`, for
    samplers that draw from several models' distributions at once (MiniLLM's teacher-mixed sampling).

    ``input_ids``, ``attention_mask`` [B, W], left-padded prompts; room for ``max_new_tokens`` tokens; positions
    ``cumsum(attention_mask) − 1`` as ``generate`` gives them. :meth:`scores` runs the pending tokens (the prompt
    first, then the last appended token) and returns the next token's logits ``[B, V]`` in float32;
    :meth:`append` takes the chosen tokens ``[B]``. ``past``: ``kv [n_layer, ΣP, 2H]``, the keys and values of
    every prompt but its last token (``P_b = L_b − 1`` positions of row b, rows in order,
    :func:`prefix_keys_values`): the prefill then runs on the last prompt position only. Call under
    ``torch.no_grad()`` with the model in eval mode.
    """

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 past: Tensor | None = None):
        self.model = model
        t = model.transformer
        B, W = input_ids.shape
        total = W + max_new_tokens
        heads, dim = t.h[0].attn.num_heads, t.h[0].attn.head_dim
        param = t.wte.weight
        # given a past, the padding columns are never written: zeros, not whatever the memory held (a masked key's
        # weight is 0, but 0 × NaN is NaN)
        alloc = param.new_empty if past is None else param.new_zeros
        self.caches = [(alloc((B, heads, total, dim)), alloc((B, heads, total, dim))) for _ in t.h]
        self.keys_on = torch.ones((B, total), dtype=torch.bool, device=input_ids.device)
        self.keys_on[:, :W] = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        self.next_position = positions[:, -1:] + 1
        if past is None:
            self.step_ids, self.positions, self.start = input_ids, positions, 0
            self.mask = _padding_mask(attention_mask, W)
        else:  # the prompts' first L_b − 1 tokens are given: columns W − L_b .. W − 2 of row b
            pb, pt = self.keys_on[:, :W - 1].nonzero(as_tuple=True)
            if pb.numel() != past.shape[1] or not bool(self.keys_on[:, W - 1].all()):
                raise ValueError(f"Decoder: past holds {past.shape[1]} positions, the prompts but their last "
                                 f"tokens {pb.numel()} (prompts must be left-padded)")
            H = heads * dim
            for (keys, values), kv in zip(self.caches, past):
                keys[pb, :, pt] = kv[:, :H].view(-1, heads, dim)
                values[pb, :, pt] = kv[:, H:].view(-1, heads, dim)
            self.step_ids, self.positions, self.start = input_ids[:, -1:], positions[:, -1:], W - 1
            self.mask = self.keys_on[:, None, None, :W]

    def scores(self) -> Tensor:
        """The next token's logits, ``[B, V]`` float32, after the pending tokens."""
        t = self.model.transformer
        h = t.wte(self.step_ids) + t.wpe(self.positions)
        for layer, (block, cache) in enumerate(zip(t.h, self.caches)):
            h = _attend(block, h, cache, self.start, self.mask, last_only=layer == len(t.h) - 1)
        return self.model.lm_head(_norm(t.ln_f, h[:, -1])).float()

    def append(self, token: Tensor) -> None:
        """Take the tokens chosen for the pending step, ``[B]`` long."""
        self.start += self.step_ids.shape[1]
        self.step_ids, self.positions = token[:, None], self.next_position
        self.next_position = self.next_position + 1
        self.mask = self.keys_on[:, None, None, :self.start + 1]


@torch.no_grad()
def decode(model, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int, eos_id: int, pad_id: int,
           processors: Sequence[Callable[[Tensor, Tensor], Tensor]] = (), past: Tensor | None = None) -> Tensor:
    """``model.generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=False, eos_token_id=eos_id,
    pad_token_id=pad_id, logits_processor=processors)`` of an :func:`eligible` model, in eval mode.

    ``input_ids``, ``attention_mask`` [B, W], left-padded. Each step: the last position's logits in float32, every
    processor ``p(ids_so_far [B, W+t], scores [B, V]) → scores`` in order (all rows, finished ones too, as
    ``generate`` does, so processors that draw random numbers consume the same stream), argmax; a row that has
    produced ``eos_id`` gets ``pad_id`` afterwards; stops when every row has ended or after ``max_new_tokens``.
    Returns ``[B, W + n]`` (``n`` ≤ ``max_new_tokens`` steps run), like ``generate``. ``past``: the prompts' cached
    keys and values, as :class:`Decoder` takes them.
    """
    decoder = Decoder(model, input_ids, attention_mask, max_new_tokens, past)
    ids = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        scores = decoder.scores()
        for processor in processors:
            scores = processor(ids, scores)
        token = scores.argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad_id))
        ids = torch.cat([ids, token[:, None]], dim=1)
        unfinished &= token != eos_id
        if not bool(unfinished.any()):
            break
        decoder.append(token)
    return ids
