"""Run under `mpirun -np N`: loads a model with tp=N and writes, from rank 0, its logits and
greedy continuation to a .npz file, for tests/test_tensor_parallel.py to compare with tp=1.

    mpirun -np 2 python tests/mpi_tp_check.py MODEL_DIR OUT.npz [--tile-tokens T] [--die-after K]
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np

from ftengine import Engine, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tile-tokens", type=int, default=0)
    parser.add_argument("--die-after", type=int, default=-1,
                        help="rank 1 kills itself after this many streamed tokens")
    parser.add_argument("--prompt-tokens", type=int, default=150)
    args = parser.parse_args()
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    engine = Engine.from_pretrained(args.model, tp=size, progress=False, num_threads=1,
                                    allreduce_tile_tokens=args.tile_tokens, max_batch_tokens=512)
    ids = [3 + (7 * i) % 250 for i in range(args.prompt_tokens)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    if args.die_after >= 0:
        for count, _event in enumerate(engine.stream([ids], params)):
            if engine.rank == 1 and count == args.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
        return
    logits = engine.logits(ids)
    tokens = engine.generate([ids], params)[0].token_ids
    if engine.rank == 0:
        np.savez(args.out, logits=logits, tokens=np.array(tokens))


if __name__ == "__main__":
    main()
