"""Op tests of the CPU FastAttention kernel (_C.attention_cpu) against a float64 torch reference.

The kernel reads K/V from a paged cache [num_blocks, block_size, kv_heads, head_dim] through a
block table; the reference sees each sequence's keys contiguously and materialises the mask.
"""

import math

import numpy as np
import pytest
import torch
from ftengine import _C


def reference_attention(q, keys, values, q_lens, kv_lens, scale, causal):
    """Plain softmax(Q·Kᵀ·scale + mask)·V per sequence in float64; GQA by repeating KV heads.

    q: [T, H, D]; keys/values: per-sequence [kv_len, KVH, D]. Returns out [T, H, D], lse [T, H].
    """
    num_tokens, num_heads, head_dim = q.shape
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float64)
    lse = torch.full((num_tokens, num_heads), -math.inf, dtype=torch.float64)
    start = 0
    for k, v, q_len, kv_len in zip(keys, values, q_lens, kv_lens, strict=True):
        if q_len == 0 or kv_len == 0:
            start += q_len
            continue
        group = num_heads // k.shape[1]
        qs = torch.from_numpy(q[start : start + q_len]).double().transpose(0, 1)  # [H, q, D]
        ks = torch.from_numpy(k).double().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = torch.from_numpy(v).double().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale  # [H, q, kv]
        if causal:
            positions = torch.arange(kv_len - q_len, kv_len)
            hidden = torch.arange(kv_len)[None, :] > positions[:, None]
            scores = scores.masked_fill(hidden, -math.inf)
        out[start : start + q_len] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
        lse[start : start + q_len] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
        start += q_len
    return out, lse


def make_case(
    q_lens,
    kv_lens,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    seed,
    shuffle=True,
    spare_blocks=3,
):
    """Random queries and a paged cache whose blocks are spread over the pool in random order."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((sum(q_lens), num_heads, head_dim), dtype=np.float32)
    blocks_per_seq = [-(-kv_len // block_size) for kv_len in kv_lens]
    max_blocks = max(max(blocks_per_seq, default=0), 1)
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = rng.permutation(num_blocks) if shuffle else np.arange(num_blocks)
    k_cache = rng.standard_normal(
        (num_blocks, block_size, num_kv_heads, head_dim), dtype=np.float32
    )
    v_cache = rng.standard_normal(
        (num_blocks, block_size, num_kv_heads, head_dim), dtype=np.float32
    )
    # Padding entries must never be read; -1 would fail the bounds check if they were.
    block_table = np.full((len(kv_lens), max_blocks), -1, dtype=np.int32)
    keys, values = [], []
    next_block = 0
    for seq, (kv_len, count) in enumerate(zip(kv_lens, blocks_per_seq, strict=True)):
        ids = order[next_block : next_block + count]
        next_block += count
        block_table[seq, :count] = ids
        keys.append(k_cache[ids].reshape(-1, num_kv_heads, head_dim)[:kv_len])
        values.append(v_cache[ids].reshape(-1, num_kv_heads, head_dim)[:kv_len])
    cu_seqlens_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table,
        cu_seqlens_q=cu_seqlens_q,
        seqlens_kv=np.asarray(kv_lens, dtype=np.int32),
        keys=keys,
        values=values,
    )


def run_and_check(case, q_lens, kv_lens, causal, scale=None, num_threads=0):
    head_dim = case["q"].shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out, lse = _C.attention_cpu(
        case["q"],
        case["k_cache"],
        case["v_cache"],
        case["block_table"],
        case["cu_seqlens_q"],
        case["seqlens_kv"],
        scale,
        causal,
        num_threads,
    )
    assert out.dtype == np.float32 and out.shape == case["q"].shape
    assert lse.dtype == np.float32 and lse.shape == case["q"].shape[:2]
    ref_out, ref_lse = reference_attention(
        case["q"], case["keys"], case["values"], q_lens, kv_lens, scale, causal
    )
    # float32 accumulation over up to a few thousand keys of unit-variance data; assert_close
    # treats NaN as a mismatch and -inf lse as equal only to -inf.
    torch.testing.assert_close(torch.from_numpy(out).double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(lse).double(), ref_lse, atol=2e-5, rtol=1e-5)
    return out, lse


# Full cross product over the small sizes: every head_dim and GQA ratio, causal and not.
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1), (16, 2)])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("seq_len", [1, 97])
def test_prefill_small(seq_len, head_dim, num_heads, num_kv_heads, causal):
    case = make_case([seq_len], [seq_len], num_heads, num_kv_heads, head_dim, 16, seed=seq_len)
    run_and_check(case, [seq_len], [seq_len], causal)


# S = 1025 crosses the 256-token KV blocks and leaves a 1-token tail; a subset of the cross
# product keeps the file fast on two cores.
@pytest.mark.parametrize(
    "head_dim,num_heads,num_kv_heads,block_size,causal",
    [
        (128, 4, 4, 64, True),
        (64, 8, 2, 16, True),
        (80, 8, 1, 64, False),
        (128, 16, 2, 256, True),
        (64, 4, 4, 1024, False),
    ],
)
def test_prefill_long(head_dim, num_heads, num_kv_heads, block_size, causal):
    case = make_case([1025], [1025], num_heads, num_kv_heads, head_dim, block_size, seed=1025)
    run_and_check(case, [1025], [1025], causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_size", [16, 64])
def test_variable_lengths(block_size, causal):
    # Fresh prefills, a chunked prefill and decodes of different lengths in one batch.
    q_lens = [97, 1, 33, 200, 1, 5]
    kv_lens = [97, 300, 33, 531, 1, 70]
    case = make_case(q_lens, kv_lens, 8, 2, 64, block_size, seed=block_size)
    run_and_check(case, q_lens, kv_lens, causal)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("q_len,kv_len", [(64, 1025), (97, 600), (300, 301)])
def test_chunked_prefill(q_len, kv_len, block_size):
    case = make_case([q_len], [kv_len], 8, 2, 128, block_size, seed=q_len)
    run_and_check(case, [q_len], [kv_len], causal=True)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads", [(4, 4), (8, 2), (32, 4), (8, 1)], ids=["mha", "gqa4", "gqa8", "mqa"]
)
@pytest.mark.parametrize("block_size", [16, 64])
def test_decode(num_heads, num_kv_heads, block_size):
    kv_lens = [1, 17, 1000, 2049]
    q_lens = [1] * len(kv_lens)
    case = make_case(q_lens, kv_lens, num_heads, num_kv_heads, 128, block_size, seed=7)
    run_and_check(case, q_lens, kv_lens, causal=True)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,num_threads", [(8, 8, 3), (12, 6, 4), (32, 8, 2), (4, 1, 2)]
)
def test_single_decode_splits_heads(num_heads, num_kv_heads, num_threads):
    # One decode sequence: its KV heads are split across tiles so that every thread works.
    case = make_case([1], [777], num_heads, num_kv_heads, 64, 16, seed=num_kv_heads)
    run_and_check(case, [1], [777], causal=True, num_threads=num_threads)


@pytest.mark.parametrize("q_len", [2, 4])
def test_short_chunk_multi_head_tile(q_len):
    # A few queries per head share decode-style multi-head tiles, with a partial causal mask.
    case = make_case([q_len, 1], [300, 45], 8, 4, 80, 16, seed=q_len)
    run_and_check(case, [q_len, 1], [300, 45], causal=True, num_threads=2)


def test_contiguous_blocks_merge_across_pages():
    # An unshuffled table lets one sgemm span several pages; results must not change.
    case = make_case([300], [700], 8, 2, 64, 16, seed=3, shuffle=False)
    run_and_check(case, [300], [700], causal=True)


def test_prefill_head_copies_in_several_waves():
    # Prefill tiles of a KV head with 8 or more tiles (128 tokens of 4 heads each here) read a
    # contiguous copy of the head, made a 32 MiB wave at a time: 16 heads of ~3.3 MiB (K, V and
    # the group's queries) need two waves, the first spanning both sequences; a chunk (q_len <
    # kv_len) places the queries' copy after its first keys.
    q_lens, kv_lens = [1100, 1030], [1100, 1200]
    case = make_case(q_lens, kv_lens, 32, 8, 128, 64, seed=3)
    run_and_check(case, q_lens, kv_lens, causal=True)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_thread_counts_agree(num_threads):
    case = make_case([97, 1], [200, 400], 8, 2, 64, 16, seed=11)
    out, lse = run_and_check(case, [97, 1], [200, 400], causal=True, num_threads=num_threads)
    out_one, lse_one = run_and_check(case, [97, 1], [200, 400], causal=True, num_threads=1)
    np.testing.assert_allclose(out, out_one, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lse, lse_one, rtol=0, atol=1e-6)


def test_large_scores_do_not_overflow():
    # Scores of several hundred would overflow a naive exp; the running max must absorb them.
    case = make_case([40], [300], 4, 4, 64, 16, seed=5)
    run_and_check(case, [40], [300], causal=True, scale=4.0)


def test_zero_kv_sequences():
    # Empty sequences between real ones read nothing and produce no rows.
    q_lens = [0, 5, 0, 1]
    kv_lens = [0, 5, 40, 9]
    case = make_case(q_lens, kv_lens, 4, 2, 64, 16, seed=2)
    run_and_check(case, q_lens, kv_lens, causal=True)


def test_empty_batch():
    case = make_case([0], [0], 4, 2, 64, 16, seed=2)
    out, lse = _C.attention_cpu(
        case["q"],
        case["k_cache"],
        case["v_cache"],
        case["block_table"],
        case["cu_seqlens_q"],
        case["seqlens_kv"],
        0.125,
        True,
    )
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def valid_args():
    case = make_case([5, 1], [5, 20], 4, 2, 64, 16, seed=9)
    return dict(
        q=case["q"],
        k_cache=case["k_cache"],
        v_cache=case["v_cache"],
        block_table=case["block_table"],
        cu_seqlens_q=case["cu_seqlens_q"],
        seqlens_kv=case["seqlens_kv"],
        softmax_scale=0.125,
        causal=True,
    )


def _set(name, value):
    return lambda args: args.__setitem__(name, value)


def _edit(name, fn):
    def apply(args):
        array = args[name].copy()
        fn(array)
        args[name] = array

    return apply


INVALID_INPUTS = {
    "q_float64": lambda a: a.__setitem__("q", a["q"].astype(np.float64)),
    "q_2d": lambda a: a.__setitem__("q", a["q"][:, 0]),
    "q_not_contiguous": lambda a: a.__setitem__("q", np.asfortranarray(a["q"])),
    "q_head_dim_mismatch": lambda a: a.__setitem__("q", np.ascontiguousarray(a["q"][:, :, :32])),
    "heads_not_multiple": lambda a: a.__setitem__("q", np.ascontiguousarray(a["q"][:, :3])),
    "v_shape_mismatch": lambda a: a.__setitem__("v_cache", a["v_cache"][:-1].copy()),
    "k_cache_float16": lambda a: a.__setitem__("k_cache", a["k_cache"].astype(np.float16)),
    "block_table_int64": lambda a: a.__setitem__("block_table", a["block_table"].astype(np.int64)),
    "block_id_too_large": _edit("block_table", lambda t: t.__setitem__((1, 1), 10_000)),
    "block_id_negative": _edit("block_table", lambda t: t.__setitem__((0, 0), -1)),
    "kv_len_beyond_table": _edit("seqlens_kv", lambda s: s.__setitem__(1, 1_000)),
    "kv_len_negative": _edit("seqlens_kv", lambda s: s.__setitem__(0, -1)),
    "q_len_above_kv_len": _edit("seqlens_kv", lambda s: s.__setitem__(0, 4)),
    "cu_not_monotone": _edit("cu_seqlens_q", lambda c: c.__setitem__(1, 7)),
    "cu_not_starting_at_zero": _edit("cu_seqlens_q", lambda c: c.__setitem__(0, 1)),
    "cu_not_ending_at_t": _edit("cu_seqlens_q", lambda c: c.__setitem__(2, 5)),
    "cu_wrong_length": lambda a: a.__setitem__("cu_seqlens_q", a["cu_seqlens_q"][:2].copy()),
    "table_rows_mismatch": lambda a: a.__setitem__("block_table", a["block_table"][:1].copy()),
    "scale_nan": _set("softmax_scale", math.nan),
    "negative_threads": _set("num_threads", -1),
}


@pytest.mark.parametrize("mutate", INVALID_INPUTS.values(), ids=INVALID_INPUTS.keys())
def test_invalid_inputs_raise_value_error(mutate):
    args = valid_args()
    _C.attention_cpu(**args)  # the unmodified inputs are valid
    mutate(args)
    with pytest.raises(ValueError):
        _C.attention_cpu(**args)
