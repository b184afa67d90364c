"""``minillm``: MiniLLM's teacher-mixed student samples, with the reference batch for its language-model term.

Gu, Dong, Wei, Huang, MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024 (arXiv 2306.08543).
Read from microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3: ``minillm/minillm/sampler.py``
(``PPOSampler.run_sample``: responses sampled from the mixture of teacher and student, the importance weight
``w = q(y_t) / ((1 − α) q(y_t) + α p(y_t))`` from the current student's and the teacher's token probabilities),
``minillm/minillm/trainer.py`` (``generate``: ``mix_in_model = teacher``, ``mix_in_alpha = teacher_mixed_alpha``;
``train``: ``ppo_epochs`` shuffled passes over the rollout store, one optimizer step per mini-batch, rollout rows
and language-model rows in one forward; ``post_epoch_callback``: a fresh collection), ``minillm/arguments.py`` and
``scripts/gpt2/minillm/train_base_xl.sh`` (``--teacher-mixed-alpha 0.2``, ``--top-k 0 --top-p 1.0
--temperature 1.0``, ``--num-rollouts 256``, ``--ppo-epochs 4``). The loss is the objective ``minillm``
(:mod:`harness.objectives.minillm`), which reads what this mode attaches.
"""

from __future__ import annotations

import inspect
import time
from typing import Sequence

import torch

from .. import gpt2_fast
from ..data.batching import collate
from ..draw import categorical
from ..schema import ConfigError, Field
from .base import STREAM_GENERATE, ModeContext, draw_rng, require, torch_seed
from .registry import register_mode
from .sampling import SamplingSource, pack_rows, unpack_rows

# the shuffles of a rollout collection's store: the e-th permutation drawn from draw_rng(seed, c, STREAM_PPO)
# serves PPO epoch e of collection c (base.py's streams are 1-4, seq_kd's teacher stream 5)
STREAM_PPO = 6
_PER_TOKEN = ("student_logprobs", "teacher_logprobs", "mix_weight")


def _forward_keys(model) -> tuple[str, bool, bool]:
    """How ``model.forward`` takes its KV cache (``cache`` in recent transformers, ``past_key_values`` before),
    and whether it takes ``position_ids`` and ``logits_to_keep``."""
    try:
        names = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = set()
    return ("cache" if "cache" in names else "past_key_values"), "position_ids" in names, "logits_to_keep" in names


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _context(model) -> int | None:
    config = getattr(model, "config", None)
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


class _LibraryDecoder:
    """:class:`harness.gpt2_fast.Decoder`'s interface over a model's own ``forward`` with its KV cache (any causal
    LM): position ids from the attention mask where ``forward`` takes them, ``logits_to_keep=1`` where it can."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model, self.keys = model, _forward_keys(model)
        self.step_ids, self.attention_mask = input_ids, attention_mask
        self.positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        self.past = None

    def scores(self) -> torch.Tensor:
        cache_key, takes_pos, takes_keep = self.keys
        kwargs = {"input_ids": self.step_ids, "attention_mask": self.attention_mask, "use_cache": True}
        if self.past is not None:
            kwargs[cache_key] = self.past
        if takes_pos:
            kwargs["position_ids"] = self.positions
        if takes_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        self.past = _cache_of(out)
        return out.logits[:, -1, :].float()

    def append(self, token: torch.Tensor) -> None:
        B = token.shape[0]
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((B, 1))], dim=1)
        self.step_ids, self.positions = token[:, None], self.positions[:, -1:] + 1


def _decoder(model, input_ids, attention_mask, budget: int, prompts, prefix=None):
    """A one-step-at-a-time decoder of ``model`` over the left-padded ``prompts``: :class:`harness.gpt2_fast.Decoder`
    for a plain GPT-2 (from the prompts' cached keys and values when ``prefix``, a
    :class:`harness.teacher_prefix.PrefixCache`, is given), the model's own forward otherwise."""
    if not gpt2_fast.eligible(model):
        return _LibraryDecoder(model, input_ids, attention_mask)
    past = None if prefix is None else prefix.for_prompts(prompts, input_ids.device)
    return gpt2_fast.Decoder(model, input_ids, attention_mask, budget, past)


def mixed_sample_rows(student, teacher, prompts: Sequence[Sequence[int]], *, mix_alpha: float, eos_id: int,
                      pad_id: int, temperature: float, max_new_tokens: int | None, max_length: int,
                      seed: int, timings: dict | None = None, teacher_prefix=None) -> list[dict]:
    """Sample one response per prompt from the token-level mixture ``(1 − α)·q + α·p`` (q: student, p: teacher,
    both ``softmax(logits / temperature)``), batched, with a KV cache for each model; return rows.

    Prompts are left-padded (position ids from the attention mask, for the models whose ``forward`` takes them);
    the token budget and the prompt truncation are those of :func:`harness.modes.sampling.sample_rows` (the
    context is the smaller of the two models'). Both models run in eval mode under ``no_grad`` (their modes are
    restored); the draw (:func:`harness.draw.categorical`) uses a ``torch.Generator`` seeded with ``seed`` (the
    global RNG is untouched). Each row is ``prompt + sample cut after its first eos`` with ``prompt_len``,
    ``sample_len``, ``ended_with_eos`` and, per sampled token (length ``sample_len``): ``student_logprobs``
    (log q(y_t)), ``teacher_logprobs`` (log p(y_t)) and ``mix_weight`` = ``q(y_t) / ((1 − α) q(y_t) + α p(y_t))``,
    MiniLLM's importance weight of the token. A vocabulary narrower than the other model's is padded with
    zero-probability columns. ``timings``: a dict whose ``student_s`` / ``teacher_s`` get the seconds of each
    model's forwards added (synchronised on CUDA). A plain GPT-2 decodes through :class:`harness.gpt2_fast.Decoder`
    (the teacher from its cached prompts when ``teacher_prefix`` is given), any other model through its forward.
    """
    if not prompts:
        raise ValueError("mixed_sample_rows needs at least one prompt")
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"mix_alpha must be in [0, 1], got {mix_alpha}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
    cap = max_length
    for m in (student, teacher):
        if _context(m) is not None:
            cap = min(cap, _context(m))
    if cap < 2:
        raise ValueError(f"max_length {max_length} leaves no room for a sampled token")
    prompts = [list(p)[-(cap - 1):] for p in prompts]
    if min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    B, width = len(prompts), max(len(p) for p in prompts)
    budget = cap - width if max_new_tokens is None else min(int(max_new_tokens), cap - width)
    device = next(student.parameters()).device
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[b, width - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    models = (student, teacher)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) % (2**63))
    tokens, log_q_tok, log_p_tok = [], [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            decoders = [_decoder(student, ids, attn, budget, prompts),
                        _decoder(teacher, ids, attn, budget, prompts, teacher_prefix)]
            for step in range(budget):
                logps = []
                for k, decoder in enumerate(decoders):
                    start = time.perf_counter()
                    if step:
                        decoder.append(tok)
                    logits = decoder.scores()
                    if timings is not None:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        key = ("student_s", "teacher_s")[k]
                        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
                    logps.append(torch.log_softmax(logits / temperature, dim=-1))
                log_q, log_p = logps
                width_v = max(log_q.shape[-1], log_p.shape[-1])
                log_q, log_p = (torch.nn.functional.pad(x, (0, width_v - x.shape[-1]), value=float("-inf"))
                                for x in (log_q, log_p))
                mix = (1.0 - mix_alpha) * log_q.exp() + mix_alpha * log_p.exp()
                tok = categorical(mix, generator)
                tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
                tokens.append(tok)
                log_q_tok.append(log_q.gather(-1, tok[:, None]).squeeze(-1))
                log_p_tok.append(log_p.gather(-1, tok[:, None]).squeeze(-1))
                finished = finished | (tok == eos_id)
                if bool(finished.all()):
                    break
    finally:
        for m, was in zip(models, modes):
            m.train(was)
    toks = torch.stack(tokens, 1).cpu().tolist()
    lq = torch.stack(log_q_tok, 1).double().cpu()
    lp = torch.stack(log_p_tok, 1).double().cpu()
    w = (lq.exp() / ((1.0 - mix_alpha) * lq.exp() + mix_alpha * lp.exp())).tolist()
    lq, lp = lq.tolist(), lp.tolist()
    rows = []
    for b, (p, sample) in enumerate(zip(prompts, toks)):
        ended = eos_id in sample
        n = sample.index(eos_id) + 1 if ended else len(sample)
        rows.append({"input_ids": p + sample[:n], "prompt_len": len(p), "sample_len": n, "ended_with_eos": ended,
                     "student_logprobs": lq[b][:n], "teacher_logprobs": lp[b][:n], "mix_weight": w[b][:n]})
    return rows


@register_mode("minillm")
class MiniLLMSampling(SamplingSource):
    """MiniLLM (Gu et al., ICLR 2024): PPO over stores of teacher-mixed student samples, plus the reference rows.

    Rollouts are collected as the released trainer does: a store of ``num_rollouts`` responses (released
    ``--num-rollouts 256``), each sampled token by token from the mixture ``(1 − mix_alpha)·student +
    mix_alpha·teacher`` (released 0.2; KV cache for both models, eval mode, the suite's ``max_new_tokens``), is
    served ``ppo_epochs`` times (released ``--ppo-epochs 4``), each time in a new random order, B rows per
    micro-batch (B: the micro-batch size; ``num_rollouts`` must be a multiple of it). With N = num_rollouts / B
    and C = N · ppo_epochs, micro-batch i belongs to collection ``c = i // C``, PPO epoch ``e = (i mod C) // N``
    and slot ``k = i mod N``:

    * collection c is sampled when it is first needed, from the student of that moment: its m-th prompt batch
      (m = 0 … N − 1) is the prompts of ``ctx.reference(c·N + m)``, sampled with the torch seed
      ``torch_seed(seed, c·N + m, STREAM_GENERATE)``; the store is its N·B rows in that order;
    * PPO epoch e serves the store in the e-th permutation drawn from ``draw_rng(seed, c, STREAM_PPO)``; slot k
      holds the store rows at positions ``k·B … k·B + B − 1`` of that permutation, in store order (the order of
      rows inside a micro-batch does not change the loss), so every rollout is used once per epoch;
    * when ``reference_rows`` is true, the B reference rows of ``ctx.reference(i)`` follow, for MiniLLM's
      language-model term (the released code reads them from a separate pre-training corpus iterator).

    ``num_rollouts = B, ppo_epochs = 1`` gives a fresh collection per micro-batch: the responses of the prompts of
    ``reference(i)`` sampled with ``torch_seed(seed, i, STREAM_GENERATE)``. Only the current collection is kept;
    it travels in :meth:`state_dict`, so a run resumed inside a collection continues with the same rollouts.
    Each micro-batch carries:

    ``minillm_role`` [R]
        1 for sampled rows (the policy-gradient and per-step terms), 0 for reference rows (the LM term).
    ``mix_weight`` [R, T]
        at the label position of every sampled token, its importance weight
        ``q_old(y_t) / ((1 − α) q_old(y_t) + α p(y_t))`` (student and teacher at sampling time); 1 elsewhere.
    ``old_logprobs`` [R, T]
        at the same positions, ``log q_old(y_t)``: the student's log-probability at sampling time (the released
        store's ``logprobs``), from which the loss takes its rewards and its ratio; 0 elsewhere.

    ``mix_alpha = 0`` samples from the student alone (weights 1). Sampling is multinomial at ``temperature``
    without top-k/top-p filtering (the released ``--top-k 0 --top-p 1.0``). The released code's extra
    student-only sample per prompt (used only for logging its reverse KL) is not drawn.
    """

    generates_with_teacher = True
    params = {
        **SamplingSource.params,
        "mix_alpha": Field((float,), 0.2, ge=0, le=1, help="teacher share of the sampling mixture "
                                                          "(released --teacher-mixed-alpha 0.2)"),
        "reference_rows": Field((bool,), True, help="append the micro-batch's reference rows for the LM term "
                                                    "(false: sampled rows only, for lm_coef = 0)"),
        "num_rollouts": Field((int,), 256, ge=1, help="rollouts per collection, a multiple of the micro-batch size "
                                                      "(released --num-rollouts 256)"),
        "ppo_epochs": Field((int,), 4, ge=1, help="shuffled passes over each collection, one micro-batch of it per "
                                                  "micro-batch of training (released --ppo-epochs 4)"),
    }

    @classmethod
    def validate_params(cls, params: dict, where: str) -> None:
        require(params["top_k"] == 0 and params["top_p"] == 1.0, where,
                "mode_params.top_k/top_p: the teacher-mixed sampler draws from the full mixture; set top_k: 0 and "
                "top_p: 1.0 (the released --top-k 0 --top-p 1.0)")

    def __init__(self, ctx: ModeContext, *, mix_alpha: float, reference_rows: bool, num_rollouts: int,
                 ppo_epochs: int, **sampling):
        super().__init__(ctx, mix_alpha=mix_alpha, reference_rows=reference_rows, num_rollouts=num_rollouts,
                         ppo_epochs=ppo_epochs, **sampling)
        if ctx.teacher is None:
            raise ValueError(f"{self.name}: this mode samples from the teacher-student mixture and needs ctx.teacher "
                             "(the teacher model); harness.steps.distill passes it for modes with "
                             "generates_with_teacher")
        if self.top_k != 0 or self.top_p != 1.0:
            raise ValueError(f"{self.name}: top_k/top_p filtering is not supported (set top_k 0, top_p 1.0)")
        size = ctx.micro_batch_size()
        if int(ppo_epochs) < 1 or int(num_rollouts) < 1 or int(num_rollouts) % size:
            fix = max(size, int(num_rollouts) // size * size)
            key, value, hint = (("ppo_epochs", ppo_epochs, "is below 1; set it to 1 or more (released --ppo-epochs 4)")
                                if int(ppo_epochs) < 1 else
                                ("num_rollouts", num_rollouts, f"is not a positive multiple of the micro-batch size "
                                 f"{size}; set it to a multiple of {size} (e.g. {fix})"))
            raise ConfigError(f"training mode {self.name!r}: mode_params.{key} {value} {hint}")
        self.mix_alpha, self.reference_rows = float(mix_alpha), bool(reference_rows)
        self.num_rollouts, self.ppo_epochs = int(num_rollouts), int(ppo_epochs)
        self.per_epoch = self.num_rollouts // size                  # N: micro-batches per pass over a store
        self.per_collection = self.per_epoch * self.ppo_epochs      # C: micro-batches per collection
        self.collection: int | None = None                          # index c of the rows in self.store
        self.store: list[dict] = []
        self.weights = {"sum": 0.0, "min": None, "max": None}
        self.timings["teacher_generation_s"] = 0.0  # the teacher's forwards inside the mixed sampling

    def position(self, i: int) -> tuple[int, int, int]:
        """``(c, e, k)``: the collection, PPO epoch and slot of micro-batch ``i``."""
        c, rest = divmod(int(i), self.per_collection)
        e, k = divmod(rest, self.per_epoch)
        return c, e, k

    def store_rows(self, i: int) -> list[int]:
        """Positions in collection ``c``'s store of the rollouts micro-batch ``i`` trains on (ascending)."""
        c, e, k = self.position(i)
        rng = draw_rng(self.ctx.seed, c, STREAM_PPO)
        for _ in range(e + 1):
            order = rng.permutation(self.num_rollouts)
        size = self.num_rollouts // self.per_epoch
        return sorted(int(x) for x in order[k * size: (k + 1) * size])

    def _mixed_rows(self, batch: dict, i: int) -> list[dict]:
        ids, plen = batch["input_ids"], batch["prompt_len"]
        prompts = [ids[b, : int(plen[b])].tolist() for b in range(ids.shape[0])]
        start, split = time.perf_counter(), {}
        rows = mixed_sample_rows(self.ctx.student, self.ctx.teacher, prompts, mix_alpha=self.mix_alpha,
                                 eos_id=self.eos_id, pad_id=self.pad_id, temperature=self.temperature,
                                 max_new_tokens=self.ctx.max_new_tokens, max_length=self.ctx.max_length,
                                 seed=torch_seed(self.ctx.seed, i, STREAM_GENERATE), timings=split,
                                 teacher_prefix=self.ctx.teacher_prefix)
        self._time("generation_s", time.perf_counter() - start)
        self._time("teacher_generation_s", split.get("teacher_s", 0.0))
        self.sampled["samples"] += len(rows)
        self.sampled["tokens"] += sum(r["sample_len"] for r in rows)
        self.sampled["ended_with_eos"] += sum(r["ended_with_eos"] for r in rows)
        ws = [x for r in rows for x in r["mix_weight"]]
        if ws:
            self.weights["sum"] += sum(ws)
            self.weights["min"] = min(ws) if self.weights["min"] is None else min(self.weights["min"], min(ws))
            self.weights["max"] = max(ws) if self.weights["max"] is None else max(self.weights["max"], max(ws))
        example_ids = batch["example_ids"].tolist() if "example_ids" in batch else [-1] * len(rows)
        for row, j in zip(rows, example_ids):
            row["example_id"] = int(j)
        return rows

    def _collect(self, c: int) -> None:
        """Sample collection ``c`` into the store (replacing the previous one)."""
        rows = []
        for m in range(self.per_epoch):
            j = c * self.per_epoch + m
            rows += self._mixed_rows(self.ctx.reference(j), j)
        self.store, self.collection = rows, c

    def __call__(self, i: int) -> dict:
        c = self.position(i)[0]
        if self.collection != c:
            self._collect(c)
        sampled = [self.store[k] for k in self.store_rows(i)]
        reference = self.ctx.reference(i)
        rows = list(sampled)
        if self.reference_rows:
            lengths = reference["lengths"].tolist()
            rows += [{"input_ids": reference["input_ids"][b, : lengths[b]].tolist(),
                      "prompt_len": int(reference["prompt_len"][b])} for b in range(len(lengths))]
        batch = collate([{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows], self.pad_id)
        n_sampled = len(sampled)
        weight = torch.ones(batch["labels"].shape, dtype=torch.float32)
        old = torch.zeros(batch["labels"].shape, dtype=torch.float64)
        for b, row in enumerate(sampled):
            start = row["prompt_len"] - 1  # the label of position t is token t + 1
            weight[b, start: start + row["sample_len"]] = torch.tensor(row["mix_weight"], dtype=torch.float32)
            old[b, start: start + row["sample_len"]] = torch.tensor(row["student_logprobs"], dtype=torch.float64)
        batch["source"] = "generated"
        batch["minillm_role"] = torch.tensor([1] * n_sampled + [0] * (len(rows) - n_sampled))
        batch["mix_weight"] = weight
        batch["old_logprobs"] = old
        if "example_ids" in reference:
            sampled_ids = torch.tensor([r["example_id"] for r in sampled], dtype=torch.long)
            batch["prompt_example_ids"] = (torch.cat([sampled_ids, reference["example_ids"]])
                                           if self.reference_rows else sampled_ids)
            if self.reference_rows:  # the reference rows, token for token: a teacher cache may serve them
                batch["cached_rows"] = torch.arange(n_sampled, len(rows))
                batch["cached_example_ids"] = reference["example_ids"].clone()
        self.counts["generated"] += 1
        return batch

    @property
    def stats(self) -> dict:
        out = super().stats
        seconds, tokens = self.timings["generation_s"], self.sampled["tokens"]
        out["generation"] = {
            "mixed_generation_s": round(seconds, 4),
            "teacher_generation_s": round(self.timings["teacher_generation_s"], 4),  # part of mixed_generation_s
            "student_generated_tokens": tokens,  # tokens of the responses collected (drawn from the mixture)
            "student_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "mix_alpha": self.mix_alpha,
        }
        out["mix_weight"] = {"mean": round(self.weights["sum"] / tokens, 6) if tokens else None,
                             "min": self.weights["min"], "max": self.weights["max"]}
        out["ppo"] = {"num_rollouts": self.num_rollouts, "ppo_epochs": self.ppo_epochs,
                      "collections": 0 if self.collection is None else self.collection + 1}
        return out

    def state_dict(self) -> dict:
        store = None if self.collection is None else pack_rows(self.store, _PER_TOKEN)
        return {**super().state_dict(), "weights": dict(self.weights), "collection": self.collection,
                "store": store}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.weights.update(state["weights"])
        self.collection, packed = state.get("collection"), state.get("store")
        self.store = [] if packed is None else unpack_rows(packed, _PER_TOKEN)
        if packed is None:
            self.collection = None
