"""Helpers shared by the op tests of the CUDA FastAttention members (prefill_sm80, decode_split_kv).

Every member is called through ``ftengine._C.cuda_attention(kernel, **kwargs)`` on a paged KV cache
whose blocks are spread over the pool in shuffled order. The check follows FlashAttention-2's
rule: the kernel's max error against a float64 reference may be at most twice the error of torch
computing the same attention in the kernel's dtype (scores, probabilities and output each rounded
to that dtype), plus a tiny absolute floor. NaN never passes, and outputs are poisoned with NaN
before each run so an element the kernel never wrote fails too.

Import as ``from cuda_attention_util import ...``; mark a test module with
``pytestmark = CUDA_ATTENTION_MARKS`` so it skips cleanly where there is no GPU or no CUDA build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

try:
    from ftengine import _C
except ImportError:  # no compiled extension at all: every CUDA test skips
    _C = None

HAS_CUDA_ATTENTION = _C is not None and hasattr(_C, "cuda_attention") and torch.cuda.is_available()

CUDA_ATTENTION_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not HAS_CUDA_ATTENTION, reason="needs a GPU and ftengine built with CUDA attention"
    ),
]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

# Below this, differences are float32 accumulation noise rather than an error of the kernel.
ABSOLUTE_FLOOR = 1e-5


def device_capability() -> int:
    """Compute capability of the current device as major * 10 + minor (e.g. 90)."""
    return int(_C.cuda_device_capability())


@dataclass
class PagedCase:
    """Queries and a paged KV cache on the GPU, plus each sequence's keys/values contiguously.

    q: [tokens, heads, head_dim], possibly a strided view (e.g. the q part of a fused QKV
    buffer); k_cache/v_cache: [num_blocks, block_size, kv_heads, head_dim]; block_table: int32
    [batch, max_blocks], padded with -1 (never to be read); keys/values[seq]: [kv_len, kv_heads,
    head_dim] views gathered through the table, for the references.
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seqlens_kv: torch.Tensor
    q_lens: list[int]
    kv_lens: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_kv_heads: int

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in DTYPES.items()}[self.q.dtype]

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def head_dim(self) -> int:
        return self.q.shape[2]

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]


def make_paged_case(
    q_lens,
    kv_lens,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype,
    seed,
    *,
    fused_qkv=False,
    spare_blocks=3,
    poison_unused_slots=True,
) -> PagedCase:
    """Random inputs (fixed seed) in `dtype` and a cache whose blocks are shuffled over the pool.

    fused_qkv: q is the first part of a [tokens, (heads + 2 * kv_heads) * head_dim] buffer, so
    its token stride is not heads * head_dim. poison_unused_slots: slots past a sequence's
    kv_len and the spare blocks hold NaN, as uninitialised cache memory may; a kernel that lets
    them reach an output fails.
    """
    assert len(q_lens) == len(kv_lens)
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(q_lens)
    if fused_qkv:
        width = (num_heads + 2 * num_kv_heads) * head_dim
        qkv = torch.randn(num_tokens, width, generator=gen).to(dtype)
        q = qkv.cuda()[:, : num_heads * head_dim].unflatten(1, (num_heads, head_dim))
    else:
        q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype).cuda()

    blocks_per_seq = [-(-kv_len // block_size) for kv_len in kv_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    block_table = torch.full(
        (len(kv_lens), max(max(blocks_per_seq, default=0), 1)), -1, dtype=torch.int32
    )
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    next_block = 0
    for seq, (kv_len, count) in enumerate(zip(kv_lens, blocks_per_seq, strict=True)):
        ids = order[next_block : next_block + count]
        next_block += count
        block_table[seq, :count] = ids.to(torch.int32)
        used.view(-1, block_size)[ids] = (
            torch.arange(count * block_size).view(count, block_size) < kv_len
        )
    if poison_unused_slots:
        k_cache[~used] = math.nan
        v_cache[~used] = math.nan
    k_cache, v_cache = k_cache.cuda(), v_cache.cuda()

    keys, values = [], []
    for seq, (kv_len, count) in enumerate(zip(kv_lens, blocks_per_seq, strict=True)):
        ids = block_table[seq, :count].long().cuda()
        keys.append(k_cache[ids].reshape(-1, num_kv_heads, head_dim)[:kv_len])
        values.append(v_cache[ids].reshape(-1, num_kv_heads, head_dim)[:kv_len])
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedCase(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table.cuda(),
        cu_seqlens_q=cu_seqlens_q.cuda(),
        seqlens_kv=torch.tensor(kv_lens, dtype=torch.int32).cuda(),
        q_lens=list(q_lens),
        kv_lens=list(kv_lens),
        keys=keys,
        values=values,
        num_kv_heads=num_kv_heads,
    )


def attention_kwargs(
    case: PagedCase, out, lse, causal, softmax_scale=None, *, max_seqlen_q=None, max_seqlen_kv=None
) -> dict:
    """The keyword arguments of _C.cuda_attention / cuda_attention_unsupported_reason."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(case.head_dim)
    return dict(
        dtype=case.dtype_name,
        q=case.q.data_ptr(),
        out=out.data_ptr(),
        lse=0 if lse is None else lse.data_ptr(),
        k_cache=case.k_cache.data_ptr(),
        v_cache=case.v_cache.data_ptr(),
        block_table=case.block_table.data_ptr(),
        cu_seqlens_q=case.cu_seqlens_q.data_ptr(),
        seqlens_kv=case.seqlens_kv.data_ptr(),
        q_token_stride=case.q.stride(0),
        q_head_stride=case.q.stride(1),
        out_token_stride=out.stride(0),
        out_head_stride=out.stride(1),
        kv_block_stride=case.k_cache.stride(0),
        kv_token_stride=case.k_cache.stride(1),
        kv_head_stride=case.k_cache.stride(2),
        block_size=case.block_size,
        kv_num_blocks=case.k_cache.shape[0],
        block_table_stride=case.block_table.stride(0),
        batch=len(case.q_lens),
        max_seqlen_q=max(case.q_lens, default=0) if max_seqlen_q is None else max_seqlen_q,
        max_seqlen_kv=max(case.kv_lens, default=0) if max_seqlen_kv is None else max_seqlen_kv,
        num_heads=case.num_heads,
        num_kv_heads=case.num_kv_heads,
        head_dim=case.head_dim,
        softmax_scale=softmax_scale,
        causal=causal,
    )


def unsupported_reason(kernel: str, case: PagedCase, causal=True, **kwargs) -> str:
    out = torch.empty(case.q.shape, dtype=case.q.dtype, device="cuda")
    return _C.cuda_attention_unsupported_reason(
        kernel, **attention_kwargs(case, out, None, causal, **kwargs)
    )


def run_cuda_attention(
    kernel: str, case: PagedCase, causal=True, softmax_scale=None, *, with_lse=True, **kwargs
):
    """Runs `kernel` on NaN-poisoned outputs; returns (out [T, H, D], lse [T, H] or None)."""
    out = torch.full(case.q.shape, math.nan, dtype=case.q.dtype, device="cuda")
    lse = (
        torch.full(case.q.shape[:2], math.nan, dtype=torch.float32, device="cuda")
        if with_lse
        else None
    )
    _C.cuda_attention(
        kernel,
        **attention_kwargs(case, out, lse, causal, softmax_scale, **kwargs),
        stream=torch.cuda.current_stream().cuda_stream,
    )
    torch.cuda.synchronize()
    return out, lse


def reference_attention(case: PagedCase, causal, softmax_scale=None, compute_dtype=torch.float64):
    """softmax(Q·Kᵀ·scale + mask)·V per sequence; GQA by repeating KV heads.

    compute_dtype float64 gives the reference. The kernel's own dtype gives the error baseline:
    scores, probabilities and output are each rounded to it (matrix products accumulate in
    float32 inside cuBLAS, as on the tensor cores). Returns out [T, H, D] float64 and lse [T, H]
    float64; a query that sees no key gets a zero row and lse -inf.
    """
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(case.head_dim)
    num_tokens, num_heads, head_dim = case.q.shape
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float64, device="cuda")
    lse = torch.full((num_tokens, num_heads), -math.inf, dtype=torch.float64, device="cuda")
    group = num_heads // case.num_kv_heads
    start = 0
    for k, v, q_len, kv_len in zip(case.keys, case.values, case.q_lens, case.kv_lens, strict=True):
        rows = slice(start, start + q_len)
        start += q_len
        if q_len == 0 or kv_len == 0:
            continue
        qs = case.q[rows].to(compute_dtype).transpose(0, 1)  # [H, q, D]
        ks = k.to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # [H, kv, D]
        vs = v.to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs * softmax_scale) @ ks.transpose(1, 2)  # [H, q, kv]
        if causal:
            positions = torch.arange(kv_len - q_len, kv_len, device="cuda")
            hidden = torch.arange(kv_len, device="cuda")[None, :] > positions[:, None]
            scores = scores.masked_fill(hidden, -math.inf)
        # Rows that see no key (causal with kv_len < q_len) softmax to NaN; they are zero.
        visible = scores.amax(dim=-1, keepdim=True) > -math.inf
        # torch's half-precision softmax computes in float32 and rounds its output.
        softmax_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        probs = torch.softmax(scores.to(softmax_dtype), dim=-1).to(compute_dtype)
        probs = probs.masked_fill(~visible, 0)
        out[rows] = (probs @ vs).transpose(0, 1).double()
        row_lse = torch.logsumexp(scores.double(), dim=-1)
        lse[rows] = row_lse.transpose(0, 1)
    return out, lse


def max_error(actual, expected):
    """Max |actual - expected|, with NaN anywhere (or a wrong -inf) counted as infinite."""
    actual = actual.double()
    both_neg_inf = (actual == -math.inf) & (expected == -math.inf)
    diff = (actual - expected).abs().masked_fill(both_neg_inf, 0)
    diff = diff.nan_to_num(nan=math.inf)
    return diff.max().item() if diff.numel() else 0.0


def assert_matches_reference(case: PagedCase, out, lse, causal, softmax_scale=None):
    """FlashAttention-2's rule against the float64 reference, baseline in the kernel's dtype."""
    assert not torch.isnan(out).any(), "output has NaN (an element never written, or a NaN)"
    ref_out, ref_lse = reference_attention(case, causal, softmax_scale)
    base_out, base_lse = reference_attention(case, causal, softmax_scale, case.q.dtype)
    out_error = max_error(out, ref_out)
    out_bound = 2 * max_error(base_out, ref_out) + ABSOLUTE_FLOOR
    assert out_error <= out_bound, f"output error {out_error:.3g} > bound {out_bound:.3g}"
    if lse is not None:
        assert not torch.isnan(lse).any(), "lse has NaN (an element never written, or a NaN)"
        assert torch.equal(lse == -math.inf, ref_lse == -math.inf), "lse -inf rows differ"
        lse_error = max_error(lse, ref_lse)
        lse_bound = 2 * max_error(base_lse, ref_lse) + ABSOLUTE_FLOOR
        assert lse_error <= lse_bound, f"lse error {lse_error:.3g} > bound {lse_bound:.3g}"
