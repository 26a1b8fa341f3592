"""Op tests of the split-KV decode member of the FastAttention CUDA family.

_C.cuda_attention("decode_split_kv", ...) runs one query token per sequence over a paged KV cache
k_cache[block][slot][kv_head][dim]; long caches are split across CTAs and merged by log-sum-exp.
Each case is checked against a float64 reference gathered from the same cache: the kernel's
largest error may be at most twice that of torch computing the same attention in the same dtype,
plus a tiny floor. Outputs are poisoned with NaN before every run, the cache slots no sequence owns
hold NaN, and block tables are shuffled, so unwritten rows and stray reads both show.
"""

from __future__ import annotations

import math

import pytest
import torch

try:
    from ftengine import _C
except ImportError:  # a CPU-only checkout without the extension
    _C = None

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not hasattr(_C, "cuda_attention"),
        reason="needs an NVIDIA GPU and ftengine._C.cuda_attention",
    ),
]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FLOOR = 1e-5  # absolute, on outputs of magnitude ~1 and on lse


def make_case(
    kv_lens,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype,
    seed,
    q_lens=None,
    spare_blocks=2,
):
    """Random queries and a paged cache whose blocks are spread over the pool in random order.

    q is a slice of a fused [tokens, heads + 2 * kv_heads, head_dim] projection and out a slice of
    a row-padded buffer, so neither is contiguous. Slots past a sequence's length, spare blocks and
    the block table's padding entries all point at NaN.
    """
    q_lens = [1] * len(kv_lens) if q_lens is None else q_lens
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    torch_dtype = DTYPES[dtype]
    batch = len(kv_lens)
    blocks_per_seq = [-(-kv_len // block_size) for kv_len in kv_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=cpu_gen)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda", generator=gen).to(torch_dtype)
    v_cache = torch.randn(shape, device="cuda", generator=gen).to(torch_dtype)
    spare = order[num_blocks - spare_blocks :]
    k_cache[spare.cuda()] = math.nan
    v_cache[spare.cuda()] = math.nan
    max_blocks = max(max(blocks_per_seq, default=0), 1) + 2  # padding entries too
    block_table = torch.full((batch, max_blocks), int(spare[0]), dtype=torch.int32)
    next_block = 0
    for seq, (kv_len, count) in enumerate(zip(kv_lens, blocks_per_seq, strict=True)):
        ids = order[next_block : next_block + count]
        next_block += count
        block_table[seq, :count] = ids.to(torch.int32)
        if count and kv_len % block_size:
            k_cache[int(ids[-1]), kv_len % block_size :] = math.nan
            v_cache[int(ids[-1]), kv_len % block_size :] = math.nan

    num_tokens = sum(q_lens)
    fused = torch.randn(
        num_tokens, num_heads + 2 * num_kv_heads, head_dim, device="cuda", generator=gen
    ).to(torch_dtype)
    q = fused[:, :num_heads]
    out_buffer = torch.empty(num_tokens, num_heads, head_dim + 8, dtype=torch_dtype, device="cuda")
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        dtype=dtype,
        q=q,
        out_buffer=out_buffer,
        out=out_buffer[:, :, :head_dim],
        lse=torch.empty(num_tokens, num_heads, dtype=torch.float32, device="cuda"),
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table.cuda(),
        cu_seqlens_q=cu_seqlens_q.cuda(),
        seqlens_kv=torch.tensor(kv_lens, dtype=torch.int32, device="cuda"),
        q_lens=list(q_lens),
        kv_lens=list(kv_lens),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        scale=head_dim**-0.5,
    )


def kernel_kwargs(case, max_seqlen_kv=None, max_seqlen_q=None):
    q, out, cache = case["q"], case["out"], case["k_cache"]
    return dict(
        dtype=case["dtype"],
        q=q.data_ptr(),
        out=out.data_ptr(),
        lse=case["lse"].data_ptr(),
        k_cache=cache.data_ptr(),
        v_cache=case["v_cache"].data_ptr(),
        block_table=case["block_table"].data_ptr(),
        cu_seqlens_q=case["cu_seqlens_q"].data_ptr(),
        seqlens_kv=case["seqlens_kv"].data_ptr(),
        q_token_stride=q.stride(0),
        q_head_stride=q.stride(1),
        out_token_stride=out.stride(0),
        out_head_stride=out.stride(1),
        kv_block_stride=cache.stride(0),
        kv_token_stride=cache.stride(1),
        kv_head_stride=cache.stride(2),
        block_size=case["block_size"],
        block_table_stride=case["block_table"].stride(0),
        batch=len(case["kv_lens"]),
        max_seqlen_q=max(case["q_lens"], default=0) if max_seqlen_q is None else max_seqlen_q,
        max_seqlen_kv=max(case["kv_lens"], default=0) if max_seqlen_kv is None else max_seqlen_kv,
        num_heads=case["num_heads"],
        num_kv_heads=case["num_kv_heads"],
        head_dim=case["head_dim"],
        softmax_scale=case["scale"],
        causal=True,
        stream=torch.cuda.current_stream().cuda_stream,
    )


def run_kernel(case, kernel="decode_split_kv", **overrides):
    """Poisons out (padding included) and lse with NaN, runs, returns (out, lse) copies."""
    case["out_buffer"].fill_(math.nan)
    case["lse"].fill_(math.nan)
    _C.cuda_attention(kernel, **kernel_kwargs(case, **overrides))
    torch.cuda.synchronize()
    # The row padding next to each head's output is never written.
    assert torch.isnan(case["out_buffer"][:, :, case["head_dim"] :]).all()
    return case["out"].clone(), case["lse"].clone()


def sequence_kv(case, seq, cache):
    blocks = case["block_table"][seq].long()
    gathered = cache[blocks].reshape(-1, case["num_kv_heads"], case["head_dim"])
    return gathered[: case["kv_lens"][seq]]  # [kv_len, kv_heads, dim]


def references(case):
    """(float64 reference, torch in the case's dtype): each an (out [T, H, D], lse [T, H]) pair."""
    num_tokens = sum(case["q_lens"])
    heads, dim = case["num_heads"], case["head_dim"]
    group = heads // case["num_kv_heads"]
    exact = (
        torch.zeros(num_tokens, heads, dim, dtype=torch.float64, device="cuda"),
        torch.full((num_tokens, heads), -math.inf, dtype=torch.float64, device="cuda"),
    )
    same_dtype = (torch.zeros_like(case["out"]), torch.full_like(exact[1], -math.inf))
    token = 0
    for seq, (q_len, kv_len) in enumerate(zip(case["q_lens"], case["kv_lens"], strict=True)):
        if q_len == 0:
            continue
        if kv_len > 0:
            keys = sequence_kv(case, seq, case["k_cache"]).repeat_interleave(group, dim=1)
            values = sequence_kv(case, seq, case["v_cache"]).repeat_interleave(group, dim=1)
            q = case["q"][token]  # [H, D]
            scores = torch.einsum("hd,khd->hk", q.double(), keys.double()) * case["scale"]
            exact[0][token] = torch.einsum("hk,khd->hd", scores.softmax(-1), values.double())
            exact[1][token] = scores.logsumexp(-1)
            # torch in the dtype: SDPA on the gathered cache; its lse from scores rounded to dtype.
            same_dtype[0][token] = torch.nn.functional.scaled_dot_product_attention(
                q[:, None], keys.transpose(0, 1), values.transpose(0, 1), scale=case["scale"]
            )[:, 0]
            low_scores = torch.einsum("hd,khd->hk", q, keys).float() * case["scale"]
            same_dtype[1][token] = low_scores.logsumexp(-1).double()
        token += q_len
    return exact, same_dtype


def check(case, out, lse):
    (ref_out, ref_lse), (torch_out, torch_lse) = references(case)
    assert not torch.isnan(out).any(), "NaN (or an unwritten row) in the output"
    assert not torch.isnan(lse).any(), "NaN (or an unwritten entry) in lse"
    empty = ref_lse == -math.inf
    assert (lse[empty] == -math.inf).all(), "a query that sees no key must get lse -inf"
    assert (out[empty] == 0).all(), "a query that sees no key must get a zero row"
    out_err = (out.double() - ref_out).abs().max().item() if out.numel() else 0.0
    torch_out_err = (torch_out.double() - ref_out).abs().max().item() if out.numel() else 0.0
    assert out_err <= 2 * torch_out_err + FLOOR, (out_err, torch_out_err)
    seen = ~empty
    if seen.any():
        lse_err = (lse.double()[seen] - ref_lse[seen]).abs().max().item()
        torch_lse_err = (torch_lse[seen] - ref_lse[seen]).abs().max().item()
        assert lse_err <= 2 * torch_lse_err + FLOOR, (lse_err, torch_lse_err)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (16, 4), (32, 4)])
@pytest.mark.parametrize("kv_len", [1, 97, 1025, 5000])
def test_single_sequence(dtype, head_dim, num_heads, num_kv_heads, kv_len):
    seed = kv_len * 1000 + head_dim + num_heads
    case = make_case([kv_len], num_heads, num_kv_heads, head_dim, 16, dtype, seed)
    check(case, *run_kernel(case))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (16, 4), (32, 4)])
def test_variable_lengths(dtype, head_dim, num_heads, num_kv_heads):
    # A 0-length cache, a sequence without a query this step (q_len 0), lengths around the chunk
    # and split sizes.
    kv_lens = [0, 1, 97, 1025, 5000, 33, 4103, 50]
    q_lens = [1, 1, 1, 1, 1, 1, 1, 0]
    case = make_case(kv_lens, num_heads, num_kv_heads, head_dim, 16, dtype, 7, q_lens=q_lens)
    check(case, *run_kernel(case))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("block_size", [1, 7, 16, 256])
def test_block_sizes(dtype, block_size):
    kv_lens = [300, 0, 1, 2000, 65]
    case = make_case(kv_lens, 16, 2, 128, block_size, dtype, block_size)
    check(case, *run_kernel(case))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_short_batch_writes_directly(dtype):
    # max_seqlen_kv this small runs one split per sequence, so the split kernel writes out itself.
    case = make_case([0, 97, 1, 64, 65], 32, 8, 128, 16, dtype, 3)
    check(case, *run_kernel(case))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_large_batch(dtype):
    gen = torch.Generator().manual_seed(11)
    kv_lens = torch.randint(0, 3000, (40,), generator=gen).tolist()
    case = make_case(kv_lens, 32, 8, 128, 16, dtype, 11)
    check(case, *run_kernel(case))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "head_dim,num_heads,num_kv_heads", [(96, 12, 4), (256, 8, 2), (128, 48, 3)]
)
def test_other_shapes(dtype, head_dim, num_heads, num_kv_heads):
    case = make_case([1500, 7, 0, 260], num_heads, num_kv_heads, head_dim, 16, dtype, head_dim)
    check(case, *run_kernel(case))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (32, 4)])
def test_graph_capacity(dtype, num_heads, num_kv_heads):
    """A captured graph sizes the launch from max_seqlen_kv and replays it with shorter caches:
    the number of splits depends on host values only, so an oversized bound must give the same
    answer as the exact one."""
    kv_lens = [1, 97, 1025, 5000, 0, 300]
    case = make_case(kv_lens, num_heads, num_kv_heads, 128, 16, dtype, 5)
    exact_out, exact_lse = run_kernel(case)
    check(case, exact_out, exact_lse)
    for capacity in (8192, 131072):
        out, lse = run_kernel(case, max_seqlen_kv=capacity)
        check(case, out, lse)
        # Same inputs, other split boundaries: equal up to float32 rounding before the cast.
        tolerance = 2 * torch.finfo(DTYPES[dtype]).eps
        torch.testing.assert_close(out, exact_out, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(lse, exact_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_lens", [[97, 0, 3], [5000, 1, 0]])
def test_without_lse(kv_lens):
    """lse = 0 (null) is allowed: the output alone, whether one split or several."""
    case = make_case(kv_lens, 32, 8, 128, 16, "bfloat16", 13)
    case["out_buffer"].fill_(math.nan)
    _C.cuda_attention("decode_split_kv", **dict(kernel_kwargs(case), lse=0))
    torch.cuda.synchronize()
    (ref_out, _), (torch_out, _) = references(case)
    out = case["out"]
    assert not torch.isnan(out).any()
    out_err = (out.double() - ref_out).abs().max().item()
    torch_err = (torch_out.double() - ref_out).abs().max().item()
    assert out_err <= 2 * torch_err + FLOOR, (out_err, torch_err)


def test_auto_picks_a_member_that_passes():
    case = make_case([1025, 3, 0], 32, 8, 128, 16, "bfloat16", 21)
    check(case, *run_kernel(case, kernel="auto"))


def test_unsupported_params_are_refused():
    case = make_case([10, 20], 32, 8, 128, 16, "bfloat16", 1)
    assert _C.cuda_attention_unsupported_reason("decode_split_kv", **kernel_kwargs(case)) == ""
    multi_query = kernel_kwargs(case, max_seqlen_q=2)
    assert _C.cuda_attention_unsupported_reason("decode_split_kv", **multi_query) != ""
    with pytest.raises(ValueError):
        _C.cuda_attention("decode_split_kv", **multi_query)
    odd_head_dim = dict(kernel_kwargs(case), head_dim=100)
    assert _C.cuda_attention_unsupported_reason("decode_split_kv", **odd_head_dim) != ""
    with pytest.raises(ValueError):
        _C.cuda_attention("decode_split_kv", **odd_head_dim)
