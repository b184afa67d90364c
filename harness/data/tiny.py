"""Deterministic tiny instruction data for the embedded ``tiny`` suite.

``generate_tiny(seed, n_train, n_valid, n_test)`` returns ``{"train": [...], "valid": [...],
"test": [...]}``, lists of items in the shared item schema (see ``harness.data.instruct``):
``id, task, instruction, input, output, answers, prompt`` and, for knowledge items,
``choices`` (4 options) and ``label`` (index of the gold option); several-answer items also carry
``answer_probs`` (the probability of each entry of ``answers`` under the training distribution,
same order, descending, so ``answers[0]`` is the mode).

Task families (``task`` field), responses 1-6 words over a small vocabulary:

one answer (exact match meaningful)
    ``add`` (a + b, a, b in 0..9), ``successor`` (0..49), ``predecessor`` (1..50),
    ``reverse`` and ``sort`` (3-4 distinct letters from a-f, space separated).
knowledge (must be memorised; 4-way ``choices`` + ``label``)
    ``capital`` and ``animal`` of 40 invented countries.
several answers (training responses drawn from a fixed Zipf-like distribution over 3-8 answers)
    ``category`` ("Name a fruit."), ``even_below`` ("Name an even number below 12."),
    ``flag_colour`` (a colour of the flag of an invented country; knowledge + several answers).

The *world* (countries, capitals, animals, flag colours, answer distributions, multiple-choice
options) is fixed by ``WORLD_SEED`` and does not depend on ``seed``; ``seed`` only decides which
phrasings go to which split and which samples are drawn.

Splitting: each underlying fact/parameter (``key``) has 3-6 phrasings (distinct
``(instruction, input)`` pairs). Valid and test items are phrasings held out from training, chosen so
every key keeps at least one phrasing in training; so the three splits never share an
``(instruction, input)`` pair (checked by ``check_disjoint``), while valid/test ask about facts the
training data teaches under another phrasing. Every family appears in every split. Training items
cycle through each family's training phrasings (so every fact is seen) with an equal share per family;
several-answer training items draw their ``output`` from the family's distribution (so train contains
the same prompt with different responses, non-uniformly); valid/test items use the mode as ``output``.

CLI: ``python -m harness.data.tiny OUT_DIR [--seed 0] [--n-train 4000] [--n-valid 200]
[--n-test 200]`` writes ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` atomically.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations
from pathlib import Path
from typing import Iterable, Sequence

from .instruct import validate_item, write_jsonl_atomic
from .prompts import build_prompt

WORLD_SEED = 20240601
DEFAULT_SIZES = {"train": 4000, "valid": 200, "test": 200}
SPLITS = ("train", "valid", "test")

FAMILIES = (
    "add",
    "successor",
    "predecessor",
    "reverse",
    "sort",
    "capital",
    "animal",
    "flag_colour",
    "category",
    "even_below",
)
ONE_ANSWER_FAMILIES = ("add", "successor", "predecessor", "reverse", "sort", "capital", "animal")
KNOWLEDGE_FAMILIES = ("capital", "animal", "flag_colour")
SEVERAL_ANSWER_FAMILIES = ("flag_colour", "category", "even_below")

N_COUNTRIES = 40
LETTERS = "abcdef"
COLOURS = ("red", "blue", "green", "white", "black", "yellow", "orange", "purple")
ANIMALS = ("fox", "bear", "wolf", "owl", "deer", "hare", "lynx", "seal", "crow", "frog")
CATEGORIES = {
    "fruit": ("apple", "pear", "plum", "grape", "lemon", "mango", "peach"),
    "colour": ("red", "blue", "green", "yellow", "pink"),
    "tool": ("hammer", "saw", "drill", "wrench"),
    "drink": ("tea", "milk", "juice", "water", "coffee", "cocoa"),
    "bird": ("robin", "duck", "eagle", "swan", "crow", "hawk", "dove", "gull"),
    "tree": ("oak", "pine", "birch"),
}


@dataclass(frozen=True)
class Question:
    """One phrasing of one fact: a distinct (instruction, input) pair with its answers.

    ``answers`` is ordered by descending ``probs`` (``probs`` is None for one-answer questions).
    """

    family: str
    key: str
    instruction: str
    input: str
    answers: tuple[str, ...]
    probs: tuple[float, ...] | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None


def _rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from a string (SHA-512 based, stable across Python versions)."""
    return random.Random(":".join(str(p) for p in parts))


def zipf_probs(n: int) -> tuple[float, ...]:
    """Probabilities proportional to 1, 1/2, ..., 1/n (descending, non-uniform for n >= 2)."""
    w = [1.0 / (i + 1) for i in range(n)]
    z = sum(w)
    return tuple(x / z for x in w)


def _name(rng: random.Random, n_syllables: int, endings: Sequence[str]) -> str:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    s = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(n_syllables))
    return (s + rng.choice(endings)).capitalize()


@dataclass(frozen=True)
class World:
    """The fixed synthetic world: per country a capital, an animal and weighted flag colours."""

    countries: tuple[str, ...]
    capitals: dict
    animals: dict
    flag_colours: dict  # country -> tuple of colours, descending probability
    categories: dict  # category -> tuple of members, descending probability
    even_orders: dict  # n -> tuple of even numbers below n (as str), descending probability


@lru_cache(maxsize=1)
def world() -> World:
    """Build the synthetic world from ``WORLD_SEED`` (independent of the split seed)."""
    rng = _rng("world", WORLD_SEED)
    names: set[str] = set()
    countries: list[str] = []
    capitals: dict[str, str] = {}
    while len(countries) < N_COUNTRIES:
        c = _name(rng, 2, ("ria", "land", "or", "esh", "ania", "ay"))
        if c not in names:
            names.add(c)
            countries.append(c)
    for c in countries:
        while True:
            cap = _name(rng, 2, ("n", "k", "m", "t", "s"))
            if cap not in names:
                names.add(cap)
                capitals[c] = cap
                break
    animals = {c: rng.choice(ANIMALS) for c in countries}
    flags = {}
    for c in countries:
        flags[c] = tuple(rng.sample(COLOURS, rng.choice((3, 4))))
    cats = {}
    for cat, members in CATEGORIES.items():
        m = list(members)
        rng.shuffle(m)
        cats[cat] = tuple(m)
    evens = {}
    for n in range(7, 18):
        m = [str(k) for k in range(2, n, 2)]
        rng.shuffle(m)
        evens[n] = tuple(m)
    return World(tuple(countries), capitals, animals, flags, cats, evens)


def _mc(answer: str, pool: Iterable[str], key: str) -> tuple[tuple[str, ...], int]:
    """Four choices (gold + 3 distinct distractors from ``pool``), order fixed by the world."""
    rng = _rng("choices", WORLD_SEED, key)
    distractors = rng.sample(sorted(set(pool) - {answer}), 3)
    options = distractors + [answer]
    rng.shuffle(options)
    return tuple(options), options.index(answer)


def questions(family: str) -> list[Question]:
    """Every phrasing of every fact of ``family`` (deterministic order, independent of any seed)."""
    w = world()
    out: list[Question] = []
    if family == "add":
        templates = [
            ("What is {a} plus {b}?", ""),
            ("Add {a} and {b}.", ""),
            ("Add the two numbers.", "{a} {b}"),
            ("Compute the sum.", "{a} + {b}"),
        ]
        for a in range(10):
            for b in range(10):
                for ins, inp in templates:
                    out.append(
                        Question(family, f"{a}+{b}", ins.format(a=a, b=b), inp.format(a=a, b=b), (str(a + b),))
                    )
    elif family in ("successor", "predecessor"):
        if family == "successor":
            numbers, delta = range(0, 50), 1
            templates = [
                ("What number comes after {n}?", ""),
                ("Which number follows {n}?", ""),
                ("Give the next number.", "{n}"),
                ("Add one to the number.", "{n}"),
            ]
        else:
            numbers, delta = range(1, 51), -1
            templates = [
                ("What number comes before {n}?", ""),
                ("Which number precedes {n}?", ""),
                ("Give the previous number.", "{n}"),
                ("Subtract one from the number.", "{n}"),
            ]
        for n in numbers:
            for ins, inp in templates:
                out.append(Question(family, str(n), ins.format(n=n), inp.format(n=n), (str(n + delta),)))
    elif family in ("reverse", "sort"):
        if family == "reverse":
            templates = [
                ("Reverse the letters.", "{s}"),
                ("Write the letters in reverse order.", "{s}"),
                ("Reverse this list: {s}", ""),
            ]
        else:
            templates = [
                ("Sort the letters.", "{s}"),
                ("Put the letters in alphabetical order.", "{s}"),
                ("Sort this list: {s}", ""),
            ]
        for k in (3, 4):
            for seq in permutations(LETTERS, k):
                s = " ".join(seq)
                ans = " ".join(reversed(seq)) if family == "reverse" else " ".join(sorted(seq))
                for ins, inp in templates:
                    out.append(Question(family, s, ins.format(s=s), inp.format(s=s), (ans,)))
    elif family in ("capital", "animal"):
        if family == "capital":
            templates = [
                ("What is the capital of {c}?", ""),
                ("Name the capital city of {c}.", ""),
                ("Which city is the capital of {c}?", ""),
                ("Give the capital of the country.", "{c}"),
            ]
            table, pool = w.capitals, w.capitals.values()
        else:
            templates = [
                ("What is the national animal of {c}?", ""),
                ("Which animal is the symbol of {c}?", ""),
                ("Name the national animal of {c}.", ""),
                ("Give the national animal of the country.", "{c}"),
            ]
            table, pool = w.animals, ANIMALS
        for c in w.countries:
            choices, label = _mc(table[c], pool, f"{family}:{c}")
            for ins, inp in templates:
                out.append(
                    Question(family, c, ins.format(c=c), inp.format(c=c), (table[c],), None, choices, label)
                )
    elif family == "flag_colour":
        templates = [
            ("Name a colour of the flag of {c}.", ""),
            ("What is one colour on the flag of {c}?", ""),
            ("Give one colour of the flag of {c}.", ""),
            ("Name a colour of this country's flag.", "{c}"),
        ]
        for c in w.countries:
            ans = w.flag_colours[c]
            for ins, inp in templates:
                out.append(Question(family, c, ins.format(c=c), inp.format(c=c), ans, zipf_probs(len(ans))))
    elif family == "category":
        templates = [
            ("Name a {k}.", ""),
            ("Give me a {k}.", ""),
            ("Tell me one {k}.", ""),
            ("Say the name of a {k}.", ""),
            ("Name one thing of the given kind.", "{k}"),
            ("Give an example of the given kind.", "{k}"),
        ]
        for k, ans in w.categories.items():
            for ins, inp in templates:
                out.append(Question(family, k, ins.format(k=k), inp.format(k=k), ans, zipf_probs(len(ans))))
    elif family == "even_below":
        templates = [
            ("Name an even number below {n}.", ""),
            ("Give an even number smaller than {n}.", ""),
            ("Say an even number less than {n}.", ""),
            ("Name an even number below the given number.", "{n}"),
        ]
        for n, ans in w.even_orders.items():
            for ins, inp in templates:
                out.append(Question(family, str(n), ins.format(n=n), inp.format(n=n), ans, zipf_probs(len(ans))))
    else:
        raise ValueError(f"unknown tiny task family {family!r}; known: {', '.join(FAMILIES)}")
    return out


def _allocate(total: int, caps: Sequence[int]) -> list[int]:
    """Split ``total`` as evenly as possible over bins with capacities ``caps`` (water filling).

    Earlier bins get the remainder first. Raises ``ValueError`` if ``sum(caps) < total``.
    """
    if total > sum(caps):
        raise ValueError(f"cannot place {total} items in bins of capacity {list(caps)}")
    alloc = [0] * len(caps)
    left = total
    while left > 0:
        open_bins = [i for i, c in enumerate(caps) if alloc[i] < c]
        share, extra = divmod(left, len(open_bins))
        for j, i in enumerate(open_bins):
            add = min(caps[i] - alloc[i], share + (1 if j < extra else 0))
            alloc[i] += add
            left -= add
    return alloc


def _item(q: Question, output: str, style: str = "alpaca") -> dict:
    item = {
        "id": "",
        "task": q.family,
        "instruction": q.instruction,
        "input": q.input,
        "output": output,
        "answers": list(q.answers),
        "prompt": build_prompt(q.instruction, q.input, style),
    }
    if q.probs is not None:
        item["answer_probs"] = list(q.probs)
    if q.choices is not None:
        item["choices"] = list(q.choices)
        item["label"] = q.label
    return item


def check_disjoint(splits: dict[str, list[dict]]) -> None:
    """Raise ``ValueError`` if two splits share an ``(instruction, input)`` pair."""
    seen: dict[tuple[str, str], str] = {}
    for name, items in splits.items():
        for it in items:
            k = (it["instruction"], it.get("input", ""))
            other = seen.setdefault(k, name)
            if other != name:
                raise ValueError(f"splits {other!r} and {name!r} share instruction/input {k!r}")


def generate_tiny(seed: int = 0, n_train: int = 4000, n_valid: int = 200, n_test: int = 200,
                  prompt_style: str = "alpaca") -> dict[str, list[dict]]:
    """Generate the tiny train/valid/test splits (see the module docstring).

    Deterministic in ``seed``; the splits share no ``(instruction, input)`` pair and each contains
    every family, so ``n_train``, ``n_valid`` and ``n_test`` must each be ``>= len(FAMILIES)``.
    ``prompt_style`` is passed to :func:`harness.data.prompts.build_prompt` (``alpaca`` or ``short``).
    """
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    for name, n in sizes.items():
        if not isinstance(n, int) or n < len(FAMILIES):
            raise ValueError(f"n_{name} must be an int >= {len(FAMILIES)} (one item per task family), got {n!r}")
    pools = {}
    eval_sel: dict[str, dict[str, list[Question]]] = {"valid": {}, "test": {}}
    caps = []
    all_q = {f: questions(f) for f in FAMILIES}
    for f in FAMILIES:
        n_keys = len({q.key for q in all_q[f]})
        caps.append(min(len(all_q[f]) - n_keys, len(all_q[f]) // 2))
    n_val = _allocate(n_valid, [c // 2 for c in caps])
    n_tst = _allocate(n_test, [c - v for c, v in zip(caps, n_val)])
    for f, nv, nt in zip(FAMILIES, n_val, n_tst):
        qs = list(all_q[f])
        _rng("split", seed, f).shuffle(qs)
        left = {}
        for q in qs:
            left[q.key] = left.get(q.key, 0) + 1
        held, train_pool = [], []
        for q in qs:
            if len(held) < nv + nt and left[q.key] > 1:
                held.append(q)
                left[q.key] -= 1
            else:
                train_pool.append(q)
        eval_sel["valid"][f], eval_sel["test"][f] = held[:nv], held[nv:]
        pools[f] = train_pool
    n_per_family = _allocate(n_train, [n_train] * len(FAMILIES))
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for f, n in zip(FAMILIES, n_per_family):
        rng = _rng("train", seed, f)
        pool = pools[f]
        chosen: list[Question] = []
        while len(chosen) < n:
            cycle = list(pool)
            rng.shuffle(cycle)
            chosen.extend(cycle[: n - len(chosen)])
        for q in chosen:
            output = q.answers[0] if q.probs is None else rng.choices(q.answers, weights=q.probs)[0]
            out["train"].append(_item(q, output, prompt_style))
        for s in ("valid", "test"):
            out[s].extend(_item(q, q.answers[0], prompt_style) for q in eval_sel[s][f])
    for s in SPLITS:
        _rng("order", seed, s).shuffle(out[s])
        for i, it in enumerate(out[s]):
            it["id"] = f"tiny-{s}-{i:05d}"
            validate_item(it, source=f"tiny[{s}]", line=i + 1)
    check_disjoint(out)
    return out


def write_tiny(out_dir: str | os.PathLike, seed: int = 0, sizes: dict[str, int] | None = None,
               prompt_style: str = "alpaca") -> dict[str, Path]:
    """Generate the tiny splits and write ``<out_dir>/{train,valid,test}.jsonl`` atomically.

    ``sizes`` may override any of ``DEFAULT_SIZES`` (keys ``train``, ``valid``, ``test``).
    Returns ``{"train": Path, "valid": Path, "test": Path}``.
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) in sizes: {sorted(unknown)}; use {list(SPLITS)}")
    data = generate_tiny(seed, n_train=sizes["train"], n_valid=sizes["valid"], n_test=sizes["test"],
                        prompt_style=prompt_style)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for s in SPLITS:
        paths[s] = out / f"{s}.jsonl"
        write_jsonl_atomic(paths[s], data[s])
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Command-line entry point: ``python -m harness.data.tiny OUT_DIR [--seed N] [--n-train N] ...``."""
    p = argparse.ArgumentParser(prog="python -m harness.data.tiny", description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=DEFAULT_SIZES["train"])
    p.add_argument("--n-valid", type=int, default=DEFAULT_SIZES["valid"])
    p.add_argument("--n-test", type=int, default=DEFAULT_SIZES["test"])
    a = p.parse_args(argv)
    paths = write_tiny(a.out_dir, a.seed, {"train": a.n_train, "valid": a.n_valid, "test": a.n_test})
    for s, path in paths.items():
        print(f"{s}: {path}")
    return paths


if __name__ == "__main__":
    main()
