"""CPU-GPU cooperative attention benchmark: contexts larger than GPU memory on one GPU.

  routes   where host-tier keys are best attended, by queries per sequence: the CPU kernel,
           streaming the host blocks to the GPU, and auto's split of decode between the two
           (a 2-layer Llama-7B-width model): the measurement behind the automatic choice
  llama-7b Llama-7B shape (MHA 32 heads, bf16, random weights) at --context tokens (256K): time
           to first token of a real prefill, then decode tokens/s with the host tier, and where
           the time goes; beside decode at the largest context the GPU alone holds
  llama3-8b Llama-3-8B shape (GQA 32/8) decoding at 1M tokens of context; the cache is filled
           synthetically (a 1M-token prefill takes over ten minutes), decode reads it all

Writes bench_gpu_cooperative_<case>.json under --out.

    python scripts/bench_gpu_cooperative.py --case routes --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_gpu_e2e import LLAMA_7B, build_runtime
from ftengine.config import ModelConfig

LLAMA3_8B = dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                 head_dim=128, norm_eps=1e-5, rope_theta=500000.0)
GIB = 2**30


def kv_bytes_per_token(config: ModelConfig) -> int:
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2


def request(runtime, prompt_len, new_tokens, prefilled=0, seed=0):
    prompt = np.random.default_rng(seed).integers(3, 32000, prompt_len).tolist()
    runtime.add_request(prompt, 0.0, 0, 1.0, 1.0, 0, new_tokens, [], prefilled_tokens=prefilled)


def decode(runtime, prompt_len, new_tokens, prefilled):
    """(seconds to the first token, decode tokens/s, host-tier stats of the decode steps)."""
    request(runtime, prompt_len, new_tokens, prefilled)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while not runtime.step():
        pass
    first = time.perf_counter() - start
    before = runtime.host_tier_stats()
    start = time.perf_counter()
    steps = 0
    while runtime.has_unfinished():
        runtime.step()
        steps += 1
    seconds = time.perf_counter() - start
    after = runtime.host_tier_stats()
    stats = {key: (after[key] - before[key]) / max(steps, 1) for key in after}
    return first, steps / seconds, stats


def case_routes(args) -> dict:
    """Per-step time of one sequence with `queries` new tokens over 32K host-tier keys (16K on
    the GPU), for each route."""
    config = ModelConfig(**{**LLAMA_7B, "num_layers": 2, "max_position_embeddings": 65536})
    device_tokens, host_tokens = 16384, 32768
    results = {}
    routes = ("cpu", "stream", "auto")
    for route in routes:
        runtime = build_runtime(config, 1, device_tokens + host_tokens + 1024,
                                gpu_kv_tokens=device_tokens, host_tier_route=route)
        assert runtime.host_tier_tokens >= host_tokens
        for queries in (1, 2, 4, 8, 16, 64, 256):
            context = device_tokens + host_tokens
            times = []
            for repeat in range(3):
                request(runtime, context, 1, prefilled=context - queries, seed=repeat)
                torch.cuda.synchronize()
                start = time.perf_counter()
                while runtime.has_unfinished():
                    runtime.step()
                times.append(time.perf_counter() - start)
            results.setdefault(str(queries), {})[route] = min(times)
            print(f"{route:6} {queries:4} queries over {host_tokens} host keys: "
                  f"{min(times) * 1e3:8.2f} ms per step (2 layers)", flush=True)
        del runtime
        torch.cuda.empty_cache()
    for row in results.values():
        row["fastest"] = min(routes, key=lambda r: row[r])
    return {"device_tokens": device_tokens, "host_tokens": host_tokens, "layers": 2,
            "step_seconds": results}


def case_long(args, shape: dict, name: str) -> dict:
    config = ModelConfig(**{**shape, "max_position_embeddings": args.context + 1024})
    per_token = kv_bytes_per_token(config)
    gpu_tokens = int(args.gpu_kv_budget * GIB) // per_token
    result = {"shape": name, "context": args.context, "gpu_kv_budget_gib": args.gpu_kv_budget,
              "route": args.route,
              "gpu_kv_tokens": gpu_tokens, "kv_gib_total": args.context * per_token / GIB,
              "device": torch.cuda.get_device_name()}
    start = time.perf_counter()
    runtime = build_runtime(config, 1, args.context + 64, max_step_tokens=args.chunk,
                            gpu_kv_tokens=gpu_tokens, host_tier_route=args.route)
    result["host_tier_tokens"] = runtime.host_tier_tokens
    result["host_tier_gib"] = runtime.host_tier_tokens * per_token / GIB
    result["load_seconds"] = time.perf_counter() - start
    print(f"{name}: {args.context} tokens of context, {gpu_tokens} on the GPU, "
          f"{runtime.host_tier_tokens} in host memory ({result['host_tier_gib']:.1f} GiB)",
          flush=True)
    prompt_len = args.context - args.new_tokens
    prefilled = 0 if args.prefill else prompt_len - 1
    first, rate, stats = decode(runtime, prompt_len, args.new_tokens, prefilled)
    result["prefill"] = "real" if args.prefill else "synthetic (zero) KV, last token computed"
    result["time_to_first_token_s"] = first
    result["decode_tokens_per_s"] = rate
    result["decode_step_breakdown_s"] = {
        "total": 1 / rate,
        "cpu_attention_beside_the_gpu": stats["cpu_seconds"],
        "cpu_waiting_for_queries": stats["query_wait_seconds"],
        "streamed_gib": stats["streamed_bytes"] / GIB,
        "cpu_attended_gib": stats["cpu_bytes"] / GIB,
    }
    print(f"{name}: time to first token {first:.1f} s ({result['prefill']}); decode "
          f"{rate:.2f} tokens/s; per step: CPU attention {stats['cpu_seconds']:.3f} s, "
          f"waiting for queries {stats['query_wait_seconds']:.3f} s; host tier "
          f"{stats['streamed_bytes'] / GIB:.1f} GiB streamed, {stats['cpu_bytes'] / GIB:.1f} "
          f"GiB attended by the CPU", flush=True)
    # The GPU alone: the longest context its share holds, decoded without a host tier.
    alone = gpu_tokens - args.new_tokens - 128
    _, alone_rate, _ = decode(runtime, alone, args.new_tokens, alone - 1)
    result["gpu_only"] = {"context": alone, "decode_tokens_per_s": alone_rate}
    print(f"{name}: the GPU alone holds {gpu_tokens} tokens; decode at {alone}: "
          f"{alone_rate:.2f} tokens/s", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["routes", "llama-7b", "llama3-8b"], required=True)
    parser.add_argument("--context", type=int, default=None,
                        help="tokens of context (default: 262144 for llama-7b, 1048576 for "
                        "llama3-8b)")
    parser.add_argument("--gpu-kv-budget", type=float, default=52.0,
                        help="GiB of GPU memory for the KV cache")
    parser.add_argument("--chunk", type=int, default=16384, help="prefill tokens per step")
    parser.add_argument("--new-tokens", type=int, default=6, help="decode steps to time")
    parser.add_argument("--route", choices=["auto", "cpu", "stream"], default="auto",
                        help="where host-tier keys are attended")
    parser.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=None,
                        help="a real prefill (default for llama-7b) or a synthetic cache")
    parser.add_argument("--out", default="bench_results", help="folder for the JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU", file=sys.stderr)
        return 1
    if args.case == "routes":
        result = case_routes(args)
    else:
        seven = args.case == "llama-7b"
        args.context = args.context or (262144 if seven else 1048576)
        args.prefill = seven if args.prefill is None else args.prefill
        result = case_long(args, LLAMA_7B if seven else LLAMA3_8B, args.case)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.case == "routes" or args.route == "auto" else f"_{args.route}"
    path = out / f"bench_gpu_cooperative_{args.case}{suffix}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
