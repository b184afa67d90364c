"""The Alpaca prompt exactly as MiniLLM / DistiLLM build it.

MiniLLM (``tools/process_data_dolly.py``) uses two templates: one when the item has a non-empty
``input`` and one when it has none. The result ends with ``"### Response:\\n"``; the response is
appended directly after that newline. ``build_prompt`` reproduces the ``prompt`` field of the real
sets in ``shared/data/instruct`` byte for byte (checked in ``tests/test_data.py``).
"""

from __future__ import annotations

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


PROMPT_SHORT = "### Instruction:\n{instruction}\n{input_block}### Response:\n"

STYLES = ("alpaca", "short")


def build_prompt(instruction: str, input: str = "", style: str = "alpaca") -> str:  # noqa: A002 - MiniLLM's field name
    """Return the Alpaca prompt for ``instruction`` and optional ``input``.

    An empty (``""``) or ``None`` input selects the no-input template, as MiniLLM does
    (``len(input) == 0``); any other input, even whitespace, is inserted verbatim.

    ``style="short"`` drops the Alpaca preamble (``### Instruction:\n…\n### Input:\n…\n### Response:\n``):
    the embedded ``tiny`` suite uses it because the preamble would be 90% of every sequence there and
    teaches nothing; every set of the ``instruct`` protocol uses ``alpaca``.
    """
    if style == "short":
        block = f"### Input:\n{input}\n" if input else ""
        return PROMPT_SHORT.format(instruction=instruction, input_block=block)
    if style != "alpaca":
        raise ValueError(f"unknown prompt style {style!r}; accepted: {', '.join(STYLES)}")
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be str, got {type(instruction).__name__}")
    if input is None or input == "":
        return PROMPT_NO_INPUT.format(instruction=instruction)
    if not isinstance(input, str):
        raise TypeError(f"input must be str, got {type(input).__name__}")
    return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
