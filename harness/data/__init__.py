"""Data: prompts, the tiny generator, real-set loaders, tokenizer training, batching.

See each module's docstring for shapes and conventions; the item schema is documented in
``harness.data.instruct`` and the (already shifted) label convention in ``harness.data.batching``.
"""

from .batching import (
    IGNORE_INDEX,
    collate,
    collate_prompts,
    encode,
    encode_prompt,
    epoch_order,
    iterate_batches,
    num_batches,
)
from .errors import DataError
from .instruct import (
    filter_long_prompts,
    load_eval_set,
    load_jsonl,
    normalize_record,
    validate_item,
    write_jsonl_atomic,
)
from .prompts import build_prompt
from .tiny import generate_tiny, write_tiny
from .tokenizer import item_texts, load_tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "build_prompt",
    "collate",
    "collate_prompts",
    "encode",
    "encode_prompt",
    "epoch_order",
    "filter_long_prompts",
    "generate_tiny",
    "item_texts",
    "iterate_batches",
    "load_eval_set",
    "load_jsonl",
    "load_tokenizer",
    "normalize_record",
    "num_batches",
    "train_tokenizer",
    "validate_item",
    "write_jsonl_atomic",
    "write_tiny",
]
