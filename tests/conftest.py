"""Shared fixtures: tiny transformers Llama models written once per session (CPU and GPU tests)."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import CUDA_DTYPES, CUDA_VARIANTS, load_reference, make_tiny_llama

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


@pytest.fixture(scope="session")
def cuda_model(tmp_path_factory):
    """make(variant, dtype) -> (directory, float32 transformers model on the GPU), one checkpoint
    per pair of CUDA_VARIANTS and CUDA_DTYPES. The reference is loaded back from the file: its
    weights are the checkpoint's rounded ones, its rotary frequencies float32 (a model cast with
    .to(bfloat16) would round those too, and drift from every correct implementation as
    positions grow)."""
    cache = {}

    def make(variant: str, dtype: str):
        key = (variant, dtype)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"cuda-{variant}-{dtype}")
            make_tiny_llama(directory, "gqa", dtype=CUDA_DTYPES[dtype], initializer_range=0.1,
                            **CUDA_VARIANTS[variant])
            cache[key] = (directory, load_reference(directory, torch.float32))
        return cache[key]

    return make
