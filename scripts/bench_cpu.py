"""CPU benchmark: ftengine against its peers in the same run, same thread count.

1. Decode and prefill of a SmolLM2-135M-shaped Llama (random weights, float32 and bfloat16
   storage) against transformers on torch: time to first token, decode tokens/s, and the GB/s
   of weight traffic decode achieves (every matrix is read once per step).
2. Attention kernels against torch's scaled_dot_product_attention (scripts/bench_cpu_attention.py).

    python scripts/bench_cpu.py --out bench_results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

# SmolLM2-135M's shape (config.json of HuggingFaceTB/SmolLM2-135M).
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0,
    eos_token_id=0,
)


def make_model(directory: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tokenizer_fixtures import write_llama_style_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    write_llama_style_tokenizer(directory, kind="byte_level_bpe")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    model.save_pretrained(directory)
    return model


def weight_bytes_per_step(model, bytes_per_weight: int) -> int:
    """Bytes of matrices one decode step reads (the embedding lookup reads one row, but the
    tied lm_head reads the whole table)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2) * bytes_per_weight


def bench_ftengine(directory: Path, dtype: str, threads: int, prompt: list[int], new_tokens: int,
                   repeats: int) -> dict:
    from ftengine import Engine, SamplingParams

    engine = Engine.from_pretrained(directory, dtype=dtype, num_threads=threads, progress=False,
                                    kv_cache_tokens=4096)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    first_token, decode_rate = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        times = []
        for _event in engine.stream([prompt], params):
            times.append(time.perf_counter())
        first_token.append(times[0] - start)
        decode_rate.append((len(times) - 1) / (times[-1] - times[0]))
    first_token, decode_rate = sorted(first_token[1:]), sorted(decode_rate[1:])
    return {"time_to_first_token_s": first_token[len(first_token) // 2],
            "decode_tokens_per_s": decode_rate[len(decode_rate) // 2]}


def bench_transformers(model, threads: int, prompt: list[int], new_tokens: int,
                       repeats: int) -> dict:
    torch.set_num_threads(threads)
    ids = torch.tensor([prompt])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(ids)
            prefill.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                           attention_mask=torch.ones_like(ids))
            total = time.perf_counter() - start
            decode.append((new_tokens - 1) / max(total - prefill[-1], 1e-9))
    prefill, decode = sorted(prefill[1:]), sorted(decode[1:])
    return {"time_to_first_token_s": prefill[len(prefill) // 2],
            "decode_tokens_per_s": decode[len(decode) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/cpu.json"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-attention", action="store_true")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"threads": args.threads, "model": "SmolLM2-135M shape, random weights",
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    prompt = [(7 * i + 3) % 400 + 10 for i in range(args.prompt_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model = make_model(directory)
        runs = [("ftengine float32", "float32", 4), ("ftengine bfloat16", "bfloat16", 2),
                ("transformers float32", None, 4)]
        for name, dtype, width in tqdm(runs, desc="decode benchmark", file=sys.stderr):
            if dtype is None:
                entry = bench_transformers(model, args.threads, prompt, args.new_tokens,
                                           args.repeats)
            else:
                entry = bench_ftengine(directory, dtype, args.threads, prompt, args.new_tokens,
                                       args.repeats)
            traffic = weight_bytes_per_step(model, width)
            entry["weight_GB_per_s"] = traffic * entry["decode_tokens_per_s"] / 1e9
            results[name] = entry
    peer = results["transformers float32"]
    for name in ("ftengine float32", "ftengine bfloat16"):
        results[name]["decode_speedup_vs_transformers"] = (
            results[name]["decode_tokens_per_s"] / peer["decode_tokens_per_s"])
        results[name]["prefill_speedup_vs_transformers"] = (
            peer["time_to_first_token_s"] / results[name]["time_to_first_token_s"])
    print(f"\n{'engine':24} {'TTFT ms':>9} {'decode tok/s':>13} {'weights GB/s':>13}")
    for name in ("ftengine float32", "ftengine bfloat16", "transformers float32"):
        r = results[name]
        print(f"{name:24} {r['time_to_first_token_s'] * 1e3:9.1f} "
              f"{r['decode_tokens_per_s']:13.1f} {r['weight_GB_per_s']:13.2f}")
    args.out.write_text(json.dumps(results, indent=2))
    if not args.skip_attention:
        attention_out = args.out.with_name(args.out.stem + "_attention.json")
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_cpu_attention.py")),
                        "--out", str(attention_out)], check=True)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
