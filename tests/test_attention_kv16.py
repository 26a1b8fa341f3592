"""Op tests of the CPU attention member over a 16-bit KV cache (the host tier of CPU-GPU
cooperative attention; _C.attention_cpu with kv_dtype) against a float64 torch reference that
sees the same 16-bit-rounded keys and values.
"""

import math

import numpy as np
import pytest
import torch
from ftengine import _C
from test_attention_cpu import make_case, reference_attention

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def to_16bit(cache, kv_dtype):
    """(bits as uint16, the float32 values those bits hold) of a float32 cache."""
    rounded = torch.from_numpy(cache).to(TORCH_DTYPES[kv_dtype])
    return rounded.view(torch.int16).numpy().view(np.uint16), rounded.float().numpy()


def run_kv16(q_lens, kv_lens, num_heads, num_kv_heads, head_dim, block_size, causal, kv_dtype,
             seed, num_threads=0):
    case = make_case(q_lens, kv_lens, num_heads, num_kv_heads, head_dim, block_size, seed)
    k_bits, k_values = to_16bit(case["k_cache"], kv_dtype)
    v_bits, v_values = to_16bit(case["v_cache"], kv_dtype)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = _C.attention_cpu(case["q"], k_bits, v_bits, case["block_table"],
                                case["cu_seqlens_q"], case["seqlens_kv"], scale, causal,
                                num_threads, kv_dtype=kv_dtype)
    # The reference reads the rounded values through the same block table.
    keys, values = [], []
    for seq, kv_len in enumerate(kv_lens):
        ids = case["block_table"][seq, : -(-kv_len // block_size)]
        keys.append(k_values[ids].reshape(-1, num_kv_heads, head_dim)[:kv_len])
        values.append(v_values[ids].reshape(-1, num_kv_heads, head_dim)[:kv_len])
    ref_out, ref_lse = reference_attention(case["q"], keys, values, q_lens, kv_lens, scale,
                                           causal)
    # float32 arithmetic over exact 16-bit inputs: float32 accumulation error only.
    torch.testing.assert_close(torch.from_numpy(out).double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(lse).double(), ref_lse, atol=2e-5, rtol=1e-5)
    return out, lse


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_decode_batch(head_dim, num_heads, num_kv_heads, kv_dtype):
    # Sequences of awkward lengths: one key, a block tail, several splits' worth.
    kv_lens = [1, 97, 1025, 3000]
    run_kv16([1] * len(kv_lens), kv_lens, num_heads, num_kv_heads, head_dim, 16, True, kv_dtype,
             seed=head_dim + num_heads)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_short_chunks(kv_dtype, causal):
    # Several queries per sequence, more rows than one work item carries (8 tokens x 8 heads).
    q_lens, kv_lens = [8, 3, 5], [8, 700, 2049]
    run_kv16(q_lens, kv_lens, 8, 1, 64, 64, causal, kv_dtype, seed=7)


def test_empty_sequences_and_threads():
    # A sequence with no keys gets zeros and -inf; the thread count changes nothing.
    q_lens, kv_lens = [1, 1, 1], [0, 600, 5]
    out, lse = run_kv16(q_lens, kv_lens, 4, 2, 64, 16, False, "bfloat16", seed=3)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    out_one, lse_one = run_kv16(q_lens, kv_lens, 4, 2, 64, 16, False, "bfloat16", seed=3,
                                num_threads=1)
    np.testing.assert_allclose(out, out_one, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lse, lse_one, rtol=0, atol=1e-6)


def test_float16_specials_widen_exactly():
    # Subnormal, largest finite and negative zero float16 keys give the float64 answer.
    case = make_case([1], [4], 1, 1, 64, 16, seed=5)
    values = np.array([6e-8, 65504.0, -0.0, 1e-3], dtype=np.float32)
    case["k_cache"][:] = 0
    case["k_cache"][case["block_table"][0, 0], :4, 0, 0] = values
    k_bits, k_values = to_16bit(case["k_cache"], "float16")
    assert k_values[case["block_table"][0, 0], 0, 0, 0] > 0  # the subnormal survived rounding
    v_bits, _ = to_16bit(case["v_cache"], "float16")
    out, lse = _C.attention_cpu(case["q"] * 0 + 1e-3, k_bits, v_bits, case["block_table"],
                                case["cu_seqlens_q"], case["seqlens_kv"], 1.0, True,
                                kv_dtype="float16")
    scores = 1e-3 * k_values[case["block_table"][0, 0], :4, 0, :].astype(np.float64).sum(-1)
    np.testing.assert_allclose(lse[0, 0], np.log(np.exp(scores - scores.max()).sum())
                               + scores.max(), rtol=1e-6)


def test_bad_kv_dtype_and_arrays():
    case = make_case([1], [4], 2, 2, 64, 16, seed=1)
    bits, _ = to_16bit(case["k_cache"], "bfloat16")
    args = (case["block_table"], case["cu_seqlens_q"], case["seqlens_kv"], 0.125, True)
    with pytest.raises(ValueError, match="kv_dtype"):
        _C.attention_cpu(case["q"], bits, bits, *args, kv_dtype="int8")
    with pytest.raises(ValueError, match="uint16"):
        _C.attention_cpu(case["q"], case["k_cache"], case["v_cache"], *args, kv_dtype="bfloat16")


def test_query_group_beyond_a_work_item_is_refused():
    # 64 query heads on one KV head: more rows than a work item holds (the GPU then streams).
    case = make_case([1], [4], 64, 1, 64, 16, seed=2)
    bits, _ = to_16bit(case["k_cache"], "bfloat16")
    with pytest.raises(ValueError, match="query heads per KV head"):
        _C.attention_cpu(case["q"], bits, bits, case["block_table"], case["cu_seqlens_q"],
                         case["seqlens_kv"], 0.125, True, kv_dtype="bfloat16")
