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
    HUB_LAYOUTS,
    SET_SCHEMA,
    check_data_plan,
    check_no_overlap,
    check_set_spec,
    filter_long_prompts,
    find_overlap,
    hub_file,
    load_eval_set,
    load_jsonl,
    load_set,
    normalize_record,
    prepare_instruct_data,
    validate_item,
    write_jsonl_atomic,
)
from .prompts import build_prompt
from .tiny import generate_tiny, write_tiny
from .tokenizer import item_texts, load_tokenizer, train_tokenizer

__all__ = [
    "HUB_LAYOUTS",
    "IGNORE_INDEX",
    "SET_SCHEMA",
    "DataError",
    "build_prompt",
    "check_data_plan",
    "check_no_overlap",
    "check_set_spec",
    "collate",
    "collate_prompts",
    "encode",
    "encode_prompt",
    "epoch_order",
    "filter_long_prompts",
    "find_overlap",
    "generate_tiny",
    "hub_file",
    "item_texts",
    "iterate_batches",
    "load_eval_set",
    "load_jsonl",
    "load_set",
    "load_tokenizer",
    "normalize_record",
    "num_batches",
    "prepare_instruct_data",
    "train_tokenizer",
    "validate_item",
    "write_jsonl_atomic",
    "write_tiny",
]
