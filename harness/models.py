"""Teacher and student models: tiny architectures built from ``transformers`` configs, or real checkpoints.

A model entry of a suite config is either
- ``{arch: gpt2 | llama, n_layer, n_embd, n_head, ...}``: a tiny model the harness builds itself, or
- ``{path: <local dir>}`` or ``{hub: <hub id>}``: an existing causal LM (the local path wins; the hub id
  needs a network).
Everything is saved with ``save_pretrained`` so any Hugging Face tool (and lm-eval) loads it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

ARCHS = ("gpt2", "llama")


class ModelError(ValueError):
    """A model entry that cannot be built or loaded, or a teacher/student pair that cannot be distilled."""


def build_tiny(spec: dict, vocab_size: int, seed: int, max_positions: int, special_ids: dict):
    """Build a randomly initialised causal LM from a tiny architecture spec (deterministic in ``seed``).

    GPT-2: no dropout, and the exact (erf) GELU (``activation_function="gelu"``) instead of GPT-2's tanh
    approximation (``gelu_new``; the two differ by < 1e-3): these models are trained from scratch here, and on a
    CPU torch's erf GELU is cheaper than its tanh one (measured on torch 2.13 with AVX-512, 960 × 256: forward
    95–160 against 400 µs, backward 260 against 450 µs; about a tenth of a tiny training step). Checkpoints
    loaded by path or hub id keep their own activation."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    arch = spec.get("arch", "gpt2")
    n_layer, n_embd, n_head = int(spec["n_layer"]), int(spec["n_embd"]), int(spec["n_head"])
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu", **special_ids,
        )
        return GPT2LMHeadModel(config)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=int(spec.get("intermediate", 4 * n_embd)),
            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
            max_position_embeddings=max_positions, tie_word_embeddings=True, **special_ids,
        )
        return LlamaForCausalLM(config)
    raise ModelError(f"unknown arch {arch!r}; accepted: {', '.join(ARCHS)}")


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU that supports it (fp16 otherwise), fp32 on a CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(requested: str | None = "auto") -> str:
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_model(path_or_id: str | Path, *, device: str = "cpu", dtype: str | torch.dtype | None = "auto"):
    """Load a causal LM from a local directory (preferred) or a hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    if dtype in (None, "auto"):
        dtype = default_dtype(device)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=dtype)
    except OSError as exc:
        raise ModelError(
            f"cannot load model {str(path_or_id)!r}: {exc}. Give a local directory (path:) when offline."
        ) from exc
    return model.to(device).eval()


def check_same_tokenizer(teacher_tok, student_tok, teacher_name: str = "teacher", student_name: str = "student"):
    """Refuse a teacher/student pair whose tokenizers differ (cross-tokenizer distillation is not supported).

    The tokenizers may differ only in padded vocabulary rows: every token the smaller one knows must map to
    the same id in the larger one.
    """
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    small, large = (tv, sv) if len(tv) <= len(sv) else (sv, tv)
    mismatched = [tok for tok, idx in small.items() if large.get(tok) != idx]
    if mismatched:
        raise ModelError(
            f"{teacher_name} and {student_name} use different tokenizers ({len(mismatched)} of {len(small)} tokens "
            f"differ, e.g. {mismatched[:3]}); token-level objectives need one vocabulary. For a student with its own "
            "tokenizer, declare it in the suite (student.tokenizer) and use a cross-tokenizer objective (uld, "
            "recipes/uld.yaml); otherwise use a student that shares the teacher's tokenizer."
        )


def align_vocab(student_logits: Tensor, teacher_logits: Tensor, n_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """Give both logits the same vocabulary width, with padded rows masked as ``-inf``.

    Real pairs that share a tokenizer can differ in the number of (padded) rows of their embedding
    matrices (e.g. Qwen 151,936 vs 152,064). Columns at or beyond ``n_tokens`` (the tokenizer's length) are
    set to ``-inf`` in both, and the narrower tensor is padded with ``-inf`` columns; these columns get
    probability exactly 0 on both sides and contribute nothing to any objective.
    """
    width = max(student_logits.shape[-1], teacher_logits.shape[-1])
    if n_tokens is None:
        n_tokens = min(student_logits.shape[-1], teacher_logits.shape[-1])

    def fix(x: Tensor) -> Tensor:
        if x.shape[-1] < width:
            x = torch.cat([x, x.new_full((*x.shape[:-1], width - x.shape[-1]), float("-inf"))], dim=-1)
        if n_tokens < width:
            x = x.masked_fill(torch.arange(width, device=x.device) >= n_tokens, float("-inf"))
        return x

    if student_logits.shape[-1] == teacher_logits.shape[-1] == n_tokens:
        return student_logits, teacher_logits
    return fix(student_logits), fix(teacher_logits)


#: model types whose logits are exactly ``get_output_embeddings()(base_model(...)[0])``: nothing after the head
#: (no soft-capping, no logit scaling), so :func:`counted_logits` may apply the head to some positions only
HEAD_ONLY_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def counted_logits(model, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, past=None) -> Tensor:
    """A causal LM's logits ``[B, T, V]`` with the output layer applied only where ``mask > 0``; 0 elsewhere.

    ``input_ids``, ``attention_mask``, ``mask`` [B, T] (``mask``: the batch's ``loss_mask``, the positions any
    loss reads). The transformer body runs on every position as in ``model(...)``; the head (``lm_head``, a
    ``V × H`` matmul, a quarter of a tiny student's forward and most of a large-vocabulary model's logits
    memory traffic) only on the counted rows, whose logits equal ``model(...).logits`` there up to the
    round-off of a matmul of another shape. Every objective reads counted positions only (cached teacher
    rows are 0 outside the mask likewise, :mod:`harness.teacher_cache`). Gradients flow through the counted
    rows. A model that is not a plain Hugging Face causal LM of :data:`HEAD_ONLY_TYPES` (a DDP/FSDP wrapper,
    an architecture with a soft-capped head, ...) gets the full ``model(...).logits``. ``past``: cached keys and
    values of each row's first positions, for a plain GPT-2 (:func:`harness.gpt2_fast.counted_hidden_states`).
    """
    if not _head_only(model, input_ids, mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    rows = mask > 0
    counted = _head_rows(model, input_ids, attention_mask, rows, past)
    out = counted.new_zeros((*input_ids.shape, counted.shape[-1]))
    out[rows] = counted
    return out


def counted_rows(model, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, past=None) -> Tensor:
    """The logits of the counted positions only, ``[N, V]`` in row-major order of ``mask > 0`` (N counted
    positions): the head on those rows for a model of :data:`HEAD_ONLY_TYPES` (see :func:`counted_logits`), the
    full forward's rows for any other model. ``past`` as in :func:`counted_logits`."""
    rows = mask > 0
    if not _head_only(model, input_ids, mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[rows]
    return _head_rows(model, input_ids, attention_mask, rows, past)


def _head_only(model, input_ids: Tensor, mask: Tensor) -> bool:
    """Whether ``model``'s logits are its output layer applied to its body's hidden states, nothing after."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        return False
    return (getattr(model.config, "model_type", None) in HEAD_ONLY_TYPES and model.base_model is not model
            and mask.shape == input_ids.shape)


def body(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The last hidden states ``[B, T, H]`` of a causal LM of :data:`HEAD_ONLY_TYPES` (before its head):
    :func:`harness.gpt2_fast.hidden_states` for a plain GPT-2 (same values, without the library's per-call
    overhead), ``model.base_model(...)[0]`` for any other."""
    from . import gpt2_fast

    if gpt2_fast.eligible(model):
        return gpt2_fast.hidden_states(model, input_ids, attention_mask)
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]


def full_logits(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``model(input_ids=..., attention_mask=...).logits`` ``[B, T, V]``; a plain GPT-2 through
    :func:`harness.gpt2_fast.hidden_states` (equal up to round-off)."""
    from . import gpt2_fast

    if gpt2_fast.eligible(model):
        return model.lm_head(gpt2_fast.hidden_states(model, input_ids, attention_mask))
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def _head_rows(model, input_ids: Tensor, attention_mask: Tensor, rows: Tensor, past=None) -> Tensor:
    """The head on the hidden states of ``rows`` (bool [B, T]) only, ``[N, V]``; a plain GPT-2's body computes only
    what those rows depend on (:func:`harness.gpt2_fast.counted_hidden_states`, given ``past`` if any)."""
    from . import gpt2_fast

    if gpt2_fast.eligible(model):
        hidden = gpt2_fast.counted_hidden_states(model, input_ids, attention_mask, rows, past)
    else:
        hidden = body(model, input_ids, attention_mask)[rows]
    return model.get_output_embeddings()(hidden)
