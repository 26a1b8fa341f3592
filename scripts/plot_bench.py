"""Plots the CPU benchmark results (bench_results/*.json) as one PNG of speed ratios against
the peers, for the README.

    pip install matplotlib
    python scripts/plot_bench.py [--results bench_results] [--out docs/bench_cpu.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("bench_results"))
    parser.add_argument("--out", type=Path, default=Path("docs/bench_cpu.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attention = json.loads((args.results / "cpu_attention.json").read_text())["results"]
    llamacpp = json.loads((args.results / "llamacpp.json").read_text())
    model = json.loads((args.results / "cpu.json").read_text())

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for kind, kv_heads, marker in (("prefill", None, "o"), ("decode", 32, "s"),
                                   ("decode", 8, "^")):
        rows = [r for r in attention if r["kind"] == kind
                and (kv_heads is None or r["num_kv_heads"] == kv_heads)]
        label = f"{kind}" + (f", {32 // kv_heads}:1 GQA" if kv_heads and kv_heads < 32 else
                             ", MHA" if kv_heads else " (causal)")
        left.plot([r["kv_len"] for r in rows], [r["speedup"] for r in rows], marker=marker,
                  label=label)
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    left.set_xscale("log", base=2)
    left.set_xlabel("sequence / KV length")
    left.set_ylabel("speed vs torch SDPA (×)")
    left.set_title("CPU FastAttention vs torch SDPA, float32, head_dim 128")
    left.legend()

    bars = {
        "prefill vs llama.cpp": llamacpp["prefill_ratio"],
        "decode vs llama.cpp": llamacpp["decode_ratio"],
        "prefill vs transformers": model["ftengine float32"]["prefill_speedup_vs_transformers"],
        "decode vs transformers": model["ftengine float32"]["decode_speedup_vs_transformers"],
    }
    right.bar(list(bars), list(bars.values()), color=["C0", "C0", "C1", "C1"])
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set_ylabel("speed ratio (×)")
    right.set_title(f"SmolLM2-135M, float32, {llamacpp['threads']} threads")
    right.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
