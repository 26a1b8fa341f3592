"""openPangu-Embedded (PanguEmbeddedForCausalLM): the Llama graph with bias on q, k, v and o,
configured by its own keys (`bias`, model_type PanguEmbedded, rope_theta 1.6e7) and shipped
with `rotary_emb.inv_freq` buffers in its checkpoints.

The reference follows the published modeling code (modeling_openpangu_dense.py): Llama
attention whose four projections carry `bias=config.bias`, RMSNorm, SwiGLU, rotate-half rotary,
untied head. That is transformers' LlamaForCausalLM with attention_bias=True, so the reference
is that model, saved and then re-labelled as a Pangu checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ftengine import Engine, SamplingParams
from model_fixtures import make_tiny_llama
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def pangu(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pangu-embedded")
    model = make_tiny_llama(directory, "gqa", "sentencepiece", attention_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1.6e7})
    config = json.loads((directory / "config.json").read_text())
    config.pop("attention_bias")
    config.update(architectures=["PanguEmbeddedForCausalLM"], model_type="PanguEmbedded",
                  bias=True)
    (directory / "config.json").write_text(json.dumps(config))
    tensors = load_file(directory / "model.safetensors")
    inv_freq = 1.0 / (1.6e7 ** (torch.arange(0, 16, 2).float() / 16))
    for layer in range(config["num_hidden_layers"]):
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory, model


def test_config_maps_pangu_keys(pangu):
    directory, _ = pangu
    engine = Engine.from_pretrained(directory, progress=False)
    assert engine.config.architecture == "PanguEmbeddedForCausalLM"
    assert engine.config.attention_bias and engine.config.rope_theta == pytest.approx(1.6e7)


def test_logits_and_greedy_match_reference(pangu):
    directory, model = pangu
    engine = Engine.from_pretrained(directory, progress=False)
    ids = engine.tokenizer.encode("Pangu models run here") + list(range(5, 60))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(engine.logits(ids), expected,
                               atol=2e-5 * max(np.abs(expected).max(), 1.0))
    output = engine.generate([ids], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                   pad_token_id=0,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert output.token_ids == reference[0, len(ids):].tolist()
