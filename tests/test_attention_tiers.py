"""The merge behind CPU-GPU cooperative attention, on the CPU: a sequence's KV blocks split
into two tiers (as between GPU and host memory), attention computed over each tier separately
(the CPU kernel standing in for both devices) and the partials merged by log-sum-exp must equal
attention over all the blocks at once."""

import math

import numpy as np
import pytest
import torch
from ftengine import _C
from test_attention_cpu import make_case, reference_attention


def tier_view(blocks, tokens):
    """A one-sequence block table over `blocks` (the tier's share, in token order) holding
    `tokens` cached tokens."""
    table = np.asarray([blocks], dtype=np.int32) if blocks else np.zeros((1, 1), np.int32)
    return table, np.asarray([tokens], dtype=np.int32)


def attend(case, q, table, kv_len, causal):
    scale = 1.0 / math.sqrt(q.shape[2])
    return _C.attention_cpu(q, case["k_cache"], case["v_cache"], table,
                            np.asarray([0, q.shape[0]], dtype=np.int32), kv_len, scale, causal)


# (queries, host blocks of 16 slots): the step's own keys are always in the device tier, so the
# host prefix ends at or before kv_len - q_len = 83 - q_len; a host prefix shorter than the query
# block (64 queries over 16 host keys) is allowed without a mask.
TIER_SPLITS = [(1, 0), (1, 1), (1, 3), (1, 5), (7, 0), (7, 1), (7, 3), (64, 0), (64, 1)]


@pytest.mark.parametrize("q_len,host_blocks", TIER_SPLITS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2)])
def test_prefix_on_host_merged_with_rest_equals_whole(q_len, host_blocks, num_heads,
                                                      num_kv_heads):
    """The oldest blocks live on the host: every query of this step comes after them, so the
    host part is attention without a mask; the device part is causal over the rest, whose
    positions are the originals shifted by the host prefix (the kernels' chunked-prefill rule)."""
    block_size, kv_len, head_dim = 16, 83, 64  # 6 blocks, the last partly filled
    case = make_case([q_len], [kv_len], num_heads, num_kv_heads, head_dim, block_size, seed=q_len)
    blocks = case["block_table"][0].tolist()
    host_tokens = host_blocks * block_size
    q = case["q"]
    parts = []
    if host_blocks:
        table, length = tier_view(blocks[:host_blocks], host_tokens)
        parts.append(attend(case, q, table, length, causal=False))
    table, length = tier_view(blocks[host_blocks:], kv_len - host_tokens)
    parts.append(attend(case, q, table, length, causal=True))
    out, lse = _C.merge_attention_cpu([p[0] for p in parts], [p[1] for p in parts])
    expected_out, expected_lse = reference_attention(q, case["keys"], case["values"], [q_len],
                                                     [kv_len], 1.0 / math.sqrt(head_dim), True)
    torch.testing.assert_close(torch.from_numpy(out).double(), expected_out, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(lse).double(), expected_lse, atol=3e-5,
                               rtol=1e-5)


def test_decode_over_interleaved_tiers():
    """Decode sees every cached key, so which blocks sit in which tier is free: alternate them
    (with the partly filled last block on the host)."""
    block_size, kv_len = 16, 90
    case = make_case([1], [kv_len], 8, 2, 128, block_size, seed=3)
    blocks = case["block_table"][0].tolist()
    device = blocks[0::2]
    host = blocks[1::2]  # includes the last, partly filled block (6 blocks: index 5)
    device_tokens = len(device) * block_size
    outs, lses = [], []
    for tier, tokens in ((device, device_tokens), (host, kv_len - device_tokens)):
        table, length = tier_view(tier, tokens)
        out, lse = attend(case, case["q"], table, length, causal=False)
        outs.append(out)
        lses.append(lse)
    out, lse = _C.merge_attention_cpu(outs, lses)
    expected_out, expected_lse = reference_attention(case["q"], case["keys"], case["values"],
                                                     [1], [kv_len], 1.0 / math.sqrt(128), True)
    torch.testing.assert_close(torch.from_numpy(out).double(), expected_out, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(lse).double(), expected_lse, atol=3e-5,
                               rtol=1e-5)


def test_merge_of_empty_parts():
    """A tier that saw no key (lse -inf, zero output) changes nothing; two empty tiers give the
    kernels' empty row: zeros and -inf."""
    rng = np.random.default_rng(0)
    out = rng.standard_normal((3, 2, 64), dtype=np.float32)
    lse = rng.standard_normal((3, 2), dtype=np.float32)
    empty_out = np.zeros_like(out)
    empty_lse = np.full_like(lse, -np.inf)
    merged_out, merged_lse = _C.merge_attention_cpu([empty_out, out], [empty_lse, lse])
    np.testing.assert_allclose(merged_out, out, rtol=1e-6)
    np.testing.assert_allclose(merged_lse, lse, rtol=1e-6)
    merged_out, merged_lse = _C.merge_attention_cpu([empty_out, empty_out],
                                                    [empty_lse, empty_lse])
    assert (merged_out == 0).all() and np.isneginf(merged_lse).all()


def test_merge_rejects_mismatched_parts():
    out = np.zeros((2, 2, 64), np.float32)
    lse = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="as many lse"):
        _C.merge_attention_cpu([out, out], [lse])
    with pytest.raises(ValueError, match="outs"):
        _C.merge_attention_cpu([out, np.zeros((2, 2, 32), np.float32)], [lse, lse])
