"""Op tests of the CPU backend's kernels (other than attention, see test_attention_cpu.py)
against torch in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ftengine import _C
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


@pytest.fixture(scope="module")
def ops():
    return _C.CpuOps()


def rng(seed=0):
    return np.random.default_rng(seed)


def bf16_round(array: np.ndarray) -> np.ndarray:
    return torch.from_numpy(array).bfloat16().double().numpy()


@pytest.mark.parametrize("rows,cols", [(1, 64), (97, 80), (5, 4096)])
def test_rmsnorm(ops, rows, cols):
    x = rng().standard_normal((rows, cols)).astype(np.float32) * 3
    w = rng(1).uniform(0.5, 1.5, cols).astype(np.float32)
    x64 = x.astype(np.float64)
    reference = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(ops.rmsnorm(x, w, 1e-5), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows,inputs,outputs", [(1, 64, 200), (97, 128, 80), (3, 96, 130)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(ops, weight_dtype, rows, inputs, outputs, with_bias):
    x = rng().standard_normal((rows, inputs)).astype(np.float32)
    w = rng(1).standard_normal((outputs, inputs)).astype(np.float32) * 0.1
    b = rng(2).standard_normal(outputs).astype(np.float32) if with_bias else None
    w_ref = bf16_round(w) if weight_dtype == "bfloat16" else w.astype(np.float64)
    reference = x.astype(np.float64) @ w_ref.T + (b if with_bias else 0)
    ours = ops.linear(x, w, b, weight_dtype)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_silu_mul(ops):
    gate_up = rng().standard_normal((33, 2 * 70)).astype(np.float32) * 4
    g, u = gate_up[:, :70].astype(np.float64), gate_up[:, 70:].astype(np.float64)
    reference = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(ops.silu_mul(gate_up), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedding(ops, dtype):
    table = rng().standard_normal((50, 24)).astype(np.float32)
    ids = np.array([0, 49, 7, 7, 13], dtype=np.int32)
    expected = bf16_round(table)[ids] if dtype == "bfloat16" else table[ids].astype(np.float64)
    np.testing.assert_array_equal(ops.embedding(table, ids, dtype), expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vocabulary_parallel_embedding_shards_sum_to_the_whole(ops, dtype):
    """Each rank's shard holds ids [first_id, first_id + rows) and gives zeros elsewhere."""
    table = rng().standard_normal((60, 16)).astype(np.float32)
    ids = np.array([0, 59, 29, 30, 31, 12], dtype=np.int32)
    whole = ops.embedding(table, ids, dtype)
    shards = [ops.embedding(np.ascontiguousarray(table[begin:begin + 30]), ids, dtype, begin)
              for begin in (0, 30)]
    np.testing.assert_array_equal(shards[0] + shards[1], whole)
    np.testing.assert_array_equal(shards[0][1], np.zeros(16))

def rope_reference(x, positions, inv_freq, interleaved):
    """float64 rotation with float32 angles, as transformers computes them."""
    angles = (positions[:, None].astype(np.float32) * inv_freq[None, :].astype(np.float32))
    cos, sin = np.cos(angles.astype(np.float64)), np.sin(angles.astype(np.float64))
    x = x.astype(np.float64)
    out = np.empty_like(x)
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = even * cos[:, None] - odd * sin[:, None]
        out[..., 1::2] = odd * cos[:, None] + even * sin[:, None]
    else:
        half = x.shape[-1] // 2
        first, second = x[..., :half], x[..., half:]
        out[..., :half] = first * cos[:, None] - second * sin[:, None]
        out[..., half:] = second * cos[:, None] + first * sin[:, None]
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (2, 1, 80)])
def test_rotary_cache_write(ops, interleaved, heads, kv_heads, head_dim):
    tokens = 37
    qkv = rng().standard_normal((tokens, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    positions = rng(1).integers(0, 8000, tokens).astype(np.int32)
    inv_freq = np.array(_C.rope_inv_freq(10000.0, "default", rotary_dim=head_dim), np.float32)
    q, k, v = ops.rotary(qkv, positions, inv_freq.tolist(), heads, kv_heads, head_dim, interleaved)
    split = qkv.reshape(tokens, heads + 2 * kv_heads, head_dim)
    np.testing.assert_allclose(
        q, rope_reference(split[:, :heads], positions, inv_freq, interleaved), atol=2e-5)
    np.testing.assert_allclose(
        k, rope_reference(split[:, heads:heads + kv_heads], positions, inv_freq, interleaved),
        atol=2e-5)
    np.testing.assert_array_equal(v, split[:, heads + kv_heads:])


@pytest.mark.parametrize("rope", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
         high_freq_factor=4.0, original_max_position_embeddings=8192),
    dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
         high_freq_factor=4.0, original_max_position_embeddings=64),
])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_frequencies_match_transformers(rope, head_dim):
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_parameters=rope)
    if rope["rope_type"] == "default":
        reference, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        reference, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    ours = _C.rope_inv_freq(
        rope["rope_theta"], rope["rope_type"], rope.get("factor", 1.0),
        rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0),
        rope.get("original_max_position_embeddings", 8192), rotary_dim=head_dim)
    np.testing.assert_allclose(ours, reference.double().numpy(), rtol=2e-6)


def test_greedy_sampling_takes_first_maximum():
    logits = np.array([0.5, 2.0, -1.0, 2.0], np.float32)
    assert _C.sample_token(logits, 0.0, 0, 1.0, 1.0, [], 0) == 1
    assert _C.sample_token(logits, 1.0, 1, 1.0, 1.0, [], 5) == 1  # top_k=1 is greedy


def sample_counts(logits, draws, **kwargs):
    options = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, history=[])
    options.update(kwargs)
    counts = np.zeros(len(logits))
    for seed in range(draws):
        counts[_C.sample_token(np.asarray(logits, np.float32), seed=seed, **options)] += 1
    return counts / draws


def test_sampling_follows_the_softmax():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    frequencies = sample_counts(logits, 4000)
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    hot = sample_counts(logits, 4000, temperature=2.0)
    expected = np.exp(logits / 2) / np.exp(logits / 2).sum()
    np.testing.assert_allclose(hot, expected, atol=0.03)


def test_top_k_and_top_p_cut_the_tail():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    top2 = sample_counts(logits, 2000, top_k=2)
    assert top2[2:].sum() == 0
    np.testing.assert_allclose(top2[:2], [0.625, 0.375], atol=0.04)
    nucleus = sample_counts(logits, 2000, top_p=0.7)  # 0.5 + 0.3 reaches 0.7
    assert nucleus[2:].sum() == 0


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = rng().standard_normal(40).astype(np.float32)
    history = [3, 7, 7, 11, 3, 0]
    processed = RepetitionPenaltyLogitsProcessor(1.7)(
        torch.tensor([history]), torch.from_numpy(logits.copy())[None])[0].numpy()
    # Greedy after the penalty picks what transformers' processed logits pick.
    assert _C.sample_token(logits, 0.0, 0, 1.0, 1.7, history, 0) == int(np.argmax(processed))
    boosted = logits.copy()
    boosted[7] = 10.0  # the favourite, penalised below the runner-up
    processed = RepetitionPenaltyLogitsProcessor(20.0)(
        torch.tensor([history]), torch.from_numpy(boosted.copy())[None])[0].numpy()
    assert _C.sample_token(boosted, 0.0, 0, 1.0, 20.0, history, 0) == int(np.argmax(processed))


def test_sampling_edge_cases():
    logits = np.array([5.0, 1.0, -3.0, 0.5], np.float32)
    # A vanishing temperature is greedy, not an overflow to the least likely token.
    assert all(_C.sample_token(logits, 1e-38, 0, 1.0, 1.0, [], seed) == 0 for seed in range(20))
    poisoned = np.array([np.nan, 1.0, np.nan, 0.5], np.float32)
    draws = {_C.sample_token(poisoned, 1.0, 0, 1.0, 1.0, [], seed) for seed in range(200)}
    assert draws <= {1, 3}
    assert _C.sample_token(poisoned, 0.0, 0, 1.0, 1.0, [], 0) == 1
    for bad in [dict(temperature=float("nan")), dict(temperature=-1.0), dict(top_p=0.0),
                dict(top_p=1.5), dict(top_k=-1), dict(repetition_penalty=0.0)]:
        options = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
        options.update(bad)
        with pytest.raises(ValueError):
            _C.sample_token(logits, history=[], seed=0, **options)
    with pytest.raises(ValueError, match="non-empty"):
        _C.sample_token(np.zeros(0, np.float32), 1.0, 0, 1.0, 1.0, [], 0)


def test_top_p_after_top_k_uses_the_renormalised_mass():
    """transformers applies top-k, then top-p to what top-k kept."""
    logits = np.log([0.4, 0.3, 0.2, 0.1])
    # Top-2 renormalised: 0.571, 0.429. top_p=0.5 keeps only the first of them.
    counts = sample_counts(logits, 500, top_k=2, top_p=0.5)
    assert counts[0] == 1.0
    nucleus = sample_counts(logits, 3000, top_p=0.75)  # 0.4 + 0.3 + 0.2 reaches 0.75
    np.testing.assert_allclose(nucleus[:3], np.array([0.4, 0.3, 0.2]) / 0.9, atol=0.035)
    assert nucleus[3] == 0
