"""Fuzzes the GGUF reading path: mutated copies of a small valid GGUF file (bit flips, byte
runs, truncations, integer fields set to extremes) go through Engine.from_pretrained's checkpoint
opening and every tensor read. Any exception that is not an ftengine error, any crash, or a
case slower than --case-timeout fails the run.

The mutations are drawn through hypothesis (st.randoms), so a failure is shrunk to a small
mutation before it is reported and saved as fuzz_failure.gguf. The run is bounded in time: the
case rate of a short warm-up sets hypothesis's example count for --seconds.

    python scripts/fuzz_gguf.py --seconds 60
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

EXTREMES = [0, 1, 0x7F, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**62, 2**63 - 1, 2**64 - 1]


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "run", "truncate", "u32", "u64"])
        # Most of the interesting structure is in the header: bias positions towards it.
        limit = len(out) if rng.random() < 0.2 else min(len(out), 4096)
        if limit < 9:
            break
        position = rng.randrange(limit - 8)
        if kind == "flip":
            out[position] ^= 1 << rng.randrange(8)
        elif kind == "run":
            out[position:position + rng.randint(1, 16)] = bytes(
                rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "truncate":
            del out[rng.randrange(len(out)):]
        elif kind == "u32":
            out[position:position + 4] = struct.pack("<I", rng.choice(EXTREMES) & 0xFFFFFFFF)
        else:
            out[position:position + 8] = struct.pack("<Q", rng.choice(EXTREMES))
    return bytes(out)


def open_and_read(path: str) -> str:
    """Runs in a child process so a crash or a hang is caught, not inherited."""
    from ftengine.checkpoint import open_checkpoint
    from ftengine.errors import FtengineError

    try:
        checkpoint = open_checkpoint(path)
        for entry in checkpoint.entries.values():
            if entry.supported:
                entry.read()
    except FtengineError:
        return "rejected"
    return "accepted"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=30.0)
    parser.add_argument("--seed-file", type=Path, default=None,
                        help="valid GGUF to mutate (default: a tiny one written here)")
    args = parser.parse_args()
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    with tempfile.TemporaryDirectory() as tmp:
        seed_file = args.seed_file or make_seed_file(Path(tmp))
        original = seed_file.read_bytes()
        path = Path(tmp) / "case.gguf"
        counts = {"accepted": 0, "rejected": 0}
        context = multiprocessing.get_context("fork")
        with context.Pool(1, maxtasksperchild=200) as pool:

            def run_case(rng: random.Random) -> None:
                path.write_bytes(mutate(original, rng))
                try:
                    outcome = pool.apply_async(open_and_read, (str(path),)).get(args.case_timeout)
                except multiprocessing.TimeoutError:
                    raise AssertionError(f"no answer in {args.case_timeout} s") from None
                except Exception as error:  # noqa: BLE001 - any non-ftengine error is a finding
                    raise AssertionError(f"{type(error).__name__}: {error}") from None
                counts[outcome] += 1

            warmup = random.Random(args.seed)
            started = time.monotonic()
            for _ in range(20):
                run_case(warmup)
            rate = 20 / max(time.monotonic() - started, 1e-3)
            examples = max(20, int(rate * args.seconds))

            @seed(args.seed)
            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(st.randoms(use_true_random=False))
            def fuzz(rng: random.Random) -> None:
                run_case(rng)

            try:
                fuzz()
            except AssertionError as finding:
                (Path.cwd() / "fuzz_failure.gguf").write_bytes(path.read_bytes())
                print(f"finding (shrunk): {finding}; case saved as fuzz_failure.gguf",
                      file=sys.stderr)
                return 1
    cases = counts["accepted"] + counts["rejected"]
    print(f"{cases} cases: {counts['rejected']} rejected with a clear error, "
          f"{counts['accepted']} accepted; no crash")
    return 0


def make_seed_file(directory: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from gguf import GGMLQuantizationType as Q
    from gguf_fixtures import write_tiny_gguf
    from model_fixtures import make_tiny_llama

    model = make_tiny_llama(directory / "source", "gqa", "byte_level_bpe", hidden_size=64,
                            intermediate_size=96, num_hidden_layers=1)
    return write_tiny_gguf(directory / "seed.gguf", model, directory / "source", Q.Q8_0)


if __name__ == "__main__":
    sys.exit(main())
