"""lm-evaluation-harness over local JSONL items, fully offline.

The repository ships task *templates* in ``harness/evaluation/lm_eval_tasks/``:

* ``distillbench_mc.yaml`` — ``multiple_choice`` (loglikelihood of each choice right after the prompt;
  ``acc``, ``acc_norm``) over items with ``prompt``, ``choices`` (list[str]) and ``label`` (int);
* ``distillbench_gen.yaml`` — ``generate_until`` (greedy, ``until: ["<|endoftext|>", "\\n\\n"]``,
  32 new tokens; ``exact_match`` ignoring case, punctuation and surrounding whitespace, any of the
  item's ``answers`` counts) over items with ``prompt`` and ``answers`` (or ``output``).

:func:`write_task_configs` fills a template per task (task name, absolute data path) into a directory;
:func:`run_lm_eval` does that in a temporary include dir and runs lm-eval's ``evaluate`` on an
in-memory model (what ``simple_evaluate`` does, without its environment report; the built tasks are
reused across calls in one process). The equivalent command line, after ``write_task_configs({...}, "<tasks_dir>")``::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=<model_dir>,dtype=float32 --device cpu --batch_size 16 \\
        --include_path <tasks_dir> --tasks <task_a>,<task_b>

Standard tasks (``hellaswag``, ``arc_easy``, ``lambada_openai`` ...) need their Hub datasets, i.e. a
networked machine (or a pre-filled HF datasets cache); pass them as ``standard_tasks``.

No truncation: lm-eval's ``generate_until`` keeps only the last ``max_length − max_gen_toks`` tokens of a
prompt (``HFLM.max_length`` is the model's context, 48 tokens for the tiny suite's student, so the
template's 32 new tokens left 16 prompt tokens and cut the question off). :func:`run_lm_eval` therefore
fits each generation task's ``max_gen_toks`` to the model's context and the task's longest prompt
(:func:`fit_max_gen_toks`), passes the context to ``HFLM(max_length=...)`` explicitly, and refuses a task
whose prompts leave no room to generate; multiple-choice items longer than the context (prompt + choice)
are logged as truncated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

TEMPLATE_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TEMPLATES = {"mc": "distillbench_mc.yaml", "gen": "distillbench_gen.yaml"}

__all__ = [
    "TEMPLATE_DIR",
    "TEMPLATES",
    "load_template",
    "infer_task_kind",
    "mc_items_from_answers",
    "task_config",
    "write_task_configs",
    "fit_max_gen_toks",
    "flatten_results",
    "model_context_length",
    "run_lm_eval",
]

log = logging.getLogger(__name__)

TaskSpec = str | Path | Mapping[str, Any]  # a jsonl path, or {"path": ..., "kind": "mc" | "gen", "max_gen_toks": n}


def load_template(kind: str) -> dict[str, Any]:
    """The shipped YAML template of ``kind`` ("mc" or "gen") as a dict."""
    if kind not in TEMPLATES:
        raise ValueError(f"unknown lm-eval task kind {kind!r}; expected one of {sorted(TEMPLATES)}")
    return yaml.safe_load((TEMPLATE_DIR / TEMPLATES[kind]).read_text(encoding="utf-8"))


def _read_records(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def infer_task_kind(records: Iterable[Mapping[str, Any]]) -> str:
    """"mc" when every record has ``choices`` and an integer ``label``, else "gen"."""
    records = list(records)
    if records and all(
        isinstance(r.get("choices"), list) and isinstance(r.get("label"), int) for r in records
    ):
        return "mc"
    return "gen"


def mc_items_from_answers(
    items: Iterable[Mapping[str, Any]], *, n_choices: int = 4, seed: int = 0, group_key: str = "task"
) -> list[dict[str, Any]]:
    """Multiple-choice items built from one-answer generation items, for skills a small student can learn
    (arithmetic, list tasks) rather than memorised facts.

    For each item whose acceptable answers (``answers``, else ``output``) reduce to one string, the choices
    are that answer and ``n_choices − 1`` distractors: answers of *other* items of the same family
    (``group_key``), never one of the item's own acceptable answers, drawn with ``random.Random`` seeded by
    ``(seed, item id or position)`` and shuffled the same way — deterministic. Items of a family with too
    few distinct answers, and several-answer items (a distractor could be correct), are skipped. Returns
    copies with ``choices`` and ``label`` (gold index) added; chance accuracy is ``1 / n_choices``.
    """
    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}")
    items = [dict(it) for it in items]

    def answers_of(it: Mapping[str, Any]) -> list[str]:
        a = it.get("answers")
        if a is None:
            a = it.get("output")
        return [a] if isinstance(a, str) else [str(x) for x in (a or [])]

    pools: dict[Any, list[str]] = {}
    for it in items:
        ans = answers_of(it)
        if len(set(ans)) == 1:
            pools.setdefault(it.get(group_key), [])
            if ans[0] not in pools[it.get(group_key)]:
                pools[it.get(group_key)].append(ans[0])
    out = []
    for i, it in enumerate(items):
        ans = answers_of(it)
        if len(set(ans)) != 1:
            continue
        gold = ans[0]
        pool = sorted(a for a in pools.get(it.get(group_key), []) if a not in set(ans))
        if len(pool) < n_choices - 1:
            continue
        rng = random.Random(f"{seed}:{it.get('id', i)}")
        options = rng.sample(pool, n_choices - 1) + [gold]
        rng.shuffle(options)
        out.append({**it, "choices": options, "label": options.index(gold)})
    return out


def task_config(
    name: str, data_path: str | Path, kind: str | None = None, max_gen_toks: int | None = None
) -> dict[str, Any]:
    """A filled-in lm-eval task config: the template of ``kind`` (inferred from the data when None)
    with ``task = name`` and the absolute ``data_path`` as its ``test`` split; ``max_gen_toks`` (gen tasks)
    replaces the template's generation length."""
    path = Path(data_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    records = _read_records(path)
    if not records:
        raise ValueError(f"{path} holds no record")
    kind = kind or infer_task_kind(records)
    cfg = copy.deepcopy(load_template(kind))
    cfg["task"] = name
    cfg["dataset_kwargs"]["data_files"]["test"] = str(path)
    if kind == "gen" and "answers" not in records[0]:
        cfg["doc_to_target"] = "output"
    if kind == "gen" and max_gen_toks is not None:
        if int(max_gen_toks) < 1:
            raise ValueError(f"lm-eval task {name}: max_gen_toks must be >= 1, got {max_gen_toks}")
        cfg["generation_kwargs"]["max_gen_toks"] = int(max_gen_toks)
    return cfg


def _spec(spec: TaskSpec) -> tuple[Path, str | None]:
    if isinstance(spec, Mapping):
        return Path(spec["path"]), spec.get("kind")
    return Path(spec), None


def model_context_length(model) -> int | None:
    """The model's context in tokens (``n_positions`` / ``max_position_embeddings``), or None."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _n_tokens(tokenizer, texts: list[str]) -> list[int]:
    """The token count of each text (no special tokens), in one batched tokenizer call."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def fit_max_gen_toks(name: str, records: Iterable[Mapping[str, Any]], tokenizer, context: int,
                     requested: int) -> int:
    """``min(requested, context − longest prompt)``: the most new tokens a ``generate_until`` task may ask
    for without lm-eval cutting any prompt. Raises ``ValueError`` (naming the task) when the longest
    prompt leaves no room."""
    longest = max(_n_tokens(tokenizer, [str(r["prompt"]) for r in records]), default=0)
    room = context - longest
    if room < 1:
        raise ValueError(f"lm-eval task {name}: its longest prompt has {longest} tokens and the model's context is "
                         f"{context}: no room to generate; shorten the task's prompts")
    return min(int(requested), room)


#: fitted task entries per tokenizer (weakly keyed), by the tasks, the context and each data file's content
_FITTED: "weakref.WeakKeyDictionary[Any, dict[str, dict[str, dict[str, Any]]]]" = weakref.WeakKeyDictionary()


def _fit_tasks(task_data: Mapping[str, TaskSpec], tokenizer, context: int | None) -> dict[str, dict[str, Any]]:
    """Each task as ``{"path", "kind", "max_gen_toks"}`` with generation lengths fitted to ``context``; computed
    once per tokenizer, tasks, context and data files (their SHA-256), then reused."""
    files = {str(path): hashlib.sha256(path.expanduser().resolve().read_bytes()).hexdigest()
             for path in (_spec(spec)[0] for spec in task_data.values())}
    key = json.dumps([{k: v if isinstance(v, Mapping) else str(v) for k, v in task_data.items()}, context, files],
                     sort_keys=True, default=str)
    memo = _FITTED.setdefault(tokenizer, {})
    if key not in memo:
        memo[key] = _fit_tasks_uncached(task_data, tokenizer, context)
    return copy.deepcopy(memo[key])


def _fit_tasks_uncached(task_data: Mapping[str, TaskSpec], tokenizer, context: int | None) -> dict[str, dict[str, Any]]:
    fitted: dict[str, dict[str, Any]] = {}
    for name, spec in task_data.items():
        path, kind = _spec(spec)
        records = _read_records(path.expanduser().resolve())
        kind = kind or infer_task_kind(records)
        requested = spec.get("max_gen_toks") if isinstance(spec, Mapping) else None
        if requested is None and kind == "gen":
            requested = load_template("gen")["generation_kwargs"]["max_gen_toks"]
        entry: dict[str, Any] = {"path": str(path), "kind": kind, "max_gen_toks": requested}
        if context is not None and kind == "gen":
            entry["max_gen_toks"] = fit_max_gen_toks(name, records, tokenizer, context, requested)
        elif context is not None and kind == "mc":
            lengths = iter(_n_tokens(tokenizer, [str(r["prompt"]) + str(c) for r in records for c in r["choices"]]))
            too_long = sum(1 for r in records if max([next(lengths) for _ in r["choices"]], default=0) > context)
            if too_long:
                log.warning("lm-eval task %s: %d item(s) longer than the model's context (%d tokens) are "
                            "truncated from the left", name, too_long, context)
        fitted[name] = entry
    return fitted


def write_task_configs(task_data: Mapping[str, TaskSpec], out_dir: str | Path) -> list[Path]:
    """Write one ``<task>.yaml`` per entry of ``task_data`` (name -> jsonl path or ``{"path", "kind"}``)
    into ``out_dir`` (an lm-eval ``--include_path``); returns the written files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in task_data.items():
        path, kind = _spec(spec)
        gen_toks = spec.get("max_gen_toks") if isinstance(spec, Mapping) else None
        target = out / f"{name}.yaml"
        target.write_text(yaml.safe_dump(task_config(name, path, kind, gen_toks), sort_keys=False), encoding="utf-8")
        written.append(target)
    return written


def flatten_results(results: Mapping[str, Mapping[str, Any]], prefix: str = "lm_eval") -> dict[str, float]:
    """``{"<task>": {"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}}`` →
    ``{"lm_eval/<task>/acc": 0.5}``. Only finite numbers are kept; a non-"none" filter is appended
    to the metric name (``exact_match_<filter>``)."""
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat


#: built lm-eval task dicts by their configs (see :func:`_load_tasks`); the last few only
_TASK_CACHE: OrderedDict[str, dict[str, Any]] = OrderedDict()
_TASK_CACHE_SIZE = 4


def _tasks_key(fitted: Mapping[str, Mapping[str, Any]], standard_tasks: list[str]) -> str:
    """What a built task dict depends on: the fitted task entries, each data file's content (SHA-256), and
    the standard task names."""
    files = {entry["path"]: hashlib.sha256(Path(entry["path"]).expanduser().resolve().read_bytes()).hexdigest()
             for entry in fitted.values()}
    return json.dumps([fitted, files, standard_tasks], sort_keys=True, default=str)


def _load_tasks(fitted: Mapping[str, Mapping[str, Any]], standard_tasks: list[str]) -> dict[str, Any]:
    """``TaskManager.load`` of the fitted local tasks (written to a temporary include dir) and the
    standard tasks, built once per process and reused (task building reads and indexes each dataset:
    ~60 ms a call for the tiny suite; one evaluate job scores several models on the same tasks).

    Reuse is safe with lm-eval 0.4.13: ``evaluate`` rebuilds each task's requests
    (``build_all_requests`` resets its instances) and :func:`run_lm_eval` re-seeds the few-shot sampler
    before each use; the records of the tiny suite are identical with and without the cache."""
    from lm_eval.tasks import TaskManager

    key = _tasks_key(fitted, standard_tasks)
    if key in _TASK_CACHE:
        _TASK_CACHE.move_to_end(key)
        return _TASK_CACHE[key]
    with tempfile.TemporaryDirectory(prefix="distillbench_lm_eval_") as include_dir:
        write_task_configs(fitted, include_dir)
        task_manager = TaskManager(include_path=include_dir if fitted else None,
                                   include_defaults=bool(standard_tasks))
        loaded = task_manager.load(list(fitted) + list(standard_tasks))
    _TASK_CACHE[key] = loaded
    while len(_TASK_CACHE) > _TASK_CACHE_SIZE:
        _TASK_CACHE.popitem(last=False)
    return loaded


@lru_cache(maxsize=1)
def _fast_path() -> bool:
    """Whether the installed lm-eval is one :func:`_evaluate_cached_tasks` was checked against (>= 0.4.13:
    ``TaskManager.load`` and that ``simple_evaluate``); older ones go through ``simple_evaluate``."""
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("lm_eval")) >= Version("0.4.13")


def _simple_evaluate(lm, fitted: Mapping[str, Mapping[str, Any]], standard_tasks: list[str], *,
                     limit, seed: int) -> dict[str, Any] | None:
    """lm-eval's ``simple_evaluate`` on the fitted local tasks (a fresh temporary include dir) and the
    standard tasks: builds the tasks and reports the environment on every call."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="distillbench_lm_eval_") as include_dir:
        write_task_configs(fitted, include_dir)
        task_manager = TaskManager(include_path=include_dir if fitted else None,
                                   include_defaults=bool(standard_tasks))
        return lm_eval.simple_evaluate(
            model=lm, tasks=list(fitted) + list(standard_tasks), task_manager=task_manager, limit=limit,
            log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)


def _evaluate_cached_tasks(lm, fitted: Mapping[str, Mapping[str, Any]], standard_tasks: list[str], *,
                           limit, seed: int) -> dict[str, Any] | None:
    """What :func:`_simple_evaluate` computes, the same numbers, less what only feeds ``simple_evaluate``'s
    result metadata (``add_env_info`` runs torch's ``collect_env``: ~0.25 s a call) and with the tasks built
    once per process (:func:`_load_tasks`). The steps of lm-eval 0.4.13 ``simple_evaluate`` for these
    arguments: seed python / numpy / torch, load the tasks, default ``num_fewshot`` to 0, seed the few-shot
    sampler, ``evaluate`` with ``simple_evaluate``'s defaults."""
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import set_torch_seed

    random.seed(seed)
    np.random.seed(seed)
    set_torch_seed(seed)
    loaded = _load_tasks(fitted, standard_tasks)
    for task_obj in loaded["tasks"].values():
        if task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=seed)
    return evaluate(
        lm=lm, task_dict=loaded, limit=limit, samples=None, cache_requests=False,
        rewrite_requests_cache=False, bootstrap_iters=0, write_out=False, log_samples=False,
        system_instruction=None, apply_chat_template=False, fewshot_as_multiturn=True, verbosity=None,
        confirm_run_unsafe_code=False)


#: token ids of the strings an lm-eval model wrapper encoded, per tokenizer (weakly keyed: gone with the tokenizer).
#: One evaluate job scores several students with one tokenizer on the same requests: each string is encoded once.
_ENCODED: "weakref.WeakKeyDictionary[Any, dict[tuple, tuple[int, ...]]]" = weakref.WeakKeyDictionary()


@lru_cache(maxsize=1)
def _hflm_class():
    """lm-eval's ``HFLM`` with three shortcuts that change no number lm-eval reports (imported lazily: lm-eval
    is heavy):

    - ``tok_encode`` is memoised per tokenizer (:data:`_ENCODED`): ``tokenizer.encode`` of a string with the same
      special-token settings gives the same ids every time.
    - ``_model_call`` of a plain GPT-2 (:func:`harness.gpt2_fast.eligible`) runs :func:`harness.gpt2_fast.hidden_states`
      and the head: ``model(inps).logits`` without the library's per-call overhead (equal up to float round-off).
    - ``_model_generate`` of a plain GPT-2 whose ``generation_config`` adds nothing, asked for greedy decoding,
      runs :func:`harness.gpt2_fast.decode` (``generate``'s greedy loop: same eos and padding) to ``max_length``
      without lm-eval's stop-sequence criteria. Those criteria only end a batch early once every row has produced
      a stop sequence; ``generate_until`` cuts each decoded row at its first stop sequence anyway, and greedy
      tokens do not depend on how far decoding goes, so the returned strings are the same.

    Anything else (sampling, mixed precision, another architecture, seq2seq) goes through ``HFLM`` unchanged.
    """
    from lm_eval.models.huggingface import HFLM

    from .. import gpt2_fast

    class FastHFLM(HFLM):
        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs) -> list[int]:
            if kwargs:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            memo = _ENCODED.setdefault(self.tokenizer, {})
            key = (string, add_special_tokens, left_truncate_len, self.add_bos_token, self.prefix_token_id)
            if key not in memo:
                memo[key] = tuple(super().tok_encode(string, add_special_tokens, left_truncate_len))
            return list(memo[key])

        def _fast(self) -> bool:
            return (self.backend == "causal" and self.mixed_precision_dtype is None
                    and gpt2_fast.eligible(self.model))

        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None or not self._fast():
                return super()._model_call(inps, attn_mask, labels)
            with torch.no_grad():
                return self.model.lm_head(gpt2_fast.hidden_states(self.model, inps))

        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            kwargs = dict(generation_kwargs)
            attention_mask = kwargs.pop("attention_mask", None)
            do_sample, temperature = kwargs.pop("do_sample", None), kwargs.pop("temperature", 0.0)
            greedy = do_sample is False or (do_sample is None and temperature == 0.0)
            config = self.model.generation_config
            eos, pad = getattr(config, "eos_token_id", None), self.tokenizer.pad_token_id
            if (kwargs or not greedy or attention_mask is None or not self._fast()
                    or not gpt2_fast.plain_generation_config(self.model)
                    or not isinstance(eos, int) or not isinstance(pad, int)):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            return gpt2_fast.decode(self.model, context, attention_mask, max_new_tokens=max_length - context.shape[1],
                                    eos_id=eos, pad_id=pad)

    return FastHFLM


def run_lm_eval(
    model,
    tokenizer,
    task_data: Mapping[str, TaskSpec],
    *,
    standard_tasks: Iterable[str] = (),
    limit: int | float | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    seed: int = 1234,
) -> dict[str, float]:
    """Run lm-eval on an in-memory HF model over local JSONL tasks (+ optional standard tasks).

    Args:
        model: a HF causal LM (``PreTrainedModel``), wrapped in ``HFLM(pretrained=model, ...)``.
        tokenizer: its tokenizer.
        task_data: task name -> jsonl path (kind inferred: "mc" if every item has ``choices`` and
            ``label``, else "gen") or ``{"path": ..., "kind": "mc" | "gen", "max_gen_toks": n}``; a gen
            task's generation length is cut to fit the model's context (no prompt is truncated).
        standard_tasks: built-in lm-eval task names; only then are the built-in task configs indexed
            (their datasets come from the Hub: networked machines only).
        limit: at most this many documents per task (a fraction when < 1).
        batch_size, device: passed to ``HFLM``.
        seed: lm-eval's python / numpy / torch / few-shot seed; the caller's RNG states are restored.

    Returns:
        ``{"lm_eval/<task>/<metric>": value}`` (e.g. ``acc``, ``acc_norm`` in [0, 1] for "mc",
        ``exact_match`` in [0, 1] for "gen").
    """
    standard_tasks = list(standard_tasks)
    names = list(task_data) + standard_tasks
    if not names:
        raise ValueError("no lm-eval task requested")
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = torch.device(device).type == "cuda"
    context = model_context_length(model)
    fitted = _fit_tasks(task_data, tokenizer, context)
    extra = {"max_length": context} if context is not None else {}
    lm = _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, **extra)
    try:
        with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
            if _fast_path():
                out = _evaluate_cached_tasks(lm, fitted, standard_tasks, limit=limit, seed=seed)
            else:
                out = _simple_evaluate(lm, fitted, standard_tasks, limit=limit, seed=seed)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    if out is None:  # non-zero rank
        return {}
    return flatten_results(out["results"])
