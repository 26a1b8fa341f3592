"""End-to-end GPU benchmark: a Llama-7B-shape model (or openPangu-Embedded-7B, --shape) with
random bf16 weights, ftengine's CUDA backend against transformers (eager and sdpa attention) in
the same process on the same card.

Reports batch-1 decode tokens/s against the memory-bandwidth bound (weight bytes over the
measured device-to-device copy rate), batch 16 and 64 decode, and 2K-token prefill latency
(best of three; on Hopper also with the sm80 attention member forced, beside the Hopper one).
Writes bench_gpu_e2e.json under --out.

    python scripts/bench_gpu_e2e.py --size full --out OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ftengine import _C
from ftengine.config import ModelConfig
from tqdm import tqdm

# Model shapes: Llama-2-7B, and openPangu-Embedded-7B (its published config: GQA 32/8, bias on
# q/k/v/o, 153k vocabulary, rope_theta 1.6e7, 34 layers).
OPENPANGU_7B = dict(architecture="PanguEmbeddedForCausalLM", vocab_size=153376, hidden_size=4096,
                    intermediate_size=12800, num_layers=34, num_heads=32, num_kv_heads=8,
                    head_dim=128, max_position_embeddings=32768, norm_eps=1e-5,
                    rope_theta=16000000.0, attention_bias=True)
LLAMA_7B = dict(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=4096,
                intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                head_dim=128, max_position_embeddings=4096, norm_eps=1e-5)


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - start)


def build_runtime(config: ModelConfig, batch: int, kv_tokens: int, max_step_tokens: int = 2048,
                  **options):
    """A Runtime holding random bf16 weights (std 0.02; norms 1), made on the GPU by torch and
    handed over as host arrays, as a loader would. `options` go to the Runtime."""
    native = config.native_dict("bfloat16")
    runtime = _C.Runtime(native, num_threads=0, kv_cache_tokens=kv_tokens,
                         block_size=128, max_step_tokens=max(max_step_tokens, batch),
                         max_sequences=batch, device="cuda", **options)
    generator = torch.Generator(device="cuda").manual_seed(0)
    specs = _C.expected_weights(native)
    for name, shape, *_ in tqdm(specs, desc=f"random {config.architecture} weights",
                                unit="tensor", file=sys.stderr):
        if len(shape) == 1:
            # Norm weights 1, biases 0: a stable residual stream whatever the random matrices.
            vector = np.zeros if name.endswith("bias") else np.ones
            runtime.add_weight(name, vector(shape, dtype=np.float32), "float32")
            continue
        weight = torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)
        weight *= 0.02
        runtime.add_weight(name, weight.view(torch.int16).cpu().numpy().view(np.uint16),
                           "bfloat16")
        del weight
    runtime.build()
    return runtime


def run_requests(runtime, batch, prompt_len, new_tokens):
    """Prefill `batch` prompts, decode `new_tokens` each; (prefill seconds, decode seconds)."""
    rng = np.random.default_rng(0)
    for _ in range(batch):
        prompt = rng.integers(3, 32000, prompt_len).tolist()
        runtime.add_request(prompt, 0.0, 0, 1.0, 1.0, 0, new_tokens, [])
    torch.cuda.synchronize()
    start = time.perf_counter()
    produced = 0
    while produced < batch:  # prefill steps until every sequence has its first token
        produced += len(runtime.step())
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    while runtime.has_unfinished():
        runtime.step()
    return prefill, time.perf_counter() - start


def profile_decode(runtime, batch, out: Path):
    """Where a decode step's GPU time goes: kernels of 32 batch-`batch` decode steps under
    torch's profiler (CUPTI sees every kernel of the process, graph replays included)."""
    from torch.profiler import ProfilerActivity, profile
    rng = np.random.default_rng(1)
    for _ in range(batch):
        runtime.add_request(rng.integers(3, 32000, 128).tolist(), 0.0, 0, 1.0, 1.0, 0, 40, [])
    for _ in range(8):  # prefill and the first decode steps (recordings) stay outside
        runtime.step()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(32):
            runtime.step()
        torch.cuda.synchronize()
    while runtime.has_unfinished():
        runtime.step()
    rows = []
    for event in trace.key_averages():
        total = event.device_time_total if hasattr(event, "device_time_total") else 0
        if total > 0:
            rows.append({"kernel": event.key[:90], "calls": event.count, "total_us": total})
    rows.sort(key=lambda r: -r["total_us"])
    step_us = sum(r["total_us"] for r in rows) / 32
    print(f"decode batch {batch}: {step_us:.0f} us of kernels per step")
    for r in rows[:15]:
        print(f"  {r['total_us'] / 32:8.1f} us/step  {r['calls'] // 32:4} calls  {r['kernel']}")
    (out / f"profile_decode_batch{batch}.json").write_text(json.dumps(rows, indent=1))


def prefill_ms(runtime, prefill_len, repeats=3):
    """The best of `repeats` single-prompt prefills, in ms."""
    return min(run_requests(runtime, 1, prefill_len, 1)[0] for _ in range(repeats)) * 1e3


def prefill_ms_with_member(config, member, prefill_len):
    """2K prefill with one attention member forced (decode steps take it too; not timed)."""
    runtime = build_runtime(config, 1, prefill_len + 128, attention_kernel=member)
    run_requests(runtime, 1, 16, 4)
    result = prefill_ms(runtime, prefill_len)
    del runtime
    gc.collect()
    return result


def ftengine_numbers(config, cases, prefill_len, profile_out=None):
    results = {}
    max_batch = max(b for b, _, _ in cases)
    # Each request reserves its prompt and new tokens at admission, rounded up to 128-slot blocks.
    kv_tokens = max(max(b * 128 * -(-(p + n) // 128) for b, p, n in cases), prefill_len + 128)
    runtime = build_runtime(config, max_batch, kv_tokens)
    run_requests(runtime, 1, 16, 4)  # warm-up: plans, workspaces, graphs
    results["prefill_2k_ms"] = prefill_ms(runtime, prefill_len)
    for batch, prompt_len, new_tokens in cases:
        prefill, decode = run_requests(runtime, batch, prompt_len, new_tokens)
        results[f"batch{batch}"] = {
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode,
            "total_tokens_per_s": batch * new_tokens / (prefill + decode),
            "prefill_ms": prefill * 1e3,
        }
        print(f"ftengine batch {batch:3}: decode {batch * (new_tokens - 1) / decode:8.1f} tok/s, "
              f"end to end {batch * new_tokens / (prefill + decode):8.1f} tok/s", flush=True)
    if profile_out is not None:
        profile_decode(runtime, 1, profile_out)
    del runtime
    gc.collect()
    if _C.cuda_device_capability() == 90:
        # auto takes the Hopper member there; the sm80 member's prefill beside it.
        results["prefill_2k_ms_sm80"] = prefill_ms_with_member(config, "prefill_sm80",
                                                               prefill_len)
        print(f"2K prefill: {results['prefill_2k_ms']:.1f} ms (auto: prefill_sm90), "
              f"{results['prefill_2k_ms_sm80']:.1f} ms with prefill_sm80", flush=True)
    return results


def transformers_numbers(config, cases, prefill_len, attention):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                            intermediate_size=config.intermediate_size,
                            num_hidden_layers=config.num_layers,
                            num_attention_heads=config.num_heads,
                            num_key_value_heads=config.num_kv_heads,
                            max_position_embeddings=config.max_position_embeddings,
                            attn_implementation=attention)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()
    results = {}
    with torch.no_grad():
        ids = torch.randint(3, 32000, (1, prefill_len), device="cuda")
        model(ids)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        results["prefill_2k_ms"] = (time.perf_counter() - start) * 1e3
        for batch, prompt_len, new_tokens in cases:
            ids = torch.randint(3, 32000, (batch, prompt_len), device="cuda")
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=0)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            rate = batch * new_tokens / (time.perf_counter() - start)
            results[f"batch{batch}"] = {"total_tokens_per_s": rate}
            print(f"transformers {attention:5} batch {batch:3}: end to end {rate:8.1f} tok/s",
                  flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["quick", "full"], default="full",
                        help="quick: 4 layers and short runs; full: the whole model")
    parser.add_argument("--out", default="bench_results", help="folder for the JSON")
    parser.add_argument("--profile", action="store_true",
                        help="also print where batch-1 decode time goes, kernel by kernel")
    parser.add_argument("--skip-peers", action="store_true",
                        help="measure ftengine only (no transformers runs)")
    parser.add_argument("--shape", choices=["llama-7b", "openpangu-7b"], default="llama-7b",
                        help="model shape with random bf16 weights (openpangu-7b: no peers)")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and _C.has_cuda):
        print("needs a GPU and a CUDA build of ftengine", file=sys.stderr)
        return 1
    quick = args.size == "quick"
    shape = {"llama-7b": LLAMA_7B, "openpangu-7b": OPENPANGU_7B}[args.shape]
    config = ModelConfig(**{**shape, **({"num_layers": 4} if quick else {})})
    # transformers has no openPangu-Embedded class of its own: that shape runs without peers.
    peers = not args.skip_peers and args.shape == "llama-7b"
    cases = [(1, 128, 32), (16, 128, 32)] if quick else [(1, 128, 128), (16, 128, 128),
                                                         (64, 128, 128)]
    weight_bytes = 2 * config.parameter_count()
    bandwidth = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "shape": args.shape,
              "layers": config.num_layers, "weight_gb": weight_bytes / 1e9,
              "copy_bandwidth_tb_s": bandwidth / 1e12,
              "bound_tokens_per_s": bandwidth / weight_bytes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["ftengine"] = ftengine_numbers(config, cases, 2048, out if args.profile else None)
    ours = result["ftengine"]["batch1"]["decode_tokens_per_s"]
    result["batch1_fraction_of_bound"] = ours / result["bound_tokens_per_s"]
    print(f"{args.shape} batch-1 decode: {ours:.1f} tok/s = "
          f"{ours / result['bound_tokens_per_s']:.0%} of the bandwidth bound "
          f"({result['bound_tokens_per_s']:.0f} tok/s); 2K prefill "
          f"{result['ftengine']['prefill_2k_ms']:.1f} ms")
    if peers:
        for attention in ("eager", "sdpa"):
            result[f"transformers_{attention}"] = transformers_numbers(config, cases, 2048,
                                                                       attention)
        for batch, _, _ in cases:
            key = f"batch{batch}"
            for attention in ("eager", "sdpa"):
                peer = result[f"transformers_{attention}"][key]["total_tokens_per_s"]
                result["ftengine"][key][f"vs_transformers_{attention}"] = (
                    result["ftengine"][key]["total_tokens_per_s"] / peer)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))
        for batch, _, _ in cases:
            f = result["ftengine"][f"batch{batch}"]
            print(f"batch {batch}: {f['total_tokens_per_s']:.1f} tok/s end to end, "
                  f"{f['vs_transformers_eager']:.2f}x eager, {f['vs_transformers_sdpa']:.2f}x sdpa")
        print(f"2K prefill: ftengine {result['ftengine']['prefill_2k_ms']:.1f} ms, transformers "
              f"sdpa {result['transformers_sdpa']['prefill_2k_ms']:.1f} ms")
    suffix = "" if args.shape == "llama-7b" else f"_{args.shape}"
    (out / f"bench_gpu_e2e{suffix}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
