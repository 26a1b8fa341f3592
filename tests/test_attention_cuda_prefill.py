"""Op tests of the sm80 FastAttention prefill member (_C.cuda_attention("prefill_sm80", ...)).

Each case: fresh random inputs with a fixed seed, a paged cache with shuffled block tables and
NaN in every slot no sequence owns, NaN-poisoned outputs, and FlashAttention-2's error rule
against a float64 reference (cuda_attention_util.assert_matches_reference).
"""

import math

import pytest
import torch
from cuda_attention_util import (
    CUDA_ATTENTION_MARKS,
    assert_matches_reference,
    device_capability,
    make_paged_case,
    run_cuda_attention,
    unsupported_reason,
)

pytestmark = CUDA_ATTENTION_MARKS

KERNEL = "prefill_sm80"
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


@pytest.fixture(autouse=True, scope="module")
def _needs_sm80():
    if device_capability() < 80:
        pytest.skip("prefill_sm80 needs compute capability 8.0")


def check(case, causal, softmax_scale=None, **kwargs):
    assert unsupported_reason(KERNEL, case, causal) == ""
    out, lse = run_cuda_attention(KERNEL, case, causal, softmax_scale, **kwargs)
    assert_matches_reference(case, out, lse, causal, softmax_scale)
    return out, lse


# S = 97 and 1025 leave ragged query tiles (128 rows) and KV tiles (64 keys); GQA ratios 1, 4, 8
# pack 1, 4 and 8 query heads into each tile's rows.
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads", [(8, 8), (16, 4), (16, 2)], ids=["mha", "gqa4", "gqa8"]
)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_len", [1, 97, 1025])
def test_fresh_prefill(seq_len, head_dim, num_heads, num_kv_heads, causal, dtype):
    case = make_paged_case(
        [seq_len],
        [seq_len],
        num_heads,
        num_kv_heads,
        head_dim,
        128,
        dtype,
        seed=seq_len + head_dim + num_kv_heads,
    )
    check(case, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_variable_lengths(head_dim, causal, dtype):
    # Fresh prefills, chunked prefills, decode tokens and an empty sequence in one batch.
    q_lens = [97, 1, 33, 200, 1, 5, 0, 64, 130]
    kv_lens = [97, 300, 33, 531, 1, 70, 0, 64, 1000]
    case = make_paged_case(q_lens, kv_lens, 16, 4, head_dim, 64, dtype, seed=head_dim)
    check(case, causal)


@pytest.mark.parametrize("block_size", [64, 256])
@pytest.mark.parametrize("q_len,kv_len", [(64, 1025), (97, 600), (300, 301), (128, 1024), (1, 777)])
def test_chunked_prefill(q_len, kv_len, block_size):
    case = make_paged_case([q_len], [kv_len], 8, 2, 128, block_size, torch.bfloat16, seed=q_len)
    check(case, causal=True)


def test_chunked_prefill_not_causal():
    case = make_paged_case([97, 40], [600, 41], 8, 1, 64, 64, torch.float16, seed=5)
    check(case, causal=False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_decode_tokens_beside_prefill(causal):
    # A step mixing one-token decodes (q_len = 1 rows) with a long prefill chunk, MQA-like group 8.
    q_lens = [1, 1, 1, 300, 1]
    kv_lens = [1000, 1, 64, 300, 129]
    case = make_paged_case(q_lens, kv_lens, 32, 4, 128, 64, torch.bfloat16, seed=11)
    check(case, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_queries_without_visible_keys(causal):
    # Outside the engine's contract (its queries are the last tokens of the cache, so q_len <=
    # kv_len), but lengths live on the device and cannot be checked there: a query that sees no
    # key must get a zero row and lse -inf, never NaN. Sequence 1 (no queries, no keys) is the
    # contract's own empty slot.
    q_lens = [3, 0, 4, 2]
    kv_lens = [0, 0, 2, 5]
    case = make_paged_case(q_lens, kv_lens, 8, 2, 64, 64, torch.float16, seed=3)
    out, lse = check(case, causal)
    assert torch.all(out[:3] == 0) and torch.all(lse[:3] == -math.inf)


def test_without_lse():
    case = make_paged_case([97, 5], [200, 5], 8, 2, 128, 64, torch.bfloat16, seed=21)
    check(case, causal=True, with_lse=False)


def test_strided_queries_from_fused_qkv():
    case = make_paged_case(
        [97, 33], [97, 100], 16, 4, 128, 64, torch.float16, seed=8, fused_qkv=True
    )
    assert case.q.stride(0) == (16 + 2 * 4) * 128
    check(case, causal=True)


def test_grid_bounds_larger_than_lengths():
    # A captured graph sizes the grid for its capacity; tiles past the real lengths exit.
    case = make_paged_case([97, 1], [150, 300], 8, 2, 128, 64, torch.bfloat16, seed=9)
    check(case, causal=True, max_seqlen_q=700, max_seqlen_kv=4096)


@pytest.mark.parametrize("softmax_scale", [0.02, 0.7])
def test_softmax_scale(softmax_scale):
    # 0.7 on unit-variance head_dim 64 scores makes the softmax peaked (large exponents).
    case = make_paged_case([200], [260], 8, 4, 64, 128, torch.bfloat16, seed=13)
    check(case, causal=True, softmax_scale=softmax_scale)


def test_auto_picks_a_member_that_agrees():
    case = make_paged_case([97, 1], [97, 40], 8, 2, 128, 64, torch.float16, seed=17)
    out, lse = run_cuda_attention("auto", case, causal=True)
    assert_matches_reference(case, out, lse, causal=True)


def test_deterministic():
    case = make_paged_case([300, 7], [500, 7], 8, 2, 128, 64, torch.bfloat16, seed=19)
    first = run_cuda_attention(KERNEL, case, causal=True)
    second = run_cuda_attention(KERNEL, case, causal=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    "head_dim,block_size,expected",
    [(80, 64, "head_dim"), (128, 16, "block_size"), (64, 96, "block_size")],
)
def test_unsupported_params_are_refused(head_dim, block_size, expected):
    case = make_paged_case([5], [5], 4, 4, head_dim, block_size, torch.float16, seed=1)
    reason = unsupported_reason(KERNEL, case)
    assert expected in reason
    with pytest.raises(ValueError, match=expected):
        run_cuda_attention(KERNEL, case)
