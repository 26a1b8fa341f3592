"""PanGu-α (GPTPanguForCausalLM) against a reference written here in torch, following the
published PyTorch port's modeling code (modeling_gptpangu.py): learned absolute positions,
LayerNorm with bias, exact-GELU MLP, biased q/k/v/c_proj, ln_f applied before the top query
layer, whose queries are q_proj(wqe[position]) while keys and values come from the hidden
states; logits through the tied word embedding."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ftengine import ContextLengthError, Engine, SamplingParams
from safetensors.torch import save_file
from tokenizer_fixtures import write_llama_style_tokenizer
from torch import nn


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.attn = nn.ModuleDict({name: nn.Linear(hidden, hidden)
                                   for name in ("q_proj", "k_proj", "v_proj", "c_proj")})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(hidden, inner),
                                  "c_proj": nn.Linear(inner, hidden)})

    def forward(self, hidden, custom_query=None):
        residual = hidden
        hidden = self.ln_1(hidden)
        tokens, width = hidden.shape
        d = width // self.heads
        query = self.attn["q_proj"](custom_query if custom_query is not None else hidden)
        split = lambda x: x.view(tokens, self.heads, d).transpose(0, 1)  # noqa: E731
        q = split(query)
        k, v = split(self.attn["k_proj"](hidden)), split(self.attn["v_proj"](hidden))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(tokens, width)
        hidden = self.attn["c_proj"](attended) + residual
        residual = hidden
        inner = nn.functional.gelu(self.mlp["c_fc"](self.ln_2(hidden)))
        return residual + self.mlp["c_proj"](inner)


class PanguAlpha(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, inner: int,
                 positions: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, hidden)
        self.transformer.wpe = nn.Embedding(positions, hidden)
        self.transformer.wqe = nn.Embedding(positions, hidden)
        self.transformer.h = nn.ModuleList(Block(hidden, heads, inner, eps) for _ in range(layers))
        self.transformer.ln_f = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        positions = torch.arange(len(ids))
        hidden = t.wte(ids) + t.wpe(positions)
        last = len(t.h) - 1
        for i, block in enumerate(t.h):
            if i == last:
                hidden = t.ln_f(hidden)
            hidden = block(hidden, t.wqe(positions) if i == last else None)
        return hidden @ t.wte.weight.T


CONFIG = dict(vocab_size=None, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=192,
              max_position_embeddings=96, layer_norm_epsilon=1e-5)


def write_pangu_alpha(directory, sizes=CONFIG, matrix_std=0.25, dtype=torch.float32):
    """Writes a random PanGu-alpha checkpoint into `directory` (safetensors under the port's
    names, config.json, a sentencepiece tokenizer); returns the float32 torch reference holding
    the same weights, rounded to `dtype` as the file stores them."""
    vocab = write_llama_style_tokenizer(directory, "sentencepiece", vocab_size=384)
    torch.manual_seed(0)
    model = PanguAlpha(vocab, sizes["hidden_size"], sizes["num_layers"], sizes["num_heads"],
                       sizes["intermediate_size"], sizes["max_position_embeddings"]).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, matrix_std)
            elif name.endswith("weight"):
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0, 0.1)
            parameter.copy_(parameter.to(dtype).float())
    tensors = {name: p.detach().to(dtype).clone().contiguous()
               for name, p in model.state_dict().items()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()  # as the port saves it
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = dict(sizes, vocab_size=vocab, architectures=["GPTPanguForCausalLM"],
                  model_type="gpt_pangu", activation_function="gelu")
    (directory / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def pangu_alpha(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pangu-alpha")
    return directory, write_pangu_alpha(directory)


def test_logits_match_reference(pangu_alpha):
    directory, model = pangu_alpha
    engine = Engine.from_pretrained(directory, progress=False)
    ids = list(range(3, 70))
    with torch.no_grad():
        expected = model(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(engine.logits(ids), expected,
                               atol=2e-5 * max(np.abs(expected).max(), 1.0))


def test_greedy_decode_matches_reference(pangu_alpha):
    """Decode steps run the query layer one position at a time over the cached keys."""
    directory, model = pangu_alpha
    engine = Engine.from_pretrained(directory, progress=False, max_batch_tokens=16,
                                    max_num_seqs=4)
    ids = list(range(5, 40))
    expected = list(ids)
    with torch.no_grad():
        for _ in range(20):
            expected.append(int(model(torch.tensor(expected))[-1].argmax()))
    output = engine.generate([ids], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert output.token_ids == expected[len(ids):]


def test_positions_past_the_table_are_refused(pangu_alpha):
    directory, _ = pangu_alpha
    engine = Engine.from_pretrained(directory, progress=False)
    with pytest.raises(ContextLengthError, match="context of 96"):
        engine.generate([list(range(3, 90))], SamplingParams(max_new_tokens=10))
    with pytest.raises(ContextLengthError):
        engine.logits(list(range(3, 100)))
