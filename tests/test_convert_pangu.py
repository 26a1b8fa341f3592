"""python -m ftengine.convert pangu-alpha: the PyTorch port's pickle (with its attention mask
buffers and a tied lm_head) becomes a safetensors directory with the same logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from ftengine import Engine, WeightFileError
from ftengine.convert import main as convert_main
from test_pangu_alpha import CONFIG, PanguAlpha
from tokenizer_fixtures import write_llama_style_tokenizer


@pytest.fixture(scope="module")
def port_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pangu-port")
    vocab = write_llama_style_tokenizer(directory, "sentencepiece", vocab_size=384)
    shutil.move(directory / "tokenizer.model", directory / "vocab.model")
    torch.manual_seed(1)
    model = PanguAlpha(vocab, 64, 3, 4, 192, 96).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.25 if parameter.dim() == 2 else 0.1)
    state = dict(model.state_dict())
    for layer in range(3):  # the port's buffers
        state[f"transformer.h.{layer}.attn.bias"] = torch.ones(1, 1, 96, 96, dtype=torch.uint8)
        state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    torch.save(state, directory / "pytorch_model.bin")
    config = dict(CONFIG, vocab_size=vocab, architectures=["GPTPanguForCausalLM"],
                  model_type="gpt_pangu", activation_function="gelu")
    (directory / "config.json").write_text(json.dumps(config))
    return directory, model


def test_converted_port_matches_the_model(port_checkpoint, tmp_path):
    source, model = port_checkpoint
    assert convert_main(["pangu-alpha", str(source), str(tmp_path / "out"), "--quiet"]) == 0
    engine = Engine.from_pretrained(tmp_path / "out", progress=False)
    ids = list(range(3, 60))
    with torch.no_grad():
        expected = model(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(engine.logits(ids), expected,
                               atol=2e-5 * max(np.abs(expected).max(), 1.0))


def test_pickled_code_is_refused(port_checkpoint, tmp_path, capsys):
    source, _ = port_checkpoint
    hostile = tmp_path / "hostile"
    shutil.copytree(source, hostile)
    torch.save({"transformer.wte.weight": WeightFileError}, hostile / "pytorch_model.bin")
    assert convert_main(["pangu-alpha", str(hostile), str(tmp_path / "out"), "--quiet"]) == 1
    assert "weights-only" in capsys.readouterr().err
