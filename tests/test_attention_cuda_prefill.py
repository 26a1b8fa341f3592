"""Op tests of the FastAttention prefill members (_C.cuda_attention("prefill_sm90", ...),
"prefill_sm80", "prefill_sm75", "prefill_sm70").

Each case: fresh random inputs with a fixed seed, a paged cache with shuffled block tables and
NaN in every slot no sequence owns, NaN-poisoned outputs, and FlashAttention-2's error rule
against a float64 reference (cuda_attention_util.assert_matches_reference). The Turing and Volta
members run on any later GPU too (their instructions are still there), so all three are tested on
the GPU at hand; they take float16 only (no bf16 tensor cores on those GPUs), and a bf16 case
checks that they refuse it. The Hopper member (wgmma, TMA) runs on compute capability 9.0 only.
"""

import math

import pytest
import torch
from cuda_attention_util import (
    CUDA_ATTENTION_MARKS,
    assert_matches_reference,
    attention_kwargs,
    device_capability,
    make_paged_case,
    run_cuda_attention,
    unsupported_reason,
)
from ftengine import _C

pytestmark = CUDA_ATTENTION_MARKS

# member -> the compute capability its instructions need
KERNELS = {"prefill_sm90": 90, "prefill_sm80": 80, "prefill_sm75": 75, "prefill_sm70": 70}
FP16_ONLY = {"prefill_sm75", "prefill_sm70"}
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


@pytest.fixture(params=list(KERNELS))
def kernel(request):
    if request.param == "prefill_sm90" and device_capability() != 90:
        pytest.skip("prefill_sm90 is sm_90a code: Hopper (compute capability 9.0) only")
    if device_capability() < KERNELS[request.param]:
        pytest.skip(f"{request.param} needs compute capability {KERNELS[request.param]}")
    return request.param


def member_dtype(kernel):
    """The low-precision type a member's single-dtype tests run in: bf16 where it has it."""
    return torch.float16 if kernel in FP16_ONLY else torch.bfloat16


def check(kernel, case, causal, softmax_scale=None, **kwargs):
    if kernel in FP16_ONLY and case.q.dtype == torch.bfloat16:
        expected = "float16 only"
        assert expected in unsupported_reason(kernel, case, causal)
        with pytest.raises(ValueError, match=expected):
            run_cuda_attention(kernel, case, causal, softmax_scale, **kwargs)
        return None, None
    assert unsupported_reason(kernel, case, causal) == ""
    out, lse = run_cuda_attention(kernel, case, causal, softmax_scale, **kwargs)
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
def test_fresh_prefill(kernel, seq_len, head_dim, num_heads, num_kv_heads, causal, dtype):
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
    check(kernel, case, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_variable_lengths(kernel, head_dim, causal, dtype):
    # Fresh prefills, chunked prefills, decode tokens and an empty sequence in one batch.
    q_lens = [97, 1, 33, 200, 1, 5, 0, 64, 130]
    kv_lens = [97, 300, 33, 531, 1, 70, 0, 64, 1000]
    case = make_paged_case(q_lens, kv_lens, 16, 4, head_dim, 64, dtype, seed=head_dim)
    check(kernel, case, causal)


@pytest.mark.parametrize("block_size", [64, 256])
@pytest.mark.parametrize("q_len,kv_len", [(64, 1025), (97, 600), (300, 301), (128, 1024), (1, 777)])
def test_chunked_prefill(kernel, q_len, kv_len, block_size):
    dtype = member_dtype(kernel)
    case = make_paged_case([q_len], [kv_len], 8, 2, 128, block_size, dtype, seed=q_len)
    check(kernel, case, causal=True)


def test_chunked_prefill_not_causal(kernel):
    case = make_paged_case([97, 40], [600, 41], 8, 1, 64, 64, torch.float16, seed=5)
    check(kernel, case, causal=False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_decode_tokens_beside_prefill(kernel, causal):
    # A step mixing one-token decodes (q_len = 1 rows) with a long prefill chunk, MQA-like group 8.
    q_lens = [1, 1, 1, 300, 1]
    kv_lens = [1000, 1, 64, 300, 129]
    case = make_paged_case(q_lens, kv_lens, 32, 4, 128, 64, member_dtype(kernel), seed=11)
    check(kernel, case, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_queries_without_visible_keys(kernel, causal):
    # Outside the engine's contract (its queries are the last tokens of the cache, so q_len <=
    # kv_len), but lengths live on the device and cannot be checked there: a query that sees no
    # key must get a zero row and lse -inf, never NaN. Sequence 1 (no queries, no keys) is the
    # contract's own empty slot.
    q_lens = [3, 0, 4, 2]
    kv_lens = [0, 0, 2, 5]
    case = make_paged_case(q_lens, kv_lens, 8, 2, 64, 64, torch.float16, seed=3)
    out, lse = check(kernel, case, causal)
    assert torch.all(out[:3] == 0) and torch.all(lse[:3] == -math.inf)


def test_without_lse(kernel):
    case = make_paged_case([97, 5], [200, 5], 8, 2, 128, 64, member_dtype(kernel), seed=21)
    check(kernel, case, causal=True, with_lse=False)


def test_strided_queries_from_fused_qkv(kernel):
    case = make_paged_case(
        [97, 33], [97, 100], 16, 4, 128, 64, torch.float16, seed=8, fused_qkv=True
    )
    assert case.q.stride(0) == (16 + 2 * 4) * 128
    check(kernel, case, causal=True)


def test_grid_bounds_larger_than_lengths(kernel):
    # A captured graph sizes the grid for its capacity; tiles past the real lengths exit.
    case = make_paged_case([97, 1], [150, 300], 8, 2, 128, 64, member_dtype(kernel), seed=9)
    check(kernel, case, causal=True, max_seqlen_q=700, max_seqlen_kv=4096)


@pytest.mark.parametrize("softmax_scale", [0.02, 0.7])
def test_softmax_scale(kernel, softmax_scale):
    # 0.7 on unit-variance head_dim 64 scores makes the softmax peaked (large exponents).
    case = make_paged_case([200], [260], 8, 4, 64, 128, member_dtype(kernel), seed=13)
    check(kernel, case, causal=True, softmax_scale=softmax_scale)


def test_auto_picks_a_member_that_agrees():
    case = make_paged_case([97, 1], [97, 40], 8, 2, 128, 64, torch.float16, seed=17)
    out, lse = run_cuda_attention("auto", case, causal=True)
    assert_matches_reference(case, out, lse, causal=True)


def test_deterministic(kernel):
    case = make_paged_case([300, 7], [500, 7], 8, 2, 128, 64, member_dtype(kernel), seed=19)
    first = run_cuda_attention(kernel, case, causal=True)
    second = run_cuda_attention(kernel, case, causal=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    "head_dim,block_size,expected",
    [(80, 64, "head_dim"), (128, 16, "block_size"), (64, 96, "block_size")],
)
def test_unsupported_params_are_refused(kernel, head_dim, block_size, expected):
    case = make_paged_case([5], [5], 4, 4, head_dim, block_size, torch.float16, seed=1)
    reason = unsupported_reason(kernel, case)
    assert expected in reason
    with pytest.raises(ValueError, match=expected):
        run_cuda_attention(kernel, case)


def test_hopper_member_needs_the_cache_extent():
    # Its TMA tensor maps are bounded by the caches' block count; a caller that leaves it out
    # gets a reason, not a map over memory it does not own.
    if device_capability() != 90:
        pytest.skip("prefill_sm90 is sm_90a code: Hopper (compute capability 9.0) only")
    case = make_paged_case([5], [5], 4, 4, 128, 64, torch.bfloat16, seed=1)
    out = torch.empty_like(case.q)
    kwargs = attention_kwargs(case, out, None, True)
    kwargs["kv_num_blocks"] = 0
    assert "kv_num_blocks" in _C.cuda_attention_unsupported_reason("prefill_sm90", **kwargs)
