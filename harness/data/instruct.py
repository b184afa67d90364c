"""Instruction data in the shared item schema: loaders for the MiniLLM / DistiLLM sets, validation, I/O.

Item schema (every set, generated or real) — a dict with:

- ``id`` (str, unique within a set), ``task`` (str: task family / topic),
- ``instruction`` (str), ``input`` (str, may be ``""``),
- ``output`` (str: one reference response),
- ``answers`` (list[str], non-empty: all acceptable answers; ``[output]`` for one-answer items; for
  S-NI the JSON list stored in the raw ``output``, with ``output = answers[0]``),
- ``prompt`` (str: the Alpaca prompt as MiniLLM builds it, see ``harness.data.prompts``),
- optional ``choices`` (list[str]) and ``label`` (int index into ``choices``) for multiple choice,
- optional ``answer_probs`` (list[float], same length as ``answers``) on generated several-answer items.

Raw real rows have ``instruction``, ``input`` (may be absent), ``output``, ``prompt`` and sometimes
``topic`` / ``category``; ``normalize_record`` maps them to the schema (``task`` = topic, category or
the set name; ``id`` = ``<set name>-<line:05d>`` unless the row has one).

Set entries
-----------
A suite names each data set (``data.train`` / ``data.valid`` and every ``evaluation.sets[i]``) with an
entry checked against :data:`SET_SCHEMA` (every key and its meaning are in the fields' ``help``):
a local JSON-lines file (``path``), a file in a Hugging Face dataset repository (``hub`` + ``file``,
downloaded with ``huggingface_hub.hf_hub_download``, so the Hugging Face cache and ``HF_HUB_OFFLINE``
behave as everywhere else), a local copy of such a repository (``path`` = directory + ``file``), or
the suite's own generated split (``split``). MiniLLM's repositories hold files, not dataset splits:
``MiniLLM/dolly`` holds ``raw.jsonl`` (the training pool) and ``valid.jsonl`` (the 500 Dolly test
items); ``MiniLLM/sinst`` and ``MiniLLM/uinst`` hold one ``valid.jsonl`` per reference-length bucket,
and MiniLLM evaluates the longest bucket, ``11_/valid.jsonl``.

MiniLLM's Dolly split (microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3
minillm/tools/process_data_dolly.py, ``--dev-num 1000``): validation = ``raw.jsonl`` rows ``[:1000]``,
training = rows ``[1000:]``, written here as ``select: {stop: 1000}`` and ``select: {start: 1000}``.
:func:`check_no_overlap` refuses a validation set that shares an item with an evaluation set (DistiLLM's
adaptive schedule and checkpoint selection read the validation set, so that would be test leakage).
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..schema import ConfigError, Field, check
from .errors import DataError
from .prompts import build_prompt

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "task", "instruction", "input", "output", "answers", "prompt")
TEMPLATES = ("file", "alpaca", "minillm-qwen2")
_NONE = type(None)

#: Files of MiniLLM's Hub dataset repositories, as listed in issue 22 (read from the repositories, not
#: re-checked offline; the middle length bucket is named ``3_6`` or ``3_5``). Used in error hints and by
#: the tests' local replicas of the repositories.
HUB_LAYOUTS: dict[str, tuple[str, ...]] = {
    "MiniLLM/dolly": ("raw.jsonl", "raw.txt", "valid.jsonl", "valid.txt"),
    "MiniLLM/self-inst": ("valid.jsonl", "valid.txt"),
    "MiniLLM/Vicuna": ("valid.jsonl", "valid.txt"),
    "MiniLLM/sinst": ("0_2/valid.jsonl", "3_6/valid.jsonl", "6_10/valid.jsonl", "11_/valid.jsonl"),
    "MiniLLM/uinst": ("0_2/valid.jsonl", "3_5/valid.jsonl", "6_10/valid.jsonl", "11_/valid.jsonl"),
}

SELECT_SCHEMA = {
    "start": Field((int,), 0, ge=0, help="first row taken (0-based)"),
    "stop": Field((int, _NONE), None, ge=1, help="row at which taking stops (excluded); null: to the end"),
}

#: One data set of a suite (``data.train``, ``data.valid``, ``evaluation.sets[i]``); ``help`` is the
#: documentation of each key (the reference page is generated from it).
SET_SCHEMA = {
    "name": Field((str, _NONE), None, min_len=1, help=(
        "the set's name: its leaderboard column, the prefix of generated item ids and the default task; "
        "required in evaluation.sets, defaults to the key (train, valid) under data")),
    "path": Field((str, _NONE), None, min_len=1, help=(
        "a local JSON-lines file, or a local copy of a Hub repository (a directory, with 'file' naming the "
        "file in it, e.g. made by `hf download MiniLLM/dolly --repo-type dataset --local-dir "
        "DIR`); relative paths resolve against the working directory; give either 'path' or 'hub'")),
    "hub": Field((str, _NONE), None, min_len=1, help=(
        "a Hugging Face dataset repository id, e.g. MiniLLM/dolly; 'file' is downloaded with "
        "huggingface_hub.hf_hub_download into the Hugging Face cache (HF_HUB_CACHE); with HF_HUB_OFFLINE=1 "
        "only the cache is read")),
    "file": Field((str, _NONE), None, min_len=1, help=(
        "the JSON-lines file within the 'hub' repository or the 'path' directory, e.g. raw.jsonl, "
        "valid.jsonl, 11_/valid.jsonl (MiniLLM's repositories hold files, not dataset splits)")),
    "revision": Field((str, _NONE), None, min_len=1, help=(
        "branch, tag or commit of the 'hub' repository (default: main); a commit pins the data")),
    "split": Field((str, _NONE), None, min_len=1, help=(
        "the suite's own generated split (train, valid or test of a generated data kind such as tiny); "
        "only without 'path' and 'hub'")),
    "select": Field((dict, _NONE), None, help=(
        "a slice of the file's rows (non-blank lines), {start: N, stop: M}, 0-based, stop excluded, either "
        "may be left out, taken before anything else; MiniLLM's Dolly split (--dev-num 1000): training = "
        "raw.jsonl with {start: 1000}, validation = raw.jsonl with {stop: 1000}")),
    "limit": Field((int, _NONE), None, ge=1, help=(
        "keep the first N items (after 'select'); MiniLLM's --dev-num of an evaluation set, e.g. 10000 for "
        "uinst 11_")),
    "expect_items": Field((int, _NONE), None, ge=1, help=(
        "the number of items the set must hold after 'select' and 'limit'; any other count is an error "
        "(catches a wrong or changed file)")),
    "list_output": Field((bool,), False, help=(
        "also read an 'output' string holding a JSON list (e.g. '[\"a\", \"b\"]') as several references; "
        "off by default, as in MiniLLM, which scores a string 'output' as one reference; an 'output' stored "
        "as a JSON list is always read as a list of references")),
    "template": Field((str,), "file", choices=TEMPLATES, help=(
        "the prompt: 'file' keeps each row's 'prompt' ('<n>' read as a newline, as MiniLLM's evaluation "
        "does) and builds the Alpaca prompt for rows without one; 'alpaca' always builds the Alpaca prompt "
        "from instruction and input (MiniLLM's training data); 'minillm-qwen2' builds MiniLLM's Qwen2 "
        "variant of it")),
}


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


def _parse_list_output(out: str, *, source: str, line: int, origin: str) -> Any:
    """An ``output`` string read as a JSON list because ``list_output`` is on (``origin`` says where)."""
    why = f"read as a JSON list because list_output is on ({origin})"
    off = "or set 'list_output: false' in that entry to score the text as one reference"
    try:
        value = json.loads(out)
    except json.JSONDecodeError as e:
        raise DataError(source, f"the text {out[:40]!r} starts like a JSON list but does not parse ({e.msg}); "
                        f"it was {why}", line=line, field="output",
                        fix=f"store the answers as a JSON list of strings, {off}") from None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise DataError(source, f"the text {out[:40]!r} is not a non-empty list of strings; it was {why}",
                        line=line, field="output",
                        fix=f"store the acceptable answers as a non-empty JSON list of strings, {off}")
    return value


def normalize_record(raw: Any, *, name: str, source: str, line: int, list_output: bool = False,
                     list_output_origin: str | None = None, template: str = "file") -> dict:
    """Map one raw row (real sets: instruction/input/output/prompt[/topic/category]) to the schema.

    ``output`` may be a string (one reference) or a non-empty JSON list of strings (several references,
    S-NI), as in MiniLLM (``PromptDataset``: a list is a list of answers, anything else one answer). With
    ``list_output`` a string holding a JSON list is parsed too (``list_output_origin`` names the setting
    that turned it on, for the error message). ``answers`` gets the list, ``output`` its first element.
    For a string ``output``, a row's own ``answers`` list (files written from schema items) is kept.
    ``template`` (:data:`TEMPLATES`) decides the prompt: ``file`` keeps the row's ``prompt`` with
    ``"<n>"`` replaced by a newline (MiniLLM's evaluation loader,
    microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3 minillm/data_utils/prompt_datasets.py
    ``PromptDataset.load_data_json``) and builds the Alpaca prompt
    when the row has none (MiniLLM's training data, built from instruction and input in
    tools/process_data_dolly.py); ``alpaca`` / ``minillm-qwen2`` always build it.
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
        out = _parse_list_output(out, source=source, line=line,
                                 origin=list_output_origin or "list_output=True was passed to the loader")
    if isinstance(out, list):
        if not out or not all(isinstance(a, str) for a in out):
            raise DataError(source, "is a JSON list in the file but not a non-empty list of strings (a list "
                            "stored in the file is always read as the item's references, whatever "
                            "'list_output' says)", line=line, field="output",
                            fix="store the acceptable answers as a non-empty JSON list of strings")
        answers, output = list(out), out[0]
    elif isinstance(out, str):
        answers, output = [out], out
        if raw.get("answers") is not None:  # our own files (e.g. tiny) carry the full list
            answers = raw["answers"]
    else:
        raise DataError(source, f"must be a string or a list of strings, got {type(out).__name__}", line=line,
                        field="output", fix="store the reference response as a JSON string")
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; accepted: {', '.join(TEMPLATES)}")
    prompt = raw.get("prompt") if template == "file" else None
    if prompt is None:
        prompt = build_prompt(instruction, inp, style="alpaca" if template == "file" else template)
    elif not isinstance(prompt, str):
        raise DataError(source, f"must be a string, got {type(prompt).__name__}", line=line, field="prompt",
                        fix="store the prompt as a JSON string, or leave it out to have it built")
    else:
        prompt = prompt.replace("<n>", "\n")
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


def _check_unique_ids(items: Sequence[dict], source: str) -> None:
    seen: dict[str, int] = {}
    for i, it in enumerate(items, 1):
        if it["id"] in seen:
            raise DataError(source, f"duplicate id {it['id']!r} (first on item {seen[it['id']]})", line=i,
                            field="id", fix="make every 'id' unique within the set")
        seen[it["id"]] = i


def _read_rows(path: Path, source: str) -> list[tuple[int, Any]]:
    """``(line number, decoded JSON)`` of every non-blank line of a JSON-lines file (1-based lines)."""
    if not path.is_file():
        raise DataError(source, "file not found" if not path.exists() else
                        "is a directory; name the file in it with 'file:'" if path.is_dir() else "not a regular file",
                        fix="check the path (relative paths resolve against the working directory), or give "
                            "'hub' and 'file' instead")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                rows.append((lineno, json.loads(text)))
            except json.JSONDecodeError as e:
                raise DataError(source, f"not valid JSON ({e.msg} at column {e.colno})", line=lineno,
                                field="(whole line)", fix="write exactly one JSON object per line") from None
    if not rows:
        raise DataError(source, "file is empty (no JSON lines)", line=1, field="(whole file)",
                        fix="write one JSON object per line, or point the config at the right file")
    return rows


def _items(rows: Sequence[tuple[int, Any]], *, name: str, source: str, list_output: bool,
           list_output_origin: str | None = None, template: str = "file") -> list[dict]:
    items = [normalize_record(raw, name=name, source=source, line=lineno, list_output=list_output,
                              list_output_origin=list_output_origin, template=template) for lineno, raw in rows]
    _check_unique_ids(items, source)
    return items


def load_jsonl(path: str | os.PathLike, *, name: str | None = None, list_output: bool = False,
               template: str = "file") -> list[dict]:
    """Load a JSON-lines instruction set and normalise every row to the item schema.

    ``name`` (default: the file name without ``.jsonl``) prefixes generated ids and is the default
    ``task``. ``list_output`` (default off) also parses a string ``output`` holding a JSON list; a real
    JSON list in ``output`` is always accepted. ``template``: see :func:`normalize_record`.
    Blank lines are skipped; line numbers in errors are 1-based physical lines.

    Raises ``DataError`` (naming file, line and field, and the fix) for a missing or empty file, a
    line that is not valid JSON, or a row lacking ``instruction`` / ``output``.
    """
    p = Path(path)
    return _items(_read_rows(p, str(p)), name=name or _set_name(p), source=str(p), list_output=list_output,
                  template=template)


# ----------------------------------------------------------------------------------------------- set entries
def _hub_hint(repo: str) -> str:
    files = HUB_LAYOUTS.get(repo)
    return f" ({repo} holds {', '.join(files)})" if files else ""


def check_set_spec(spec: Any, where: str = "<suite config>", key: str = "set", *,
                   default_name: str | None = None) -> dict:
    """Check one set entry against :data:`SET_SCHEMA`; return it with every key present (defaults filled).

    ``where`` (the suite file) and ``key`` (e.g. ``evaluation.sets[3]``) name the entry in the one-line
    :class:`~harness.schema.ConfigError`. ``default_name`` is the name of an entry that may omit ``name``
    (``data.train`` → ``train``). Idempotent: a checked entry passes unchanged.
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: key {key!r} must be a mapping such as {{name: dolly, hub: MiniLLM/dolly, "
                          f"file: valid.jsonl}}, got {type(spec).__name__} {spec!r}")
    out = check(spec, SET_SCHEMA, where, f"{key}.")
    if out["name"] is None:
        if default_name is None:
            raise ConfigError(f"{where}: missing required key '{key}.name' ({SET_SCHEMA['name'].help})")
        out["name"] = default_name
    sources = [k for k in ("path", "hub", "split") if out[k] is not None]
    if not sources:
        raise ConfigError(f"{where}: key {key!r} needs one of 'path' (a local file or directory), 'hub' (a "
                          "dataset repository, with 'file') or 'split' (the suite's own generated split)")
    if out["hub"] is not None and out["split"] is not None:
        raise ConfigError(
            f"{where}: key '{key}.split': a 'hub' entry names a JSON-lines file of the repository, not a dataset "
            f"split ('split: {out['split']}' would match no file of MiniLLM's repositories); replace it by "
            f"'file', e.g. 'file: valid.jsonl'{_hub_hint(out['hub'])}")
    if len(sources) > 1:
        raise ConfigError(f"{where}: key {key!r} gives {' and '.join(repr(s) for s in sources)}; give exactly one "
                          "('path' for a local copy, 'hub' to download)")
    if out["hub"] is not None and out["file"] is None:
        raise ConfigError(f"{where}: missing required key '{key}.file' with 'hub' ({SET_SCHEMA['file'].help})"
                          f"{_hub_hint(out['hub'])}")
    if out["split"] is not None:
        for extra in ("file", "select"):
            if out[extra] is not None:
                raise ConfigError(f"{where}: key '{key}.{extra}' applies to a file ('path' or 'hub'), not to the "
                                  f"suite's own split {out['split']!r}; remove it")
    if out["revision"] is not None and out["hub"] is None:
        raise ConfigError(f"{where}: key '{key}.revision' applies to a 'hub' repository only; remove it")
    if out["select"] is not None:
        sel = check(out["select"], SELECT_SCHEMA, where, f"{key}.select.")
        if sel["stop"] is not None and sel["stop"] <= sel["start"]:
            raise ConfigError(f"{where}: key '{key}.select' takes no row (start {sel['start']} >= stop "
                              f"{sel['stop']}); give stop > start")
        out["select"] = sel
    return out


def hub_file(repo: str, file: str, *, revision: str | None = None, local_only: bool = False) -> Path | None:
    """The local path of ``file`` of the dataset repository ``repo``, downloaded into the Hugging Face cache.

    Calls ``huggingface_hub.hf_hub_download(repo_type="dataset")``, so ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``
    and ``HF_ENDPOINT`` apply as usual. ``local_only``: read the cache only and return ``None`` when the
    file is not there. Raises ``DataError`` naming ``hub:<repo>/<file>`` and the fix.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    source = f"hub:{repo}/{file}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id=repo, filename=file, repo_type="dataset", revision=revision,
                                    local_files_only=local_only))
    except LocalEntryNotFoundError:
        if local_only:
            return None
        raise DataError(source, "not in the local Hugging Face cache, and the Hub cannot be reached (offline, "
                        f"HF_HUB_OFFLINE=1 or no network); or the repository has no such file{_hub_hint(repo)}",
                        fix="run once with a network, or download the repository (`hf download "
                            f"{repo} --repo-type dataset --local-dir DIR`) and give 'path: DIR' with the same "
                            "'file'") from None
    except RevisionNotFoundError:
        raise DataError(source, f"the repository has no revision {revision!r}",
                        fix="give an existing branch, tag or commit in 'revision', or leave it out") from None
    except EntryNotFoundError:
        raise DataError(source, f"the repository has no such file{_hub_hint(repo)}",
                        fix="name a file the repository holds in 'file' (repositories of this protocol hold "
                            "files, not dataset splits)") from None
    except RepositoryNotFoundError:
        raise DataError(source, "no such dataset repository on the Hub (or it is private or gated)",
                        fix="check the 'hub' id (e.g. MiniLLM/dolly) and your Hugging Face login") from None
    except Exception as e:  # network errors, proxies, invalid ids ...
        raise DataError(source, f"could not download from the Hugging Face Hub ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})",
                        fix="check the network, or download the repository once and give 'path: DIR' with the "
                            "same 'file'") from None


def load_set(spec: Mapping, *, where: str = "<suite config>", key: str = "set", default_name: str | None = None,
             base_dir: str | os.PathLike | None = None, local_only: bool = False) -> list[dict] | None:
    """Load the data set of one suite entry (see :data:`SET_SCHEMA`) as schema items.

    A ``hub`` entry goes through :func:`hub_file` (the Hub or the Hugging Face cache); a ``path`` entry
    reads the file, or ``file`` inside the ``path`` directory (relative paths resolve against
    ``base_dir``, default the working directory). Then ``select`` (rows), normalisation, ``limit``,
    ``expect_items``. ``local_only``: return ``None`` for a ``hub`` file not in the local cache instead of
    downloading it. An entry with ``split`` (the suite's own split) must be resolved to its file first.
    Errors name the file, the suite key and the suite file (``where``).
    """
    spec = check_set_spec(dict(spec) if isinstance(spec, Mapping) else spec, where, key, default_name=default_name)
    name = spec["name"]
    if spec["split"] is not None:
        raise ConfigError(f"{where}: key '{key}.split' names the suite's own split {spec['split']!r}, which only "
                          "exists once the data step has run; load its file instead")
    try:
        if spec["hub"] is not None:
            path = hub_file(spec["hub"], spec["file"], revision=spec["revision"], local_only=local_only)
            if path is None:
                return None
            source = f"hub:{spec['hub']}/{spec['file']}" + (f"@{spec['revision']}" if spec["revision"] else "")
        else:
            path = Path(spec["path"])
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if spec["file"] is not None:
                if path.is_file():
                    raise DataError(path, "is a file, but 'file' names a file inside a directory",
                                    fix="remove 'file', or give the directory (a local copy of the repository) in "
                                        "'path'")
                path = path / spec["file"]
            source = str(path)
        rows = _read_rows(path, source)
        if spec["select"] is not None:
            start, stop = spec["select"]["start"], spec["select"]["stop"]
            if start >= len(rows):
                raise DataError(source, f"select.start is {start} but the file holds {len(rows)} rows",
                                field="(whole file)", fix="check 'select' and 'file' (MiniLLM's training rows "
                                "are raw.jsonl from row 1000; valid.jsonl is the 500-item test set)")
            rows = rows[start:stop]
        origin = f"'list_output: true' in key {key!r} of {where}"
        items = _items(rows, name=name, source=source, list_output=spec["list_output"],
                       list_output_origin=origin, template=spec["template"])
        if spec["limit"] is not None:
            items = items[: spec["limit"]]
        if spec["expect_items"] is not None and len(items) != spec["expect_items"]:
            raise DataError(source, f"holds {len(items)} items after select/limit, but 'expect_items' is "
                            f"{spec['expect_items']}", field="(whole file)",
                            fix="check 'file' and 'select' (a wrong or changed file), or correct 'expect_items'")
    except DataError as e:
        raise DataError(e.source, e.problem, line=e.line, field=e.field, fix=e.fix, key=key, config=where) from None
    return items


def load_eval_set(spec: dict, base_dir: str | os.PathLike | None = None, *, where: str = "<suite config>",
                  key: str | None = None) -> list[dict]:
    """Load one evaluation (or training) set from a suite entry: :func:`load_set`, downloading if needed.

    ``spec`` is e.g. ``{"name": "dolly", "path": "file.jsonl"}``, ``{"name": "sinst", "hub": "MiniLLM/sinst",
    "file": "11_/valid.jsonl"}``, with the optional keys of :data:`SET_SCHEMA`.
    """
    name = spec.get("name") if isinstance(spec, dict) else None
    items = load_set(spec, where=where, key=key or (str(name) if name else "set"), base_dir=base_dir)
    assert items is not None  # not local_only: a missing file raises
    return items


# ----------------------------------------------------------------------------------------------- leakage
def _norm(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace runs collapsed: the form two texts are compared in."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _prompt_key(item: Mapping) -> str:
    """The prompt's content: instruction and input, so that a template difference hides no match."""
    return _norm(item["instruction"]) + "\n" + _norm(item.get("input") or "")


def find_overlap(a: Sequence[Mapping], b: Sequence[Mapping]) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` with ``a[i]`` and ``b[j]`` the same item by content: the same instruction and
    input, and at least one reference in common (``answers``, else ``output``), after :func:`_norm`.

    Items with the same question but different references (e.g. Dolly's two answers to "What is the meaning
    of life?" in MiniLLM's dev and test files) are not an overlap.
    """
    index: dict[str, list[int]] = {}
    for j, item in enumerate(b):
        index.setdefault(_prompt_key(item), []).append(j)
    pairs = []
    for i, item in enumerate(a):
        refs = {_norm(r) for r in item.get("answers") or [item["output"]]}
        for j in index.get(_prompt_key(item), ()):
            if refs & {_norm(r) for r in b[j].get("answers") or [b[j]["output"]]}:
                pairs.append((i, j))
    return pairs


def check_no_overlap(held_out: Mapping[str, Sequence[Mapping]], evaluation: Mapping[str, Sequence[Mapping]], *,
                     where: str = "<suite config>") -> None:
    """Refuse any item shared (by content, see :func:`find_overlap`) by a held-out set and an evaluation set.

    ``held_out`` and ``evaluation`` map a suite key (e.g. ``data.valid``, ``evaluation.sets[0] (dolly)``) to
    its items; ``where`` is the suite file. Raises ``DataError`` naming both keys, the count and an example.
    """
    for h_key, h_items in held_out.items():
        for e_key, e_items in evaluation.items():
            pairs = find_overlap(h_items, e_items)
            if pairs:
                i, j = pairs[0]
                raise DataError(
                    where, f"{len(pairs)} item(s) of {h_key} are also in {e_key} (same instruction, input and "
                    f"reference), e.g. {h_items[i].get('id')!r} = {e_items[j].get('id')!r} "
                    f"({' '.join(h_items[i]['instruction'].split())[:60]!r}): evaluation items would steer "
                    "training and checkpoint selection", key=h_key,
                    fix="hold out rows no evaluation set contains, e.g. MiniLLM's dev split {hub: MiniLLM/dolly, "
                        "file: raw.jsonl, select: {stop: 1000}}; an evaluation file (MiniLLM/dolly valid.jsonl "
                        "is the Dolly test set) is never a validation set")


def _eval_label(i: int, name: str) -> str:
    return f"evaluation.sets[{i}] ({name})"


def check_data_plan(data: Mapping, eval_specs: Sequence[Mapping], *, where: str) -> dict[str, int]:
    """Validation before anything runs: check every set entry, load what is on this machine, refuse leakage.

    ``data`` is the suite's ``data`` section and ``eval_specs`` its ``evaluation.sets``. Local files are
    loaded, ``hub`` files only when already in the Hugging Face cache (nothing is downloaded; the data step
    downloads), the suite's own splits are skipped. The validation set (``data.valid``) is checked against
    every loaded evaluation set with :func:`check_no_overlap`. Returns the item count of each loaded set
    (``train``, ``valid``, evaluation-set names).
    """
    counts: dict[str, int] = {}
    held: dict[str, list[dict]] = {}
    if data.get("kind") == "instruct" and not data.get("train"):
        raise ConfigError(f"{where}: key 'data.train' needs 'path' or 'hub' (with 'file') for kind 'instruct'")
    for split in ("train", "valid", "test"):
        if data.get(split) is None:
            continue
        items = load_set(data[split], where=where, key=f"data.{split}", default_name=split, local_only=True)
        if items is not None:
            counts[split] = len(items)
            if split == "valid":
                held["data.valid"] = items
    evals: dict[str, list[dict]] = {}
    for i, raw in enumerate(eval_specs):
        spec = check_set_spec(raw, where, f"evaluation.sets[{i}]")
        if spec["split"] is not None:
            continue  # the suite's own split, written by the data step
        items = load_set(spec, where=where, key=f"evaluation.sets[{i}]", local_only=True)
        if items is not None:
            counts[spec["name"]] = len(items)
            evals[_eval_label(i, spec["name"])] = items
    check_no_overlap(held, evals, where=where)
    return counts


def prepare_instruct_data(data: Mapping, eval_specs: Sequence[Mapping], out_dir: str | os.PathLike, *,
                          where: str) -> dict[str, Path]:
    """The data step of kind ``instruct``: load ``data.train`` / ``data.valid`` (/ ``data.test``), refuse a
    validation set that overlaps an evaluation set, and write ``<split>.jsonl`` under ``out_dir``.

    ``data.max_train_items`` keeps the first N training items. Training items shared with an evaluation
    set are logged as a warning (counted, not refused: the papers train on them as released).
    """
    loaded: dict[str, list[dict]] = {}
    for split in ("train", "valid", "test"):
        if data.get(split) is None:
            continue
        items = load_set(data[split], where=where, key=f"data.{split}", default_name=split)
        if split == "train" and data.get("max_train_items"):
            items = items[: data["max_train_items"]]
        loaded[split] = items
    evals = {}
    for i, raw in enumerate(eval_specs):
        spec = check_set_spec(raw, where, f"evaluation.sets[{i}]")
        if spec["split"] is None:
            evals[_eval_label(i, spec["name"])] = load_set(spec, where=where, key=f"evaluation.sets[{i}]")
    check_no_overlap({"data.valid": loaded["valid"]} if "valid" in loaded else {}, evals, where=where)
    for label, items in evals.items():
        n = len(find_overlap(loaded.get("train", []), items))
        if n:
            log.warning("%s: %d training items (data.train) are also in %s", where, n, label)
    return {split: write_jsonl_atomic(Path(out_dir) / f"{split}.jsonl", items) for split, items in loaded.items()}


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
