"""Tensor parallelism over MPI: `mpirun -np 2` (and 4) against the single-process engine.

Every test launches mpirun as a subprocess with a timeout (tests/mpi_launch.py), so a hang fails
the test instead of stalling the suite. mpirun, mpi4py and ftengine's `_mpi` module are
required: when they are missing these tests fail (CI installs them), they are not skipped.

The workers are tests/mpi_tp_check.py (Engine API) and `python -m ftengine.generate` (CLI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ftengine import Engine
from model_fixtures import make_tiny_llama
from mpi_launch import (
    TESTS,
    TIMEOUT,
    check_ok,
    expect_error_on_every_rank,
    mpi_command,
    mpirun,
    run,
)

pytestmark = pytest.mark.mpi

WORKER = TESTS / "mpi_tp_check.py"
PROMPT_TOKENS = 200  # > 2 * 64: the automatic tile splits the prefill into several tiles
# TILE:MAX_BATCH_TOKENS: automatic, untiled, 32-token tiles, then the same with a prefill chunked
# into 64-token steps (automatic does not tile steps that small; 32 splits each in two).
CONFIGS = "0:512,-1:512,32:512,0:64,32:64"

# name -> (make_tiny_llama variant, overrides)
MODELS = {
    "gqa": ("gqa", {}),  # 8 heads, 2 KV heads: tp=4 replicates each KV head on 2 ranks
    "mqa_tied": ("mqa_tied", {}),  # 1 KV head (< tp, replicated), lm_head tied to the embedding
    "bias": ("bias", {}),  # attention and MLP biases: o_proj/down_proj biases added once
    "llama3_rope": ("llama3_rope", {}),
    "gqa_seed1": ("gqa", {"seed": 1}),  # same shapes as gqa, other weights
    "odd_vocab": ("gqa", {"vocab_size": 385}),  # tokenizer ids stay < 384
    "six_heads": ("gqa", {"hidden_size": 96, "num_attention_heads": 6,
                          "num_key_value_heads": 2, "head_dim": 16}),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """model_dir(name) -> directory of that tiny model, written once per module."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            variant, overrides = MODELS[name]
            directory = tmp_path_factory.mktemp(f"tp-{name}")
            make_tiny_llama(directory, variant, **overrides)
            cache[name] = directory
        return cache[name]

    return make


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """reference(name) -> (logits, tokens) of the single-process engine (tp=1)."""
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"ref-{name}") / "ref.npz"
            result, _ = run([sys.executable, str(WORKER), str(model_dir(name)), str(out),
                             "--configs", "0:512", "--prompt-tokens", str(PROMPT_TOKENS)])
            check_ok(result)
            data = np.load(out)
            cache[name] = (data["logits_0"], data["tokens_0"])
        return cache[name]

    return get


def _check_against_reference(out: Path, expected, configs: str) -> None:
    logits, tokens = expected
    data = np.load(out)
    results = [(data[f"logits_{i}"], data[f"tokens_{i}"]) for i in range(len(configs.split(",")))]
    for config, (got_logits, got_tokens) in zip(configs.split(","), results, strict=True):
        np.testing.assert_array_equal(got_tokens, tokens, err_msg=f"greedy tokens, {config}")
        np.testing.assert_allclose(got_logits, logits, rtol=1e-4, atol=1e-4,
                                   err_msg=f"logits, tile:max_batch_tokens {config}")
    # Tiled and untiled sum the same partial products: with the same steps (the same
    # max_batch_tokens) they agree far more tightly than with the single process.
    first_of_step = {}
    for config, (got_logits, _) in zip(configs.split(","), results, strict=True):
        step = config.split(":")[1]
        base_config, base = first_of_step.setdefault(step, (config, got_logits))
        np.testing.assert_allclose(got_logits, base, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{config} against {base_config}")


def test_mpi_is_available():
    """mpirun, mpi4py and the native MPI module must all be present (CI installs them)."""
    mpirun()
    import mpi4py  # noqa: F401
    from ftengine import _mpi  # noqa: F401


def test_forced_tile_on_one_rank_matches_untiled(model_dir):
    """A configured tile splits the row-parallel products on one rank too (where each tile's sum
    is an identity; the GPU tests run that path through a one-rank NCCL communicator)."""
    ids = [3 + (7 * i) % 250 for i in range(PROMPT_TOKENS)]
    tiled, untiled = (Engine.from_pretrained(model_dir("bias"), progress=False, num_threads=1,
                                             kv_cache_tokens=1024, allreduce_tile_tokens=tile)
                      for tile in (32, -1))
    np.testing.assert_allclose(tiled.logits(ids), untiled.logits(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gqa", "mqa_tied", "bias", "llama3_rope"])
def test_tp2_matches_single_process(name, model_dir, reference, tmp_path):
    out = tmp_path / "tp.npz"
    result, _ = run(mpi_command(2, str(WORKER), str(model_dir(name)), str(out), "--configs",
                                CONFIGS, "--prompt-tokens", str(PROMPT_TOKENS)))
    check_ok(result)
    _check_against_reference(out, reference(name), CONFIGS)


@pytest.mark.parametrize("name", ["gqa", "mqa_tied"])
def test_tp4_replicated_kv_heads_match_single_process(name, model_dir, reference, tmp_path):
    """gqa: 2 KV heads over 4 ranks; mqa_tied: 1 KV head over 4 ranks."""
    configs = "0:512,32:64"
    out = tmp_path / "tp.npz"
    result, _ = run(mpi_command(4, str(WORKER), str(model_dir(name)), str(out), "--configs",
                                configs, "--prompt-tokens", str(PROMPT_TOKENS)))
    check_ok(result)
    _check_against_reference(out, reference(name), configs)


def test_cli_prints_what_the_single_process_cli_prints(model_dir):
    args = ["-m", "ftengine.generate", "--model", str(model_dir("gqa")), "--prompt",
            "Once upon a time there was", "--max-new-tokens", "24", "--quiet"]
    single, _ = run([sys.executable, *args])
    check_ok(single)
    # No --output tag here: stdout must be byte for byte what one process prints.
    command = [mpirun(), "-np", "2", "--oversubscribe", "-x", "PYTHONPATH", sys.executable,
               *args, "--tp", "2"]
    parallel, _ = run(command)
    check_ok(parallel)
    assert single.stdout.strip(), "the single-process CLI printed nothing"
    assert parallel.stdout == single.stdout


@pytest.mark.parametrize(
    ("name", "ranks", "tp", "fragments"),
    [
        ("gqa", 3, 3, ("8 attention heads are not divisible by 3",)),
        ("six_heads", 4, 4, ("6 attention heads are not divisible by 4",)),
        ("odd_vocab", 2, 2, ("vocab_size 385 is not divisible by 2",)),
        ("gqa", 2, 4, ("tp=4", "mpirun -np 4")),
        ("gqa", 3, 2, ("tp=2", "mpirun -np 2")),
    ],
    ids=["heads_tp3", "six_heads_tp4", "vocab_tp2", "tp4_np2", "tp2_np3"],
)
def test_cli_bad_split_fails_on_every_rank(name, ranks, tp, fragments, model_dir):
    result, elapsed = run(mpi_command(
        ranks, "-m", "ftengine.generate", "--model", str(model_dir(name)), "--tp", str(tp),
        "--prompt", "hi", "--max-new-tokens", "2", "--quiet"))
    expect_error_on_every_rank(result, elapsed, ranks, *fragments)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (lambda dirs: ["--rank1-model", str(dirs("bias"))],
         ("ranks disagree on the model configuration",)),
        (lambda dirs: ["--rank1-model", "/nonexistent/ftengine-model"],
         ("rank 1 failed",)),
        (lambda dirs: ["--rank1-max-batch-tokens", "64"],
         ("ranks disagree on the engine settings",)),
    ],
    ids=["other_config", "missing_on_rank1", "max_batch_tokens"],
)
def test_ranks_that_disagree_fail_on_every_rank(extra, fragments, model_dir, tmp_path):
    result, elapsed = run(mpi_command(2, str(WORKER), str(model_dir("gqa")),
                                      str(tmp_path / "x.npz"), *extra(model_dir)))
    expect_error_on_every_rank(result, elapsed, 2, *fragments)


def test_ranks_with_same_shaped_different_models_fail(model_dir, tmp_path):
    """Same config, different weights: caught by the weights fingerprint."""
    result, elapsed = run(mpi_command(2, str(WORKER), str(model_dir("gqa")),
                                      str(tmp_path / "x.npz"), "--rank1-model",
                                      str(model_dir("gqa_seed1"))))
    expect_error_on_every_rank(result, elapsed, 2, "ranks disagree on the model weights")


def test_rank_failing_while_loading_weights_fails_every_rank(model_dir, tmp_path):
    """Rank 1 reads a NaN deep inside one tensor (past the fingerprinted first bytes), so it
    fails while streaming weights, after the agreement checks: rank 0 must learn of it instead
    of waiting in a collective of the model build."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dir("gqa"), broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][7, 9] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result, elapsed = run(mpi_command(2, str(WORKER), str(model_dir("gqa")),
                                      str(tmp_path / "x.npz"), "--rank1-model", str(broken)))
    expect_error_on_every_rank(result, elapsed, 2, "rank 1 failed")


def test_rank_killed_mid_generation_ends_the_job(model_dir, tmp_path):
    result, elapsed = run(mpi_command(2, str(WORKER), str(model_dir("gqa")),
                                      str(tmp_path / "x.npz"), "--die-after", "3"))
    assert result.returncode != 0, f"{result.stdout}\n{result.stderr}"
    assert elapsed < TIMEOUT


AGENT = """#!/bin/sh
# Stand-in for ssh: prterun runs `AGENT HOST COMMAND...`; the command runs here, with the
# host's own address for MPI's TCP transport.
echo "$1" >> {log}
case "$1" in
  127.0.0.12) export OMPI_MCA_btl_tcp_if_include=h0 ;;
  127.0.0.13) export OMPI_MCA_btl_tcp_if_include=h1 ;;
  *) echo "unexpected host $1" >&2; exit 1 ;;
esac
shift
exec sh -c "$*"
"""

NETWORK = """set -e
ip link set lo up
ip link add h0 type veth peer name h1
ip addr add 127.0.0.2/32 dev h0
ip addr add 127.0.0.3/32 dev h1
ip link set h0 up
ip link set h1 up
exec "$@"
"""


def test_multi_node_hostfile_launch_emulated(model_dir, reference, tmp_path):
    """A two-host hostfile launch, emulated on this machine.

    What is real: prterun reads a hostfile naming two hosts (127.0.0.12 and 127.0.0.13, one
    slot each), starts one prted daemon per host through its ssh launcher (plm_ssh_agent), the
    daemons connect back to prterun over TCP, and each starts one rank; the ranks see
    themselves on different nodes (OMPI_COMM_WORLD_LOCAL_SIZE=1, no shared memory) and talk
    over Open MPI's TCP transport, as ranks on two hosts would.

    What is emulated: the ssh agent is a shell script that runs the daemon's command locally
    (and gives each "host" its own interface for MPI traffic). Everything runs in a private
    network namespace (unshare -n) holding only lo and a veth pair h0/h1 with addresses
    127.0.0.2 and 127.0.0.3: PRRTE's daemons refuse the loopback interface for their
    out-of-band channel whenever another interface exists, so they need a non-loopback one,
    and inside the namespace no address outside 127.0.0.0/8 exists or can be reached.
    The host names are IP literals, so no name is ever resolved.

    coll/han (Open MPI's hierarchical collectives, chosen for multi-node jobs) is turned off:
    with one rank per emulated host it hangs in this setup (Open MPI 5.0.x).
    """
    for tool in ("unshare", "ip"):
        assert shutil.which(tool), f"{tool} not found (util-linux / iproute2)"
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    probe = subprocess.run([*unshare, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.strip()}")

    log = tmp_path / "agent.log"
    agent = tmp_path / "agent.sh"
    agent.write_text(AGENT.format(log=log))
    agent.chmod(0o755)
    network = tmp_path / "network.sh"
    network.write_text(NETWORK)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.12 slots=1\n127.0.0.13 slots=1\n")
    configs = "0:512,32:64"
    out = tmp_path / "tp.npz"
    command = [
        *unshare, "sh", str(network),
        mpirun(), "--hostfile", str(hostfile), "-np", "2", "--output", "tag",
        "--prtemca", "plm_ssh_agent", str(agent), "--prtemca", "plm_ssh_no_tree_spawn", "1",
        "--mca", "btl", "self,tcp", "--mca", "coll", "^han",
        "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "OMPI_ALLOW_RUN_AS_ROOT",
        "-x", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
        sys.executable, "-c",
        "import os, runpy, sys; "
        "assert os.environ['OMPI_COMM_WORLD_LOCAL_SIZE'] == '1', 'ranks share a node'; "
        f"sys.argv = {[str(WORKER), str(model_dir('gqa')), str(out), '--configs', configs, '--prompt-tokens', str(PROMPT_TOKENS)]!r}; "  # noqa: E501
        "runpy.run_path(sys.argv[0], run_name='__main__')",
    ]
    result, _ = run(command)
    check_ok(result)
    assert sorted(log.read_text().split()) == ["127.0.0.12", "127.0.0.13"], log.read_text()
    _check_against_reference(out, reference("gqa"), configs)


def test_cli_under_mpirun_without_tp_fails(model_dir, tmp_path):
    """Each rank stops before loading anything; the first to exit ends the job, so the other
    may be terminated before it prints."""
    result, elapsed = run(mpi_command(2, "-m", "ftengine.generate", "--model",
                                      str(model_dir("gqa")), "--prompt", "hi"))
    assert result.returncode != 0 and elapsed < TIMEOUT
    assert "error: launched as 2 processes but --tp is 1: pass --tp 2" in result.stderr
