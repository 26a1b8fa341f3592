"""ftengine against llama.cpp (llama-cpp-python) on the CPU: the same model file, the same
weight precision, the same thread count.

The default model's Q4_1 GGUF is dequantised once into an F32 GGUF, so both engines read the
same float32 weights (ftengine dequantises everything it loads; llama.cpp would otherwise run its
quantised kernels, a different precision). Prefill is timed over a prompt of --prompt-tokens,
decode over --new-tokens greedy steps; medians of --repeats runs after a warm-up.

    pip install llama-cpp-python          # builds llama.cpp from source (minutes)
    python scripts/bench_llamacpp.py --out bench_results/llamacpp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_f32_gguf(source: Path, destination: Path) -> None:
    import gguf
    from gguf import quants
    from tqdm import tqdm

    reader = gguf.GGUFReader(source)
    architecture = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(destination, architecture)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in tqdm(reader.tensors, desc="writing F32 GGUF", file=sys.stderr, leave=False):
        values = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def bench_ftengine(path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int):
    from ftengine import Engine, SamplingParams

    engine = Engine.from_pretrained(path, dtype="float32", num_threads=threads, progress=False,
                                    kv_cache_tokens=4096)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    prefill, decode = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in engine.stream([prompt], params)]
        prefill.append(len(prompt) / (stamps[0] - start))
        decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def bench_llamacpp(path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=4096, n_batch=len(prompt), n_ubatch=len(prompt),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def greedy_next() -> int:  # logits of the last evaluated token
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    prefill, decode = [], []
    for _ in range(repeats + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = greedy_next()
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = greedy_next()
        end = time.perf_counter()
        prefill.append(len(prompt) / (first - start))
        decode.append((new_tokens - 1) / (end - first))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/llamacpp.json"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from ftengine.checkpoint import DEFAULT_MODEL, resolve_model

    prompt = [(7 * i + 3) % 4000 + 100 for i in range(args.prompt_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "smollm2-135m-instruct-f32.gguf"
        write_f32_gguf(resolve_model(DEFAULT_MODEL), f32)
        ours = bench_ftengine(f32, prompt, args.new_tokens, args.threads, args.repeats)
        peer = bench_llamacpp(f32, prompt, args.new_tokens, args.threads, args.repeats)
    results = {
        "model": "SmolLM2-135M-Instruct, float32 weights (F32 GGUF from the Q4_1 file)",
        "threads": args.threads, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "ftengine": {"prefill_tokens_per_s": ours[0], "decode_tokens_per_s": ours[1]},
        "llama.cpp": {"prefill_tokens_per_s": peer[0], "decode_tokens_per_s": peer[1]},
        "prefill_ratio": ours[0] / peer[0], "decode_ratio": ours[1] / peer[1],
    }
    print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name in ("ftengine", "llama.cpp"):
        r = results[name]
        print(f"{name:10} {r['prefill_tokens_per_s']:14.1f} {r['decode_tokens_per_s']:13.1f}")
    print(f"ratio      {results['prefill_ratio']:14.2f} {results['decode_ratio']:13.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
