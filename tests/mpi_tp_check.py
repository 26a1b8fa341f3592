"""Run under `mpirun -np N`: loads a model with tp=N and writes, from rank 0, its logits and
greedy continuation to a .npz file, for tests/test_tensor_parallel.py (CPU) and
tests/test_cuda_tp.py (--device cuda) to compare with tp=1.

    mpirun -np 2 python tests/mpi_tp_check.py MODEL_DIR OUT.npz [--tile-tokens T] [--die-after K]
    mpirun -np 2 python tests/mpi_tp_check.py MODEL_DIR OUT.npz --configs 0:512,-1:512,32:64

--configs loads the model once per TILE:MAX_BATCH_TOKENS pair (in the same job) and stores
logits_<i> / tokens_<i> / margins_<i> for the i-th pair (margins: each greedy choice's best
minus second-best logit, from one pass over the prompt and continuation). --rank1-model /
--rank1-max-batch-tokens give rank 1 a different argument than the others, to test ranks that
disagree. An FtengineError prints `error: rank R: ...` on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np
from ftengine import Engine, SamplingParams
from ftengine.errors import FtengineError


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tile-tokens", type=int, default=0)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--configs", default=None,
                        help="comma-separated TILE:MAX_BATCH_TOKENS pairs, one engine each")
    parser.add_argument("--tp", type=int, default=None, help="default: the job's size")
    parser.add_argument("--rank1-model", default=None, help="rank 1 loads this model instead")
    parser.add_argument("--rank1-max-batch-tokens", type=int, default=None)
    parser.add_argument("--die-after", type=int, default=-1,
                        help="rank 1 kills itself after this many streamed tokens")
    parser.add_argument("--prompt-tokens", type=int, default=150)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    parser.add_argument("--cuda-graphs", type=int, default=1, help="0 launches every kernel")
    args = parser.parse_args()
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    tp = args.tp if args.tp is not None else size
    model = args.rank1_model if rank == 1 and args.rank1_model else args.model
    if args.configs:
        configs = [tuple(int(v) for v in pair.split(":")) for pair in args.configs.split(",")]
    else:
        configs = [(args.tile_tokens, args.max_batch_tokens)]
    ids = [3 + (7 * i) % 250 for i in range(args.prompt_tokens)]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    results = {}
    try:
        for index, (tile, max_batch_tokens) in enumerate(configs):
            if rank == 1 and args.rank1_max_batch_tokens is not None:
                max_batch_tokens = args.rank1_max_batch_tokens
            engine = Engine.from_pretrained(model, device=args.device, tp=tp, progress=False,
                                            num_threads=1, allreduce_tile_tokens=tile,
                                            max_batch_tokens=max_batch_tokens,
                                            kv_cache_tokens=1024,
                                            cuda_graphs=bool(args.cuda_graphs))
            if args.die_after >= 0:
                for count, _event in enumerate(engine.stream([ids], params)):
                    if engine.rank == 1 and count == args.die_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                return 0
            results[f"logits_{index}"] = engine.logits(ids)
            tokens = engine.generate([ids], params)[0].token_ids
            results[f"tokens_{index}"] = np.array(tokens)
            chosen = np.sort(engine.logits(ids + tokens[:-1])[len(ids) - 1:], axis=1)
            results[f"margins_{index}"] = chosen[:, -1] - chosen[:, -2]
            del engine
    except FtengineError as error:
        print(f"error: rank {rank}: {error}", file=sys.stderr, flush=True)
        return 1
    if not args.configs:  # the single-config names of the first version of this worker
        results["logits"], results["tokens"] = results["logits_0"], results["tokens_0"]
    if rank == 0:
        np.savez(args.out, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
