"""CPU benchmark of tensor parallelism: 2 MPI ranks, prefill with the tiled (overlapped)
AllReduce after each row-parallel projection against one blocking AllReduce per projection,
in the same run, on the same loaded shards.

    python scripts/bench_tp_cpu.py --out bench_results/tp_cpu.json

launches itself as `mpirun -np 2 --oversubscribe python scripts/bench_tp_cpu.py ...` (1 thread
per rank); running it under mpirun directly works too. The model is a Llama with random weights
shaped so the matrix products dominate (written once to --model, default a temp directory).

Reported per tile setting (-1: blocking, 0: automatic, N: N-token tiles): median prefill time
on rank 0. T_comm is what the blocking AllReduces of one prefill cost on their own: mpi4py
MPI.Allreduce of the same sizes (one [tokens, hidden] float32 buffer after the embedding and
after every o_proj and down_proj), timed on the same two ranks. The fraction of communication
hidden by a tiled setting is (T_blocking - T_tiled) / T_comm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--model", default=None,
                        help="model directory (written if missing; default: a temp directory)")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens to prefill")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--tiles", default="-1,0,128,256",
                        help="allreduce_tile_tokens settings; -1 (blocking) must be one")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per setting")
    parser.add_argument("--ranks", type=int, default=2)
    return parser.parse_args(argv)


def model_dir(args) -> Path:
    if args.model:
        return Path(args.model)
    shape = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-a{args.heads}-kv{args.kv_heads}"
    return Path(tempfile.gettempdir()) / f"ftengine-bench-tp-{shape}"


def make_model(directory: Path, args) -> None:
    if (directory / "config.json").exists():
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from model_fixtures import make_tiny_llama

    directory.mkdir(parents=True, exist_ok=True)
    make_tiny_llama(directory, "gqa", hidden_size=args.hidden,
                    intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    head_dim=args.hidden // args.heads,
                    max_position_embeddings=max(4096, args.tokens + 64), initializer_range=0.02)


def launch(argv: list[str], args) -> int:
    """Outside mpirun: write the model, then run this script on `ranks` ranks."""
    directory = model_dir(args)
    make_model(directory, args)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    mpirun = Path(sys.executable).with_name("mpirun")
    command = [str(mpirun) if mpirun.exists() else "mpirun", "-np", str(args.ranks),
               "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
               sys.executable, __file__, *argv, "--model", str(directory)]
    return subprocess.call(command, env=env)


def time_allreduce(comm, tokens: int, hidden: int, count: int, repeats: int) -> float:
    """Seconds `count` blocking in-place Allreduces of [tokens, hidden] float32 take (median)."""
    import numpy as np
    from mpi4py import MPI

    buffer = np.ones((tokens, hidden), np.float32)
    samples = []
    for _ in range(repeats + 1):
        comm.Barrier()
        started = time.perf_counter()
        for _ in range(count):
            comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        samples.append(comm.allreduce(time.perf_counter() - started, op=MPI.MAX))
    return statistics.median(samples[1:])


def run_ranks(args) -> None:
    from ftengine import Engine, SamplingParams
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tiles = [int(t) for t in args.tiles.split(",")]
    assert -1 in tiles, "--tiles must include -1 (blocking), the baseline"
    directory = model_dir(args)
    if comm.rank == 0:  # under mpirun directly: the model may not be written yet
        make_model(directory, args)
    comm.Barrier()
    engines = {
        tile: Engine.from_pretrained(directory, tp=comm.size, num_threads=1, progress=False,
                                     allreduce_tile_tokens=tile, max_batch_tokens=args.tokens,
                                     kv_cache_tokens=args.tokens + 256, max_num_seqs=1)
        for tile in tiles
    }
    prompt = [3 + (7 * i) % 300 for i in range(args.tokens)]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)  # the prefill step alone
    samples: dict[int, list[float]] = {tile: [] for tile in tiles}
    for round_ in range(args.repeats + 1):  # round 0 warms up; settings interleave
        for tile in tiles:
            comm.Barrier()
            started = time.perf_counter()
            engines[tile].generate(prompt, params)
            elapsed = comm.allreduce(time.perf_counter() - started, op=MPI.MAX)
            if round_ > 0:
                samples[tile].append(elapsed)
    del engines
    collectives = 1 + 2 * args.layers  # embedding, then o_proj and down_proj of every layer
    t_comm = time_allreduce(comm, args.tokens, args.hidden, collectives, args.repeats)
    if comm.rank != 0:
        return
    blocking = statistics.median(samples[-1])
    rows = []
    for tile in tiles:
        median = statistics.median(samples[tile])
        row = dict(allreduce_tile_tokens=tile, prefill_s=median,
                   prefill_tokens_per_s=args.tokens / median, samples_s=samples[tile])
        if tile != -1:
            row["comm_hidden_fraction"] = (blocking - median) / t_comm
        rows.append(row)
    result = dict(
        ranks=comm.size, threads_per_rank=1, prompt_tokens=args.tokens,
        model=dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                   heads=args.heads, kv_heads=args.kv_heads),
        allreduces_per_prefill=collectives,
        allreduce_bytes_each=args.tokens * args.hidden * 4,
        t_comm_blocking_s=t_comm, settings=rows,
        note="t_comm: mpi4py Allreduce of the same buffers timed alone; hidden fraction = "
             "(T_blocking - T_tiled) / t_comm (noisy when t_comm is small next to prefill)",
    )
    print(f"prefill of {args.tokens} tokens, {comm.size} ranks x 1 thread, hidden {args.hidden}, "
          f"{args.layers} layers; blocking AllReduces alone: {t_comm * 1e3:.1f} ms "
          f"({collectives} x {args.tokens * args.hidden * 4 / 2**20:.1f} MiB)")
    print(f"{'tile':>8} {'prefill ms':>11} {'tok/s':>8} {'hidden':>8}")
    for row in rows:
        name = {-1: "blocking", 0: "auto"}.get(row["allreduce_tile_tokens"],
                                             str(row["allreduce_tile_tokens"]))
        hidden = row.get("comm_hidden_fraction")
        print(f"{name:>8} {row['prefill_s'] * 1e3:11.1f} {row['prefill_tokens_per_s']:8.1f} "
              f"{'' if hidden is None else f'{hidden * 100:7.0f}%':>8}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return launch(argv, args)
    run_ranks(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
