"""GGUF files against transformers loading the same file (gguf_file=): tiny models in every
supported weight type, and the real SmolLM2-135M-Instruct Q4_1 file the default model uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ftengine import Engine, SamplingParams
from ftengine.checkpoint import DEFAULT_MODEL, resolve_model
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import write_tiny_gguf
from model_fixtures import make_tiny_llama
from transformers import AutoModelForCausalLM

WEIGHT_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A tiny Llama whose matrix widths are multiples of 256 (the K-quant block)."""
    directory = tmp_path_factory.mktemp("gguf-source")
    model = make_tiny_llama(directory, "gqa", "byte_level_bpe", hidden_size=256,
                            intermediate_size=512, head_dim=32)
    return directory, model


def transformers_from_gguf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def greedy(model, ids, new_tokens):
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda q: q.name)
def test_tiny_gguf_matches_transformers(tiny_source, tmp_path, qtype):
    directory, model = tiny_source
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype.name}.gguf", model, directory, qtype)
    engine = Engine.from_pretrained(path, progress=False)
    reference = transformers_from_gguf(path)
    ids = engine.tokenizer.encode("The quick brown fox") + list(range(5, 40))
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    ours = engine.logits(ids)
    np.testing.assert_allclose(ours, expected, atol=5e-5 * max(np.abs(expected).max(), 1.0))
    output = engine.generate([ids], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert output.token_ids == greedy(reference, ids, 12)


def test_rope_freqs_carry_llama3_scaling(tmp_path):
    """Llama 3.1 GGUFs hold their rope scaling as per-frequency divisors (rope_freqs): the GGUF
    must give the logits of the transformers model with llama3 rope scaling it came from."""
    source = tmp_path / "source"
    model = make_tiny_llama(source, "llama3_rope", "byte_level_bpe", max_position_embeddings=512)
    path = write_tiny_gguf(tmp_path / "llama31.gguf", model, source, Q.F32)
    engine = Engine.from_pretrained(path, progress=False)
    assert len(engine.config.rope_freq_factors) == model.config.head_dim // 2
    ids = list(range(5, 300))  # past original_max_position_embeddings (64), where scaling acts
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(engine.logits(ids), expected,
                               atol=5e-5 * max(np.abs(expected).max(), 1.0))


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model(DEFAULT_MODEL)
    engine = Engine.from_pretrained(path, progress=False)
    return engine, transformers_from_gguf(path)


SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def test_smollm2_config(smollm2):
    engine, _ = smollm2
    config = engine.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and config.rope_interleaved


@pytest.mark.parametrize("prompt", SMOLLM2_PROMPTS)
def test_smollm2_greedy_matches_transformers(smollm2, prompt):
    engine, reference = smollm2
    ids = engine.tokenizer.encode(prompt)
    output = engine.generate([ids], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
    assert output.token_ids == greedy(reference, ids, 24)


def test_smollm2_chat_turns_match_transformers(smollm2):
    engine, reference = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for follow_up in ["And of Germany?", "Thanks!"]:
        ids = engine.chat_prompt(messages)
        reply = engine.generate([ids], SamplingParams(max_new_tokens=24))[0]
        expected = greedy(reference, ids, 24)
        stop = next((i for i, t in enumerate(expected) if t in engine.tokenizer.eos_token_ids),
                    None)
        assert reply.token_ids == expected[: None if stop is None else stop + 1]
        messages += [{"role": "assistant", "content": reply.text},
                     {"role": "user", "content": follow_up}]
