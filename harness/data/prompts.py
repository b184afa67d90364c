"""The Alpaca prompt exactly as MiniLLM / DistiLLM build it.

MiniLLM (``tools/process_data_dolly.py``) uses two templates: one when the item has a non-empty
``input`` and one when it has none. The result ends with ``"### Response:\\n"``; the response is
appended directly after that newline. ``build_prompt`` reproduces the ``prompt`` field of the real
sets in ``shared/data/instruct`` byte for byte (checked in ``tests/test_data.py``).

For Qwen2 models MiniLLM wraps the same text in chat markers (``style="minillm-qwen2"``, read from
microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3 minillm/tools/process_data_dolly.py,
``Encoder.encode`` for ``model_type == "qwen2"``): ``<|im_start|>`` before the preamble and
``<|im_end|><|im_start|>Assistant:`` after ``"### Response:\\n"``.
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

QWEN2_PREFIX = "<|im_start|>"
QWEN2_SUFFIX = "<|im_end|><|im_start|>Assistant:"

STYLES = ("alpaca", "short", "minillm-qwen2")


def build_prompt(instruction: str, input: str = "", style: str = "alpaca") -> str:  # noqa: A002 - MiniLLM's field name
    """Return the Alpaca prompt for ``instruction`` and optional ``input``.

    An empty (``""``) or ``None`` input selects the no-input template, as MiniLLM does
    (``len(input) == 0``); any other input, even whitespace, is inserted verbatim.

    ``style="short"`` drops the Alpaca preamble (``### Instruction:\n…\n### Input:\n…\n### Response:\n``):
    the embedded ``tiny`` suite uses it because the preamble would be 90% of every sequence there and
    teaches nothing; every set of the ``instruct`` protocol uses ``alpaca``.

    ``style="minillm-qwen2"`` is the Alpaca prompt between MiniLLM's Qwen2 chat markers
    (:data:`QWEN2_PREFIX` + Alpaca prompt + :data:`QWEN2_SUFFIX`), for the Qwen2.5 pair.
    """
    if style == "short":
        block = f"### Input:\n{input}\n" if input else ""
        return PROMPT_SHORT.format(instruction=instruction, input_block=block)
    if style == "minillm-qwen2":
        return QWEN2_PREFIX + build_prompt(instruction, input) + QWEN2_SUFFIX
    if style != "alpaca":
        raise ValueError(f"unknown prompt style {style!r}; accepted: {', '.join(STYLES)}")
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be str, got {type(instruction).__name__}")
    if input is None or input == "":
        return PROMPT_NO_INPUT.format(instruction=instruction)
    if not isinstance(input, str):
        raise TypeError(f"input must be str, got {type(input).__name__}")
    return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
