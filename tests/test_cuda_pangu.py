"""Both Pangu families on the CUDA backend: PanGu-alpha against the torch reference of
test_pangu_alpha.py and openPangu-Embedded against transformers' Llama with attention bias (its
published graph), in bfloat16 on the GPU, with the FlashAttention-2 error rule for whole models.
Skipped where there is no GPU or no CUDA build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ftengine import _C, Engine, SamplingParams
from model_fixtures import make_tiny_llama
from test_pangu_alpha import CONFIG, write_pangu_alpha
from transformers import LlamaForCausalLM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (_C.has_cuda and torch.cuda.is_available()),
                       reason="needs a GPU and a CUDA build of ftengine"),
]


def assert_within_twice_torch(ours, reference, torch_low, floor=1e-3):
    assert np.isfinite(ours).all(), "non-finite logits"
    ours_error = np.abs(ours - reference).max()
    torch_error = np.abs(torch_low - reference).max()
    assert ours_error <= 2 * torch_error + floor * np.abs(reference).max(), (ours_error,
                                                                             torch_error)


@pytest.fixture(scope="module")
def pangu_alpha_hd64(tmp_path_factory):
    """A PanGu-alpha with head_dim 64 (hidden 256, 4 heads), weights rounded to bfloat16."""
    directory = tmp_path_factory.mktemp("cuda-pangu-alpha")
    sizes = dict(CONFIG, hidden_size=256, intermediate_size=512, max_position_embeddings=256)
    return directory, write_pangu_alpha(directory, sizes, matrix_std=0.08, dtype=torch.bfloat16)


def pangu_logits(model, ids, dtype=torch.float32):
    """The reference on the CPU (its forward makes its positions there), in `dtype`."""
    with torch.no_grad():
        try:
            return model.to(dtype)(torch.tensor(ids)).float().numpy()
        finally:
            model.float()


def test_pangu_alpha_logits_and_greedy_on_cuda(pangu_alpha_hd64):
    directory, model = pangu_alpha_hd64
    engine = Engine.from_pretrained(directory, device="cuda", progress=False,
                                    kv_cache_tokens=1024, max_batch_tokens=32, max_num_seqs=4)
    ids = list(range(3, 120))  # 117 tokens: prefilled in chunks of 32 over the paged cache
    expected, torch_low = pangu_logits(model, ids), pangu_logits(model, ids, torch.bfloat16)
    assert_within_twice_torch(engine.logits(ids), expected, torch_low)
    noise = np.abs(torch_low - expected).max()  # a margin below twice this is rounding's call
    prompt = list(range(5, 40))
    expected, margins = list(prompt), []
    for _ in range(16):
        logits = pangu_logits(model, expected)[-1]
        top = np.sort(logits)[-2:]
        margins.append(top[1] - top[0])
        expected.append(int(logits.argmax()))
    output = engine.generate([prompt], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    for step, (ours, theirs) in enumerate(zip(output.token_ids, expected[len(prompt):],
                                              strict=True)):
        if ours != theirs:
            assert margins[step] < 2 * noise, (step, margins[step], noise)
            break


def test_openpangu_embedded_on_cuda(tmp_path):
    make_tiny_llama(tmp_path, "gqa", dtype=torch.bfloat16, hidden_size=256,
                    intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=64, attention_bias=True, initializer_range=0.1,
                    rope_parameters={"rope_type": "default", "rope_theta": 1.6e7})
    # The references load the file before it is relabelled: float32 rotary frequencies,
    # the checkpoint's rounded weights.
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    low = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("attention_bias")
    config.update(architectures=["PanguEmbeddedForCausalLM"], model_type="PanguEmbedded",
                  bias=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    engine = Engine.from_pretrained(tmp_path, device="cuda", progress=False,
                                    kv_cache_tokens=1024)
    assert engine.config.architecture == "PanguEmbeddedForCausalLM"
    ids = list(range(3, 90))
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        expected = reference(x).logits[0].cpu().numpy()
        torch_low = low(x).logits[0].float().cpu().numpy()
    assert_within_twice_torch(engine.logits(ids), expected, torch_low)
