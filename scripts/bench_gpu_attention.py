"""GPU attention benchmark: the FastAttention CUDA kernels against torch SDPA's flash
(FlashAttention-2), efficient (the xformers kernel) and cuDNN backends and a standard
materialised attention, in one process on one card. Prints ratios; writes JSON (and a PNG when
matplotlib is there) under --out.

Prefill: the sweep of shared/BASELINES.md (B*S = 16K tokens, 32 heads, head_dim 128, causal and
not, bf16 and fp16), and bf16 at head_dim 64. On a Hopper card the Hopper member (prefill_sm90:
wgmma, TMA) runs beside the sm80 member, against cuDNN (SDPA's fastest backend there). The fp16
rows also time the Turing (prefill_sm75) and Volta (prefill_sm70) members, with their ratio to
the efficient backend (the xformers kernel, the paper's Volta baseline: FastAttention 1.43x). On
this card they only show that the kernels run and how they compare here: their speed on a
Hopper says nothing about their speed on a T4 or a V100.
Decode: one query token per sequence over a paged cache, GB/s of K+V read.

    python scripts/bench_gpu_attention.py --size full --out OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from ftengine import _C
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# The Turing and Volta members run on later GPUs too; timed in the fp16 rows.
LOW_RESOURCE_MEMBERS = ("sm75", "sm70")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}


def median_ms(fn, warmup=3, repeat=10, graph=True):
    """Median of `repeat` timed runs (CUDA events) after `warmup` untimed ones. The call is
    recorded as a CUDA graph and replayed when it can be, so a microsecond kernel is timed
    without the host's launch path (Python, bindings) in front of it, for every contender."""
    for _ in range(warmup):
        fn()
    run = fn
    if graph:
        try:
            recording = torch.cuda.CUDAGraph()
            with torch.cuda.graph(recording):
                fn()
            run = recording.replay
            run()
        except RuntimeError:
            torch.cuda.synchronize()
            run = fn
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def paged(k, v, block_size):
    """[B, L, H, D] keys/values as a paged cache [blocks, block_size, H, D] and its table, the
    blocks of each sequence shuffled so no kernel can rely on contiguity."""
    b, length, h, d = k.shape
    per_seq = math.ceil(length / block_size)
    padded = per_seq * block_size
    def to_blocks(x):
        x = F.pad(x, (0, 0, 0, 0, 0, padded - length))
        return x.reshape(b * per_seq, block_size, h, d)
    order = torch.randperm(b * per_seq, device=k.device)
    k_cache = torch.empty_like(to_blocks(k))
    v_cache = torch.empty_like(k_cache)
    k_cache[order] = to_blocks(k)
    v_cache[order] = to_blocks(v)
    table = order.reshape(b, per_seq).to(torch.int32).contiguous()
    return k_cache, v_cache, table


def ftengine_attention(kernel, q, k_cache, v_cache, table, q_lens, kv_lens, causal, out, lse):
    """Runs our kernel on packed q [tokens, H, D] over the paged cache."""
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(torch.tensor(q_lens, device="cuda"), 0)
    seqlens = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    h, d = q.shape[1], q.shape[2]
    kvh = k_cache.shape[2]
    args = dict(
        dtype="bfloat16" if q.dtype == torch.bfloat16 else "float16",
        q=q.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(), k_cache=k_cache.data_ptr(),
        v_cache=v_cache.data_ptr(), block_table=table.data_ptr(), cu_seqlens_q=cu.data_ptr(),
        seqlens_kv=seqlens.data_ptr(), q_token_stride=h * d, q_head_stride=d,
        out_token_stride=h * d, out_head_stride=d, kv_block_stride=k_cache.stride(0),
        kv_token_stride=k_cache.stride(1), kv_head_stride=k_cache.stride(2),
        block_size=k_cache.shape[1], kv_num_blocks=k_cache.shape[0],
        block_table_stride=table.shape[1], batch=len(q_lens),
        max_seqlen_q=max(q_lens), max_seqlen_kv=max(kv_lens), num_heads=h, num_kv_heads=kvh,
        head_dim=d, softmax_scale=1 / math.sqrt(d), causal=causal)
    # The stream is read at each call: under graph capture it is the capturing stream.
    return lambda: _C.cuda_attention(kernel, **args,
                                     stream=torch.cuda.current_stream().cuda_stream)


def sdpa(q, k, v, **options):
    """A call of torch SDPA on these tensors, for timing under one backend."""
    return lambda: F.scaled_dot_product_attention(q, k, v, **options)


def standard_attention(q, k, v, causal):
    """Materialised attention: S = QKᵀ, mask, softmax, PV (what the paper's 10.7x is against)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        length = q.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def prefill_sweep(lengths, dtypes, heads=32, head_dim=128, tokens=16384):
    hopper = _C.cuda_device_capability() == 90
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for causal in (True, False):
            for s in lengths:
                b = max(1, tokens // s)
                q = torch.randn(b, s, heads, head_dim, device="cuda", dtype=dtype)
                k, v = torch.randn_like(q), torch.randn_like(q)
                flops = 4 * b * s * s * heads * head_dim / (2 if causal else 1)
                row = {"dtype": dtype_name, "causal": causal, "seq_len": s, "batch": b,
                       "head_dim": head_dim}
                k_cache, v_cache, table = paged(k, v, 128)
                out = torch.empty(b * s, heads, head_dim, device="cuda", dtype=dtype)
                lse = torch.empty(b * s, heads, device="cuda", dtype=torch.float32)
                run = ftengine_attention("prefill_sm80", q.reshape(b * s, heads, head_dim),
                                         k_cache, v_cache, table, [s] * b, [s] * b, causal,
                                         out, lse)
                row["ftengine_sm80"] = flops / median_ms(run) / 1e9
                if hopper:
                    run = ftengine_attention("prefill_sm90", q.reshape(b * s, heads, head_dim),
                                             k_cache, v_cache, table, [s] * b, [s] * b, causal,
                                             out, lse)
                    row["ftengine_sm90"] = flops / median_ms(run) / 1e9
                # fp16 only: Turing and Volta tensor cores have no bf16.
                for member in LOW_RESOURCE_MEMBERS if dtype == torch.float16 else ():
                    run = ftengine_attention(f"prefill_{member}", q.reshape(b * s, heads, head_dim),
                                             k_cache, v_cache, table, [s] * b, [s] * b, causal,
                                             out, lse)
                    row[f"ftengine_{member}"] = flops / median_ms(run) / 1e9
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                for name, backend in SDPA_BACKENDS.items():
                    try:
                        with sdpa_kernel(backend):
                            row[f"sdpa_{name}"] = flops / median_ms(
                                sdpa(qt, kt, vt, is_causal=causal)) / 1e9
                    except RuntimeError:
                        row[f"sdpa_{name}"] = None
                if s <= 4096:
                    row["standard"] = flops / median_ms(
                        functools.partial(standard_attention, qt, kt, vt, causal), 1, 3,
                        graph=False) / 1e9
                rows.append(row)
                ratio = row["ftengine_sm80"] / row["sdpa_flash"] if row.get("sdpa_flash") else 0
                print(f"prefill {dtype_name} d={head_dim} causal={causal!s:5} S={s:6}: ftengine "
                      f"sm80 {row['ftengine_sm80']:6.1f} TFLOP/s, "
                      f"flash {row.get('sdpa_flash') or 0:6.1f}, "
                      f"cudnn {row.get('sdpa_cudnn') or 0:6.1f} -> {ratio:.2f}x flash",
                      flush=True)
                if hopper:
                    cudnn = row.get("sdpa_cudnn") or 0
                    print(f"  sm90: {row['ftengine_sm90']:6.1f} TFLOP/s -> "
                          f"{row['ftengine_sm90'] / cudnn if cudnn else 0:.2f}x cudnn", flush=True)
                for member in LOW_RESOURCE_MEMBERS if dtype == torch.float16 else ():
                    speed = row[f"ftengine_{member}"]
                    efficient = row.get("sdpa_efficient") or 0
                    print(f"  {member}: {speed:6.1f} TFLOP/s, efficient (xformers) "
                          f"{efficient:6.1f} -> {speed / efficient if efficient else 0:.2f}x "
                          "(H100 speed, not a T4/V100 measurement)", flush=True)
                del q, k, v, k_cache, v_cache, out, lse
                torch.cuda.empty_cache()
    return rows


DECODE_POINTS = [(1, 4096, 8), (1, 4096, 32), (1, 32768, 8), (1, 32768, 32), (1, 131072, 8),
                 (1, 131072, 32), (8, 8192, 8), (32, 4096, 8), (64, 2048, 8)]


def decode_sweep(points, heads=32, head_dim=128, dtype=torch.bfloat16):
    rows = []
    for batch, length, kv_heads in points:
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
        k = torch.randn(batch, length, kv_heads, head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        kv_bytes = 2 * k.numel() * k.element_size()
        row = {"batch": batch, "kv_len": length, "kv_heads": kv_heads,
               "kv_megabytes": kv_bytes / 2**20}
        k_cache, v_cache, table = paged(k, v, 128)
        out = torch.empty_like(q)
        lse = torch.empty(batch, heads, device="cuda", dtype=torch.float32)
        run = ftengine_attention("decode_split_kv", q, k_cache, v_cache, table, [1] * batch,
                                 [length] * batch, True, out, lse)
        row["ftengine_split_kv"] = kv_bytes / median_ms(run) / 1e6
        qt = q.unsqueeze(2)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        for name, backend in SDPA_BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    row[f"sdpa_{name}"] = kv_bytes / median_ms(
                        sdpa(qt, kt, vt, enable_gqa=kv_heads != heads)) / 1e6
            except RuntimeError:
                row[f"sdpa_{name}"] = None
        best = max(x for x in (row.get(f"sdpa_{n}") for n in SDPA_BACKENDS) if x) or 1
        rows.append(row)
        print(f"decode B={batch:3} L={length:6} kvh={kv_heads:2}: ftengine "
              f"{row['ftengine_split_kv']:7.0f} GB/s, best SDPA {best:7.0f} GB/s -> "
              f"{row['ftengine_split_kv'] / best:.2f}x", flush=True)
        del q, k, v, k_cache, v_cache
        torch.cuda.empty_cache()
    return rows


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for causal, ax in zip((True, False), axes, strict=True):
        rows = [r for r in result["prefill"] if r["causal"] == causal and r["dtype"] == "bfloat16"
                and r["head_dim"] == 128]
        xs = [r["seq_len"] for r in rows]
        for key in ("ftengine_sm90", "ftengine_sm80", "sdpa_flash", "sdpa_efficient",
                    "sdpa_cudnn", "standard"):
            ys = [r.get(key) for r in rows]
            if any(ys):
                ax.plot(xs, [y or float("nan") for y in ys], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_title(f"prefill bf16 {'causal' if causal else 'non-causal'}, H=32, d=128")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.legend()
    fig.suptitle(result["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["quick", "full"], default="full",
                        help="quick: a few points to check the kernels run; full: the sweeps")
    parser.add_argument("--out", default="bench_results", help="folder for JSON and PNG")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and _C.has_cuda):
        print("needs a GPU and a CUDA build of ftengine", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    quick = args.size == "quick"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    lengths = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    result["prefill"] = prefill_sweep(lengths, ["bfloat16"] if quick else ["bfloat16", "float16"])
    result["prefill"] += prefill_sweep(lengths[-2:] if quick else lengths[1:], ["bfloat16"],
                                       heads=64, head_dim=64)
    result["decode"] = decode_sweep(DECODE_POINTS[:3] if quick else DECODE_POINTS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu_attention.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "bench_gpu_attention.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
