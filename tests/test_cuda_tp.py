"""Tensor parallelism on GPUs: the NCCL communicator (issue #4). Run by scripts/gpu_run.sh.

NCCL runs one rank per GPU, so on one GPU NCCL runs one rank, and that is what most of these
tests do: the communicator's collectives on device tensors of each dtype, in the order of the
stream they are attached to; and whole models with tp=1 whose row-parallel products are tiled
through a one-rank NCCL communicator (every tile's sum started on NCCL's stream, waited for on
the compute stream, inside recorded CUDA graphs too), against the same engine without NCCL.
mpirun -np 2 on one GPU shows that ranks placed on a missing or a shared GPU fail on every rank.
With two GPUs or more, mpirun -np 2 must give the greedy tokens of tp=1.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from ftengine import _C, Engine, SamplingParams, distributed
from model_fixtures import make_tiny_llama
from mpi_launch import TESTS, check_ok, expect_error_on_every_rank, find_mpirun, mpi_command, run

try:
    from ftengine import _nccl
except ImportError:
    _nccl = None

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (_C.has_cuda and torch.cuda.is_available()),
                       reason="needs a GPU and a CUDA build of ftengine"),
    pytest.mark.skipif(_nccl is None,
                       reason="this build of ftengine has no NCCL communicator (FTENGINE_NCCL)"),
]

WORKER = TESTS / "mpi_tp_check.py"
TIMEOUT = 300  # seconds for an mpirun job on GPUs: CUDA and NCCL start-up per engine
PROMPT_TOKENS = 200  # > 2 * 64: the automatic tile measures whether tiling pays
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Head sizes the CUDA attention kernels serve; both split over 2 ranks (mqa_tied_bias replicates
# its one KV head, and adds the o_proj / down_proj biases once after the sums).
VARIANTS = {
    "gqa_hd64": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64),
    "mqa_tied_bias": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
                          attention_bias=True, mlp_bias=True),
}
PROMPTS = [list(range(3, 8)), list(range(3, 40)) + list(range(100, 300, 3)), list(range(50, 111))]
# GPU clock cycles torch.cuda._sleep holds a stream back (tens of milliseconds): long enough
# that work not ordered after it would visibly run first.
SLEEP_CYCLES = 100_000_000


def mpi_reason() -> str | None:
    """Why the mpirun tests cannot run here, or None."""
    if find_mpirun() is None:
        return "no mpirun on this machine"
    try:
        import mpi4py  # noqa: F401
        from ftengine import _mpi  # noqa: F401
    except ImportError as missing:
        return f"tensor parallelism needs mpi4py and ftengine's _mpi module: {missing}"
    return None


needs_mpi = pytest.mark.skipif(mpi_reason() is not None, reason=str(mpi_reason()))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """model_dir(variant) -> directory of that tiny bfloat16 model, written once per module."""
    cache = {}

    def make(variant: str):
        if variant not in cache:
            directory = tmp_path_factory.mktemp(f"tp-{variant}")
            make_tiny_llama(directory, "gqa", dtype=torch.bfloat16, initializer_range=0.1,
                            **VARIANTS[variant])
            cache[variant] = directory
        return cache[variant]

    return make


def one_rank_nccl():
    """A one-rank NCCL communicator on the current GPU (no MPI: the id stays in-process)."""
    return _nccl.make_communicator(_nccl.unique_id(), 0, 1, torch.cuda.current_device(),
                                   _C.single_rank_communicator())


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_collectives_on_device_tensors(dtype):
    """One rank's results (a sum is the identity, a gather a copy), in stream order: the
    producer of each input is held back by a sleep, so a collective that did not wait for it,
    or a consumer that did not wait for the collective, would read stale values."""
    communicator = one_rank_nccl()
    communicator.use_stream(torch.cuda.current_stream().cuda_stream)
    torch.manual_seed(0)
    values = torch.randn(4099, device="cuda").to(DTYPES[dtype])
    data, out = torch.zeros_like(values), torch.zeros_like(values)

    torch.cuda._sleep(SLEEP_CYCLES)
    data.copy_(values)
    communicator.allgather(data.data_ptr(), data.numel(), dtype, out.data_ptr())
    gathered = out.clone()

    torch.cuda._sleep(SLEEP_CYCLES)
    data.mul_(2)
    communicator.allreduce_sum(data.data_ptr(), data.numel(), dtype)
    summed = data.clone()

    # The tiled form: sums of consecutive tiles started one after another, then one wait.
    torch.cuda._sleep(SLEEP_CYCLES)
    data.add_(1)
    for tile in data.split(1000):
        communicator.start_allreduce_sum(tile.data_ptr(), tile.numel(), dtype)
    communicator.wait_all()
    tiled = data.clone()

    torch.cuda.synchronize()
    assert torch.equal(gathered, values)
    assert torch.equal(summed, values * 2)
    assert torch.equal(tiled, values * 2 + 1)
    assert communicator.allreduce_sum_host([1.0, 2.5]) == [1.0, 2.5]


def test_communicator_arguments_are_checked():
    unique_id = _nccl.unique_id()
    single = _C.single_rank_communicator()
    with pytest.raises(ValueError, match="unique id has"):
        _nccl.make_communicator(unique_id[:-1], 0, 1, 0, single)
    with pytest.raises(ValueError, match="rank 1 of 1"):
        _nccl.make_communicator(unique_id, 1, 1, 0, single)
    with pytest.raises(ValueError, match="host communicator must span the same ranks"):
        _nccl.make_communicator(unique_id, 0, 2, 0, single)


def nccl_engine(monkeypatch, directory, **settings):
    """A tp=1 engine whose collectives go through a one-rank NCCL communicator. For tp=1
    Engine.from_pretrained makes no communicator: distributed.world hands it this one."""
    communicator = one_rank_nccl()
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "world", lambda tp: (None, communicator))
        return Engine.from_pretrained(directory, progress=False, kv_cache_tokens=4096,
                                      **settings)


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("tile", [1, 16])
def test_tiled_allreduce_through_nccl_matches_engine_without(monkeypatch, model_dir, tile,
                                                             cuda_graphs):
    """A forced tile splits every step (tile 1: decode steps of several sequences too, so the
    recorded graphs hold the NCCL calls). Each one-rank sum is an identity, so the results equal
    the same tiling without a communicator bit for bit, and the untiled engine within rounding
    (cuBLASLt may pick another algorithm for a tile's shape)."""
    directory = model_dir("gqa_hd64")
    settings = dict(device="cuda", allreduce_tile_tokens=tile, cuda_graphs=cuda_graphs)
    through_nccl = nccl_engine(monkeypatch, directory, **settings)
    without = Engine.from_pretrained(directory, progress=False, kv_cache_tokens=4096, **settings)
    untiled = Engine.from_pretrained(directory, device="cuda", progress=False,
                                     kv_cache_tokens=4096)
    ours = through_nccl.logits(PROMPTS[1])
    assert np.array_equal(ours, without.logits(PROMPTS[1]))
    reference = untiled.logits(PROMPTS[1])
    assert np.abs(ours - reference).max() <= 2e-2 * np.abs(reference).max()
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    expected = without.generate(PROMPTS, params)
    for got, want in zip(through_nccl.generate(PROMPTS, params), expected, strict=True):
        assert got.token_ids == want.token_ids


def test_nccl_communicator_on_the_cpu_backend_is_refused(monkeypatch, model_dir):
    with pytest.raises(ValueError, match="cannot sum .* memory.*NCCL on CUDA"):
        nccl_engine(monkeypatch, model_dir("gqa_hd64"), device="cpu")


@needs_mpi
def test_ranks_beyond_the_gpus_fail_on_every_rank(model_dir, tmp_path):
    """One rank more than the node has GPUs: the last has none of its own."""
    count = torch.cuda.device_count()
    ranks = count + 1
    result, elapsed = run(mpi_command(ranks, str(WORKER), str(model_dir("gqa_hd64")),
                                      str(tmp_path / "x.npz"), "--device", "cuda"),
                          timeout=TIMEOUT)
    expect_error_on_every_rank(result, elapsed, ranks, f"shows {count} GPU(s)",
                               timeout=TIMEOUT)


@needs_mpi
def test_ranks_sharing_a_gpu_fail_on_every_rank(model_dir, tmp_path):
    result, elapsed = run(mpi_command(2, str(WORKER), str(model_dir("gqa_hd64")),
                                      str(tmp_path / "x.npz"), "--device", "cuda:0"),
                          timeout=TIMEOUT)
    expect_error_on_every_rank(result, elapsed, 2, "ranks 0, 1 would share the GPU",
                               timeout=TIMEOUT)


# TILE:MAX_BATCH_TOKENS: automatic (tiling measured), untiled, 16-token tiles, and 16-token
# tiles of a prefill chunked into 64-token steps.
CONFIGS = "0:512,-1:512,16:512,16:64"


@needs_mpi
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"2 NCCL ranks need 2 GPUs (NCCL runs one rank per GPU); this "
                           f"machine has {torch.cuda.device_count()}")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_gpus_give_the_greedy_tokens_of_one(model_dir, variant, tmp_path):
    """tp=2 over NCCL against tp=1, both through the worker. The ranks sum bfloat16 partial
    products, which rounds otherwise than one GPU's float32 accumulation: logits agree within
    rounding, and greedy tokens agree up to the first choice whose margin (tp=1's best minus
    second-best logit) is within twice the largest logit difference seen. Recorded graphs and
    launching every kernel give the same tokens."""
    directory = str(model_dir(variant))
    common = ["--configs", CONFIGS, "--prompt-tokens", str(PROMPT_TOKENS), "--device", "cuda"]
    single, parallel, eager = (tmp_path / name for name in ("tp1.npz", "tp2.npz", "eager.npz"))
    result, _ = run([sys.executable, str(WORKER), directory, str(single), *common],
                    timeout=TIMEOUT)
    check_ok(result)
    result, _ = run(mpi_command(2, str(WORKER), directory, str(parallel), *common),
                    timeout=TIMEOUT)
    check_ok(result)
    result, _ = run(mpi_command(2, str(WORKER), directory, str(eager), *common,
                                "--cuda-graphs", "0"), timeout=TIMEOUT)
    check_ok(result)
    one, two, launched = np.load(single), np.load(parallel), np.load(eager)
    for index, config in enumerate(CONFIGS.split(",")):
        logits, reference = two[f"logits_{index}"], one[f"logits_{index}"]
        assert np.isfinite(logits).all(), config
        noise = np.abs(logits - reference).max()
        assert noise <= 2e-2 * np.abs(reference).max(), (config, noise)
        tokens, expected = two[f"tokens_{index}"], one[f"tokens_{index}"]
        margins = one[f"margins_{index}"]
        for step, (ours, theirs) in enumerate(zip(tokens, expected, strict=True)):
            if ours != theirs:
                assert margins[step] < 2 * noise, (config, step, margins[step], noise)
                break
        assert np.array_equal(launched[f"tokens_{index}"], tokens), config
