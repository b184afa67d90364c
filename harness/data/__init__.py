"""Data: prompts, the tiny generator, real-set loaders, tokenizer training, batching.

See each module's docstring for shapes and conventions; the item schema is documented in
``harness.data.instruct`` and the (already shifted) label convention in ``harness.data.batching``.
"""

#: public name -> submodule; loaded on first use (PEP 562), so `import harness.data` (and the steps that
#: need only its torch-free parts: data, leaderboard, publish) does not import torch through batching
_LAZY = {
    "IGNORE_INDEX": "batching",
    "collate": "batching",
    "collate_prompts": "batching",
    "encode": "batching",
    "encode_prompt": "batching",
    "epoch_order": "batching",
    "iterate_batches": "batching",
    "num_batches": "batching",
    "DataError": "errors",
    "HUB_LAYOUTS": "instruct",
    "SET_SCHEMA": "instruct",
    "check_data_plan": "instruct",
    "check_no_overlap": "instruct",
    "check_set_spec": "instruct",
    "filter_long_prompts": "instruct",
    "find_overlap": "instruct",
    "hub_file": "instruct",
    "load_eval_set": "instruct",
    "load_jsonl": "instruct",
    "load_set": "instruct",
    "normalize_record": "instruct",
    "prepare_instruct_data": "instruct",
    "validate_item": "instruct",
    "write_jsonl_atomic": "instruct",
    "build_prompt": "prompts",
    "generate_tiny": "tiny",
    "write_tiny": "tiny",
    "item_texts": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
