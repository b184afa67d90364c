"""Instruction data in the shared item schema: loaders for the MiniLLM / DistiLLM sets, validation, I/O.

Item schema (every set, generated or real) — a dict with:

- ``id`` (str, unique within a set), ``task`` (str: task family / topic),
- ``instruction`` (str), ``input`` (str, may be ``""``),
- ``output`` (str: one reference response),
- ``answers`` (list[str], non-empty: all acceptable answers; ``[output]`` for one-answer items; for
  S-NI / UnNI the JSON list stored in the raw ``output``, with ``output = answers[0]``),
- ``prompt`` (str: the Alpaca prompt as MiniLLM builds it, see ``harness.data.prompts``),
- optional ``choices`` (list[str]) and ``label`` (int index into ``choices``) for multiple choice,
- optional ``answer_probs`` (list[float], same length as ``answers``) on generated several-answer items.

Raw real rows have ``instruction``, ``input`` (may be absent), ``output``, ``prompt`` and sometimes
``topic`` / ``category``; ``normalize_record`` maps them to the schema (``task`` = topic, category or
the set name; ``id`` = ``<set name>-<line:05d>`` unless the row has one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import DataError
from .prompts import build_prompt

REQUIRED_FIELDS = ("id", "task", "instruction", "input", "output", "answers", "prompt")
LIST_OUTPUT_SETS = ("sinst", "uinst")  # sets whose raw ``output`` is a JSON list of answers


def validate_item(item: dict, *, source: str = "<items>", line: int | None = None) -> dict:
    """Check ``item`` against the schema; return it unchanged or raise ``DataError``."""

    def bad(field: str, problem: str, fix: str) -> DataError:
        return DataError(source, problem, line=line, field=field, fix=fix)

    if not isinstance(item, dict):
        raise DataError(source, f"item is a {type(item).__name__}, not an object", line=line,
                        fix="give one JSON object per item")
    for f in REQUIRED_FIELDS:
        if f not in item:
            raise bad(f, "missing", f"add the '{f}' field (see the item schema in harness.data.instruct)")
    for f in ("id", "task", "instruction", "input", "output", "prompt"):
        if not isinstance(item[f], str):
            raise bad(f, f"must be a string, got {type(item[f]).__name__}", f"store '{f}' as a JSON string")
    ans = item["answers"]
    if not isinstance(ans, list) or not ans or not all(isinstance(a, str) for a in ans):
        raise bad("answers", "must be a non-empty list of strings", "list every acceptable answer as a string")
    if item["output"] not in ans:
        raise bad("answers", "does not contain 'output'", "include the reference 'output' in 'answers'")
    if "answer_probs" in item:
        p = item["answer_probs"]
        if not isinstance(p, list) or len(p) != len(ans) or any(not isinstance(x, (int, float)) or x < 0 for x in p):
            raise bad("answer_probs", "must be non-negative numbers, one per answer",
                      "give one probability per entry of 'answers' or drop the field")
    if "choices" in item or "label" in item:
        ch, lab = item.get("choices"), item.get("label")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise bad("choices", "must be a list of at least 2 strings", "give 'choices' and 'label' together")
        if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < len(ch):
            raise bad("label", f"must be an int index into choices (0..{len(ch) - 1})",
                      "give 'label' as the 0-based index of the correct choice")
    return item


def normalize_record(raw: Any, *, name: str, source: str, line: int, list_output: bool = False) -> dict:
    """Map one raw row (real sets: instruction/input/output/prompt[/topic/category]) to the schema.

    ``output`` may be a string, or a non-empty list of strings (S-NI); with ``list_output`` a string
    holding a JSON list is parsed too. ``answers`` gets the list, ``output`` its first element. For a
    string ``output``, a row's own ``answers`` list (files written from schema items) is kept.
    ``prompt`` is kept when present (it is the set's ground truth) and built when absent.
    """
    if not isinstance(raw, dict):
        raise DataError(source, f"line is a JSON {type(raw).__name__}, not an object", line=line,
                        field="(whole line)", fix="write one JSON object per line")
    for f in ("instruction", "output"):
        if f not in raw or raw[f] is None:
            raise DataError(source, "missing", line=line, field=f,
                            fix=f"give every line an '{f}' (string{' or list of strings' if f == 'output' else ''})")
    instruction = raw["instruction"]
    if not isinstance(instruction, str):
        raise DataError(source, f"must be a string, got {type(instruction).__name__}", line=line,
                        field="instruction", fix="store the instruction as a JSON string")
    inp = raw.get("input")
    inp = "" if inp is None else inp
    if not isinstance(inp, str):
        raise DataError(source, f"must be a string, got {type(inp).__name__}", line=line, field="input",
                        fix="store the input as a JSON string, or leave it out")
    out = raw["output"]
    if isinstance(out, str) and list_output and out.lstrip().startswith("["):
        try:
            out = json.loads(out)
        except json.JSONDecodeError as e:
            raise DataError(source, f"looks like a JSON list but does not parse ({e})", line=line,
                            field="output", fix="store the answers as a JSON list of strings") from None
    if isinstance(out, list):
        if not out or not all(isinstance(a, str) for a in out):
            raise DataError(source, "list must be non-empty and hold only strings", line=line, field="output",
                            fix="store the acceptable answers as a non-empty JSON list of strings")
        answers, output = list(out), out[0]
    elif isinstance(out, str):
        answers, output = [out], out
        if raw.get("answers") is not None:  # our own files (e.g. tiny) carry the full list
            answers = raw["answers"]
    else:
        raise DataError(source, f"must be a string or a list of strings, got {type(out).__name__}", line=line,
                        field="output", fix="store the reference response as a JSON string")
    prompt = raw.get("prompt")
    if prompt is None:
        prompt = build_prompt(instruction, inp)
    elif not isinstance(prompt, str):
        raise DataError(source, f"must be a string, got {type(prompt).__name__}", line=line, field="prompt",
                        fix="store the prompt as a JSON string, or leave it out to have it built")
    task = raw.get("task") or raw.get("topic") or raw.get("category") or name
    item = {
        "id": str(raw["id"]) if raw.get("id") is not None else f"{name}-{line:05d}",
        "task": str(task),
        "instruction": instruction,
        "input": inp,
        "output": output,
        "answers": answers,
        "prompt": prompt,
    }
    for f in ("choices", "label", "answer_probs"):
        if f in raw:
            item[f] = raw[f]
    return validate_item(item, source=source, line=line)


def _set_name(path: Path) -> str:
    """``dolly_valid.jsonl`` -> ``dolly_valid``."""
    return path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem


def _wants_list_output(name: str) -> bool:
    n = name.lower()
    return any(s in n for s in LIST_OUTPUT_SETS)


def _check_unique_ids(items: Sequence[dict], source: str) -> None:
    seen: dict[str, int] = {}
    for i, it in enumerate(items, 1):
        if it["id"] in seen:
            raise DataError(source, f"duplicate id {it['id']!r} (first on item {seen[it['id']]})", line=i,
                            field="id", fix="make every 'id' unique within the set")
        seen[it["id"]] = i


def load_jsonl(path: str | os.PathLike, *, name: str | None = None, list_output: bool | None = None) -> list[dict]:
    """Load a JSON-lines instruction set and normalise every row to the item schema.

    ``name`` (default: the file name without ``.jsonl``) prefixes generated ids and is the default
    ``task``. ``list_output`` (default: on for names containing ``sinst``/``uinst``) also parses a
    string ``output`` holding a JSON list; a real JSON list in ``output`` is always accepted.
    Blank lines are skipped; line numbers in errors are 1-based physical lines.

    Raises ``DataError`` (naming file, line and field, and the fix) for a missing or empty file, a
    line that is not valid JSON, or a row lacking ``instruction`` / ``output``.
    """
    p = Path(path)
    name = name or _set_name(p)
    list_output = _wants_list_output(name) if list_output is None else list_output
    if not p.is_file():
        raise DataError(p, "file not found" if not p.exists() else "not a regular file",
                        fix="check the path (relative paths resolve against the working directory "
                            "or the suite's data directory), or give a hub id instead")
    items = []
    with p.open(encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(p, f"not valid JSON ({e.msg} at column {e.colno})", line=lineno,
                                field="(whole line)", fix="write exactly one JSON object per line") from None
            items.append(normalize_record(raw, name=name, source=str(p), line=lineno, list_output=list_output))
    if not items:
        raise DataError(p, "file is empty (no JSON lines)", line=1, field="(whole file)",
                        fix="write one JSON object per line, or point the config at the right file")
    _check_unique_ids(items, str(p))
    return items


def _load_hub(hub: str, split: str, name: str, list_output: bool) -> list[dict]:
    source = f"hub:{hub}[{split}]"
    try:
        import datasets  # lazy: only the hub path needs it
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(source, f"the 'datasets' library is not available ({e})",
                        fix="pip install datasets, or give a local 'path'") from None
    try:
        ds = datasets.load_dataset(hub, split=split)
    except Exception as e:  # network, auth, unknown id, unknown split ...
        raise DataError(source, f"could not load from the Hugging Face Hub ({type(e).__name__}: {e})",
                        fix="this machine may be offline: download the set once and give a local 'path' "
                            "(JSON lines) in the suite config instead of 'hub'") from None
    items = [normalize_record(dict(row), name=name, source=source, line=i, list_output=list_output)
             for i, row in enumerate(ds, 1)]
    if not items:
        raise DataError(source, "split is empty", line=1, field="(whole split)", fix="choose another split")
    _check_unique_ids(items, source)
    return items


def load_eval_set(spec: dict, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Load one evaluation (or training) set from a suite-config entry.

    ``spec`` is ``{"name": ..., "path": "file.jsonl"}`` (relative paths resolve against
    ``base_dir``, default the working directory) or ``{"name": ..., "hub": "MiniLLM/dolly",
    "split": "test"}``; the hub is tried (lazily, with ``datasets.load_dataset``) only when no
    ``path`` is given. Optional keys: ``limit`` (keep the first N items), ``list_output``.
    """
    if not isinstance(spec, dict) or "name" not in spec:
        raise DataError("<suite config>", f"evaluation-set entry {spec!r} has no name", field="name",
                        fix="give each entry a 'name' and a 'path' (or 'hub')")
    name = str(spec["name"])
    list_output = spec.get("list_output")
    if spec.get("path"):
        p = Path(spec["path"])
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        if list_output is None:
            list_output = _wants_list_output(name) or _wants_list_output(_set_name(p))
        items = load_jsonl(p, name=name, list_output=list_output)
    elif spec.get("hub"):
        hub = str(spec["hub"])
        if list_output is None:
            list_output = _wants_list_output(name) or _wants_list_output(hub)
        items = _load_hub(hub, str(spec.get("split", "test")), name, list_output)
    else:
        raise DataError("<suite config>", f"evaluation set {name!r} has neither 'path' nor 'hub'", field="path",
                        fix="add 'path: <file.jsonl>' (or 'hub: <id>' with 'split') to the entry")
    limit = spec.get("limit")
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise DataError("<suite config>", f"limit of {name!r} must be a positive int, got {limit!r}",
                            field="limit", fix="give 'limit' as a positive integer or leave it out")
        items = items[:limit]
    return items


def filter_long_prompts(items: Iterable[dict], tokenizer, max_prompt_tokens: int = 256) -> tuple[list[dict], int]:
    """Drop items whose ``prompt`` is longer than ``max_prompt_tokens`` tokens (MiniLLM: 256).

    Tokens are counted with ``tokenizer.encode(prompt, add_special_tokens=False)``.
    Returns ``(kept_items, n_dropped)``; order is preserved.
    """
    kept, dropped = [], 0
    for it in items:
        if len(tokenizer.encode(it["prompt"], add_special_tokens=False)) > max_prompt_tokens:
            dropped += 1
        else:
            kept.append(it)
    return kept, dropped


def write_jsonl_atomic(path: str | os.PathLike, items: Iterable[dict]) -> Path:
    """Write ``items`` as JSON lines (UTF-8, key order kept), atomically (see :mod:`harness.io`)."""
    from ..io import write_text_atomic

    return Path(write_text_atomic(path, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)))
