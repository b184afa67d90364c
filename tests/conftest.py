"""Shared fixtures: tiny data, tokenizer and models built in-process (seconds, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data():
    from harness.data.tiny import generate_tiny

    return generate_tiny(0, n_train=200, n_valid=20, n_test=20, prompt_style="short")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_data, tmp_path_factory):
    from harness.data.tokenizer import item_texts, train_tokenizer

    return train_tokenizer(item_texts(tiny_data["train"]), 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gpt2(tokenizer, *, n_layer: int, seed: int, n_embd: int = 32, n_head: int = 2):
    """A randomly initialised tiny GPT-2 for ``tokenizer`` (its special ids), in eval mode."""
    from harness.models import build_tiny

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return build_tiny({"arch": "gpt2", "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}, len(tokenizer),
                      seed=seed, max_positions=64, special_ids=special).eval()
