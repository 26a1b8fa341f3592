"""Shared fixtures: tiny transformers Llama models written once per session."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import make_tiny_llama

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """make(variant, tokenizer_kind="sentencepiece", dtype=torch.float32) -> (dir, hf_model),
    cached so each model is written once per test session."""
    cache = {}

    def make(variant: str, tokenizer_kind: str = "sentencepiece", dtype=torch.float32):
        key = (variant, tokenizer_kind, dtype)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{variant}-{tokenizer_kind}")
            cache[key] = (directory, make_tiny_llama(directory, variant, tokenizer_kind, dtype))
        return cache[key]

    return make
