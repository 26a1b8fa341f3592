"""CPU attention: ftengine's FastAttention kernel against torch SDPA, float32, same thread count.

Prefill (causal, batch 1, Llama-7B heads) and decode (one query over a long KV cache, MHA and
GQA 32/8). Our kernel reads a paged cache [blocks, block_size, kv_heads, head_dim] with an
in-order block table; torch gets contiguous [1, heads, seq, head_dim] tensors, its best layout.
Medians of several runs after warm-up; prints a table and writes JSON.

    python scripts/bench_cpu_attention.py [--threads N] [--out bench_results/cpu_attention.json]
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from ftengine import _C

BLOCK_SIZE = 256
HEAD_DIM = 128


def median_seconds(fns, warmup, runs):
    """Median time of each function. Runs alternate between the peers so that load from other
    processes on a shared machine hits both alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, samples in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def make_inputs(q_len, kv_len, num_heads, num_kv_heads, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, num_heads, q_len, HEAD_DIM, generator=gen)
    k = torch.randn(1, num_kv_heads, kv_len, HEAD_DIM, generator=gen)
    v = torch.randn(1, num_kv_heads, kv_len, HEAD_DIM, generator=gen)

    num_blocks = -(-kv_len // BLOCK_SIZE)
    padded = num_blocks * BLOCK_SIZE

    def to_cache(x):
        cache = np.zeros((padded, num_kv_heads, HEAD_DIM), dtype=np.float32)
        cache[:kv_len] = x[0].transpose(0, 1).numpy()
        return cache.reshape(num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM)

    ours = dict(
        q=np.ascontiguousarray(q[0].transpose(0, 1).numpy()),
        k_cache=to_cache(k),
        v_cache=to_cache(v),
        block_table=np.arange(num_blocks, dtype=np.int32)[None, :],
        cu_seqlens_q=np.array([0, q_len], dtype=np.int32),
        seqlens_kv=np.array([kv_len], dtype=np.int32),
    )
    return (q, k, v), ours


def bench_config(kind, q_len, kv_len, num_heads, num_kv_heads, threads, warmup, runs, seed):
    (q, k, v), ours = make_inputs(q_len, kv_len, num_heads, num_kv_heads, seed)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    # Decode's single query is the last position, so causal masking changes nothing there;
    # torch's is_causal aligns the mask top-left, so it is only asked for square prefill.
    causal = kind == "prefill"
    gqa = num_heads != num_kv_heads

    def run_torch():
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa
        )

    def run_ours():
        return _C.attention_cpu(
            ours["q"],
            ours["k_cache"],
            ours["v_cache"],
            ours["block_table"],
            ours["cu_seqlens_q"],
            ours["seqlens_kv"],
            scale,
            True,
            threads,
        )

    with torch.no_grad():
        expected = run_torch()[0].transpose(0, 1).numpy()
        out, _ = run_ours()
        max_error = float(np.abs(out - expected).max())
        if not max_error < 1e-3:
            raise RuntimeError(f"{kind} S={q_len} KV={kv_len}: outputs differ by {max_error}")
        torch_s, ours_s = median_seconds([run_torch, run_ours], warmup, runs)

    # Causal prefill does half the work of the full S x S products.
    pairs = q_len * kv_len / 2 if causal else q_len * kv_len
    flops = 4 * pairs * HEAD_DIM * num_heads
    kv_bytes = 2 * kv_len * num_kv_heads * HEAD_DIM * 4
    return dict(
        kind=kind,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=HEAD_DIM,
        ours_ms=ours_s * 1e3,
        torch_ms=torch_s * 1e3,
        speedup=torch_s / ours_s,
        ours_gflops=flops / ours_s / 1e9,
        torch_gflops=flops / torch_s / 1e9,
        ours_kv_gbps=kv_bytes / ours_s / 1e9,
        torch_kv_gbps=kv_bytes / torch_s / 1e9,
        max_abs_diff=max_error,
    )


def configs(quick):
    prefill = [512, 1024, 2048, 4096, 8192]
    decode = [4096, 8192, 16384, 32768]
    if quick:
        prefill, decode = [512, 1024], [4096]
    for s in prefill:
        # 32 heads at S = 8192 take minutes on two cores; 8 heads keep the work per head equal.
        heads = 8 if s >= 8192 else 32
        yield "prefill", s, s, heads, heads
    for kv in decode:
        for num_kv_heads in (32, 8):
            yield "decode", 1, kv, 32, num_kv_heads


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="bench_results/cpu_attention.json")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few small configs only")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, float32, head_dim {HEAD_DIM}, "
        f"block_size {BLOCK_SIZE}; prefill is causal, batch 1; "
        "prefill S=8192 uses 8 heads (not 32) to bound the run time",
        flush=True,
    )

    header = (
        f"{'kind':8}{'S_q':>6}{'S_kv':>7}{'H':>4}{'KVH':>4}{'ours ms':>10}{'torch ms':>10}"
        f"{'speedup':>11}{'ours GF/s':>10}{'torch GF/s':>11}{'ours GB/s':>10}"
    )
    results = []
    rows = []
    for i, (kind, q_len, kv_len, heads, kv_heads) in enumerate(configs(args.quick)):
        print(
            f"[{i + 1}] {kind} S_q={q_len} S_kv={kv_len} H={heads} KVH={kv_heads} ...",
            end=" ",
            flush=True,
        )
        r = bench_config(
            kind, q_len, kv_len, heads, kv_heads, args.threads, args.warmup, args.runs, seed=i
        )
        print(
            f"ours {r['ours_ms']:.2f} ms, torch {r['torch_ms']:.2f} ms, "
            f"speedup {r['speedup']:.2f}x",
            flush=True,
        )
        results.append(r)
        rows.append(
            f"{kind:8}{q_len:>6}{kv_len:>7}{heads:>4}{kv_heads:>4}{r['ours_ms']:>10.2f}"
            f"{r['torch_ms']:>10.2f}{r['speedup']:>10.2f}x{r['ours_gflops']:>10.1f}"
            f"{r['torch_gflops']:>11.1f}{r['ours_kv_gbps']:>10.1f}"
        )
    print()
    print("speedup = torch time / our time (> 1 means ours is faster)")
    print(header)
    print("\n".join(rows))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                benchmark="cpu_attention",
                torch=torch.__version__,
                threads=args.threads,
                cpu=platform.processor() or platform.machine(),
                warmup=args.warmup,
                runs=args.runs,
                results=results,
            ),
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
