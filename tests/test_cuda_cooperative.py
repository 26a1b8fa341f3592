"""CPU-GPU cooperative attention on the GPU: a KV cache whose last blocks live in pinned host
memory gives what the all-on-GPU cache gives — prompt logits against transformers (the
twice-torch rule), greedy tokens equal to the device-only engine's for single prompts and
mixed batches — through each route (the CPU kernel, streaming to the GPU, the automatic mix).
Run by scripts/gpu_run.sh; skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from ftengine import _C, Engine, SamplingParams
from ftengine.errors import FtengineError
from test_cuda_model import (
    assert_greedy_matches,
    assert_within_twice_torch,
    dtype_noise,
    hf_logits,
    low_precision_logits,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (_C.has_cuda and torch.cuda.is_available()),
                       reason="needs a GPU and a CUDA build of ftengine"),
]

BLOCK = 64
DEVICE_TOKENS = 2 * BLOCK  # the GPU keeps two blocks; everything after spills to the host
LONG_PROMPT = [(7 * i + 3) % 380 + 2 for i in range(300)]  # 300 tokens: chunks on both tiers


def budget_for(directory_config, tokens):
    """gpu_kv_budget (GiB) that holds `tokens` KV tokens of a tiny model."""
    layers, kv_heads, head_dim = directory_config
    return tokens * layers * 2 * kv_heads * head_dim * 2 / 2**30


def tiny_shape(engine):
    config = engine.config
    return config.num_layers, config.num_kv_heads, config.head_dim


def make_engines(directory, dtype, route, **options):
    """(device-only engine, engine with a host tier) of the same checkpoint."""
    device_only = Engine.from_pretrained(directory, device="cuda", dtype=dtype, progress=False,
                                         kv_cache_tokens=4096, block_size=BLOCK, **options)
    budget = budget_for(tiny_shape(device_only), DEVICE_TOKENS)
    tiered = Engine.from_pretrained(directory, device="cuda", dtype=dtype, progress=False,
                                    kv_cache_tokens=4096, block_size=BLOCK, gpu_kv_budget=budget,
                                    host_tier_attention=route, **options)
    assert tiered._runtime.host_tier_tokens == 4096 - DEVICE_TOKENS
    return device_only, tiered


@pytest.mark.parametrize("route", ["auto", "cpu", "stream"])
@pytest.mark.parametrize("variant,dtype", [("gqa_hd64", "bfloat16"), ("mha_hd128", "float16"),
                                           ("llama3_rope_gqa8", "bfloat16")])
def test_prompt_logits_over_both_tiers(cuda_model, variant, dtype, route):
    directory, reference = cuda_model(variant, dtype)
    _, tiered = make_engines(directory, dtype, route, max_batch_tokens=100)
    ours = tiered.logits(LONG_PROMPT)
    assert_within_twice_torch(ours, hf_logits(reference, LONG_PROMPT),
                              low_precision_logits(directory, LONG_PROMPT, dtype))
    stats = tiered._runtime.host_tier_stats()
    assert stats["layers"] > 0
    if route == "cpu":
        assert stats["cpu_seconds"] > 0 and stats["streamed_bytes"] == 0
    else:  # auto streams
        assert stats["streamed_bytes"] > 0 and stats["cpu_seconds"] == 0


@pytest.mark.parametrize("route", ["auto", "cpu", "stream"])
@pytest.mark.parametrize("variant", ["gqa_hd64", "mha_hd128"])
def test_greedy_decode_over_host_tier(cuda_model, variant, route):
    """Prompts inside the GPU's blocks, generation running on into the host tier; a batch whose
    first sequence holds the GPU's blocks and whose others live on the host entirely; decode
    steps mixing graph-recorded (device-only) and eager (host-tier) steps. Greedy tokens equal
    the float32 reference's, and the device-only engine's, wherever the margins are not within
    rounding (the tiers sum in another order: bit-identical logits are not to be had)."""
    directory, reference = cuda_model(variant, "bfloat16")
    device_only, tiered = make_engines(directory, "bfloat16", route)
    noise = dtype_noise(directory, reference, "bfloat16")
    prompts = [LONG_PROMPT[:40], LONG_PROMPT[:90], LONG_PROMPT[5:260]]
    for batch in ([prompts[0]], [prompts[2]], prompts):
        params = SamplingParams(max_new_tokens=200 if len(batch) == 1 else 120, ignore_eos=True)
        for engine in (tiered, device_only):
            for prompt, output in zip(batch, engine.generate(batch, params), strict=True):
                assert_greedy_matches(reference, prompt, output.token_ids, noise)
    stats = tiered._runtime.host_tier_stats()
    assert stats["layers"] > 0
    # cpu: all on the CPU; stream: all over the bus; auto: decode split between the two.
    assert (stats["cpu_bytes"] > 0) == (route != "stream")
    assert (stats["streamed_bytes"] > 0) == (route != "cpu")


def test_host_tier_errors_are_clear(cuda_model):
    directory, _ = cuda_model("gqa_hd64", "bfloat16")
    with pytest.raises(FtengineError, match="host memory"):
        # About a terabyte of host tier for this tiny model: refused before anything is pinned.
        Engine.from_pretrained(directory, device="cuda", progress=False,
                               kv_cache_tokens=2**30, gpu_kv_budget=0.001)
    with pytest.raises(FtengineError, match="host_tier_attention"):
        Engine.from_pretrained(directory, device="cuda", progress=False,
                               host_tier_attention="disk")
    with pytest.raises(FtengineError, match="gpu_kv_budget"):
        Engine.from_pretrained(directory, device="cuda", progress=False, gpu_kv_budget=-1)
    with pytest.raises(FtengineError, match="less than one block"):
        Engine.from_pretrained(directory, device="cuda", progress=False, kv_cache_tokens=4096,
                               gpu_kv_budget=1e-9)
