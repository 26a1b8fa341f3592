"""Generate text with a model on the command line.

    python -m ftengine.generate                                  # chat with SmolLM2-135M-Instruct
    python -m ftengine.generate --prompt "What is the capital of France?"
    python -m ftengine.generate --model PATH --prompt "Once upon a time" --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .checkpoint import DEFAULT_MODEL, KNOWN_MODELS
from .errors import FtengineError
from .sampling import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ftengine.generate",
        description="Generate text with an ftengine model. Text streams to stdout as it is "
        "produced; loading progress and timings go to stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model directory (config.json, *.safetensors, "
                        "tokenizer), a llama.cpp .gguf file, or a known model name: "
                        + ", ".join(f"{name} ({what})" for name, (_, _, what)
                                    in KNOWN_MODELS.items())
                        + f". Default: {DEFAULT_MODEL}, in chat mode")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text; repeat for a batch of prompts (generated together)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="use the model's chat template; without --prompt, start an "
                        "interactive multi-turn chat (default: on for the default model)")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1: all")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help=">1 discourages repeating tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop when this text appears (repeatable)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="print tokens as they are generated")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N (builds with the CUDA backend)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="CPU: storage of the weight matrices, float32 or bfloat16 (default: "
                        "as in the checkpoint); GPU: bfloat16 (default) or float16 for weights, "
                        "activations and KV cache")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="KV cache capacity in tokens, shared by all requests (default: "
                        "the model's context per request, within the memory budget)")
    parser.add_argument("--gpu-kv-budget", type=float, default=None, metavar="GIB",
                        help="GPU memory for the KV cache in GiB (default: what is free beside "
                        "the weights, less a reserve); a --kv-cache-tokens beyond it keeps the "
                        "rest in host memory, attended by the CPU and the GPU together")
    parser.add_argument("--host-tier-attention", choices=("auto", "cpu", "stream"),
                        default="auto",
                        help="where keys in host memory are attended: copied to the GPU "
                        "(stream), in place by the CPU (cpu), or both (auto: decode split in "
                        "the ratio of their speeds, prompt chunks streamed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default: all cores, divided among the "
                        "ranks of one host under mpirun)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel ranks; launch as mpirun -np N python -m "
                        "ftengine.generate --tp N ... (only rank 0 prints)")
    parser.add_argument("--allreduce-tile-tokens", type=int, default=0,
                        help="tokens per overlapped AllReduce tile with --tp (0: automatic, "
                        "-1: one AllReduce per projection)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or timings")
    return parser


def _print_stream(events, stream: bool, count: int) -> None:
    texts = [""] * count
    for event in events:
        texts[event.index] += event.text
        if stream and count == 1:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if stream and count == 1:
        sys.stdout.write("\n")
        return
    for index, text in enumerate(texts):
        if count > 1:
            print(f"--- [{index}]")
        print(text)


def _interactive_chat(engine, params: SamplingParams, system: str | None) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        reply = ""
        for event in engine.chat(messages, params, stream=True):
            reply += event.text
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


def _launch_rank() -> int:
    """This process's rank under mpirun (read from the launcher's environment, so ranks other
    than 0 are quiet from the start, before MPI is even initialised)."""
    for variable in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def _threads_per_rank() -> int | None:
    """Cores divided among the ranks mpirun placed on this host, so ranks do not fight over
    cores; None (every core) outside mpirun."""
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if local is None:
        return None
    return max(1, (os.cpu_count() or 1) // int(local))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .engine import Engine

    if args.chat is None:
        args.chat = args.model is None
    model = args.model or DEFAULT_MODEL
    rank = _launch_rank()
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
    if world > 1 and args.tp == 1:
        print(f"error: launched as {world} processes but --tp is 1: pass --tp {world}",
              file=sys.stderr)
        return 1
    if rank != 0:  # one voice: the other ranks compute in step but print nothing but errors
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        args.quiet = True

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=args.stop,
    )
    try:
        params.validate()
        started = time.perf_counter()
        engine = Engine.from_pretrained(model, device=args.device, dtype=args.dtype,
                                        num_threads=args.threads or _threads_per_rank(),
                                        progress=not args.quiet, tp=args.tp,
                                        allreduce_tile_tokens=args.allreduce_tile_tokens,
                                        kv_cache_tokens=args.kv_cache_tokens,
                                        gpu_kv_budget=args.gpu_kv_budget,
                                        host_tier_attention=args.host_tier_attention)
        if not args.quiet:
            print(f"loaded {model} in {time.perf_counter() - started:.1f} s "
                  f"({engine.dtype} weights)", file=sys.stderr)
        if args.chat and not args.prompt:
            if args.tp > 1:
                print("error: interactive chat runs on one process; give --prompt with --tp",
                      file=sys.stderr)
                return 2
            _interactive_chat(engine, params, args.system)
            return 0
        if not args.prompt:
            print("error: give --prompt (or --chat for an interactive chat)", file=sys.stderr)
            return 2
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            prompts = [engine.chat_prompt(system + [{"role": "user", "content": p}])
                       for p in args.prompt]
        else:
            prompts = args.prompt
        started = time.perf_counter()
        tokens = 0
        def counted(events):
            nonlocal tokens
            for event in events:
                tokens += event.token_id is not None
                yield event
        _print_stream(counted(engine.stream(prompts, params)), args.stream, len(prompts))
        elapsed = time.perf_counter() - started
        if not args.quiet:
            print(f"{tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s)",
                  file=sys.stderr)
    except FtengineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
