"""lm-evaluation-harness over local JSONL items, fully offline.

The repository ships task *templates* in ``harness/evaluation/lm_eval_tasks/``:

* ``distillbench_mc.yaml`` — ``multiple_choice`` (loglikelihood of each choice right after the prompt;
  ``acc``, ``acc_norm``) over items with ``prompt``, ``choices`` (list[str]) and ``label`` (int);
* ``distillbench_gen.yaml`` — ``generate_until`` (greedy, ``until: ["<|endoftext|>", "\\n\\n"]``,
  32 new tokens; ``exact_match`` ignoring case, punctuation and surrounding whitespace, any of the
  item's ``answers`` counts) over items with ``prompt`` and ``answers`` (or ``output``).

:func:`write_task_configs` fills a template per task (task name, absolute data path) into a directory;
:func:`run_lm_eval` does that in a temporary include dir and runs ``lm_eval.simple_evaluate`` on an
in-memory model. The equivalent command line, after ``write_task_configs({...}, "<tasks_dir>")``::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=<model_dir>,dtype=float32 --device cpu --batch_size 16 \\
        --include_path <tasks_dir> --tasks <task_a>,<task_b>

Standard tasks (``hellaswag``, ``arc_easy``, ``lambada_openai`` ...) need their Hub datasets, i.e. a
networked machine (or a pre-filled HF datasets cache); pass them as ``standard_tasks``.
"""

from __future__ import annotations

import copy
import json
import math
import random
import tempfile
from collections.abc import Iterable, Mapping
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
    "task_config",
    "write_task_configs",
    "flatten_results",
    "run_lm_eval",
]

TaskSpec = str | Path | Mapping[str, Any]  # a jsonl path, or {"path": ..., "kind": "mc" | "gen"}


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


def task_config(name: str, data_path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """A filled-in lm-eval task config: the template of ``kind`` (inferred from the data when None)
    with ``task = name`` and the absolute ``data_path`` as its ``test`` split."""
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
    return cfg


def _spec(spec: TaskSpec) -> tuple[Path, str | None]:
    if isinstance(spec, Mapping):
        return Path(spec["path"]), spec.get("kind")
    return Path(spec), None


def write_task_configs(task_data: Mapping[str, TaskSpec], out_dir: str | Path) -> list[Path]:
    """Write one ``<task>.yaml`` per entry of ``task_data`` (name -> jsonl path or ``{"path", "kind"}``)
    into ``out_dir`` (an lm-eval ``--include_path``); returns the written files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in task_data.items():
        path, kind = _spec(spec)
        target = out / f"{name}.yaml"
        target.write_text(yaml.safe_dump(task_config(name, path, kind), sort_keys=False), encoding="utf-8")
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
            ``label``, else "gen") or ``{"path": ..., "kind": "mc" | "gen"}``.
        standard_tasks: built-in lm-eval task names; only then are the built-in task configs indexed
            (their datasets come from the Hub: networked machines only).
        limit: at most this many documents per task (a fraction when < 1).
        batch_size, device: passed to ``HFLM``.
        seed: lm-eval's python / numpy / torch / few-shot seed; the caller's RNG states are restored.

    Returns:
        ``{"lm_eval/<task>/<metric>": value}`` (e.g. ``acc``, ``acc_norm`` in [0, 1] for "mc",
        ``exact_match`` in [0, 1] for "gen").
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    standard_tasks = list(standard_tasks)
    names = list(task_data) + standard_tasks
    if not names:
        raise ValueError("no lm-eval task requested")
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = torch.device(device).type == "cuda"
    with tempfile.TemporaryDirectory(prefix="distillbench_lm_eval_") as include_dir:
        write_task_configs(task_data, include_dir)
        task_manager = TaskManager(
            include_path=include_dir if task_data else None, include_defaults=bool(standard_tasks)
        )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        try:
            with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=names,
                    task_manager=task_manager,
                    limit=limit,
                    log_samples=False,
                    bootstrap_iters=0,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    if out is None:  # non-zero rank
        return {}
    return flatten_results(out["results"])
